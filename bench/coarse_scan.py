"""The int8 first scan against the exact scan: time per request, blocks rescored, and agreement.

Retrieve at 2k tokens asks every layer's block index for its shortlist (``select``: four times
the most blocks a layer may take, plus the blocks the sinks and recent window cover). Large flat
layers are scanned first by int8 codes and only the blocks near the k-th are scored again
exactly (retrieval/flat_search.py); this benchmark runs both paths on the same indexes and
probes, request by request in turn, in one process:

* indexes in the Retrieve layout (SmolLM2: 30 layers, 3 KV heads of 64; 64-token blocks, 4
  representatives), at 256k, 512k and 1M tokens (the int8 scan runs where a 2k budget's
  shortlist is at most a 32nd of the blocks: from 512k; the 256k rows force it, to show why not
  there), of two kinds of vectors: independent random ones
  and "outlier" ones (a few dimensions 30x the rest, long runs of similar tokens: keys as a
  transformer makes them);
* probes of 24 vectors per head: independent, or near-identical (their rounding errors add up
  instead of cancelling: the int8 scan's hard case), with ActQKV-like peaked weights;
* per request (all layers, ``BlockIndex.search_layers``): milliseconds for each path, p50 and
  p99, their ratio; blocks scored exactly per layer; layers where the int8 path lost a block,
  and where it ordered blocks otherwise (two scores within float rounding of each other, summed
  in another order: the largest score difference is shown); and
  the largest |approximate - exact| block score over every block seen, as a share of the margin
  the scan allows (it must stay under 1 for the shortlist to be exact; docs/retrieval.md).

    python -m bench.coarse_scan           # 256k, 512k and 1M, 20 requests per kind (about 12 minutes)
    python -m bench.coarse_scan --quick   # 512k, 6 layers, a few requests (CI smoke)
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

import faiss
import numpy as np
import torch

from bench.common import RESULTS_DIR, environment, format_table, pin_threads, write_result
from retrieval.actqkv import BudgetSpread
from retrieval.block_index import BlockIndex, BlockIndexConfig
from retrieval.flat_search import COARSE_MIN_RATIO, COARSE_MIN_VECTORS, coarse_scores, layer_scores

HEADS, DIM, PROBES = 3, 64, 24
CONFIG = BlockIndexConfig(block_tokens=64, representatives=4)  # Retrieve's index ([retrieval] defaults)
BUDGET, SINKS, RECENT = 2048, 4, 256


def shortlist(tokens: int) -> int:
    """k as select() asks for it at a 2k budget with dynamic per-layer budgets."""
    mean_blocks = (BUDGET - SINKS - RECENT) / CONFIG.block_tokens
    excluded = 1 + RECENT // CONFIG.block_tokens
    return min(tokens // CONFIG.block_tokens, 4 * BudgetSpread().cap(mean_blocks, tokens // CONFIG.block_tokens) + excluded)


def unit_vectors(kind: str, count: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        vectors = rng.standard_normal((count, DIM), dtype=np.float32)
    else:
        scale = np.ones(DIM, dtype=np.float32)
        scale[rng.choice(DIM, 3, replace=False)] = 30.0
        topics = rng.standard_normal((8, DIM), dtype=np.float32)
        vectors = (topics[np.arange(count) * 8 // count] + 0.3 * rng.standard_normal((count, DIM), dtype=np.float32)) * scale
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def build(tokens: int, layers: int, kind: str, seed: int) -> BlockIndex:
    """Flat indexes holding unit vectors directly (what BlockIndex.build makes from keys; building
    from 256k tokens of keys would take a minute and change nothing this bench measures)."""
    rng = np.random.default_rng(seed)
    count = tokens // CONFIG.block_tokens * CONFIG.per_block
    indexes = []
    for _ in range(layers):
        heads = []
        for _ in range(HEADS):
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
            index.add_with_ids(unit_vectors(kind, count, rng), np.arange(count, dtype=np.int64))
            heads.append(index)
        indexes.append(heads)
    return BlockIndex(CONFIG, tokens, DIM, indexes, coarse_min_vectors=0, coarse_min_ratio=16)  # forced where the default would scan exactly


def probes(layers: int, correlated: bool, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _ in range(layers):
        if correlated:
            vectors = torch.randn(HEADS, 1, DIM, generator=generator) + 0.2 * torch.randn(HEADS, PROBES, DIM, generator=generator)
        else:
            vectors = torch.randn(HEADS, PROBES, DIM, generator=generator)
        out.append((vectors, torch.softmax(2 * torch.randn(PROBES, generator=generator), 0)))
    return out


def run(tokens: int, layers: int, kind: str, correlated: bool, requests: int) -> dict:
    coarse = build(tokens, layers, kind, seed=tokens).prepare_search()
    exact = BlockIndex(coarse.config, coarse.num_tokens, coarse.head_dim, coarse.indexes, coarse_min_vectors=1 << 62)  # the same vectors, scanned exactly
    k = shortlist(tokens)
    generator = torch.Generator().manual_seed(7)
    import retrieval.flat_search as flat_search

    rescored: list[int] = []
    real = flat_search._exact_scores
    flat_search._exact_scores = lambda vectors, blocks, *rest: rescored.append(len(blocks)) or real(vectors, blocks, *rest)
    times = {"exact": [], "int8": []}
    missed, reordered, worst, score_gap = 0, 0, 0.0, 0.0
    try:
        for request in range(requests + 1):
            batch = probes(layers, correlated, generator)
            results = {}
            for name, index in (("exact", exact), ("int8", coarse)) if request % 2 else (("int8", coarse), ("exact", exact)):
                started = time.perf_counter()
                results[name] = index.search_layers(batch, k)
                if request:  # the first request of each warms caches and is not timed
                    times[name].append((time.perf_counter() - started) * 1000)
            missed += sum(set(a[0].tolist()) != set(b[0].tolist()) for a, b in zip(results["exact"], results["int8"]))  # a block the int8 scan lost
            reordered += sum(not np.array_equal(a[0], b[0]) for a, b in zip(results["exact"], results["int8"]))  # or their order (float rounding at near-ties)
            score_gap = max(score_gap, max(float(np.abs(a[1] - b[1]).max()) for a, b in zip(results["exact"], results["int8"])))  # float rounding only
            for layer, (vectors, weights) in enumerate(batch[:3]):  # the error against the margin, every block of three layers
                query = torch.nn.functional.normalize(vectors.float(), dim=-1).numpy()
                approx, margin = coarse_scores(coarse._coarse.layer(layer), query, weights.numpy(), CONFIG.per_block)
                truth = layer_scores(coarse._flat_vectors(layer), query, weights.numpy(), CONFIG.per_block)
                worst = max(worst, float(np.abs(approx.astype(np.float64) - truth).max() / margin))
    finally:
        flat_search._exact_scores = real
    exact_ms, int8_ms = np.asarray(times["exact"]), np.asarray(times["int8"])
    return {
        "tokens": tokens, "layers": layers, "vectors": kind, "probes": "near-identical" if correlated else "independent", "requests": requests, "k": k,
        "blocks": tokens // CONFIG.block_tokens, "int8_by_default": tokens // CONFIG.block_tokens >= COARSE_MIN_RATIO * k and tokens // CONFIG.block_tokens * CONFIG.per_block >= COARSE_MIN_VECTORS, "exact_p50_ms": float(np.percentile(exact_ms, 50)), "exact_p99_ms": float(np.percentile(exact_ms, 99)),
        "int8_p50_ms": float(np.percentile(int8_ms, 50)), "int8_p99_ms": float(np.percentile(int8_ms, 99)),
        "speedup_p50": float(np.percentile(exact_ms, 50) / np.percentile(int8_ms, 50)),
        "rescored_per_layer": float(np.sum(rescored) / max(1, len(times["int8"]) + 1) / layers), "layers_missing_a_block": missed, "layers_reordered": reordered,
        "layers_compared": (requests + 1) * layers, "worst_error_share_of_margin": worst, "largest_score_difference": score_gap,
    }


def print_table(rows: list[dict]) -> str:
    table = format_table(
        ["tokens", "int8 by default", "vectors", "probes", "k", "exact p50 ms", "exact p99 ms", "int8 p50 ms", "int8 p99 ms", "exact/int8 p50", "rescored blocks/layer",
         "layers missing a block", "layers ordered otherwise", "score difference", "worst error / margin"],
        [[r["tokens"], "yes" if r["int8_by_default"] else "no (forced here)", r["vectors"], r["probes"], r["k"], round(r["exact_p50_ms"], 1), round(r["exact_p99_ms"], 1), round(r["int8_p50_ms"], 1),
          round(r["int8_p99_ms"], 1), f"{r['speedup_p50']:.2f}x", f"{r['rescored_per_layer']:.0f} of {r['blocks']}",
          f"{r['layers_missing_a_block']} of {r['layers_compared']}", r["layers_reordered"], f"{r['largest_score_difference']:.1e}", round(r["worst_error_share_of_margin"], 2)] for r in rows],
        title=f"Block search per request ({rows[0]['layers']} layers x {HEADS} KV heads, 64-token blocks, 4 representatives, 2k budget): exact float32 scan vs int8 first scan",
    )
    print(table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="512k tokens, 6 layers, 3 requests per kind (CI smoke)")
    parser.add_argument("--requests", type=int, default=0, help="timed requests per row (default 20)")
    parser.add_argument("--lengths", default="", help="comma-separated token counts (default 262144,524288,1048576)")
    args = parser.parse_args(argv)
    pin_threads()
    faiss.omp_set_num_threads(1)  # as the server sets it
    lengths, layers = ([524288], 6) if args.quick else ([262144, 524288, 1048576], 30)
    lengths = [int(x) for x in args.lengths.split(",") if x] or lengths
    requests = args.requests or (3 if args.quick else 20)
    rows = []
    for tokens in lengths:
        for kind in ("random", "outlier"):
            for correlated in (False, True):
                rows.append(run(tokens, layers, kind, correlated, requests))
                print(f"{tokens} {kind} {'near-identical' if correlated else 'independent'} done", flush=True)
    text = print_table(rows)
    write_result("coarse_scan", {"quick": args.quick, "environment": environment(), "rows": rows, "table": text})
    if not args.quick:
        (RESULTS_DIR / "coarse_scan.md").write_text("```\n" + text + "\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
