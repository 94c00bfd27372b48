"""``kvmem`` command line: run the server, inspect and manage sessions of a running one.

    kvmem serve --data-dir data            # same as: python server.py --data-dir data
    kvmem ls | info ID | rm ID | stats      # against --address (default 127.0.0.1:50051)
    kvmem prepare-model --cache-dir DIR     # convert the bundled SmolLM2 once
    kvmem compact --method attention_matching --ratio 0.1 --sessions a b c   # or --all
    kvmem compact --method knorm --ratio 0.25 --all --ray [ADDRESS] --store-url redis://HOST:PORT   # Ray workers
    kvmem answer ID "question" [--dry-run] [--budget-s 5] [--force full] [--forbid ttt]
    kvmem keys add --keys-file keys.toml --tenant acme [--admin]   # prints a new token once
    kvmem keys rm --keys-file keys.toml KEY_ID | kvmem keys ls --keys-file keys.toml
    kvmem verify --data-dir data            # scrub every record and block; exit 1 on damage
    kvmem salvage data rescued              # copy every healthy session into a new data directory
    kvmem backup --data-dir data snapshot   # consistent snapshot, also while the server runs

Calls to a server send $KVMEM_TOKEN (or --token) as the API key; --tls/--tls-ca/--tls-cert/--tls-key
for TLS and mutual TLS.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from kvmem import __version__
from kvstore.errors import KvmemError


def _client_options(args) -> dict:
    """kvmem.client.Client's keywords from the global flags (token, TLS, tenant, timeout)."""
    from kvmem.tls import ClientTLS

    tls = ClientTLS(args.tls_ca or "", args.tls_cert or "", args.tls_key or "", args.tls_server_name or "") if (args.tls or args.tls_ca or args.tls_cert) else None
    return dict(token=args.token or None, tls=tls, tenant=args.tenant, timeout=args.timeout)


def _client(args):
    from kvmem.client import Client

    return Client(args.address, **_client_options(args))


def _keys(args) -> int:
    """kvmem keys add|rm|ls: edit the server's keys file (digests only; a new token is shown once)."""
    from kvmem import auth

    keys_file = args.keys_file
    if not keys_file:  # the server's own setting, from its config file ($KVMEM_CONFIG)
        try:
            from kvmem.config import ConfigError, load_config
        except ImportError as exc:
            print(f"kvmem keys: reading the server config needs the server extra (pip install 'kvmem[server]'): {exc}; "
                  "or give --keys-file PATH", file=sys.stderr)
            return 2
        try:
            keys_file = load_config(os.environ.get("KVMEM_CONFIG"), os.environ).auth.keys_file
        except (ConfigError, OSError) as exc:
            print(f"kvmem keys: cannot read the server config: {exc}", file=sys.stderr)
            return 2
    if not keys_file:
        print("kvmem keys: give --keys-file PATH (the server's auth.keys_file), or set KVMEM_AUTH_KEYS_FILE or KVMEM_CONFIG", file=sys.stderr)
        return 2
    path = Path(keys_file)
    try:
        if args.keys_command == "add":
            entry, token = auth.add_key(path, args.tenant_name, "admin" if args.admin else "tenant", args.max_stored_bytes, args.max_sessions)
            print(f"key {entry.key_id} for tenant {entry.tenant!r} ({entry.role}) added to {path}", file=sys.stderr)
            print("the token is shown once and not stored; send SIGHUP to the server (or restart it) to load the key:", file=sys.stderr)
            print(token)
        elif args.keys_command == "rm":
            entry = auth.remove_key(path, args.key_id)
            print(f"key {entry.key_id} of tenant {entry.tenant!r} removed from {path}; send SIGHUP to the server to apply", file=sys.stderr)
        else:
            for entry in auth.list_keys(path):
                print(f"{entry.key_id}\t{entry.tenant}\t{entry.role}\t{entry.created_at}")
    except (auth.KeysFileError, OSError) as exc:
        print(f"kvmem keys: {exc}", file=sys.stderr)
        return 1
    return 0


