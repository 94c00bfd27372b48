"""Time to first token in vLLM for a stored prompt: kvmem's connector against recomputing the
prefill, and against vLLM's own ExampleConnector (safetensors files on local disk), in one run.

Three vLLM engines (the CPU build, .venv-vllm; SmolLM2-135M, float32), each with vLLM's own
prefix cache off, so a repeated prompt is either loaded through the connector or recomputed:
    recompute  no connector
    kvmem      kvmem's connector, a kvmem server process on 127.0.0.1 (LMDB on the real disk)
    example    vLLM's ExampleConnector, files under a temporary directory on the same disk
Every engine prefills in one step (max_num_batched_tokens = max_model_len: the
ExampleConnector cannot store a chunked prefill). Each prompt is stored by one request, then asked again ``repeats`` times with max_tokens=1 (the
request's time is its time to first token), the three engines taking turns. Reported: median
seconds and the ratio to recompute.

    python -m bench.vllm_ttft            # 2k and 8k prompts, 5 repeats
    python -m bench.vllm_ttft --quick    # one 1k prompt, 2 repeats (CI's smoke run)
"""
from __future__ import annotations

import contextlib
import time
from typing import Sequence

from bench.common import MODEL_CACHE, SMOLLM2_SPEC, disk_tempdir, environment, format_table, median, parse_args, run_server, write_result
from bench.vllm_engine import CPU_BLOCK_TOKENS, Engine, prompt_tokens, wait_stored
from kvstore.spec import ModelSpec

def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    sizes = [1000] if args.quick else [2000, 8000]
    repeats = args.repeats or (2 if args.quick else 5)
    model = MODEL_CACHE / "smollm2-135m-instruct"
    if not (model / "config.json").exists():
        from modelhost.models import prepare_model

        prepare_model(MODEL_CACHE, "smollm2-135m-instruct")
    max_len = 2048 if args.quick else 8192
    # one step per prefill: vLLM's ExampleConnector saves what one forward pass computed, so a
    # chunked prefill would leave it a partial file (and a shape error on load)
    common = ["--model", str(model), "--max-model-len", str(max_len), "--no-prefix-caching", "--max-num-batched-tokens", str(max_len)]
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(run_server("vllm", process=True))
        files = stack.enter_context(disk_tempdir("kvmem-bench-example-"))
        logs = stack.enter_context(disk_tempdir("kvmem-bench-vllm-logs-"))
        engines = {
            "recompute": Engine("recompute", common, logs),
            "kvmem": Engine("kvmem", common + ["--kvmem", server.address], logs),
            "example": Engine("example", common + ["--example-dir", str(files / "kv")], logs),
        }
        for engine in engines.values():
            stack.callback(engine.stop)
        started = time.perf_counter()
        for engine in engines.values():
            engine.wait_ready()
        startup_s = time.perf_counter() - started
        spec = None
        results = []
        for size in sizes:
            prompt = prompt_tokens(size, seed=size)
            aligned = ((size - 1) // CPU_BLOCK_TOKENS) * CPU_BLOCK_TOKENS
            for engine in engines.values():
                engine.generate(prompt, max_tokens=1)  # stores it (kvmem, example); warms the engine for this length
            if spec is None:
                spec = ModelSpec.from_dict(engines["kvmem"].ask(op="spec"))
            stored = wait_stored(server.address, spec, prompt, aligned, timeout=120.0)
            times: dict[str, list[float]] = {name: [] for name in engines}
            cached: dict[str, int] = {}
            for _ in range(repeats):
                for name, engine in engines.items():
                    answer = engine.generate(prompt, max_tokens=1)
                    times[name].append(answer["seconds"])
                    cached[name] = answer["cached"]
            base = median(times["recompute"])
            for name in engines:
                results.append({
                    "prompt_tokens": size, "engine": name, "ttft_s": median(times[name]), "runs_s": times[name],
                    "vs_recompute": median(times[name]) / base, "cached_tokens": cached[name],
                    "stored_in_kvmem": stored if name == "kvmem" else None,
                })
        rows = [[r["prompt_tokens"], r["engine"], r["ttft_s"], r["vs_recompute"], r["cached_tokens"]] for r in results]
        print(format_table(["prompt tokens", "engine", "TTFT s (median)", "x recompute", "cached tokens"], rows,
                           title=f"vLLM time to first token, stored prompt ({repeats} repeats each, engines take turns)"))
        payload = {"benchmark": "vllm_ttft", "quick": args.quick, "repeats": repeats, "engine_startup_s": startup_s,
                   "model": SMOLLM2_SPEC.name, "block_size": CPU_BLOCK_TOKENS, "results": results, "environment": environment()}
        print("wrote", write_result("vllm_ttft", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
