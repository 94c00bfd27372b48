"""Which probe finds the needle: the rank of the needle's block under four probe designs.

Per task (a needle planted in 16k tokens, windowed prefill), the question runs once over the sinks
and the recent window (retrieval.context's probe pass) and its query and key states are recorded
per layer. Each design scores every retrievable 64-token block; the benchmark reports, over layers,
the median rank of the block holding the needle's code and how many layers rank it within the top
27 (what a 2k budget retrieves):

* ``queries, pooled, 4 reps``: the question's query states, activation-weighted into one probe per
  KV head (ActQKV's probe query), against 4 representative keys per block;
* ``queries, late interaction``: every question token's query matched to every key;
* ``keys, pooled``: the question's keys in one activation-weighted probe, every key;
* ``keys, late interaction`` (what kvmem ships): every question token's key matched to every key,
  activation-weighted.

    python -m bench.retrieval_probes            # 4 tasks (~8 min)
    python -m bench.retrieval_probes --quick    # one 4k task
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bench.common import environment, format_table, parse_args, pin_threads, write_result
from bench.tasks import TaskFactory

DESIGNS = ("queries, pooled, 4 reps", "queries, late interaction", "keys, pooled", "keys, late interaction")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    pin_threads()
    from modelhost.models import load_model
    from retrieval.actqkv import Probe
    from retrieval.block_index import BlockIndex, BlockIndexConfig
    from retrieval.context import RetrievalConfig, SessionKV, always_kept, probe_pass, retrievable_blocks
    from retrieval.long_prefill import windowed_prefill
    from retrieval.rope import Rope

    model, tokenizer = load_model("smollm2-135m-instruct", cache_dir=Path(__file__).resolve().parent.parent / ".cache" / "models")
    rope, factory = Rope.from_model(model), TaskFactory(tokenizer)
    specs = [("single", 4000, 0.4, 100)] if args.quick else [("single", 16000, 0.2, 100), ("single", 16000, 0.4, 101), ("multi", 16000, 0.6, 102), ("multi", 16000, 0.3, 103)]
    records = []
    for kind, length, depth, seed in specs:
        task = factory.make(kind, length, depth, seed)
        keys, values = windowed_prefill(model, task.context_ids, window_tokens=2048)
        kv = SessionKV(keys, values, torch.arange(length))
        every = BlockIndex.build(keys, kv.positions, rope)
        reps4 = BlockIndex.build(keys, kv.positions, rope, BlockIndexConfig(representatives=4))
        config = RetrievalConfig()
        states = probe_pass(model, kv, task.question_ids[0], config, rope, 8192, record_queries=True)
        sink_end, recent_start, _ = always_kept(length, config)
        needle = [n for n in task.needles if n["asked"]][0]["position"]
        code_block = (needle + 12) // 64  # the block holding the code's digits
        allowed = retrievable_blocks(every, sink_end, recent_start)
        for design in DESIGNS:
            ranks = []
            for layer, (queries, qkeys) in enumerate(zip(states.queries, states.keys)):
                source = queries if design.startswith("queries") else qkeys
                probe = Probe.from_states(source, 3, "actqkv")
                index = reps4 if "4 reps" in design else every
                if "pooled" in design:
                    scores = index.block_scores(layer, torch.einsum("n,hnd->hd", probe.weights, probe.vectors))
                else:
                    scores = index.block_scores(layer, probe.vectors, probe.weights)
                scores[~allowed] = -np.inf
                ranks.append(int((scores > scores[code_block]).sum()))
            ranks = np.asarray(ranks)
            records.append({"task": task.name, "design": design, "median_rank": float(np.median(ranks)), "layers_top27": int((ranks < 27).sum()), "blocks": int(allowed.sum()), "ranks": ranks.tolist()})
            print(records[-1]["task"], design, records[-1]["median_rank"], records[-1]["layers_top27"], flush=True)
    rows = []
    for design in DESIGNS:
        mine = [r for r in records if r["design"] == design]
        rows.append([design, len(mine), float(np.median([r["median_rank"] for r in mine])), float(np.mean([r["layers_top27"] for r in mine]))])
    print(format_table(["probe", "tasks", "median rank of the needle block", "layers (of 30) with it in the top 27"], rows,
                       f"Needle block rank among ~{records[0]['blocks']} retrievable blocks ({specs[0][1]:,}-token contexts)"))
    path = write_result("retrieval_probes", {"quick": args.quick, "environment": environment(), "records": records})
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
