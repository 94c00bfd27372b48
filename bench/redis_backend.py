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
from kvstore.redis_backend import slot_tag_for
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
    """redis-py SET/GET of the same bytes, one value per (chunk, layer), a chunk's layers per call
    as the store moves them: one pipeline per primary, all primaries at once (the store's own
    transport, so the ratio is the store's overhead). With ``wait_replicas`` > 0, one WAIT per
    primary at the end of each session (what a durable plain write costs; the store also waits
    once per save). Save time starts at the tensors, as the store's does."""
    nodes = store.backend.nodes
    save_s = restore_s = 0.0
    for index in range(rounds):
        layers = layers_for(tokens, seed=index)
        started = time.perf_counter()
        batches: list[list[tuple[bytes, bytes]]] = []
        for at in range(0, tokens, chunk_tokens):
            batches.append([(f"plain:{wait_replicas}:{index}:{layer}:{at}".encode(),
                             k[:, at : at + chunk_tokens].numpy().tobytes() + v[:, at : at + chunk_tokens].numpy().tobytes())
                            for layer, (k, v) in enumerate(layers)])
        for batch in batches:
            nodes.per_primary([name for name, _ in batch], lambda client, indexes, batch=batch: _pipeline(client, [("SET", *batch[i]) for i in indexes]), "plain SET")
        if wait_replicas:
            settle(nodes, wait_replicas, sync=False)  # the WAIT is the timed part; writeback is not
        save_s += time.perf_counter() - started
        started = time.perf_counter()
        got = 0
        for batch in batches:
            replies = nodes.per_primary([name for name, _ in batch], lambda client, indexes, batch=batch: _pipeline(client, [("GET", batch[i][0]) for i in indexes]), "plain GET")
            got += sum(len(value) for value in replies)
        restore_s += time.perf_counter() - started
        assert got == sum(len(value) for batch in batches for _, value in batch)
    return save_s, restore_s


def settle(nodes, replicas: int = 1, sync: bool = True) -> None:
    """Until every primary's replicas have everything written so far (a marker write, then WAIT),
    and the AOF files' dirty pages are on disk (os.sync): a row must not pay for the writeback of
    the row before it."""
    import os

    for address in nodes.primaries():
        _pipeline(nodes.client(address), [("SET", b"plain-barrier" + slot_tag_for(nodes, address), b"1"), ("WAIT", replicas, 60_000)])
    if sync:
        os.sync()


def _pipeline(client, commands: list[tuple]) -> list:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    return pipe.execute()


