"""Restore an 8k-token SmolLM2 session into a DynamicCache vs prefilling those tokens (goal >= 20x).

Real model (SmolLM2-135M-Instruct via modelhost.models.load_model) and real English text (Debian's
licence texts under /usr/share/common-licenses, concatenated). 8000 tokens: SmolLM2's context is
8192. Side by side in one process:

    prefill              model(input_ids, use_cache=True) under inference_mode (the baseline)
    restore (cpu tier)   Client.restore(..., config=model.config) right after the save: gRPC stream
                         from the server's CPU tier plus building the DynamicCache
    restore (lmdb)       the same from a server with cpu_tier_bytes=0 (every block read from LMDB)

It also checks that the next-token logits computed on the restored cache equal, bit for bit, the
logits computed on the original prefill cache.

    python -m bench.restore_vs_prefill [--quick]
"""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

from bench.common import (
    MB,
    MODEL_CACHE,
    environment,
    format_table,
    median,
    parse_args,
    pin_threads,
    run_server,
    summary,
    timed,
    write_result,
)
from kvstore.spec import ModelSpec

NAME = "restore_vs_prefill"
GOAL = 20.0
TEXT_DIR = Path("/usr/share/common-licenses")


def english_text() -> str:
    """Every licence text once (symlinks such as GPL -> GPL-3 resolved), in name order."""
    seen, parts = set(), []
    for path in sorted(TEXT_DIR.iterdir()):
        real = path.resolve()
        if real.is_file() and real not in seen:
            seen.add(real)
            parts.append(real.read_text(errors="replace"))
    if not parts:
        raise FileNotFoundError(f"no text under {TEXT_DIR}")
    return "\n\n".join(parts)


def prompt_ids(tokenizer, count: int) -> torch.Tensor:
    ids = tokenizer(english_text(), return_tensors="pt").input_ids  # [1, T_all]
    if ids.shape[1] < count:
        raise RuntimeError(f"the text has only {ids.shape[1]} tokens, need {count}")
    return ids[:, :count]


def next_logits(model, cache, token: torch.Tensor) -> torch.Tensor:
    """float32 [V]: logits after feeding one more token on top of ``cache`` (which it extends)."""
    with torch.inference_mode():
        return model(token, cache=cache, use_cache=True).logits[0, -1].clone()


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    pin_threads()
    from transformers.utils import logging as hf_logging

    from modelhost.models import load_model

    hf_logging.disable_progress_bar()  # keep the table output clean
    tokens = 1000 if args.quick else 8000
    prefill_repeats = args.repeats or (1 if args.quick else 3)
    restore_repeats = args.repeats or (1 if args.quick else 5)
    model, tokenizer = load_model("smollm2-135m-instruct", cache_dir=MODEL_CACHE)
    spec = ModelSpec.from_model(model)
    input_ids = prompt_ids(tokenizer, tokens)  # [1, T]
    nbytes = tokens * spec.bytes_per_token
    print(f"restore_vs_prefill: {spec.name}, {tokens} tokens ({nbytes / MB:.0f} MB of KV), torch threads {torch.get_num_threads()}", flush=True)

    with torch.inference_mode():  # warm-up: first-call kernel selection, allocator
        model(input_ids[:, :64], use_cache=True)

    prefill_times = []
    out = None
    for rep in range(prefill_repeats):
        out = None
        gc.collect()
        with torch.inference_mode():
            elapsed, out = timed(lambda: model(input_ids, use_cache=True))
        prefill_times.append(elapsed)
        print(f"  prefill {rep + 1}/{prefill_repeats}: {elapsed:.2f}s", flush=True)
    cache = out.cache
    next_token = out.logits[0, -1].argmax().view(1, 1)  # greedy next token, [1, 1]

    restore_times: dict[str, list[float]] = {"restore (cpu tier)": [], "restore (lmdb)": []}
    save_times: dict[str, float] = {}
    checks: dict[str, dict] = {}
    with run_server("tiered", durable=True) as tiered, run_server("lmdb", cpu_tier_bytes=0, durable=True) as lmdb_only:
        clients = {"restore (cpu tier)": tiered.client(spec), "restore (lmdb)": lmdb_only.client(spec)}
        for path, client in clients.items():
            client.save("warm-up", [(k[0, :, :64], v[0, :, :64]) for k, v in ((layer.keys, layer.values) for layer in cache.layers)], input_ids[0, :64], reuse_prefix=False, overwrite=True)
            client.restore("warm-up", config=model.config)
            client.delete("warm-up")
            save_times[path], _ = timed(lambda: client.save("session", cache, input_ids[0], reuse_prefix=False, overwrite=True))
        reference = next_logits(model, cache, next_token)  # extends the original cache (already saved)
        for rep in range(restore_repeats):
            for path, client in clients.items():
                gc.collect()
                elapsed, restored = timed(lambda: client.restore("session", config=model.config))
                restore_times[path].append(elapsed)
                if rep == 0:
                    length = restored.cache.get_seq_length()
                    logits = next_logits(model, restored.cache, next_token)
                    checks[path] = {
                        "cache_type": type(restored.cache).__name__,
                        "cache_tokens": int(length),
                        "logits_bit_exact": bool(torch.equal(logits, reference)),
                        "max_abs_diff": float((logits - reference).abs().max()),
                        "next_token": int(next_token), "argmax_after": int(logits.argmax()),
                    }
                del restored
            print(f"  restore {rep + 1}/{restore_repeats}: " + ", ".join(f"{p} {t[-1]:.3f}s" for p, t in restore_times.items()), flush=True)
        for client in clients.values():
            client.close()

    prefill = median(prefill_times)
    rows = [["prefill (baseline)", tokens, prefill, tokens / prefill, nbytes / prefill / MB, 1.0, "", ""]]
    results = [{"path": "prefill", "seconds": summary(prefill_times)}]
    for path, times in restore_times.items():
        seconds = median(times)
        speedup = prefill / seconds
        goal = f">= {GOAL:.0f}x {'PASS' if speedup >= GOAL else 'FAIL'}" if path == "restore (cpu tier)" else ""
        exact = "yes" if checks[path]["logits_bit_exact"] else f"NO (max diff {checks[path]['max_abs_diff']:.3g})"
        rows.append([path, tokens, seconds, tokens / seconds, nbytes / seconds / MB, speedup, goal, exact])
        results.append({"path": path, "seconds": summary(times), "speedup_vs_prefill": speedup, "save_seconds": save_times[path], **checks[path]})
    print()
    print(format_table(["path", "tokens", "median s", "tokens/s", "MB/s", "x faster", "goal", "logits bit-exact"], rows,
                       title=f"Restore into DynamicCache vs prefill, SmolLM2-135M, {tokens} tokens ({nbytes / MB:.0f} MB KV; medians)"))
    print("\nsave (durable, one shot): " + ", ".join(f"{p.split('(')[1].rstrip(')')} server {s:.2f}s" for p, s in save_times.items()))
    for path, check in checks.items():
        print(f"{path}: {check['cache_type']} with {check['cache_tokens']} tokens; next-token logits bit-exact: {check['logits_bit_exact']} "
              f"(max |diff| {check['max_abs_diff']:.3g}); greedy token after {check['next_token']} -> {check['argmax_after']}")
    path = write_result(NAME, {
        "benchmark": NAME, "quick": args.quick, "tokens": tokens, "kv_bytes": nbytes, "spec": spec.to_dict(), "goal_x": GOAL,
        "text_source": str(TEXT_DIR), "results": results, "environment": environment(),
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
