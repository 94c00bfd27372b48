"""A vLLM engine in its own process, driven over stdin/stdout, for the tests and bench.vllm_ttft.

``main`` runs in the vLLM environment (.venv-vllm, `make vllm-env`):

    .venv-vllm/bin/python bench/vllm_engine.py --model DIR [--kvmem ADDRESS | --example-dir DIR]

``Engine`` (imported from kvmem's own environment) starts and drives one.

One JSON request per stdin line, one answer per stdout line prefixed "ENGINE " (vLLM's own
logs go to stderr):
    {"op": "generate", "prompt": [ids], "max_tokens": n, "params": {kv_transfer_params}}
        -> {"tokens": [ids], "cached": num_cached_tokens, "kv_transfer_params": {...}, "seconds": s}
    {"op": "spec"}  -> the kvmem ModelSpec the connector derives from this engine's config
    {"op": "quit"}
An engine costs 25-50 s to start, so the tests start each one once and reuse it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
CPU_BLOCK_TOKENS = 128  # vLLM's CPU block size (tokens per paged block)


def prompt_tokens(count: int, seed: int) -> list[int]:
    """A seeded prompt of ``count`` token ids (plain vocabulary, no special tokens)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, 40_000) for _ in range(count)]


def wait_stored(address: str, spec, prompt: list[int], at_least: int, timeout: float = 60.0) -> int:
    """The connector saves in the background: wait until kvmem holds ``at_least`` leading tokens
    of ``prompt`` (or ``timeout`` passes); returns what it holds."""
    from kvmem.client import Client

    deadline = time.monotonic() + timeout
    with Client(address, spec=spec) as client:
        while True:
            matched = client.lookup(prompt)
            if matched >= at_least or time.monotonic() > deadline:
                return matched
            time.sleep(0.1)


class Engine:
    """A vLLM engine process; ``ask`` sends one request and waits for its answer."""

    def __init__(self, name: str, args: list[str], log_dir: Path, python: Path = VLLM_PYTHON):
        if not python.exists():
            raise FileNotFoundError(f"{python} is missing: `make vllm-env` builds the vLLM environment (make test does)")
        self.name = name
        self.log_path = Path(log_dir) / f"engine-{name}.log"
        self._log = self.log_path.open("w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        self.process = subprocess.Popen([str(python), str(Path(__file__).resolve()), *args], cwd=REPO, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1)
        self._ready = False

    def _read(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"engine {self.name} exited ({self.process.poll()}); its log:\n{self.log_path.read_text()[-4000:]}")
            if line.startswith("ENGINE "):
                return json.loads(line[len("ENGINE "):])

    def wait_ready(self) -> None:
        if not self._ready:
            assert self._read() == {"ready": True}
            self._ready = True

    def ask(self, **request) -> dict:
        self.wait_ready()
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def generate(self, prompt: list[int], max_tokens: int = 12, **params) -> dict:
        return self.ask(op="generate", prompt=prompt, max_tokens=max_tokens, params=params or None)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def build_engine(model: str, kvmem: str, example_dir: str, max_model_len: int, prefix_caching: bool, extra: dict, batched_tokens: int = 0):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    transfer = None
    if kvmem:
        transfer = KVTransferConfig(
            kv_connector="KVMemConnector", kv_connector_module_path="kvmem.vllm.connector", kv_role="kv_both",
            kv_load_failure_policy="recompute", kv_connector_extra_config={"kvmem_address": kvmem, **extra},
        )
    elif example_dir:
        transfer = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                                    kv_connector_extra_config={"shared_storage_path": example_dir})
    more = {"max_num_batched_tokens": batched_tokens} if batched_tokens else {}
    return LLM(model=model, dtype="float32", max_model_len=max_model_len, enforce_eager=True, kv_transfer_config=transfer,
               enable_prefix_caching=prefix_caching, seed=0, **more)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--kvmem", default="", help="kvmem address; none = no connector")
    parser.add_argument("--example-dir", default="", help="use vLLM's ExampleConnector with files here")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--max-num-batched-tokens", type=int, default=0, help="0 = vLLM's default (prefills longer than it are chunked)")
    parser.add_argument("--extra", default="{}", help="JSON of more kv_connector_extra_config keys")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # vLLM prints to stdout too: keep ours clean
    from vllm import SamplingParams

    llm = build_engine(args.model, args.kvmem, args.example_dir, args.max_model_len, not args.no_prefix_caching, json.loads(args.extra),
                       args.max_num_batched_tokens)
    answers.write("ENGINE " + json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        if op == "quit":
            break
        if op == "spec":
            from kvmem.vllm.settings import ConnectorSettings, spec_from_vllm

            spec = spec_from_vllm(llm.llm_engine.vllm_config, ConnectorSettings())
            answers.write("ENGINE " + json.dumps(spec.to_dict()) + "\n")
            continue
        extra_args = {"kv_transfer_params": request["params"]} if request.get("params") else None
        sampling = SamplingParams(max_tokens=request.get("max_tokens", 8), temperature=0.0, extra_args=extra_args)
        started = time.perf_counter()
        output = llm.generate([{"prompt_token_ids": request["prompt"]}], sampling, use_tqdm=False)[0]
        seconds = time.perf_counter() - started
        answers.write("ENGINE " + json.dumps({
            "tokens": list(output.outputs[0].token_ids), "cached": output.num_cached_tokens or 0,
            "kv_transfer_params": output.kv_transfer_params, "seconds": seconds,
        }) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
