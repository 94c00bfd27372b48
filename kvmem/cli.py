"""``kvmem`` command line: run the server, inspect and manage sessions of a running one.

    kvmem serve --data-dir data            # same as: python server.py --data-dir data
    kvmem ls | info ID | rm ID | stats      # against --address (default 127.0.0.1:50051)
    kvmem prepare-model --cache-dir DIR     # convert the bundled SmolLM2 once
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from kvstore.errors import KvmemError


def _client(args):
    from kvmem.client import Client

    return Client(args.address, tenant=args.tenant, timeout=args.timeout)


def _print(message) -> None:
    print(json.dumps(MessageToDict(message, preserving_proto_field_name=True), indent=2))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        import server

        return server.main(argv[1:])
    parser = argparse.ArgumentParser(prog="kvmem", description="Manage a kvmem server (and `kvmem serve` to run one).")
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--tenant", default="default")
    parser.add_argument("--timeout", type=float, default=60.0)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the server (all server flags follow)")
    commands.add_parser("ls", help="list sessions")
    for name, text in (("info", "show one session"), ("rm", "delete a session")):
        commands.add_parser(name, help=text).add_argument("session_id")
    commands.add_parser("stats", help="tiers, bytes, hit rates, deduplication")
    prepare = commands.add_parser("prepare-model", help="convert the bundled SmolLM2 GGUF once")
    prepare.add_argument("--cache-dir", type=Path, default=Path("data/models"))
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare-model":
            from kvstore.models import prepare_model

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
    except KvmemError as exc:
        print(f"kvmem: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
