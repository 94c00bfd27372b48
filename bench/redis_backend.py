"""Save and restore through kvmem's store on Redis Cluster against redis-py SET/GET of the same
bytes, on one local 3+3 cluster in one run (ratios: the machine is shared).

    python -m bench.redis_backend            # 4096-token sessions, SmolLM2-135M's layout, 5 rounds
    python -m bench.redis_backend --quick    # CI smoke run

Rows: the store (save = staging marks, blocks SET NX on their primaries, one commit script;
restore = record + blocks GET, checksums verified) with min_replicas 0 and 1, and redis-py
writing/reading the same bytes as one value per block (one pipeline per primary, all primaries
at once: the best a plain client does), with min_replicas 1 also SET + WAIT 1.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kvmem.local_cluster import LocalRedisCluster
from kvstore.spec import ModelSpec
from kvstore.store import SessionStore, StoreConfig

SPEC = ModelSpec("smollm2-135m-layout", num_layers=30, num_kv_heads=3, head_dim=64, dtype="float16", max_position=1 << 16)


def layers_for(tokens: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    shape = (SPEC.num_kv_heads, tokens, SPEC.head_dim)
    return [(torch.randn(shape, generator=generator).half(), torch.randn(shape, generator=generator).half()) for _ in range(SPEC.num_layers)]


def pieces(store, layers):
    end = layers[0][0].shape[1]
    out = store.new_pieces(SPEC, 0, end, has_bias=False)
    for layer, (k, v) in enumerate(layers):
        out.add_tensors(layer, 0, k, v, None)
    return out


def store_round(store, tokens: int, rounds: int, repeat: int = 0) -> tuple[float, float, int]:
    """Save and restore ``rounds`` new sessions (token ids no earlier session used: nothing
    deduplicates); seconds of each and the bytes restored."""
    save_s = restore_s = 0.0
    nbytes = 0
    for index in range(rounds):
        layers = layers_for(tokens, seed=index)
        session = repeat * rounds + index
        started = time.perf_counter()
        store.save("bench", f"s{session}", SPEC, np.arange(tokens) + session * tokens, pieces(store, layers))
        save_s += time.perf_counter() - started
        for tier in store.blocks.tiers:
            tier.clear() if hasattr(tier, "clear") else None
        started = time.perf_counter()
        plan = store.restore("bench", f"s{session}", SPEC)
        nbytes += sum(len(piece.keys) + len(piece.values) for piece in plan.pieces())
        restore_s += time.perf_counter() - started
    return save_s, restore_s, nbytes


def plain_round(store, tokens: int, rounds: int, chunk_tokens: int, wait_replicas: int = 0) -> tuple[float, float]:
    """redis-py SET/GET of the same bytes, one value per (chunk, layer): one pipeline per primary,
    all primaries at once (the store's own transport, so the ratio is the store's overhead), with
    ``WAIT wait_replicas`` after each primary's SETs when > 0 (what a durable plain write costs).
    Save time starts at the tensors, as the store's does."""
    nodes = store.backend.nodes
    save_s = restore_s = 0.0
    for index in range(rounds):
        layers = layers_for(tokens, seed=index)
        started = time.perf_counter()  # from the same tensors the store gets: their bytes are made in the timed part, as the store's records are
        values = []
        for layer, (k, v) in enumerate(layers):
            for at in range(0, tokens, chunk_tokens):
                values.append((f"plain:{wait_replicas}:{index}:{layer}:{at}".encode(), k[:, at : at + chunk_tokens].numpy().tobytes() + v[:, at : at + chunk_tokens].numpy().tobytes()))
        names = [name for name, _ in values]

        def put(client, indexes):
            pipe = client.pipeline(transaction=False)
            for i in indexes:
                pipe.set(names[i], values[i][1])
            if wait_replicas:
                pipe.execute_command("WAIT", wait_replicas, 5000)
            replies = pipe.execute()
            return replies[: len(indexes)]

        def get(client, indexes):
            pipe = client.pipeline(transaction=False)
            for i in indexes:
                pipe.get(names[i])
            return pipe.execute()

        nodes.per_primary(names, put, "plain SET")
        save_s += time.perf_counter() - started
        started = time.perf_counter()
        got = sum(len(value) for value in nodes.per_primary(names, get, "plain GET"))
        restore_s += time.perf_counter() - started
        assert got == sum(len(value) for _, value in values)
    return save_s, restore_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of every row (medians reported)")
    parser.add_argument("--quick", action="store_true", help="512 tokens, 2 rounds, 1 repeat (CI smoke run)")
    args = parser.parse_args(argv)
    tokens, rounds, repeats = (512, 2, 1) if args.quick else (args.tokens, args.rounds, args.repeats)
    directory = Path(tempfile.mkdtemp(prefix="kvmem-bench-redis-"))
    cluster = LocalRedisCluster(directory / "cluster").start()
    rows = []
    try:
        for replicas in (0, 1):
            config = StoreConfig(data_dir=directory / "data", chunk_tokens=256, cpu_tier_bytes=0, backend="redis",
                                 redis_url=cluster.url, redis_namespace=f"bench{replicas}", redis_min_replicas=replicas)
            store = SessionStore.open(config)
            try:
                timings = {"store": [], "plain": [], "plain+wait": []}
                for repeat in range(repeats):  # interleaved, medians: the machine is shared
                    timings["store"].append(store_round(store, tokens, rounds, repeat))
                    timings["plain"].append(plain_round(store, tokens, rounds, config.chunk_tokens))
                    if replicas:
                        timings["plain+wait"].append(plain_round(store, tokens, rounds, config.chunk_tokens, wait_replicas=replicas))
            finally:
                store.close()
            gb = timings["store"][0][2] / 1e9
            save_s = statistics.median(t[0] for t in timings["store"])
            restore_s = statistics.median(t[1] for t in timings["store"])
            plain_save = statistics.median(t[0] for t in timings["plain"])
            plain_restore = statistics.median(t[1] for t in timings["plain"])
            rows.append((f"kvmem store, min_replicas={replicas}", gb / save_s, gb / restore_s, plain_save / save_s, plain_restore / restore_s))
            rows.append(("redis-py SET/GET, same bytes", gb / plain_save, gb / plain_restore, 1.0, 1.0))
            if replicas:
                wait_save = statistics.median(t[0] for t in timings["plain+wait"])
                rows.append((f"redis-py SET + WAIT {replicas}, same bytes", gb / wait_save, float("nan"), wait_save / save_s, float("nan")))
    finally:
        cluster.stop(remove=True)
    print(f"\n{rounds} sessions of {tokens} tokens ({SPEC.num_layers} layers, fp16), 3+3 local Redis Cluster\n")
    print("| row | save GB/s | restore GB/s | save vs redis-py | restore vs redis-py |")
    print("|---|---:|---:|---:|---:|")
    for name, save_rate, restore_rate, save_ratio, restore_ratio in rows:
        restore_cells = "–" if restore_rate != restore_rate else f"{restore_rate:.3f}"
        ratio_cell = "–" if restore_ratio != restore_ratio else f"{restore_ratio:.2f}x"
        print(f"| {name} | {save_rate:.3f} | {restore_cells} | {save_ratio:.2f}x | {ratio_cell} |")
    print("\nratios are the store's time against the redis-py row above it (and, for save with replicas, against SET + WAIT: "
          "a durable plain write); medians of interleaved repeats")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
