"""One against two kvmem servers over one Redis Cluster: aggregate restore throughput, latency,
and CPU seconds per GB restored for the kvmem servers, the Redis nodes and the clients, in one run.

    python -m bench.scale_out            # 8 sessions of 2048 tokens, 4 client processes, 5 repeats
    python -m bench.scale_out --quick    # CI smoke run (tiny sessions, 1 repeat)

One local 3-master/3-replica cluster; kvmem server processes over one namespace of it (no model,
``redis_min_replicas=1``). Sessions in SmolLM2-135M's layout (bench.redis_backend.SPEC, 23 KB per
token) are saved through server A, with distinct token ids so nothing deduplicates. Then C client
processes (not threads: the client's own GIL must not be the limit) each restore every session
once per pass, in a rotated order, either all through A ("1 server") or split between A and B
("2 servers"). The rows are interleaved, their order alternating, over the repeats; a row's
figures are medians over repeats, its latencies pooled over them.

Every restore is checked: a CRC-32 of all its keys and values against the one computed at save
time, and its token ids. The checksum's CPU time is measured in each client and left out of the
client CPU figure (it is not a client's work); its gaps stay in the loop, equal in every row.

CPU seconds are utime + stime (+ reaped children: Redis's AOF rewrites) from /proc/<pid>/stat for
the servers and the Redis nodes, and each client process's process_time over its loop. The
machine this runs on has 2 shared cores, so absolute GB/s is bound by them: read the ratios and
the CPU seconds per GB (what a capacity plan scales), not the rates.

Rows "tier" (on by default, --no-cpu-tier skips them) repeat both with a second pair of servers
whose CPU memory tier (2 GiB) holds every session, warmed before timing: restores then read only
the session record from Redis.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from bench.common import RESULTS_DIR, _server_process, disk_tempdir, environment, write_result
from bench.redis_backend import SPEC, layers_for
from kvmem.client import Client
from kvmem.config import RetrievalSettings, ServerConfig, ServiceConfig
from kvmem.local_cluster import LocalRedisCluster
from kvstore.store import StoreConfig

NAMESPACE = "scale-out"
TIER_BYTES = 2 << 30
_TICK = os.sysconf("SC_CLK_TCK")


def checksum(layers) -> int:
    crc = 0
    for keys, values in layers:
        crc = zlib.crc32(keys.contiguous().numpy(), crc)
        crc = zlib.crc32(values.contiguous().numpy(), crc)
    return crc


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process and of its reaped children (Redis forks its AOF rewrites)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / _TICK  # fields 14-17 of proc(5)


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine, all cores (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / _TICK


def _client_worker(commands, results, barrier) -> None:
    """One client process: per command, restore its list of (session, first token, tokens, crc)
    through one address after the start barrier; put what it measured."""
    import torch

    torch.set_num_threads(1)
    while (command := commands.get()) is not None:
        address, work = command
        try:
            with Client(address, spec=SPEC, timeout=600) as client:
                client.wait_ready(60)
                barrier.wait(300)
                cpu0, started = time.process_time(), time.perf_counter()
                latencies, nbytes, check_cpu, wrong = [], 0, 0.0, []
                for session_id, first_token, tokens, crc in work:
                    at = time.perf_counter()
                    restored = client.restore(session_id, build_cache=False)
                    latencies.append(time.perf_counter() - at)
                    check0 = time.thread_time()
                    ids = restored.token_ids
                    if checksum(restored.layers) != crc or len(ids) != tokens or int(ids[0]) != first_token or int(ids[-1]) != first_token + tokens - 1:
                        wrong.append(session_id)
                    check_cpu += time.thread_time() - check0
                    nbytes += sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in restored.layers)
                ended, cpu = time.perf_counter(), time.process_time() - cpu0
            results.put({"started": started, "ended": ended, "latencies": latencies, "bytes": nbytes, "cpu_s": cpu, "check_cpu_s": check_cpu, "wrong": wrong})
        except Exception as exc:  # reported to the parent, which stops the run
            with contextlib.suppress(Exception):
                barrier.abort()
            results.put({"error": f"{type(exc).__name__}: {exc}"})


class Clients:
    """C client processes (spawned: the parent holds gRPC channels, which do not survive fork)."""

    def __init__(self, count: int):
        context = multiprocessing.get_context("spawn")
        self.barrier = context.Barrier(count + 1)
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in range(count)]
        self.processes = [context.Process(target=_client_worker, args=(queue, self.results, self.barrier), daemon=True) for queue in self.commands]
        for process in self.processes:
            process.start()

    def run(self, assignments: list[tuple[str, list]], pids: dict[str, list[int]]) -> dict[str, Any]:
        """Hand each client (address, work), start them together; wall time, bytes, latencies and
        CPU seconds per group of ``pids`` over the loop, and the clients' own."""
        for queue, assignment in zip(self.commands, assignments):
            queue.put(assignment)
        before = {group: sum(cpu_seconds(pid) for pid in group_pids) for group, group_pids in pids.items()}
        machine_before, at = machine_cpu_seconds(), time.perf_counter()
        self.barrier.wait(300)
        reports = [self.results.get(timeout=900) for _ in self.processes]
        machine_s, window_s = machine_cpu_seconds() - machine_before, time.perf_counter() - at
        after = {group: sum(cpu_seconds(pid) for pid in group_pids) for group, group_pids in pids.items()}
        errors = [report["error"] for report in reports if "error" in report]
        if errors:
            raise RuntimeError(f"a client failed: {errors[0]}")
        wrong = sorted({session for report in reports for session in report["wrong"]})
        if wrong:
            raise AssertionError(f"restores differ from what was saved: {wrong}")
        cpu = {group: after[group] - before[group] for group in pids}
        cpu["clients"] = sum(report["cpu_s"] - report["check_cpu_s"] for report in reports)
        return {
            "wall_s": max(report["ended"] for report in reports) - min(report["started"] for report in reports),
            "bytes": sum(report["bytes"] for report in reports),
            "restores": sum(len(report["latencies"]) for report in reports),
            "latencies": [latency for report in reports for latency in report["latencies"]],
            "cpu_s": cpu,
            "checksum_cpu_s": sum(report["check_cpu_s"] for report in reports),
            "machine_cores_busy": machine_s / window_s,  # everything on the machine, this benchmark's processes and others'
        }

    def close(self) -> None:
        for queue in self.commands:
            queue.put(None)
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()


