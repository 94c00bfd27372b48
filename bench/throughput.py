"""Save and restore throughput through gRPC against a plain loopback socket moving the same bytes.

Sessions of SmolLM2 shape (30 layers, 3 KV heads, head_dim 64, float32: 46,080 bytes/token) with
random KV. Per size and repeat, side by side in one process:

    socket                  Python TCP loopback: a sender thread sendall()s the session's KV bytes,
                            the receiver recv_into()s a preallocated bytearray (the baseline)
    save (durable)          Client.save, reuse_prefix=False, unique token ids (nothing dedups);
                            the server fsyncs the LMDB commit before answering
    save (non-durable)      the same against a server with durable=False (shows the fsync cost)
    restore (cpu tier)      Client.restore of the saved session from the CPU tier: one untimed restore
                            first fills it (saves stream to LMDB and do not fill the tier)
    restore (lmdb)          Client.restore from a server with cpu_tier_bytes=0: every block is read
                            from LMDB and checksum-verified (file pages are in the OS page cache)
    disk write+fsync        reference: the same bytes written to a new file on the data disk and
                            fdatasync'd, the ceiling for any durable save on this machine
    grpc raw up / down      reference, not a goal: a bare gRPC server in the same process streaming
                            the same bytes as 2 MiB raw messages (no protobuf, no kvmem), client to
                            server and back, each side copying into a preallocated buffer. It shows
                            how much of the gap to the socket is gRPC itself.

Restores include building the DynamicCache. Sessions are deleted (untimed) between repeats.
Goals (issue): restore >= 0.6x and durable save >= 0.4x of the socket figure.

    python -m bench.throughput [--quick]
"""
from __future__ import annotations

import gc
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch

from bench.common import (
    GiB,
    MB,
    SMOLLM2_SPEC,
    environment,
    format_table,
    median,
    parse_args,
    pin_threads,
    random_kv,
    random_tokens,
    run_server,
    summary,
    timed,
    write_result,
)

NAME = "throughput"
GOALS = {"restore (cpu tier)": 0.6, "save (durable)": 0.4}
PATHS = ["socket", "grpc raw up", "grpc raw down", "disk write+fsync", "save (durable)", "save (non-durable)", "restore (cpu tier)", "restore (lmdb)"]
RAW_MESSAGE_BYTES = 2 << 20  # the size kvmem batches its stream messages to (kvmem.convert.MAX_CHUNK_BYTES)


