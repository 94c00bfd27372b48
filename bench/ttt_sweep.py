"""qTTT settings on SmolLM2: held-out loss, answer accuracy and time, around the defaults.

For a few planner-suite tasks (lookup and multi-key needles, 2k and 4k tokens) the context is
prefilled once; then, for each setting (steps N, span length k, learning rate; one varied at a time
around the default), the query projections are trained (retrieval/ttt.py) and measured:

* held-out next-token loss on 4 other spans of the same context, relative to no training;
* whether the adapted model answers the task's question (greedy, exact code);
* training seconds.

    python -m bench.ttt_sweep            # 4 tasks, 8 settings (~10 min on 2 CPU cores)
    python -m bench.ttt_sweep --quick    # CI smoke: one 1k task, two settings
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bench.common import environment, format_table, pin_threads, write_result

NAME = "ttt_sweep"


def settings(quick: bool):
    from retrieval.ttt import TTTConfig

    base = TTTConfig()
    if quick:
        return [replace(base, steps=0), replace(base, steps=2)]
    grid = [replace(base, steps=0), base]
    grid += [replace(base, learning_rate=lr) for lr in (3e-4, 3e-3)]
    grid += [replace(base, steps=n) for n in (4, 16)]
    grid += [replace(base, span_tokens=k) for k in (64, 256)]
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: bench/common.py's)")
    args = parser.parse_args(argv)
    pin_threads(args.threads) if args.threads else pin_threads()
    from bench.planner_matrix import prefill
    from bench.planner_tasks import SuiteFactory, score
    from modelhost.models import load_model
    from retrieval.executors import generate_on
    from retrieval.ttt import TTTConfig, adapt, heldout_loss, span_starts

    model, tokenizer = load_model("smollm2-135m-instruct", cache_dir=Path(".cache/models"))
    factory = SuiteFactory(tokenizer)
    plan = [("lookup", 1000, 0)] if args.quick else [("lookup", 2000, 1), ("multikey", 2000, 1), ("lookup", 4000, 0), ("multikey", 4000, 0)]
    grid = settings(args.quick)
    results: dict[int, list[dict]] = {i: [] for i in range(len(grid))}
    started = time.perf_counter()
    for family, length, seed in plan:
        task = factory.make(family, length, seed)
        keys, values, _ = prefill(model, task.context_ids, 8192)
        ids = task.context_ids[0]
        question = tokenizer(task.question, return_tensors="pt", add_special_tokens=False).input_ids[0]
        held = span_starts(ids.numel(), TTTConfig(steps=4, seed=9999))
        base = heldout_loss(model, ids, keys, values, held, 128)
        for i, config in enumerate(grid):
            shadow, report = adapt(model, ids, keys, values, config)
            loss = heldout_loss(shadow, ids, keys, values, held, 128)
            answer = tokenizer.decode(generate_on(shadow, list(zip(keys, values)), [None] * len(keys), ids.numel(), question, 16))
            results[i].append({"task": task.name, "base": base, "loss": loss, "correct": score(family, answer, task.answer), "seconds": report.seconds})
            print(f"{task.name} N={config.steps} k={config.span_tokens} lr={config.learning_rate:g}: loss {base:.3f} -> {loss:.3f}, "
                  f"correct {results[i][-1]['correct']:.0f}, {report.seconds:.1f}s", flush=True)
    rows = []
    for i, config in enumerate(grid):
        r = results[i]
        rows.append([config.steps, config.span_tokens, config.learning_rate, float(np.mean([x["loss"] / x["base"] for x in r])),
                     float(np.mean([x["correct"] for x in r])), float(np.mean([x["seconds"] for x in r]))])
    headers = ["steps", "span", "lr", "held-out loss / untrained", "accuracy", "train s"]
    table = format_table(headers, rows, f"qTTT settings on {len(plan)} tasks (SmolLM2-135M, CPU)")
    print(table)
    path = write_result(NAME, {"benchmark": NAME, "quick": args.quick, "environment": environment(), "tasks": [p for p in plan],
                               "rows": [dict(zip(headers, row)) for row in rows], "records": results, "table": table,
                               "total_seconds": time.perf_counter() - started})
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