def save_sessions(address: str, sessions: int, tokens: int) -> list[tuple[str, int, int, int]]:
    """Save the sessions through ``address``; (session id, first token id, tokens, crc) each."""
    saved = []
    with Client(address, spec=SPEC, timeout=600) as client:
        client.wait_ready(60)
        for index in range(sessions):
            layers = layers_for(tokens, seed=index)
            first = 1_000_000 + index * tokens  # distinct token ids: no chunk is shared
            client.save(f"s{index}", layers, list(range(first, first + tokens)), reuse_prefix=False)
            saved.append((f"s{index}", first, tokens, checksum(layers)))
    return saved


def verify_through(address: str, saved: list) -> None:
    """Restore every session through ``address`` once, bit-exact (also warms that server)."""
    with Client(address, spec=SPEC, timeout=600) as client:
        for session_id, first, tokens, crc in saved:
            restored = client.restore(session_id, build_cache=False)
            if checksum(restored.layers) != crc or restored.token_ids.tolist() != list(range(first, first + tokens)):
                raise AssertionError(f"{session_id} restored through {address} differs from what was saved")


def wait_for_aof_rewrites(cluster: LocalRedisCluster, timeout_s: float = 120.0) -> None:
    """A background AOF rewrite started by the saves would compete with the timed restores."""
    deadline = time.monotonic() + timeout_s
    while any("aof_rewrite_in_progress:1" in cluster._cli("info", "persistence", port=port) for port in cluster.ports):
        if time.monotonic() > deadline:
            raise RuntimeError("Redis AOF rewrites still running")
        time.sleep(0.2)


def assignments(addresses: Sequence[str], clients: int, saved: list, passes: int) -> list[tuple[str, list]]:
    """Client i goes to addresses[i % len]; it restores every session ``passes`` times, starting at session i."""
    out = []
    for index in range(clients):
        order = saved[index % len(saved):] + saved[: index % len(saved)]
        out.append((addresses[index % len(addresses)], order * passes))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(name: str, servers: int, runs: list[dict]) -> dict[str, Any]:
    gb = [run["bytes"] / 1e9 for run in runs]
    latencies = [latency for run in runs for latency in run["latencies"]]

    def per_gb(group: str) -> float:
        return statistics.median(run["cpu_s"][group] / (run["bytes"] / 1e9) for run in runs)

    return {
        "row": name,
        "servers": servers,
        "gb_per_s": statistics.median(size / run["wall_s"] for size, run in zip(gb, runs)),
        "p50_ms": 1e3 * percentile(latencies, 0.5),
        "p99_ms": 1e3 * percentile(latencies, 0.99),
        "server_cpu_s_per_gb": per_gb("servers"),
        "redis_cpu_s_per_gb": per_gb("redis"),
        "client_cpu_s_per_gb": per_gb("clients"),
        "total_cpu_s_per_gb": statistics.median(sum(run["cpu_s"].values()) / (run["bytes"] / 1e9) for run in runs),
        "cores_per_server": statistics.median(run["cpu_s"]["servers"] / run["wall_s"] / servers for run in runs),
        "cores_busy": statistics.median(sum(run["cpu_s"].values()) / run["wall_s"] for run in runs),
        "machine_cores_busy": statistics.median(run["machine_cores_busy"] for run in runs),
        "restores_per_repeat": runs[0]["restores"],
        "gb_per_repeat": gb[0],
        "runs": [{key: value for key, value in run.items() if key != "latencies"} for run in runs],
    }


