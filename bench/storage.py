"""The durable write path of the store: save speed against the disk, group commit, server memory.

Only the public surface is used, so the same script measures any version of the server: the
server runs as deployed (``python server.py --port P --data-dir D``, a free port on 127.0.0.1,
waited for through the health service), and everything goes through ``kvmem.client.Client``
or, for the stream that never commits, the generated stubs of the wire contract
(``proto/kvmem/v1/kvmem.proto``). Data dirs are on the real disk (durable saves fsync). KV is
random with the exact shape of SmolLM2-135M (30 layers, 3 KV heads, head_dim 64, float32:
46,080 bytes/token); token ids are unique per save, so nothing deduplicates. Ratios against a
baseline measured in the same run are the headline; absolute numbers are noisy on 2 cores.

1. Durable save. Per size (2k, 8k, 32k tokens; --quick: 2k, 8k), one untimed warm-up, then 3
   repeats of: ``client.save`` of a new session against writing the same number of bytes to a
   new file in the server's data directory and fsyncing it (the order of the two alternates
   between repeats); sessions deleted (untimed) after each repeat. Medians; MB/s of both and
   save / disk. Also the CPU seconds of the server process and of this (client) process per
   save: wall time not covered by either is waiting (disk, fsync, wake-ups). Goal (issue):
   save >= 0.8x the disk.

2. Group commit. 4 concurrent writers (threads of this process, a Client each) against 1,
   each writer doing a fixed number of back-to-back durable saves of new sessions, for
   16-token saves (0.7 MB: fsync-bound), 256-token saves (one chunk, 11.8 MB: close to the
   disk's bandwidth here) and 2,048-token saves. 3 repeats, 1 and 4
   writers interleaved, medians of aggregate saves/s and MB/s (all saves over the wall time
   from the common start to the last save's return). Goal (issue): 4 writers >= 2x 1 writer.

3. Server memory. A fresh server per case, with the CPU tier off (``store.cpu_tier_bytes=0``:
   a committed session sitting in the cache tier is not write-path memory; a server that does
   not know the key runs with its defaults, recorded in the results). After a small warm-up
   save, the server's RSS is read, VmHWM reset (/proc/PID/clear_refs), and /proc/PID/status
   (VmRSS, RssAnon, RssFile) sampled every 20 ms while the case runs:
     save N              client.save of N tokens (2k, 8k, 32k; --quick: 2k, 8k)
     stream, no commit   a valid header for a session of 1 GiB (--quick: 256 MiB) of KV, then
                         valid chunk messages up to that many bytes, then the stream ends
                         without its commit (the server refuses it: nothing is stored)
     stream, cancelled   the same, but the client cancels the call with the stream still open
   Each stream case runs twice on its server. Reported: peak growth over the pre-case RSS
   (VmRSS, from the samples and VmHWM; RssAnon and RssFile from the samples: file-backed pages,
   such as a memory-mapped store's, count in RSS but the kernel can reclaim them), and what is
   left 1 s after each round (a second round shows whether what a refused stream leaves behind
   adds up). Goal (issue): peak growth <= 64 MB plus one chunk (chunk_tokens x bytes per token,
   11.8 MB here) per open stream.

    python -m bench.storage [--quick] [--out PATH]

Results: bench/results/storage.json (--quick: storage.quick.json, git-ignored, like every
benchmark's smoke run), or --out.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; inherited by the server

import grpc
import numpy as np
import torch

from bench.common import _fs_type, disk_tempdir
from bench.common import environment as common_environment
from kvmem.client import Client
from kvmem.v1 import kvmem_pb2 as pb
from kvstore.spec import ModelSpec

NAME = "storage"
REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1e6  # decimal megabytes, like every benchmark here
MiB, GiB = 1 << 20, 1 << 30
SPEC = ModelSpec("smollm2-135m-instruct", num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32", max_position=8192)
BYTES_PER_TOKEN = SPEC.bytes_per_token  # 46,080
CHUNK_MESSAGE_BYTES = 2 << 20  # tensor bytes per stream message (the contract's limit)
SAVE_METHOD = f"/{pb.DESCRIPTOR.services_by_name['KVMem'].full_name}/SaveSession"
GOAL_SAVE_X = 0.8  # durable save >= 0.8x disk write + fsync
GOAL_GROUP_X = 2.0  # 4 writers >= 2x 1 writer, aggregate
GOAL_RSS_MB = 64.0  # peak RSS growth <= 64 MB + one chunk per open stream
SAMPLE_S = 0.02
SETTLE_S = 1.0

# settings for every server (config keys of today's server; dropped if a server refuses them)
BASE_SETTINGS = ["model.prepare=false", "retrieval.index_on_save=false", "server.log_level=WARNING", f"server.max_message_bytes={64 << 20}"]
NO_CPU_TIER = ["store.cpu_tier_bytes=0"]


# ---------------------------------------------------------------------------- small helpers
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {"median": median(values), "min": min(values) if values else None, "max": max(values) if values else None, "samples": list(values)}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    try:
        from bench.common import format_table as common_format
    except Exception:  # noqa: BLE001 - bench.common imports store internals; the table is not worth failing for
        lines = [title] if title else []
        lines += ["  ".join(str(h) for h in headers)] + ["  ".join(str(v) for v in row) for row in rows]
        return "\n".join(lines)
    return common_format(headers, rows, title)


def environment() -> dict[str, Any]:
    """bench.common's record of the machine, plus what this benchmark needs to tell runs apart."""
    return {**common_environment(), "repo": str(REPO), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def start_together(threads: list[threading.Thread], barrier: threading.Barrier) -> float:
    """Start ``threads`` (each waits on ``barrier`` first), release them at once, wait for all;
    returns the moment they were released (perf_counter)."""
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return started


def random_kv(tokens: int, seed: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One contiguous float32 buffer [L, 2, H, T, D] of random KV and per-layer (keys, values) views [H, T, D]."""
    generator = torch.Generator().manual_seed(seed)
    buffer = torch.randn((SPEC.num_layers, 2, SPEC.num_kv_heads, tokens, SPEC.head_dim), generator=generator, dtype=torch.float32)
    return buffer, [(buffer[layer, 0], buffer[layer, 1]) for layer in range(SPEC.num_layers)]


class TokenSource:
    """Token ids that no other save of the run shares (random, from a fresh seed each time)."""

    def __init__(self) -> None:
        self._seed = 0
        self._lock = threading.Lock()

    def take(self, count: int) -> list[int]:
        with self._lock:
            self._seed += 1
            seed = self._seed
        return np.random.default_rng(seed).integers(0, 49152, size=count, dtype=np.int64).tolist()


def disk_write(payload: memoryview, directory: Path) -> float:
    """Seconds to write ``payload`` to a new file in ``directory`` (4 MiB writes) and fsync it."""
    path = directory / "bench-storage-baseline.bin"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        for offset in range(0, len(payload), 4 * MiB):
            handle.write(payload[offset : offset + 4 * MiB])
        os.fsync(handle.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


# ---------------------------------------------------------------------------- the server process
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(address: str, deadline: float, process: subprocess.Popen) -> None:
    """Until the health service says SERVING (or, without grpc_health, GetStats answers)."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError:
        health_pb2 = None
    with grpc.insecure_channel(address) as channel:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with code {process.returncode}")
            try:
                if health_pb2 is not None:
                    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                else:
                    with Client(address, timeout=1.0) as client:
                        client.stats()
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server at {address} not healthy in time")
            time.sleep(0.1)


@dataclass
class Server:
    """``python server.py`` in its own process, on a free 127.0.0.1 port, data dir on disk."""

    data_dir: Path
    settings: list[str]
    optional: list[str] = field(default_factory=list)  # dropped (and recorded) if the server refuses them
    process: subprocess.Popen | None = None
    port: int = 0
    applied: list[str] = field(default_factory=list)
    log_path: Path | None = None

    def start(self, timeout: float = 120.0) -> "Server":
        attempts = [self.settings + self.optional, self.settings] if self.optional else [self.settings]
        errors = []
        for settings in attempts + [[]]:
            for _ in range(2):  # a port taken between free_port() and bind: once more
                try:
                    self._launch(settings, timeout)
                    self.applied = settings
                    return self
                except (RuntimeError, TimeoutError) as exc:
                    errors.append(f"{settings}: {exc}: {self._log_tail()}")
                    self.stop()
        raise RuntimeError("the server did not start:\n" + "\n".join(errors))

    def _launch(self, settings: list[str], timeout: float) -> None:
        self.port = free_port()
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        command = [sys.executable, str(REPO / "server.py"), "--port", str(self.port), "--host", "127.0.0.1", "--data-dir", str(self.data_dir)]
        for item in settings:
            command += ["--set", item]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_healthy(self.address, time.monotonic() + timeout, self.process)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError, TypeError):
            return self.log_path.read_text(errors="replace")[-1500:]
        return ""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self) -> Client:
        client = Client(self.address, spec=SPEC, timeout=1800.0, max_message_bytes=64 << 20)
        client.wait_ready(30)
        return client

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@contextlib.contextmanager
def running_server(root: Path, name: str, optional: list[str] | None = None) -> Iterator[Server]:
    server = Server(root / name, list(BASE_SETTINGS), list(optional or [])).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root / name, ignore_errors=True)


