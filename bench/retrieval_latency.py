"""Retrieval latency per decode step: one probe per layer searched in a session's block index.

A decode step that re-retrieves asks every layer's index for the best blocks of one probe vector
per KV head. This benchmark times exactly that call (``BlockIndex.search`` with the shortlist a 2k
budget uses) per layer, for sessions of 32k and 256k tokens (SmolLM2 layout: 3 KV heads of dim 64;
synthetic keys, since search cost depends only on sizes), with the exact index (every key, flat
inner product) and with HNSW, side by side, plus build time and index bytes. A sweep over index
sizes shows where flat search per (layer) crosses 1 ms and 5 ms: that sets ``exact_max_vectors``.

    python -m bench.retrieval_latency           # full run (minutes)
    python -m bench.retrieval_latency --quick   # 32k only, a few steps (CI smoke)
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from bench.common import environment, format_table, parse_args, pin_threads, write_result
from retrieval.block_index import BlockIndex, BlockIndexConfig
from retrieval.rope import Rope

HEADS, DIM = 3, 64
ROPE = Rope(1.0 / (100000.0 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM)))  # SmolLM2's rope
SHORTLIST = 4 * (2048 // 64)  # what select() asks for at a 2k budget
FLAT = BlockIndexConfig(exact_max_vectors=1 << 62)  # flat at every size (the default switches to HNSW above 32k vectors)


def build(tokens: int, layers: int, config: BlockIndexConfig, seed: int = 0) -> tuple[BlockIndex, float]:
    generator = torch.Generator().manual_seed(seed)
    keys = [torch.randn(HEADS, tokens, DIM, generator=generator) for _ in range(layers)]
    started = time.perf_counter()
    index = BlockIndex.build(keys, torch.arange(tokens), ROPE, config)
    return index, time.perf_counter() - started


def time_steps(index: BlockIndex, steps: int, seed: int = 1) -> np.ndarray:
    """ms per (step, layer) search of one probe [H, D]."""
    generator = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(steps):
        for layer in range(index.num_layers):
            probe = torch.randn(HEADS, DIM, generator=generator)
            started = time.perf_counter()
            index.search(layer, probe, SHORTLIST)
            times.append((time.perf_counter() - started) * 1000)
    return np.asarray(times)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    pin_threads(1)
    import faiss

    faiss.omp_set_num_threads(1)  # one probe per search: waking OpenMP workers costs more than it saves (measured)
    sessions = [32_768] if args.quick else [32_768, 262_144]
    layers = 2  # layers are independent indexes of equal size: time a few, report per layer
    steps = 20 if args.quick else 100
    rows, records = [], []
    for tokens in sessions:
        for kind, config in (("exact (flat)", FLAT), ("HNSW", BlockIndexConfig(exact_max_vectors=0))):
            if kind == "HNSW" and args.quick:
                continue
            index, seconds = build(tokens, layers, config)
            ms = time_steps(index, steps)
            nbytes = sum(len(index.layer_to_bytes(l)) for l in range(index.num_layers)) / layers
            record = {"tokens": tokens, "index": kind, "vectors_per_head": tokens, "build_s_per_layer": seconds / layers,
                      "bytes_per_layer": nbytes, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "searches": len(ms)}
            records.append(record)
            rows.append([tokens, kind, record["build_s_per_layer"], nbytes / 2**20, record["p50_ms"], record["p99_ms"], record["p99_ms"] <= 5.0])
            print(rows[-1], flush=True)
    print(format_table(["tokens", "index", "build s/layer", "MiB/layer", "p50 ms/layer", "p99 ms/layer", "p99 <= 5 ms"], rows,
                       "Retrieval latency per decode step, per layer (one probe, 3 KV heads, 1 thread)"))
    sweep = []
    if not args.quick:
        for tokens in (4_096, 16_384, 65_536, 131_072, 262_144, 524_288):
            index, _ = build(tokens, 1, FLAT)
            ms = time_steps(index, 60)
            sweep.append({"vectors_per_head": tokens, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))})
        print(format_table(["vectors per head", "p50 ms/layer", "p99 ms/layer"], [[s["vectors_per_head"], s["p50_ms"], s["p99_ms"]] for s in sweep],
                           "Exact (flat) search cost against index size"))
    path = write_result("retrieval_latency", {"quick": args.quick, "environment": environment(), "shortlist": SHORTLIST, "records": records, "flat_sweep": sweep})
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
