"""Save and restore through kvmem's store on Redis Cluster against redis-py SET/GET of the same
bytes, on one local 3+3 cluster in one run (ratios: the machine is shared).

    python -m bench.redis_backend                 # 16 sessions of 4096 tokens a row, SmolLM2-135M's layout
    python -m bench.redis_backend --aof-on-disk   # the same with the cluster's AOF files on disk
    python -m bench.redis_backend --quick         # CI smoke run

Rows: the store (save = staging marks, blocks SET NX on their primaries, one commit script;
restore = record + blocks GET, checksums verified) with min_replicas 0 and 1, and redis-py
writing/reading the same bytes as one value per block (one pipeline per primary, all primaries
at once: the best a plain client does), with min_replicas 1 also SET + WAIT 1. The rows take
turns session by session; between sessions (untimed) the replicas catch up, each session is
deleted and its blocks swept, and every 4 sessions the AOF files are rewritten, so memory and
files stay flat however many sessions run.
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


def store_session(store, tokens: int, index: int) -> tuple[float, float, int]:
    """Save and restore one new session (token ids no other session uses: nothing deduplicates);
    seconds of each and the bytes restored."""
    layers = layers_for(tokens, seed=index)
    started = time.perf_counter()
    store.save("bench", f"s{index}", SPEC, np.arange(tokens) + index * tokens, pieces(store, layers))
    save_s = time.perf_counter() - started
    for tier in store.blocks.tiers:
        tier.clear() if hasattr(tier, "clear") else None
    started = time.perf_counter()
    plan = store.restore("bench", f"s{index}", SPEC)
    nbytes = sum(len(piece.keys) + len(piece.values) for piece in plan.pieces())
    return save_s, time.perf_counter() - started, nbytes


def drop_store_session(store, index: int) -> None:
    """Untimed: delete the session and sweep its blocks at once (the bench's memory stays flat)."""
    store.delete("bench", f"s{index}")
    store.backend.mark_orphans()
    store.backend.sweep_blocks(grace_s=0)


def plain_session(store, tokens: int, index: int, chunk_tokens: int, wait_replicas: int = 0) -> tuple[float, float]:
    """redis-py SET/GET of the same bytes, one value per (chunk, layer), a chunk's layers per call
    as the store moves them: one pipeline per primary, all primaries at once (the store's own
    transport, so the ratio is the store's overhead). With ``wait_replicas`` > 0, one WAIT per
    primary at the end (what a durable plain write costs; the store also waits once per save).
    Save time starts at the tensors, as the store's does. The keys are deleted afterwards
    (untimed)."""
    nodes = store.backend.nodes
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
    save_s = time.perf_counter() - started
    started = time.perf_counter()
    got = 0
    for batch in batches:
        replies = nodes.per_primary([name for name, _ in batch], lambda client, indexes, batch=batch: _pipeline(client, [("GET", batch[i][0]) for i in indexes]), "plain GET")
        got += sum(len(value) for value in replies)
    restore_s = time.perf_counter() - started
    assert got == sum(len(value) for batch in batches for _, value in batch)
    for batch in batches:
        nodes.per_primary([name for name, _ in batch], lambda client, indexes, batch=batch: _pipeline(client, [("DEL", batch[i][0]) for i in indexes]), "plain DEL")
    return save_s, restore_s


def rewrite_aof(cluster) -> None:
    """Untimed: every node rewrites its AOF (deleted sessions leave it), and the bench waits for
    it: the files stay small, and no rewrite lands inside a timed row."""
    for port in cluster.ports:
        cluster._cli("bgrewriteaof", port=port)
    for port in cluster.ports:
        for _ in range(600):
            info = cluster._cli("info", "persistence", port=port)
            if "aof_rewrite_in_progress:0" in info and "aof_rewrite_scheduled:0" in info:
                break
            time.sleep(0.05)


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
    parser.add_argument("--sessions", type=int, default=16, help="sessions per row, interleaved session by session (medians reported)")
    parser.add_argument("--aof-on-disk", action="store_true",
                        help="the cluster's AOF files on disk (default: on tmpfs where /dev/shm exists, so the shared "
                             "disk's writeback stalls, which hit whichever row runs then, do not decide the ratio)")
    parser.add_argument("--quick", action="store_true", help="512 tokens, 2 sessions (CI smoke run)")
    args = parser.parse_args(argv)
    tokens, sessions = (512, 2) if args.quick else (args.tokens, args.sessions)
    shm = Path("/dev/shm")
    on_tmpfs = not args.aof_on_disk and shm.is_dir()
    directory = Path(tempfile.mkdtemp(prefix="kvmem-bench-redis-", dir=shm if on_tmpfs else None))
    cluster = LocalRedisCluster(directory / "cluster").start()
    for port in cluster.ports:  # AOF stays on (appendfsync everysec); its automatic rewrites (a fork writing the
        # whole dataset, at random moments) would land on whichever row runs then: the bench rewrites untimed instead
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
        nbytes = 0
        for index in range(sessions):  # every row for every session, interleaved: the machine is shared
            def store_row(replicas: int, index=index):
                nonlocal nbytes
                save_s, restore_s, nbytes = store_session(stores[replicas], tokens, index)
                drop_store_session(stores[replicas], index)
                return save_s, restore_s

            rows_now = [("store0", lambda: store_row(0)),
                        ("plain", lambda index=index: plain_session(stores[0], tokens, index, chunk_tokens)),
                        ("store1", lambda: store_row(1)),
                        ("plain+wait", lambda index=index: plain_session(stores[1], tokens, index, chunk_tokens, wait_replicas=1))]
            shift = index % len(rows_now)  # each session starts at another row: no row always follows the same one
            for row, run in rows_now[shift:] + rows_now[:shift]:
                settle(nodes, sync=not on_tmpfs)  # replicas caught up, dirty pages written (untimed): no row pays for the one before
                timings[row].append(run())
            if index % 4 == 3:
                rewrite_aof(cluster)
        resident_mb = sum(nodes.client(address).info("memory")["used_memory"] for address in nodes.primaries()) / 1e6
        for store in stores.values():
            store.close()
        stores.clear()
        gb = nbytes / 1e9

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
    where = "AOF on tmpfs" if on_tmpfs else "AOF on disk"
    print(f"\n{sessions} sessions of {tokens} tokens ({SPEC.num_layers} layers, fp16, {gb * 1000:.0f} MB) per row, 3+3 local Redis Cluster, {where}\n")
    print("| row | save GB/s | restore GB/s | save vs redis-py SET | restore vs redis-py GET | save vs SET + WAIT 1 |")
    print("|---|---:|---:|---:|---:|---:|")

    def cell(value: float, form: str) -> str:
        return "–" if value != value else format(value, form) + ("x" if form == ".2f" else "")

    for name, save_rate, restore_rate, save_ratio, restore_ratio, wait_ratio in rows:
        print(f"| {name} | {save_rate:.3f} | {cell(restore_rate, '.3f')} | {cell(save_ratio, '.2f')} | {cell(restore_ratio, '.2f')} | {cell(wait_ratio, '.2f')} |")
    print(f"\nRedis primaries' memory after every row's sessions were deleted: {resident_mb:.0f} MB (the bench stays flat)")
    print("\nratios: the redis-py row's median time over the store's (above 1: the store is faster); rows interleaved session by session")
    print(f"\nmetadata commits: 4 threads saving one-chunk sessions (min_replicas=1) for {commits['seconds']:.0f} s: "
          f"{commits['saves_per_s']:.0f} saves/s, metadata primary {commits['meta_cpu_ms_per_save']:.2f} CPU ms per save "
          f"({commits['meta_cpu_busy']:.2f} of a core busy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