def disk_write(payload: memoryview, directory: Path) -> float:
    """Seconds to write ``payload`` to a new file in ``directory`` and fdatasync it (the disk's ceiling)."""
    path = directory / "disk-baseline.bin"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        for offset in range(0, len(payload), 4 << 20):
            handle.write(payload[offset : offset + (4 << 20)])
        os.fdatasync(handle.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def socket_transfer(payload: memoryview, sink: bytearray) -> float:
    """Seconds to move ``payload`` over a fresh loopback TCP connection into ``sink``."""
    total = len(payload)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    sender_error: list[BaseException] = []

    def send() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(payload)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            sender_error.append(exc)

    sink_view = memoryview(sink)
    start = time.perf_counter()
    sender = threading.Thread(target=send, name="bench-socket-sender")
    sender.start()
    conn, _ = listener.accept()
    received = 0
    with conn:
        while received < total:
            n = conn.recv_into(sink_view[received:], min(total - received, 4 << 20))
            if n == 0:
                break
            received += n
    elapsed = time.perf_counter() - start
    sender.join()
    listener.close()
    if sender_error:
        raise sender_error[0]
    if received != total:
        raise RuntimeError(f"socket baseline received {received} of {total} bytes")
    return elapsed


class RawGrpc:
    """A bare gRPC server (bytes in, bytes out) in this process: the floor under any gRPC service."""

    def __init__(self):
        import grpc
        from concurrent import futures

        self.payload: memoryview = memoryview(b"")
        self.sink: bytearray = bytearray()
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        handlers = grpc.method_handlers_generic_handler("bench.Raw", {
            "Upload": grpc.stream_unary_rpc_method_handler(self._upload),
            "Download": grpc.unary_stream_rpc_method_handler(self._download),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
        self.server.add_generic_rpc_handlers((handlers,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.upload = self.channel.stream_unary("/bench.Raw/Upload")
        self.download = self.channel.unary_stream("/bench.Raw/Download")

    def _upload(self, request_iterator, context) -> bytes:
        view, offset = memoryview(self.sink), 0
        for message in request_iterator:
            view[offset : offset + len(message)] = message
            offset += len(message)
        return offset.to_bytes(8, "little")

    def _download(self, request, context):
        for start in range(0, len(self.payload), RAW_MESSAGE_BYTES):
            yield bytes(self.payload[start : start + RAW_MESSAGE_BYTES])

    def time_upload(self, payload: memoryview, sink: bytearray) -> float:
        self.sink = sink
        messages = (bytes(payload[s : s + RAW_MESSAGE_BYTES]) for s in range(0, len(payload), RAW_MESSAGE_BYTES))
        elapsed, reply = timed(lambda: self.upload(messages, timeout=600))
        if int.from_bytes(reply, "little") != len(payload):
            raise RuntimeError("raw gRPC upload lost bytes")
        return elapsed

    def time_download(self, payload: memoryview, sink: bytearray) -> float:
        self.payload = payload
        view = memoryview(sink)

        def run() -> int:
            offset = 0
            for message in self.download(b"", timeout=600):
                view[offset : offset + len(message)] = message
                offset += len(message)
            return offset

        elapsed, received = timed(run)
        if received != len(payload):
            raise RuntimeError("raw gRPC download lost bytes")
        return elapsed

    def close(self) -> None:
        self.channel.close()
        self.server.stop(1).wait()


def check_restored(restored, layers) -> None:
    for index, ((k, v), (rk, rv)) in enumerate(zip(layers, restored.layers)):
        if not (torch.equal(k, rk) and torch.equal(v, rv)):
            raise RuntimeError(f"restored KV differs from what was saved (layer {index})")


def warm_up(clients, spec) -> None:
    """One small untimed save/restore per client: channel set-up, first-call imports (transformers)."""
    _, layers = random_kv(spec, 512, seed=12345)
    for index, client in enumerate(clients):
        client.save("warm-up", layers, random_tokens(512, seed=54321 + index), reuse_prefix=False, overwrite=True)
        client.restore("warm-up")
        client.delete("warm-up")


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    pin_threads()
    spec = SMOLLM2_SPEC
    sizes = [2048] if args.quick else [2048, 8192, 32768]
    largest = max(sizes) * spec.bytes_per_token
    store = dict(
        lmdb_map_bytes=max(GiB, 4 * largest),  # room for a session plus LMDB's free pages from the previous repeat
        lmdb_max_map_bytes=max(8 * GiB, 16 * largest),
        max_session_tokens=1 << 20,
    )
    samples: dict[int, dict[str, list[float]]] = {}
    print(f"throughput: SmolLM2 shape, {spec.bytes_per_token:,} bytes/token, sizes {sizes}, torch threads {torch.get_num_threads()}", flush=True)
    # kvmem servers run in their own processes, as deployed (the client does not share their GIL)
    with run_server("tiered", process=True, cpu_tier_bytes=max(2 * GiB, 2 * largest), durable=True, **store) as tiered, \
         run_server("lmdb", process=True, cpu_tier_bytes=0, durable=False, **store) as lmdb_only:
        tiered_client = tiered.client(spec)
        lmdb_client = lmdb_only.client(spec)
        warm_up([tiered_client, lmdb_client], spec)
        raw = RawGrpc()
        for size_index, tokens in enumerate(sizes):
            repeats = args.repeats or (1 if args.quick else (3 if tokens >= 32768 else 5))
            buffer, layers = random_kv(spec, tokens, seed=size_index)
            payload = memoryview(buffer.numpy()).cast("B")
            nbytes = len(payload)
            if nbytes != tokens * spec.bytes_per_token:
                raise RuntimeError("KV buffer size does not match the spec")
            sink = bytearray(nbytes)
            times: dict[str, list[float]] = {path: [] for path in PATHS}
            for rep in range(repeats):
                ids = random_tokens(tokens, seed=1000 * size_index + rep)
                times["socket"].append(socket_transfer(payload, sink))
                if rep == 0 and sink != payload:
                    raise RuntimeError("socket baseline corrupted the payload")
                times["grpc raw up"].append(raw.time_upload(payload, sink))
                times["grpc raw down"].append(raw.time_download(payload, sink))
                times["disk write+fsync"].append(disk_write(payload, tiered.data_dir))

                sid = f"tp-{tokens}-{rep}"
                elapsed, response = timed(lambda: tiered_client.save(sid, layers, ids, reuse_prefix=False, overwrite=True))
                if response.deduplicated_tokens:
                    raise RuntimeError(f"save deduplicated {response.deduplicated_tokens} tokens; token ids were meant to be unique")
                times["save (durable)"].append(elapsed)
                del tiered_client.restore(sid).layers[:]  # fills the CPU tier (untimed)
                elapsed, restored = timed(lambda: tiered_client.restore(sid))
                times["restore (cpu tier)"].append(elapsed)
                if rep == 0:
                    check_restored(restored, layers)
                del restored
                tiered_client.delete(sid)

                elapsed, _ = timed(lambda: lmdb_client.save(sid, layers, ids, reuse_prefix=False, overwrite=True))
                times["save (non-durable)"].append(elapsed)
                elapsed, restored = timed(lambda: lmdb_client.restore(sid))
                times["restore (lmdb)"].append(elapsed)
                if rep == 0:
                    check_restored(restored, layers)
                del restored
                lmdb_client.delete(sid)
                gc.collect()
                print(f"  {tokens} tokens, repeat {rep + 1}/{repeats}: " + ", ".join(f"{p} {times[p][-1]:.3f}s" for p in PATHS), flush=True)
            samples[tokens] = times
            del buffer, layers, payload, sink
            gc.collect()
        tier_stats = {t.name: {"hits": t.hits, "misses": t.misses} for t in tiered_client.stats().tiers}
        lmdb_stats = {t.name: {"hits": t.hits, "misses": t.misses} for t in lmdb_client.stats().tiers}
        tiered_client.close()
        lmdb_client.close()
        raw.close()

    rows, results = [], []
    for tokens, times in samples.items():
        nbytes = tokens * spec.bytes_per_token
        socket_rate = nbytes / median(times["socket"]) / MB
        for path in PATHS:
            seconds = median(times[path])
            rate = nbytes / seconds / MB
            ratio = rate / socket_rate
            goal = GOALS.get(path)
            verdict = "" if goal is None else ("PASS" if ratio >= goal else "FAIL")
            rows.append([tokens, nbytes / MB, path, seconds, rate, ratio, f">= {goal}x {verdict}" if goal else ""])
            results.append({"tokens": tokens, "bytes": nbytes, "path": path, "seconds": summary(times[path]), "mb_per_s": rate, "x_socket": ratio, "goal_x_socket": goal, "pass": None if goal is None else ratio >= goal})
    print()
    print(format_table(["tokens", "MB", "path", "median s", "MB/s", "x socket", "goal"], rows, title="Save/restore throughput vs loopback socket (medians; MB = 10^6 bytes)"))
    print(f"\ntier hits (tiered server): {tier_stats}\ntier hits (lmdb-only server): {lmdb_stats}")
    path = write_result(NAME, {
        "benchmark": NAME, "quick": args.quick, "spec": spec.to_dict(), "bytes_per_token": spec.bytes_per_token,
        "goals": GOALS, "results": results, "tier_stats": {"tiered": tier_stats, "lmdb_only": lmdb_stats}, "environment": environment(),
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