def commit_rate(cluster, directory: Path, seconds: float, writers: int = 4) -> dict:
    """Small saves (one 16-token chunk, 2 layers' worth of a tiny spec) by ``writers`` threads for
    ``seconds``, min_replicas=1: saves per second, and the metadata primary's CPU seconds per save
    (every save's staging and record commits run there: the one primary all commits share)."""
    import threading

    from redis.crc import key_slot

    from bench.scale_out import cpu_seconds

    tiny = ModelSpec("commit-rate", num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", max_position=1 << 16)
    namespace = "commits"
    store = SessionStore.open(StoreConfig(data_dir=directory / "commits", chunk_tokens=16, cpu_tier_bytes=0, backend="redis",
                                          redis_url=cluster.url, redis_namespace=namespace, redis_min_replicas=1))
    meta_pid = cluster.processes[cluster.primary_of_slot(key_slot(f"{{{namespace}}}:v:sessions".encode()))].pid
    counts = [0] * writers
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(worker: int) -> None:
        try:
            for index in range(1 << 24):
                if stop.is_set():
                    return
                pieces = store.new_pieces(tiny, 0, 16, has_bias=False)
                for layer in range(tiny.num_layers):
                    pieces.add_tensors(layer, 0, torch.zeros(1, 16, 8, dtype=torch.float16), torch.ones(1, 16, 8, dtype=torch.float16), None)
                base = (worker << 28) + index * 16  # distinct uint32 token ids: every save writes its own chunk
                store.save("bench", f"c{worker}-{index}", tiny, np.arange(base, base + 16), pieces)
                counts[worker] += 1
        except BaseException as exc:  # noqa: BLE001 - raised below: a bench that loses a writer must say so
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(worker,)) for worker in range(writers)]
    cpu_before, started = cpu_seconds(meta_pid), time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed, cpu = time.perf_counter() - started, cpu_seconds(meta_pid) - cpu_before
    store.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {writers} commit-rate writers failed") from errors[0]
    saves = sum(counts)
    return {"saves": saves, "seconds": elapsed, "saves_per_s": saves / elapsed, "meta_cpu_ms_per_save": 1000 * cpu / max(1, saves),
            "meta_cpu_busy": cpu / elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4, help="interleaved repetitions of every row, each starting at another row (medians reported)")
    parser.add_argument("--quick", action="store_true", help="512 tokens, 2 rounds, 1 repeat (CI smoke run)")
    args = parser.parse_args(argv)
    tokens, rounds, repeats = (512, 2, 1) if args.quick else (args.tokens, args.rounds, args.repeats)
    directory = Path(tempfile.mkdtemp(prefix="kvmem-bench-redis-"))
    cluster = LocalRedisCluster(directory / "cluster").start()
    for port in cluster.ports:  # AOF stays on (appendfsync everysec); its rewrites (a fork writing the whole
        # dataset, at random moments) would land on whichever row runs then: off for the bench
        cluster._cli("config", "set", "auto-aof-rewrite-percentage", "0", port=port)
    rows = []
    stores = {}
    try:
        for replicas in (0, 1):
            stores[replicas] = SessionStore.open(StoreConfig(
                data_dir=directory / "data", chunk_tokens=256, cpu_tier_bytes=0, backend="redis",
                redis_url=cluster.url, redis_namespace=f"bench{replicas}", redis_min_replicas=replicas))
        chunk_tokens = stores[0].config.chunk_tokens
        timings: dict[str, list] = {"store0": [], "store1": [], "plain": [], "plain+wait": []}
        nodes = stores[0].backend.nodes
        for repeat in range(repeats):  # every row in every repeat, interleaved; medians: the machine is shared
            rows_now = [("store0", lambda: store_round(stores[0], tokens, rounds, repeat)),
                        ("plain", lambda: plain_round(stores[0], tokens, rounds, chunk_tokens)),
                        ("store1", lambda: store_round(stores[1], tokens, rounds, repeat)),
                        ("plain+wait", lambda: plain_round(stores[1], tokens, rounds, chunk_tokens, wait_replicas=1))]
            shift = repeat % len(rows_now)  # each repeat starts at another row: no row always follows the same one
            for row, run in rows_now[shift:] + rows_now[:shift]:
                settle(nodes)  # replicas caught up and dirty pages written (untimed): no row pays for the one before
                timings[row].append(run())
        for store in stores.values():
            store.close()
        stores.clear()
        gb = timings["store0"][0][2] / 1e9

        def median(row: str, column: int) -> float:
            return statistics.median(t[column] for t in timings[row])

        plain_save, plain_restore, wait_save = median("plain", 0), median("plain", 1), median("plain+wait", 0)
        for replicas in (0, 1):
            save_s, restore_s = median(f"store{replicas}", 0), median(f"store{replicas}", 1)
            rows.append((f"kvmem store, min_replicas={replicas}", gb / save_s, gb / restore_s, plain_save / save_s, plain_restore / restore_s,
                         wait_save / save_s))
        rows.append(("redis-py SET/GET, same bytes", gb / plain_save, gb / plain_restore, 1.0, 1.0, float("nan")))
        rows.append(("redis-py SET + WAIT 1 per primary, same bytes", gb / wait_save, float("nan"), float("nan"), float("nan"), 1.0))
        commits = commit_rate(cluster, directory, 2.0 if args.quick else 10.0)
    finally:
        for store in stores.values():
            store.close()
        cluster.stop(remove=True)
    print(f"\n{rounds} sessions of {tokens} tokens ({SPEC.num_layers} layers, fp16), 3+3 local Redis Cluster\n")
    print("| row | save GB/s | restore GB/s | save vs redis-py SET | restore vs redis-py GET | save vs SET + WAIT 1 |")
    print("|---|---:|---:|---:|---:|---:|")

    def cell(value: float, form: str) -> str:
        return "–" if value != value else format(value, form) + ("x" if form == ".2f" else "")

    for name, save_rate, restore_rate, save_ratio, restore_ratio, wait_ratio in rows:
        print(f"| {name} | {save_rate:.3f} | {cell(restore_rate, '.3f')} | {cell(save_ratio, '.2f')} | {cell(restore_ratio, '.2f')} | {cell(wait_ratio, '.2f')} |")
    print("\nratios: the redis-py row's time over the store's (above 1: the store is faster); medians of interleaved repeats")
    print(f"\nmetadata commits: 4 threads saving one-chunk sessions (min_replicas=1) for {commits['seconds']:.0f} s: "
          f"{commits['saves_per_s']:.0f} saves/s, metadata primary {commits['meta_cpu_ms_per_save']:.2f} CPU ms per save "
          f"({commits['meta_cpu_busy']:.2f} of a core busy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