def _storage_command(argv: list[str]) -> int:
    """verify / salvage / backup open a data directory directly: they need the server extra."""
    try:
        from kvmem import storage_cli
    except ImportError as exc:
        print(f"kvmem: this command opens a data directory and needs the server extra (pip install 'kvmem[server]'): {exc}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="kvmem")
    storage_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    index = next(i for i, word in enumerate(argv) if word in ("verify", "salvage", "backup"))
    return storage_cli.run(parser.parse_args(argv[index:]))


def _print(message) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        import server

        return server.main(argv[1:])
    parser = argparse.ArgumentParser(prog="kvmem", description="Manage a kvmem server (and `kvmem serve` to run one).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    env = os.environ
    parser.add_argument("--address", default=env.get("KVMEM_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--tenant", default="", help="act for this tenant (admins); default: the token's tenant, or 'default' without auth")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--token", default=env.get("KVMEM_TOKEN", ""), help="API key (default: $KVMEM_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    parser.add_argument("--tls-ca", default=env.get("KVMEM_TLS_CA", ""), help="CA file that signed the server's certificate ($KVMEM_TLS_CA)")
    parser.add_argument("--tls-cert", default=env.get("KVMEM_TLS_CERT", ""), help="client certificate for mutual TLS ($KVMEM_TLS_CERT)")
    parser.add_argument("--tls-key", default=env.get("KVMEM_TLS_KEY", ""), help="client key for mutual TLS ($KVMEM_TLS_KEY)")
    parser.add_argument("--tls-server-name", default="", help="name to check in the server's certificate")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the server (all server flags follow)")
    commands.add_parser("ls", help="list sessions")
    for name, text in (("info", "show one session"), ("rm", "delete a session")):
        commands.add_parser(name, help=text).add_argument("session_id")
    commands.add_parser("stats", help="tiers, bytes, hit rates, deduplication")
    compact = commands.add_parser("compact", help="compact stored sessions (resumable: finished ones are skipped)")
    compact.add_argument("--method", default="attention_matching")
    amount = compact.add_mutually_exclusive_group(required=True)
    amount.add_argument("--ratio", type=float, help="kept fraction in (0, 1]")
    amount.add_argument("--budget", type=int, help="kept tokens per KV head")
    chosen = compact.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--sessions", nargs="+", metavar="ID")
    chosen.add_argument("--all", action="store_true", help="every uncompacted session of the tenant")
    compact.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, e.g. selection=omp")
    _add_ray_flags(compact)
    answer = commands.add_parser("answer", help="answer a question about a session (the planner decides how; --dry-run: decision only)")
    answer.add_argument("session_id")
    answer.add_argument("question", help="text appended after the session's context")
    answer.add_argument("--dry-run", action="store_true", help="print the decision record without running it")
    answer.add_argument("--budget-s", type=float, default=None, help="latency budget in seconds")
    answer.add_argument("--force", default="", help="run this option: rag, kv_retrieval, full, compacted, compacted_recall, ttt")
    answer.add_argument("--forbid", action="append", default=[], help="never choose this option (repeatable)")
    answer.add_argument("--followups", type=int, default=0, help="further questions expected on this session")
    answer.add_argument("--max-new-tokens", type=int, default=24)
    answer.add_argument("--rag-budget", type=int, default=0, help="text tokens rag puts in context (0: the server's setting)")
    answer.add_argument("--kv-budget", type=int, default=0, help="tokens per layer kv_retrieval attends to (0: the server's setting)")
    answer.add_argument("--recall-budget", type=int, default=0, help="exact tokens per layer compacted_recall recalls (0: the server's setting)")
    keys = commands.add_parser("keys", help="manage API keys in the server's keys file (auth.keys_file)")
    keys.add_argument("--keys-file", default="", help="the keys file (default: the server's auth.keys_file from $KVMEM_CONFIG / $KVMEM_AUTH_KEYS_FILE)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_commands.add_parser("add", help="create a key; prints its token once")
    add.add_argument("--tenant", dest="tenant_name", required=True)
    add.add_argument("--admin", action="store_true", help="may act for any tenant and sees totals")
    add.add_argument("--max-stored-bytes", type=int, default=None, help="quota override (0 = unlimited)")
    add.add_argument("--max-sessions", type=int, default=None, help="quota override (0 = unlimited)")
    keys_commands.add_parser("rm", help="remove a key").add_argument("key_id")
    keys_commands.add_parser("ls", help="list keys (ids, tenants, roles; never tokens)")
    prepare = commands.add_parser("prepare-model", help="convert the bundled SmolLM2 GGUF once")
    prepare.add_argument("--cache-dir", type=Path, default=Path("data/models"))
    for name, text in (("verify", "check a data directory for damage"), ("salvage", "copy the healthy sessions of a data directory"), ("backup", "snapshot a data directory")):
        commands.add_parser(name, help=text, add_help=False)  # parsed by kvmem.storage_cli (server extra)
    args, rest = parser.parse_known_args(argv)
    if args.command in ("verify", "salvage", "backup"):
        return _storage_command(argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "keys":
        return _keys(args)
    if args.command == "compact" and (args.ray is not None or args.store_url):
        return _compact_on_ray(parser, args)
    if args.command == "compact" and args.servers:
        if len(args.servers) > 1:
            parser.error("several --address values need --ray (without it, one server compacts the sessions in turn)")
        args.address = args.servers[0]
    try:
        if args.command == "prepare-model":
            from modelhost.models import prepare_model

            print(prepare_model(args.cache_dir))
            return 0
        with _client(args) as client:
            if args.command == "ls":
                for info in client.list():
                    print(f"{info.session_id}\t{info.num_tokens} tokens\t{info.kv_bytes} bytes\t{info.model.name}")
            elif args.command == "info":
                _print(client.get(args.session_id))
            elif args.command == "rm":
                print(f"deleted {args.session_id}: {client.delete(args.session_id)} bytes freed")
            elif args.command == "stats":
                _print(client.stats())
            elif args.command == "compact":
                return _compact(client, args)
            elif args.command == "answer":
                common = dict(latency_budget_s=args.budget_s, force=args.force, forbid=args.forbid, expected_followups=args.followups)
                if args.dry_run:
                    _print(client.plan(args.session_id, args.question, **common))
                else:
                    _print(client.answer(args.session_id, args.question, max_new_tokens=args.max_new_tokens, rag_budget_tokens=args.rag_budget,
                                         kv_budget_tokens=args.kv_budget, recall_budget_tokens=args.recall_budget, **common))
    except KvmemError as exc:
        print(f"kvmem: {exc}", file=sys.stderr)
        return 1
    return 0


def _compact(client, args) -> int:
    """Compact each session unless its compacted version exists already (so a rerun resumes).

    Each Compact call is atomic on the server: an interrupted run never leaves a half-written session.
    Progress: a bar with rate and ETA on a terminal, one line per session otherwise.
    """
    from kvmem.batch_compact import ClientCompactor, Tally
    from kvmem.progress import Progress

    job = _compact_job(args)
    compactor = ClientCompactor(client)
    sessions = compactor.sessions() if args.all else list(args.sessions)
    tally = Tally(len(sessions))
    with Progress(len(sessions), "session", stream=sys.stdout) as progress:
        try:
            for session_id in sessions:
                outcome = compactor.compact(job, session_id)
                tally.add(outcome)
                progress.step(outcome.line())
        except KeyboardInterrupt:
            print(tally.interrupted(), file=sys.stderr)
            return 130
    print(tally.summary())
    return 0


def _compact_job(args):
    from kvmem.batch_compact import Job

    return Job(args.method, args.ratio, args.budget, dict(item.split("=", 1) for item in args.option))


def _add_ray_flags(compact) -> None:
    ray = compact.add_argument_group("batch compaction on Ray (pip install 'kvmem[ray]')")
    ray.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="fan the sessions out as Ray tasks; without ADDRESS start a local Ray cluster")
    ray.add_argument("--ray-workers", type=int, default=2, metavar="N", help="Ray actors, one session each at a time (default 2)")
    ray.add_argument("--store-url", default="", metavar="URL",
                     help="redis:// or rediss:// URL of the shared backend: the Ray workers compact and store through it themselves "
                          "(default: each worker calls a kvmem server's Compact)")
    ray.add_argument("--store-namespace", default="kvmem", metavar="NAME", help="the servers' store.redis_namespace (default kvmem)")
    ray.add_argument("--store-min-replicas", type=int, default=0, metavar="N", help="the servers' store.redis_min_replicas (default 0)")
    ray.add_argument("--store-chunk-tokens", type=int, default=256, metavar="N", help="the servers' store.chunk_tokens (default 256)")
    ray.add_argument("--model", default=None, help="model each worker hosts for methods that need reference queries (default: the server's)")
    ray.add_argument("--model-cache-dir", type=Path, default=None, metavar="DIR", help="where that model is prepared, the same path on every Ray node (default: ./data/models)")
    ray.add_argument("--threads", type=int, default=1, metavar="N", help="torch threads per worker (default 1, reproducible)")
    ray.add_argument("--address", action="append", default=[], metavar="ADDRESS", dest="servers",
                     help="the kvmem server to call (as the global --address); with --ray and no --store-url repeatable: the workers take them in turn")


def _compact_on_ray(parser, args) -> int:
    """kvmem compact --ray: the sessions fanned out over Ray actors (kvmem.ray_compact)."""
    from functools import partial

    from kvmem import ray_compact
    from kvmem.batch_compact import ClientCompactor, StoreCompactor

    if args.ray is None:
        parser.error("--store-url works with --ray (without it, kvmem compact calls the server at --address)")
    if args.ray_workers < 1 or args.threads < 1:
        parser.error("--ray-workers and --threads must be at least 1")
    if args.store_url and not args.store_url.startswith(("redis://", "rediss://")):
        parser.error("--store-url must be a redis:// or rediss:// URL (the shared backend); to compact one machine's LMDB, leave it out")
    job = _compact_job(args)
    if args.store_url:
        try:
            config = _store_worker_config(args)
        except ImportError as exc:
            print(f"kvmem: --store-url needs the server extra (pip install 'kvmem[server,ray]'): {exc}", file=sys.stderr)
            return 2
        except ValueError as exc:  # a StoreConfig setting out of range
            parser.error(str(exc))
        makers, cpus = [partial(StoreCompactor, config)] * args.ray_workers, args.threads
    else:
        options = _client_options(args)
        addresses = ray_compact.round_robin(args.servers or [args.address], args.ray_workers)
        makers, cpus = [partial(ClientCompactor.to, address, **options) for address in addresses], 0
    try:
        started = ray_compact.connect(args.ray)
        try:
            tally = ray_compact.compact_on_ray(job, makers, None if args.all else args.sessions, cpus_per_worker=cpus)
        finally:
            if started:
                import ray

                ray.shutdown()
    except ray_compact.RayMissing as exc:
        print(f"kvmem: {exc}", file=sys.stderr)
        return 2
    except ray_compact.RayFailed as exc:
        print(f"kvmem: {exc}", file=sys.stderr)
        return 1
    except ray_compact.Interrupted as exc:
        print(f"{exc} (the unfinished Ray tasks were cancelled and stored nothing)", file=sys.stderr)
        return 130
    print(tally.summary())
    return 1 if tally.failed else 0


def _store_worker_config(args):
    """How each Ray worker reaches the shared Redis backend, and the model it hosts (server defaults)."""
    from kvmem.batch_compact import StoreWorkerConfig
    from kvmem.config import ModelConfig
    from kvstore.store import StoreConfig

    store = StoreConfig(backend="redis", redis_url=args.store_url, redis_namespace=args.store_namespace,
                        redis_min_replicas=args.store_min_replicas, chunk_tokens=args.store_chunk_tokens)
    cache_dir = (args.model_cache_dir if args.model_cache_dir is not None else Path(store.data_dir) / "models").absolute()  # workers start elsewhere
    model = ModelConfig().name if args.model is None else args.model
    return StoreWorkerConfig(store, args.tenant or "default", model, cache_dir, args.threads)


if __name__ == "__main__":
    sys.exit(main())