HEADERS = ["row", "GB/s", "p50 ms", "p99 ms", "server CPU s/GB", "Redis CPU s/GB", "client CPU s/GB", "total CPU s/GB", "cores per server",
           "cores busy (bench)", "cores busy (machine)"]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|---|" + "---:|" * (len(HEADERS) - 1)]
    for row in rows:
        lines.append(f"| {row['row']} | {row['gb_per_s']:.3f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['server_cpu_s_per_gb']:.2f} | "
                     f"{row['redis_cpu_s_per_gb']:.2f} | {row['client_cpu_s_per_gb']:.2f} | {row['total_cpu_s_per_gb']:.2f} | {row['cores_per_server']:.2f} | "
                     f"{row['cores_busy']:.2f} | {row['machine_cores_busy']:.2f} |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[dict[str, Any]]:
    """Two servers over one, per kind (Redis reads, CPU tier)."""
    out = []
    for one in (row for row in rows if row["servers"] == 1):
        two = next(row for row in rows if row["servers"] == 2 and row["row"].split(",", 1)[1:] == one["row"].split(",", 1)[1:])
        out.append({"rows": f"{two['row']} / {one['row']}", "gb_per_s": two["gb_per_s"] / one["gb_per_s"],
                    **{key: two[key] / one[key] if one[key] else float("nan") for key in ("server_cpu_s_per_gb", "redis_cpu_s_per_gb", "client_cpu_s_per_gb", "total_cpu_s_per_gb", "p50_ms", "p99_ms")}})
    return out


def ratio_lines(found: list[dict]) -> list[str]:
    return [f"- {item['rows']}: throughput {item['gb_per_s']:.2f}x; CPU s/GB server {item['server_cpu_s_per_gb']:.2f}x, "
            f"Redis {item['redis_cpu_s_per_gb']:.2f}x, clients {item['client_cpu_s_per_gb']:.2f}x, total {item['total_cpu_s_per_gb']:.2f}x; "
            f"p50 {item['p50_ms']:.2f}x, p99 {item['p99_ms']:.2f}x" for item in found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--clients", type=int, default=4, help="concurrent client processes (C)")
    parser.add_argument("--passes", type=int, default=1, help="times each client restores every session per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-cpu-tier", action="store_true", help="skip the rows whose servers keep every session in their CPU tier")
    parser.add_argument("--quick", action="store_true", help="2 sessions of 256 tokens, 2 clients, 1 repeat (CI smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.tokens, args.clients, args.passes, args.repeats = 2, 256, 2, 1, 1
    command = "python -m bench.scale_out" + (" --quick" if args.quick else "") + "".join(f" {arg}" for arg in (argv if argv is not None else sys.argv[1:]) if arg != "--quick")
    began = time.monotonic()
    measured = environment()  # the commit the servers run, taken before they start
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=RESULTS_DIR, capture_output=True, text=True).stdout.split("\n")
    clients = Clients(args.clients)  # they import torch while the cluster starts
    with disk_tempdir("kvmem-bench-scale-out-") as directory, contextlib.ExitStack() as stack:
        stack.callback(clients.close)
        cluster = LocalRedisCluster(directory / "cluster").start()
        stack.callback(cluster.stop, remove=True)
        store = replace(StoreConfig(), backend="redis", redis_url=cluster.url, redis_namespace=NAMESPACE, redis_min_replicas=1, cpu_tier_bytes=0)
        tiers = {"Redis reads": 0} if args.no_cpu_tier else {"Redis reads": 0, "CPU tier": TIER_BYTES}
        servers: dict[str, dict[str, tuple[str, int]]] = {}
        for kind, tier_bytes in tiers.items():
            config = ServiceConfig(server=ServerConfig(host="127.0.0.1", port=0), store=replace(store, cpu_tier_bytes=tier_bytes),
                                   retrieval=RetrievalSettings(index_on_save=False))
            servers[kind] = {}
            for name in ("A", "B"):
                popen: list = []
                data_dir = directory / f"{kind.split()[-1].lower()}-{name}"
                data_dir.mkdir()
                port = stack.enter_context(_server_process(data_dir, config, popen=popen))
                servers[kind][name] = (f"127.0.0.1:{port}", popen[0].pid)
        saved = save_sessions(servers["Redis reads"]["A"][0], args.sessions, args.tokens)
        for pair in servers.values():  # bit-exact through every server; fills the tier servers' CPU tiers
            for address, _ in pair.values():
                verify_through(address, saved)
        wait_for_aof_rewrites(cluster)
        redis_pids = [process.pid for process in cluster.processes.values()]
        print(f"{args.sessions} sessions of {args.tokens} tokens saved and verified through every server "
              f"({time.monotonic() - began:.0f} s); {args.repeats} repeats of {len(tiers) * 2} rows", flush=True)
        plan = [(f"{servers_used} server{'s' if servers_used > 1 else ''}, {kind}", kind, names)
                for kind in tiers for servers_used, names in ((1, "A"), (2, "AB"))]
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in plan}
        for repeat in range(args.repeats):
            for name, kind, names in plan if repeat % 2 == 0 else plan[::-1]:
                pair = servers[kind]
                result = clients.run(assignments([pair[n][0] for n in names], args.clients, saved, args.passes),
                                     {"servers": [pair[n][1] for n in names], "redis": redis_pids})
                runs[name].append(result)
                print(f"  repeat {repeat + 1}: {name}: {result['bytes'] / 1e9 / result['wall_s']:.3f} GB/s", flush=True)
    rows = [summarize(name, len(names), runs[name]) for name, _, names in plan]
    found = ratios(rows)
    text = table(rows)
    size_gb = args.tokens * SPEC.bytes_per_token / 1e9
    setup = (f"{args.sessions} sessions of {args.tokens} tokens ({size_gb * 1e3:.0f} MB each; SmolLM2-135M layout: 30 layers, 3 KV heads, head_dim 64, fp16), "
             f"{args.clients} client processes, each restoring every session {args.passes}x per repeat ({rows[0]['gb_per_repeat']:.2f} GB per row and repeat), "
             f"{args.repeats} repeats interleaved; one local 3+3 Redis Cluster, redis_min_replicas=1, 256-token chunks")
    print(f"\n{setup}\n\n{text}\n")
    print("\n".join(ratio_lines(found)))
    payload = {"benchmark": "scale_out", "quick": args.quick, "command": command, "date": datetime.date.today().isoformat(),
               "machine": "2 shared cores", "environment": measured, "uncommitted": [line[3:] for line in dirty if line.strip()], "setup": setup, "args": vars(args), "rows": rows, "ratios": found, "table": text}
    write_result("scale_out", payload)
    if not args.quick:
        (RESULTS_DIR / "scale_out.md").write_text(markdown(payload))
    print(f"({time.monotonic() - began:.0f} s)")
    return 0


def markdown(payload: dict[str, Any]) -> str:
    return "\n".join([
        f"# bench.scale_out ({payload['date']}, this machine: 2 shared cores, git {payload['environment']['git_commit']})",
        "",
        f"`{payload['command']}`: {payload['setup']}.",
        "",
        *([f"Measured on git {payload['environment']['git_commit']} with uncommitted changes in: {', '.join(payload['uncommitted'])}.", ""] if payload["uncommitted"] else []),
        payload["table"],
        "",
        "Two servers over one:",
        "",
        *ratio_lines(payload["ratios"]),
        "",
        "GB/s: bytes restored by all clients over the wall time from the first client's start to the last one's end (median of the repeats). "
        "p50/p99: per restore, pooled over the repeats. CPU s/GB: CPU seconds over the loop per GB restored (median of the repeats); "
        "servers = the kvmem server processes in the row, Redis = all 6 nodes, clients = the client processes less their checksums. "
        "cores per server: one server process's CPU seconds over the wall time (a Python process is mostly held to one core by its GIL). "
        "cores busy: the bench's CPU seconds (servers, Redis, clients) over the wall time; machine: all busy CPU time on the machine in that window, "
        "others' work included (2 is all of it). Every restore was checked against a CRC-32 taken at save time. "
        "The 2 cores are shared with other work, so read the ratios and the CPU s/GB, not the rates.",
        "",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
