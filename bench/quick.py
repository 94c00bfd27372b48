"""Smoke run of every benchmark (``--quick``), each in its own process, then the seconds each
took: what CI runs, and where its minutes go.

    python -m bench.quick                  # every benchmark but vllm_ttft (it needs the vLLM venv)
    python -m bench.quick recall planner   # only these
"""
from __future__ import annotations

import subprocess
import sys
import time
from typing import Sequence

MODULES = ("throughput", "restore_vs_prefill", "dedup", "am_ablation", "compaction", "retrieval_latency", "retrieval",
           "retrieval_probes", "retrieve_e2e", "coarse_scan", "recall", "ttt_sweep", "planner_matrix", "redis_backend", "scale_out", "planner",
           "security", "storage")


def main(argv: Sequence[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(MODULES)
    unknown = [name for name in names if name not in MODULES]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {', '.join(MODULES)}", file=sys.stderr)
        return 2
    seconds: list[tuple[str, float, int]] = []
    for name in names:
        print(f"\n=== bench.{name} --quick", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", f"bench.{name}", "--quick"])
        seconds.append((name, time.perf_counter() - started, code))
    print("\n| benchmark | seconds | exit |\n|---|---:|---:|")
    for name, took, code in seconds:
        print(f"| {name} | {took:.0f} | {code} |")
    print(f"| all | {sum(took for _, took, _ in seconds):.0f} | |")
    failed = [name for name, _, code in seconds if code != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
