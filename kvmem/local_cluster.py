"""A Redis Cluster on loopback ports from Debian's ``redis-server`` and ``redis-cli``: for tests,
benchmarks and ``make serve-cluster``. Not for production (docs/scale-out.md says what is).

    python -m kvmem.local_cluster --dir data/redis-cluster --port 7100   # runs until Ctrl-C

Each node runs in its own directory with AOF on (``appendfsync everysec``: an acknowledged write
survives a node's crash through its replica, which ``store.redis_min_replicas`` waits for).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def _free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def find_base_port(count: int, start: int = 7100, stop: int = 30000) -> int:
    """A base port with ``count`` free ports after it (and their cluster bus ports, +10000)."""
    for base in range(start, stop, count):
        if all(_free(port) and _free(port + 10000) for port in range(base, base + count)):
            return base
    raise RuntimeError(f"no {count} free loopback ports between {start} and {stop}")


@dataclass
class LocalRedisCluster:
    directory: Path
    base_port: int = 0  # 0: the first free range from 7100
    masters: int = 3
    replicas: int = 1  # per master
    node_timeout_ms: int = 1000  # a dead master is failed over after about this long
    processes: dict[int, subprocess.Popen] = field(default_factory=dict)

    @property
    def ports(self) -> list[int]:
        return list(range(self.base_port, self.base_port + self.masters * (1 + self.replicas)))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.base_port}"

    def start(self) -> "LocalRedisCluster":
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli are missing: `apt-get install -y redis-server` (make install does it)")
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.base_port:
            self.base_port = find_base_port(self.masters * (1 + self.replicas))
        fresh = not (self.directory / str(self.base_port) / "nodes.conf").exists()
        for port in self.ports:
            self.start_node(port)
        if fresh:
            self._cli("--cluster", "create", *[f"127.0.0.1:{port}" for port in self.ports],
                      "--cluster-replicas", str(self.replicas), "--cluster-yes")
        self.wait_healthy()
        return self

    def start_node(self, port: int) -> None:
        node_dir = self.directory / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms), "--appendonly", "yes",
                "--appendfsync", "everysec", "--save", "", "--protected-mode", "no", "--daemonize", "no",
                "--logfile", str(node_dir / "redis.log")]
        self.processes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while _free(port):
            if self.processes[port].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start; see {node_dir / 'redis.log'}")
            time.sleep(0.05)

    def _cli(self, *args: str, port: int | None = None) -> str:
        command = ["redis-cli", "-p", str(port or self.base_port), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stdout[-400:]} {done.stderr[-400:]}")
        return done.stdout

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Until every node answers, sees the cluster state ok and every slot has a primary."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                alive = [port for port in self.ports if port in self.processes and self.processes[port].poll() is None]
                if alive and all("cluster_state:ok" in self._cli("cluster", "info", port=port) for port in alive):
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster on ports {self.ports} did not become healthy in {timeout_s:g} s")
            time.sleep(0.2)

    def wait_replicas_synced(self, timeout_s: float = 120.0) -> None:
        """Until every running replica's link to its master is up and no full sync is in progress
        (a node that rejoined loads its master's dataset first, and acknowledges no WAIT until then)."""
        deadline = time.monotonic() + timeout_s
        while True:
            lagging = []
            for port in self.ports:
                if port not in self.processes or self.processes[port].poll() is not None:
                    continue
                try:
                    info = self._cli("info", "replication", port=port)
                except (RuntimeError, subprocess.TimeoutExpired):
                    lagging.append(port)
                    continue
                if "role:slave" in info and ("master_link_status:up" not in info or "master_sync_in_progress:0" not in info):
                    lagging.append(port)
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replicas on ports {lagging} did not finish syncing in {timeout_s:g} s")
            time.sleep(0.2)

    def role(self, port: int) -> str:
        return self._cli("role", port=port).split()[0]

    def primary_ports(self) -> list[int]:
        return [port for port in self.ports if self.processes.get(port) and self.processes[port].poll() is None and self.role(port) == "master"]

    def primary_of_slot(self, slot: int) -> int:
        """The port of the master that serves hash slot ``slot`` now, as a running node sees it."""
        via = next(port for port in self.ports if port in self.processes and self.processes[port].poll() is None)
        for line in self._cli("cluster", "nodes", port=via).splitlines():
            fields = line.split()
            if "master" not in fields[2] or "fail" in fields[2]:
                continue
            for served in fields[8:]:
                low, _, high = served.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(fields[1].split(":")[1].split("@")[0])
        raise RuntimeError(f"no master serves slot {slot}")

    def wait_failover(self, slot: int, old_primary: int, timeout_s: float = 60.0) -> int:
        """Until a replica has taken slot ``slot`` over from ``old_primary`` and the cluster is
        healthy again; the new primary's port."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                primary = self.primary_of_slot(slot)
                if primary != old_primary:
                    self.wait_healthy(max(1.0, deadline - time.monotonic()))
                    return primary
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no replica took slot {slot} over from port {old_primary} in {timeout_s:g} s")
            time.sleep(0.1)

    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown, no final fsync)."""
        process = self.processes.pop(port)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def stop(self, remove: bool = False) -> None:
        for port, process in list(self.processes.items()):
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a local Redis Cluster (3 masters, 3 replicas) until interrupted")
    parser.add_argument("--dir", default="data/redis-cluster", help="where the nodes keep their AOF and nodes.conf")
    parser.add_argument("--port", type=int, default=7100, help="first port (the cluster uses six from here)")
    args = parser.parse_args(argv)
    cluster = LocalRedisCluster(Path(args.dir), base_port=args.port).start()
    print(f"Redis Cluster up: {cluster.url} (ports {cluster.ports[0]}-{cluster.ports[-1]}, data in {args.dir})", flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
