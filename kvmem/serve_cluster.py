"""``make serve-cluster``: a local Redis Cluster and two kvmem servers sharing it, until Ctrl-C.

    python -m kvmem.serve_cluster --data-dir data   # servers on 127.0.0.1:50051 and :50052

Any server serves any session: save through one, restore through the other.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from pathlib import Path

from kvmem.local_cluster import LocalRedisCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a local Redis Cluster and kvmem servers over it")
    parser.add_argument("--data-dir", default="data", help="the cluster's AOF under <dir>/redis-cluster, the converted model under <dir>/models")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--port", type=int, default=50051, help="first kvmem port")
    parser.add_argument("--redis-port", type=int, default=7100, help="first Redis port (six from here)")
    args = parser.parse_args(argv)
    cluster = LocalRedisCluster(Path(args.data_dir) / "redis-cluster", base_port=args.redis_port).start()
    servers = []
    try:
        for index in range(args.servers):
            servers.append(subprocess.Popen([
                sys.executable, "server.py", "--data-dir", args.data_dir, "--port", str(args.port + index),
                "--set", "store.backend=redis", "--set", f"store.redis_url={cluster.url}", "--set", "store.redis_min_replicas=1",
            ]))
        print(f"Redis Cluster {cluster.url}; kvmem servers on 127.0.0.1:{args.port}..{args.port + args.servers - 1}", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=60)
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