# ---------------------------------------------------------------------------- /proc readings
_CLOCK_TICK = os.sysconf("SC_CLK_TCK")
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of ``pid`` in bytes (the fields the kernel gives)."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in STATUS_FIELDS:
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (clear_refs "5"); False if the kernel does not allow it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of ``pid``."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK


class RssSampler:
    """/proc/PID/status every 20 ms on a thread; ``peaks`` keeps the maximum of each field."""

    def __init__(self, pid: int, interval: float = SAMPLE_S):
        self.pid = pid
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss-sampler", daemon=True)

    def _take(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for key, value in proc_status(self.pid).items():
                self.peaks[key] = max(self.peaks.get(key, 0), value)
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._take()


# ---------------------------------------------------------------------------- 1. durable save
def durable_save(root: Path, sizes: list[int], repeats: int, tokens: TokenSource) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with running_server(root, "save") as server, server.client() as client:
        results["server_settings"] = server.applied
        for size in sizes:
            buffer, layers = random_kv(size, seed=size)
            payload = memoryview(buffer.numpy()).cast("B")
            nbytes = size * BYTES_PER_TOKEN
            assert len(payload) == nbytes
            client.save(f"warm-{size}", layers, tokens.take(size), reuse_prefix=False)  # first-call costs, LMDB map growth
            client.delete(f"warm-{size}")
            save_s, disk_s, server_cpu, client_cpu = [], [], [], []
            for rep in range(repeats):
                sid = f"save-{size}-{rep}"
                ids = tokens.take(size)

                def save() -> None:
                    cpu0, mine0, start = process_cpu_seconds(server.pid), time.process_time(), time.perf_counter()
                    response = client.save(sid, layers, ids, reuse_prefix=False)
                    save_s.append(time.perf_counter() - start)
                    server_cpu.append(process_cpu_seconds(server.pid) - cpu0)
                    client_cpu.append(time.process_time() - mine0)
                    if response.deduplicated_tokens:
                        raise RuntimeError(f"save of {size} tokens deduplicated {response.deduplicated_tokens}; token ids were meant to be unique")

                steps = [save, lambda: disk_s.append(disk_write(payload, server.data_dir))]
                for step in steps if rep % 2 == 0 else steps[::-1]:
                    step()
                client.delete(sid)
                gc.collect()
            save_mbs, disk_mbs = nbytes / MB / median(save_s), nbytes / MB / median(disk_s)
            results[str(size)] = {
                "tokens": size, "bytes": nbytes, "save_s": summary(save_s), "disk_write_fsync_s": summary(disk_s),
                "save_mb_s": save_mbs, "disk_mb_s": disk_mbs, "save_over_disk": save_mbs / disk_mbs,
                "server_cpu_s": summary(server_cpu), "client_cpu_s": summary(client_cpu),
                "goal": GOAL_SAVE_X, "met": save_mbs / disk_mbs >= GOAL_SAVE_X,
            }
            print(f"  durable save {size:>6} tokens: {save_mbs:7.1f} MB/s, disk {disk_mbs:7.1f} MB/s, x{save_mbs / disk_mbs:.2f}", flush=True)
    return results


# ---------------------------------------------------------------------------- 2. group commit
def writers_run(server: Server, writers: int, saves_each: int, layers, size: int, tokens: TokenSource, tag: str) -> tuple[float, list[float], list[str]]:
    """(wall seconds from the common start to the last save, per-save latencies, session ids)."""
    clients = [server.client() for _ in range(writers)]
    ids = [[tokens.take(size) for _ in range(saves_each)] for _ in range(writers)]
    barrier = threading.Barrier(writers + 1)
    latencies: list[float] = []
    errors: list[BaseException] = []
    finished: list[float] = []
    lock = threading.Lock()

    def writer(index: int) -> None:
        barrier.wait()
        try:
            for number in range(saves_each):
                start = time.perf_counter()
                response = clients[index].save(f"{tag}-{index}-{number}", layers, ids[index][number], reuse_prefix=False)
                with lock:
                    latencies.append(time.perf_counter() - start)
                if response.deduplicated_tokens:
                    raise RuntimeError("a group-commit save deduplicated tokens; token ids were meant to be unique")
        except BaseException as exc:  # noqa: BLE001 - re-raised on the main thread
            errors.append(exc)
        finally:
            with lock:
                finished.append(time.perf_counter())

    start = start_together([threading.Thread(target=writer, args=(i,), name=f"bench-writer-{i}") for i in range(writers)], barrier)
    for client in clients:
        client.close()
    if errors:
        raise errors[0]
    return max(finished) - start, latencies, [f"{tag}-{i}-{n}" for i in range(writers) for n in range(saves_each)]


def group_commit(root: Path, plan: list[tuple[int, int]], repeats: int, tokens: TokenSource, writer_counts=(1, 4)) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with running_server(root, "group") as server, server.client() as admin:
        results["server_settings"] = server.applied
        for size, saves_each in plan:
            _, layers = random_kv(size, seed=1000 + size)
            writers_run(server, max(writer_counts), 1, layers, size, tokens, f"warm-{size}")  # connections, LMDB growth
            for sid in [f"warm-{size}-{i}-0" for i in range(max(writer_counts))]:
                admin.delete(sid)
            runs: dict[int, dict[str, list[float]]] = {n: {"wall_s": [], "saves_s": [], "mb_s": [], "latency_s": []} for n in writer_counts}
            for rep in range(repeats):
                order = list(writer_counts) if rep % 2 == 0 else list(writer_counts)[::-1]
                for writers in order:
                    wall, latencies, sids = writers_run(server, writers, saves_each, layers, size, tokens, f"g{size}-{writers}w-{rep}")
                    count = writers * saves_each
                    runs[writers]["wall_s"].append(wall)
                    runs[writers]["saves_s"].append(count / wall)
                    runs[writers]["mb_s"].append(count * size * BYTES_PER_TOKEN / MB / wall)
                    runs[writers]["latency_s"].extend(latencies)
                    for sid in sids:
                        admin.delete(sid)
                    gc.collect()
            entry: dict[str, Any] = {"tokens_per_save": size, "bytes_per_save": size * BYTES_PER_TOKEN, "saves_per_writer": saves_each}
            one = median(runs[min(writer_counts)]["saves_s"])
            for writers, values in runs.items():
                entry[f"{writers}_writers"] = {
                    "saves_per_s": median(values["saves_s"]), "mb_s": median(values["mb_s"]), "wall_s": summary(values["wall_s"]),
                    "saves_per_s_samples": values["saves_s"], "latency_median_s": median(values["latency_s"]),
                    "x_one_writer": median(values["saves_s"]) / one,
                }
            many = entry[f"{max(writer_counts)}_writers"]["x_one_writer"]
            entry["goal"], entry["met"] = GOAL_GROUP_X, many >= GOAL_GROUP_X
            results[str(size)] = entry
            print(f"  group commit {size:>5} tokens/save: 1 writer {one:6.2f} saves/s, {max(writer_counts)} writers x{many:.2f}", flush=True)
            del layers
            gc.collect()
    return results


# ---------------------------------------------------------------------------- 2b. backend commits
def backend_commits(root: Path, writes_each: int, repeats: int, writer_counts=(1, 4)) -> dict[str, Any]:
    """The group-commit mechanism alone: threads doing tiny durable writes (one 1 KiB record each)
    straight on the LMDB backend in the data dir, 1 against 4 threads; and the cost of one
    write + fsync of 4 KiB on this disk, which is what group commit can save per write."""
    from kvstore.lmdb_backend import LmdbBackend, LmdbConfig

    backend = LmdbBackend(LmdbConfig(root / "commits" / "lmdb"))
    new_api = hasattr(backend, "submit")  # the backend interface; the old backend took raw LMDB transactions
    value = b"v" * 1024

    def put(key: bytes) -> None:
        if new_api:
            backend.write(lambda txn: txn.put("meta", key, value))
        else:
            backend.write(lambda txn: txn.put(key, value, db=backend.db["meta"]))

    def run(threads: int, tag: str) -> float:
        barrier = threading.Barrier(threads + 1)

        def writer(index: int) -> None:
            barrier.wait()
            for n in range(writes_each):
                put(f"{tag}/{index}/{n}".encode())

        started = start_together([threading.Thread(target=writer, args=(i,)) for i in range(threads)], barrier)
        return threads * writes_each / (time.perf_counter() - started)

    probe = root / "commits" / "fsync.probe"
    fsync_s = []
    with open(probe, "wb") as handle:
        for _ in range(200):
            started = time.perf_counter()
            handle.write(b"x" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
            fsync_s.append(time.perf_counter() - started)
    probe.unlink()
    run(max(writer_counts), "warm")
    rates: dict[int, list[float]] = {n: [] for n in writer_counts}
    commits: dict[int, list[float]] = {n: [] for n in writer_counts}
    for rep in range(repeats):
        for threads in (writer_counts if rep % 2 == 0 else writer_counts[::-1]):
            before = getattr(backend, "commits", 0)
            rates[threads].append(run(threads, f"r{rep}-{threads}"))
            if new_api:
                commits[threads].append(threads * writes_each / max(1, backend.commits - before))
    backend.close()
    shutil.rmtree(root / "commits", ignore_errors=True)
    one = median(rates[min(writer_counts)])
    result = {"writes_per_thread": writes_each, "fsync_4k_s": summary(fsync_s)}
    for threads in writer_counts:
        result[f"{threads}_threads"] = {"writes_per_s": median(rates[threads]), "x_one_thread": median(rates[threads]) / one,
                                        "writes_per_commit": median(commits[threads]) if commits[threads] else None}
    many = result[f"{max(writer_counts)}_threads"]["x_one_thread"]
    result["goal"], result["met"] = GOAL_GROUP_X, many >= GOAL_GROUP_X
    print(f"  backend commits: 1 thread {one:.0f} writes/s, {max(writer_counts)} threads x{many:.2f}; fsync of 4 KiB {median(fsync_s) * 1e3:.2f} ms", flush=True)
    return result


# ---------------------------------------------------------------------------- 3. server memory
def spec_pb() -> pb.ModelSpec:
    return pb.ModelSpec(name=SPEC.name, num_layers=SPEC.num_layers, num_kv_heads=SPEC.num_kv_heads, head_dim=SPEC.head_dim,
                        dtype=pb.DTYPE_FLOAT32, max_position=SPEC.max_position)


def uncommitted_messages(session_id: str, total_bytes: int, chunk_tokens: int, tokens: TokenSource, on_sent: Callable[[], None]) -> tuple[Iterator[bytes], int]:
    """(encoded SaveSession messages, tensor bytes they carry): a valid header for a session of
    ``total_bytes`` of KV (rounded up to whole chunks), then valid chunk messages (chunk by chunk,
    every layer, <= 2 MiB of tensor bytes each) carrying at least ``total_bytes``; no commit.
    ``on_sent`` runs after the last message has been handed to gRPC (in gRPC's sending thread)."""
    piece = SPEC.num_kv_heads * chunk_tokens * SPEC.head_dim * 4  # keys (or values) of one (chunk, layer)
    per_chunk = 2 * piece * SPEC.num_layers
    chunks = -(-total_bytes // per_chunk)
    num_tokens = chunks * chunk_tokens
    payload = np.random.default_rng(7).standard_normal(piece // 4, dtype=np.float32).tobytes()
    header = pb.SaveSessionRequest(header=pb.SaveHeader(session_id=session_id, model=spec_pb(), token_ids=tokens.take(num_tokens)))
    per_message = max(1, CHUNK_MESSAGE_BYTES // (2 * piece))

    def messages() -> Iterator[bytes]:
        yield header.SerializeToString()
        batch = []
        for chunk in range(chunks):
            for layer in range(SPEC.num_layers):
                batch.append(pb.KVChunk(layer=layer, token_start=chunk * chunk_tokens, num_tokens=chunk_tokens, dtype=pb.DTYPE_FLOAT32, keys=payload, values=payload))
                if len(batch) == per_message:
                    yield pb.SaveSessionRequest(chunks=pb.KVChunks(chunks=batch)).SerializeToString()
                    batch = []
        if batch:
            yield pb.SaveSessionRequest(chunks=pb.KVChunks(chunks=batch)).SerializeToString()
        on_sent()

    return messages(), chunks * per_chunk


def stream_case(server: Server, total_bytes: int, chunk_tokens: int, tokens: TokenSource, cancel: bool) -> dict[str, Any]:
    """Send an uncommitted stream; returns the outcome (the status the call ended with)."""
    sent, release = threading.Event(), threading.Event()

    def on_sent() -> None:
        sent.set()
        if cancel:
            release.wait(60)  # keep the stream open until the main thread cancels it

    messages, carried = uncommitted_messages(f"uncommitted-{'cancelled' if cancel else 'ended'}-{time.monotonic_ns()}", total_bytes, chunk_tokens, tokens, on_sent)
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]) as channel:
        save = channel.stream_unary(SAVE_METHOD, request_serializer=lambda data: data, response_deserializer=pb.SaveSessionResponse.FromString)
        future = save.future(messages, timeout=1800.0)
        if cancel:
            sent.wait(1800)
            time.sleep(0.5)  # the last messages reach the server's handler
            future.cancel()
            release.set()
        try:
            future.result()
            outcome = "OK (stored!)"
        except grpc.FutureCancelledError:
            outcome = "CANCELLED"
        except grpc.RpcError as exc:
            outcome = exc.code().name
    return {"bytes_sent": carried, "outcome": outcome}


def memory_case(root: Path, name: str, action: Callable[[Server, Client, int], dict[str, Any]], open_streams: int, rounds: int = 1) -> dict[str, Any]:
    """RSS of a fresh server around ``rounds`` runs of ``action``: the peak over all of them, and
    what is left SETTLE_S after each (a second round shows whether what is left adds up)."""
    with running_server(root, f"rss-{name.replace(' ', '-').replace(',', '')}", NO_CPU_TIER) as server, server.client() as client:
        chunk_tokens = client.stats().chunk_tokens or 256
        _, warm = random_kv(chunk_tokens, seed=3)
        client.save("warm-up", warm, list(range(chunk_tokens)), reuse_prefix=False)
        client.delete("warm-up")
        del warm
        gc.collect()
        time.sleep(SETTLE_S)
        before = proc_status(server.pid)
        peak_reset = reset_peak(server.pid)
        infos, seconds, left = [], [], []
        with RssSampler(server.pid) as sampler:
            for _ in range(rounds):
                started = time.perf_counter()
                infos.append(action(server, client, chunk_tokens))
                seconds.append(time.perf_counter() - started)
                time.sleep(SETTLE_S)
                left.append(proc_status(server.pid))
        end = proc_status(server.pid)
        peak_rss = max(sampler.peaks.get("VmRSS", 0), end.get("VmHWM", 0) if peak_reset else 0)
        goal = GOAL_RSS_MB + open_streams * chunk_tokens * BYTES_PER_TOKEN / MB
        growth = (peak_rss - before["VmRSS"]) / MB
        return {
            **infos[0], "rounds": rounds, "outcomes": [info["outcome"] for info in infos], "seconds": seconds,
            "server_settings": server.applied, "chunk_tokens": chunk_tokens, "samples": sampler.samples, "vmhwm_reset": peak_reset,
            "before": before, "peaks": sampler.peaks, "after_each_round": left, "end": end,
            "peak_growth_mb": growth, "peak_anon_growth_mb": (sampler.peaks.get("RssAnon", 0) - before.get("RssAnon", 0)) / MB,
            "peak_file_growth_mb": (sampler.peaks.get("RssFile", 0) - before.get("RssFile", 0)) / MB,
            "left_after_mb": [(status["VmRSS"] - before["VmRSS"]) / MB for status in left],
            "left_anon_after_mb": [(status.get("RssAnon", 0) - before.get("RssAnon", 0)) / MB for status in left],
            "goal_mb": goal, "met": growth <= goal,
        }


def server_memory(root: Path, sizes: list[int], stream_bytes: int, tokens: TokenSource) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for size in sizes:
        _, layers = random_kv(size, seed=2000 + size)

        def save(server: Server, client: Client, chunk_tokens: int, layers=layers, size=size) -> dict[str, Any]:
            response = client.save(f"rss-{size}", layers, tokens.take(size), reuse_prefix=False)
            return {"tokens": size, "bytes_sent": size * BYTES_PER_TOKEN, "outcome": "OK", "bytes_written": response.bytes_written}

        results[f"save {size}"] = m = memory_case(root, f"save {size}", save, 1)
        print(f"  memory, save {size:>6} tokens: peak +{m['peak_growth_mb']:.0f} MB, left +{m['left_after_mb'][-1]:.0f} MB", flush=True)
    for cancel in (False, True):
        name = "stream, cancelled" if cancel else "stream, no commit"

        def stream(server: Server, client: Client, chunk_tokens: int, cancel=cancel) -> dict[str, Any]:
            return stream_case(server, stream_bytes, chunk_tokens, tokens, cancel)

        results[name] = m = memory_case(root, name, stream, 1, rounds=2)
        left = " / ".join(f"+{mb:.0f}" for mb in m["left_after_mb"])
        print(f"  memory, {name} x2: peak +{m['peak_growth_mb']:.0f} MB, left after each {left} MB ({', '.join(m['outcomes'])})", flush=True)
    return results


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Durable saves against the disk, group commit, and server memory on the write path.")
    parser.add_argument("--quick", action="store_true", help="smoke run (under ~2 minutes)")
    parser.add_argument("--repeats", type=int, default=0, help="override the number of repeats (0 = 3)")
    parser.add_argument("--out", type=Path, help="results file (default bench/results/storage.json; --quick: storage.quick.json)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    repeats = args.repeats or 3
    save_sizes = [2048, 8192] if args.quick else [2048, 8192, 32768]
    group_plan = [(16, 10), (256, 4)] if args.quick else [(16, 40), (256, 10), (2048, 3)]
    stream_bytes = 256 * MiB if args.quick else GiB
    tokens = TokenSource()
    started = time.perf_counter()
    with disk_tempdir("kvmem-bench-storage-") as root:
        print(f"data dirs under {root} ({_fs_type(root) or 'unknown fs'}); server: {REPO / 'server.py'}", flush=True)
        save = durable_save(root, save_sizes, repeats, tokens)
        group = group_commit(root, group_plan, repeats, tokens)
        commits = backend_commits(root, 100 if args.quick else 500, repeats)
        memory = server_memory(root, save_sizes, stream_bytes, tokens)
    elapsed = time.perf_counter() - started

    print()
    print(format_table(
        ["tokens", "MB", "save MB/s", "disk write+fsync MB/s", "save / disk", "server CPU s", "client CPU s", "save s", f"goal >= {GOAL_SAVE_X}x"],
        [[s, save[str(s)]["bytes"] / MB, save[str(s)]["save_mb_s"], save[str(s)]["disk_mb_s"], save[str(s)]["save_over_disk"],
          save[str(s)]["server_cpu_s"]["median"], save[str(s)]["client_cpu_s"]["median"], save[str(s)]["save_s"]["median"], save[str(s)]["met"]] for s in save_sizes],
        f"Durable save vs writing the same bytes + fsync in the data dir (medians of {repeats})",
    ))
    print()
    rows = []
    for size, _ in group_plan:
        entry = group[str(size)]
        for writers in (1, 4):
            w = entry[f"{writers}_writers"]
            rows.append([size, writers, writers * entry["saves_per_writer"], w["saves_per_s"], w["mb_s"], w["latency_median_s"] * 1e3, w["x_one_writer"], entry["met"] if writers == 4 else ""])
    print(format_table(["tokens/save", "writers", "saves/run", "saves/s", "MB/s", "latency ms", "x 1 writer", f"goal >= {GOAL_GROUP_X}x"], rows,
                       f"Group commit: concurrent durable saves, aggregate (medians of {repeats})"))
    print()
    print(format_table(["threads", "writes/s", "x 1 thread", "writes per fsync", f"goal >= {GOAL_GROUP_X}x"],
                       [[n, commits[f"{n}_threads"]["writes_per_s"], commits[f"{n}_threads"]["x_one_thread"], commits[f"{n}_threads"]["writes_per_commit"],
                         commits["met"] if n == 4 else ""] for n in (1, 4)],
                       f"Group commit, the backend alone: tiny durable writes (fsync of 4 KiB here: {commits['fsync_4k_s']['median'] * 1e3:.2f} ms median)"))
    print()
    print(format_table(
        ["case", "rounds", "MB sent each", "outcome", "peak RSS +MB", "peak anon +MB", "peak file +MB", "left after 1st +MB", "left after 2nd +MB", "goal <= MB", "met"],
        [[name, m["rounds"], m["bytes_sent"] / MB, m["outcome"], m["peak_growth_mb"], m["peak_anon_growth_mb"], m["peak_file_growth_mb"], m["left_after_mb"][0],
          m["left_after_mb"][1] if m["rounds"] > 1 else None, m["goal_mb"], m["met"]] for name, m in memory.items()],
        "Server RSS growth over its pre-case RSS (fresh server per case, CPU tier off; peak over all rounds)",
    ))
    print(f"\ntotal {elapsed:.0f} s")

    payload = {
        "benchmark": NAME, "quick": args.quick, "repeats": repeats, "seconds": elapsed, "environment": environment(),
        "spec": SPEC.to_dict(), "bytes_per_token": BYTES_PER_TOKEN,
        "goals": {"save_over_disk": GOAL_SAVE_X, "group_commit_x": GOAL_GROUP_X, "peak_rss_growth_mb": f"{GOAL_RSS_MB:g} + one chunk per open stream"},
        "durable_save": save, "group_commit": group, "backend_commits": commits, "server_memory": memory,
    }
    out = args.out or RESULTS_DIR / (f"{NAME}.quick.json" if args.quick else f"{NAME}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    os.replace(tmp, out)
    print(f"results: {out}")
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
