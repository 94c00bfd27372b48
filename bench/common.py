"""Shared helpers for the benchmarks: in-process servers, random KV, timing, tables, results.

Every benchmark pins torch threads, starts its servers in process on 127.0.0.1 port 0 with a
temporary data directory on the real disk (durable saves fsync, so tmpfs would flatter them),
repeats each measurement, reports medians, and writes bench/results/<name>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from kvmem.client import Client
from kvmem.config import RetrievalSettings, ServerConfig, ServiceConfig
from kvstore.spec import ModelSpec
from kvstore.store import StoreConfig

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL_CACHE = REPO / ".cache" / "models"
THREADS = 2
MB = 1e6  # benchmarks report decimal megabytes (10^6 bytes)
GiB = 1 << 30

# SmolLM2-135M KV layout: 30 layers, 3 KV heads, head_dim 64, float32 -> 46,080 bytes per token.
SMOLLM2_SPEC = ModelSpec("smollm2-135m-instruct", 30, 3, 64, "float32", max_position=8192)


# ---------------------------------------------------------------------------- setup
def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke run (under ~60 s); what CI calls")
    parser.add_argument("--repeats", type=int, default=0, help="override the number of repeats (0 = the benchmark's default)")
    return parser.parse_args(argv)


def pin_threads(n: int = THREADS) -> None:
    torch.set_num_threads(n)


def environment() -> dict[str, Any]:
    """What the numbers were measured on (goes into every result file)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import grpc
    import lmdb
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "grpcio": grpc.__version__,
        "lmdb": lmdb.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "git_commit": commit,
    }


# ---------------------------------------------------------------------------- temp dirs on disk
def _fs_type(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (longest mount-point prefix in /proc/mounts)."""
    best, kind = "", ""
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) >= 3:
                    mount = parts[1]
                    if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                        best, kind = mount, parts[2]
    except OSError:
        return ""
    return kind


@contextlib.contextmanager
def disk_tempdir(prefix: str) -> Iterator[Path]:
    """A temporary directory on a real disk (not tmpfs/ramfs), removed afterwards.

    Uses the system temp dir unless it is memory-backed; then falls back to bench/results/*.tmp
    (git-ignored).
    """
    base = Path(tempfile.gettempdir()).resolve()
    if _fs_type(base) in ("tmpfs", "ramfs"):
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=RESULTS_DIR))
    else:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------- servers
@dataclass
class RunningServer:
    service: Any  # the in-process Service, or None when the server runs in its own process
    address: str
    data_dir: Path
    config: ServiceConfig
    port: int = 0

    def client(self, spec: ModelSpec | None = None, address: str | None = None, max_message_bytes: int = 64 << 20) -> Client:
        client = Client(address or self.address, spec=spec, timeout=1800.0, max_message_bytes=max_message_bytes)
        client.wait_ready(30)
        return client


@contextlib.contextmanager
def run_server(name: str = "kvmem", process: bool = False, **store_overrides: Any) -> Iterator[RunningServer]:
    """Start a kvmem service on 127.0.0.1:0 with a fresh on-disk data dir; stop it after.

    process=True runs ``server.py`` in its own process, as deployed (client and server then do
    not share a GIL); otherwise the service runs in this process.
    """
    with disk_tempdir(f"kvmem-bench-{name}-") as data_dir:
        store = replace(StoreConfig(), data_dir=data_dir, **store_overrides)
        # store benchmarks measure the store: no background block indexing competing for the CPU
        config = ServiceConfig(server=ServerConfig(host="127.0.0.1", port=0, max_message_bytes=64 << 20), store=store,
                               retrieval=RetrievalSettings(index_on_save=False))
        if process:
            with _server_process(data_dir, config) as port:
                yield RunningServer(None, f"127.0.0.1:{port}", data_dir, config, port)
            return
        from server import create_service  # the composition root lives at the repo root

        service = create_service(config).start()
        try:
            yield RunningServer(service, f"127.0.0.1:{service.port}", data_dir, config, service.port)
        finally:
            service.stop(grace=2.0)


@contextlib.contextmanager
def _server_process(data_dir: Path, config: ServiceConfig, extra: Sequence[str] = (), popen: list | None = None, port_name: str = "port") -> Iterator[int]:
    port_file = data_dir / port_name  # another name lets a second server run beside the first on the same store
    port_file.unlink(missing_ok=True)  # a server started before in this directory left its port
    overrides = [f"store.{key}={value}" for key, value in vars(config.store).items() if key != "data_dir"]
    command = [
        sys.executable, str(REPO / "server.py"), "--port", "0", "--data-dir", str(data_dir / "store"),
        "--set", f"server.port_file={port_file}", "--set", "model.prepare=false", "--set", "server.log_level=WARNING",
        "--set", f"server.max_message_bytes={config.server.max_message_bytes}", "--set", f"retrieval.index_on_save={str(config.retrieval.index_on_save).lower()}",
    ]
    for item in [*overrides, *extra]:
        command += ["--set", item]
    process = subprocess.Popen(command, cwd=REPO)
    if popen is not None:
        popen.append(process)  # the caller may read the process's memory
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"benchmark server did not start (exit code {process.poll()})")
            time.sleep(0.05)
        yield int(port_file.read_text())
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# ---------------------------------------------------------------------------- data
def random_kv(spec: ModelSpec, tokens: int, seed: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One contiguous buffer [L, 2, H, T, D] of random KV and per-layer (keys, values) views [H, T, D]."""
    generator = torch.Generator().manual_seed(seed)
    buffer = torch.randn((spec.num_layers, 2, spec.num_kv_heads, tokens, spec.head_dim), generator=generator, dtype=torch.float32).to(spec.torch_dtype)
    return buffer, [(buffer[layer, 0], buffer[layer, 1]) for layer in range(spec.num_layers)]


def random_tokens(count: int, seed: int, vocab: int = 49152) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=count, dtype=np.int64)


def session_bytes(spec: ModelSpec, tokens: int) -> int:
    return tokens * spec.bytes_per_token


# ---------------------------------------------------------------------------- timing & stats
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {"median": median(values), "min": min(values) if values else None, "max": max(values) if values else None, "samples": list(values)}


# ---------------------------------------------------------------------------- output
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """Plain-text table: text columns left-aligned, numeric columns right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = [title] if title else []
    out.append(line(cells[0]))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or value is None or value == ""


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write bench/results/<name>.json atomically (via a git-ignored .tmp file).

    Smoke runs (payload["quick"]) go to <name>.quick.json, git-ignored, so that CI and local smoke
    runs never overwrite the committed full-run results.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / (f"{name}.quick.json" if payload.get("quick") else f"{name}.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------- byte-counting TCP proxy
@dataclass
class ByteCounter:
    upstream: int = 0  # client -> server
    downstream: int = 0  # server -> client
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, direction: str, n: int) -> None:
        with self.lock:
            setattr(self, direction, getattr(self, direction) + n)

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.upstream, self.downstream


class CountingProxy:
    """A loopback TCP proxy in front of a server that counts the bytes each way (wire bytes,
    HTTP/2 framing included). Use its ``address`` instead of the server's."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.counter = ByteCounter()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, name="bench-proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, "upstream"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "downstream"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        try:
            while True:
                n = src.recv_into(buffer)
                if n == 0:
                    break
                dst.sendall(view[:n])
                self.counter.add(direction, n)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
