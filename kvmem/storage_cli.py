"""``kvmem verify | salvage | backup``: commands on a data directory (they open its LMDB file
directly, so they need the server extra). All three read through a read-only environment, so
they are safe while a server is running on the same directory."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from kvstore.errors import KvmemError


def add_commands(commands) -> None:
    verify = commands.add_parser("verify", help="check every session record and block of a data directory; exit 1 on damage")
    verify.add_argument("--data-dir", type=Path, default=Path("data"))
    verify.add_argument("--json", action="store_true", help="print the full report as JSON")
    salvage = commands.add_parser("salvage", help="copy every readable, checksum-valid session of SRC into a new data directory DST")
    salvage.add_argument("source", type=Path, metavar="SRC")
    salvage.add_argument("destination", type=Path, metavar="DST")
    backup = commands.add_parser("backup", help="a consistent snapshot of a data directory (also while the server runs)")
    backup.add_argument("--data-dir", type=Path, default=Path("data"))
    backup.add_argument("destination", type=Path, metavar="DST", help="new directory; serve from it with --data-dir DST")


def _open(data_dir: Path, readonly: bool = True):
    from kvstore.store import SessionStore, StoreConfig

    return SessionStore.open(StoreConfig(data_dir=data_dir, cpu_tier_bytes=0), readonly=readonly)


def run(args) -> int:
    try:
        if args.command == "verify":
            return _verify(args)
        if args.command == "salvage":
            return _salvage(args)
        return _backup(args)
    except KvmemError as exc:
        print(f"kvmem {args.command}: {exc}", file=sys.stderr)
        return 2


def _verify(args) -> int:
    from kvstore.scrub import verify

    store = _open(args.data_dir)
    try:
        report = verify(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"{report.sessions} sessions, {report.blocks_checked} blocks ({report.bytes_checked} bytes) checked")
        for entry in report.damaged_sessions:
            print(f"DAMAGED session {entry['tenant']}/{entry['session_id']}: {entry['damage']}")
        for entry in report.refcount_mismatches:
            print(f"DAMAGED reference count of chunk {entry['chunk']}: recorded {entry['recorded']}, {entry['sessions']} sessions use it")
        for tenant, problem in report.catalogue.items():
            print(f"DAMAGED catalogue of tenant {tenant}: {problem}")
        for error in report.errors:
            print(f"DAMAGED {error}")
        if report.orphan_chunks or report.staged_entries or report.unreferenced_blocks:
            print(f"{report.orphan_chunks} chunks without sessions, {report.unreferenced_blocks} blocks without references, "
                  f"{report.staged_entries} staged entries (unfinished writes: the server's sweep removes them)")
        print("ok" if report.ok else f"damage found: run `kvmem salvage {args.data_dir} NEW_DIR` to copy out every healthy session")
    return 0 if report.ok else 1


def _salvage(args) -> int:
    from kvstore.scrub import salvage

    destination = Path(args.destination)
    if destination.exists() and any(destination.iterdir()):
        print(f"kvmem salvage: {destination} exists and is not empty; give a new directory", file=sys.stderr)
        return 2
    source = _open(args.source)
    try:
        target = _open(destination, readonly=False)
        try:
            report = salvage(source, target)
        finally:
            target.close()
    finally:
        source.close()
    for entry in report.skipped:
        print(f"SKIPPED {entry['tenant']}/{entry['session_id']}: {entry['reason']}")
    for error in report.errors:
        print(f"ERROR {error}")
    print(f"{len(report.copied)} sessions copied to {destination}, {len(report.skipped)} skipped")
    return 0 if not (report.skipped or report.errors) else 1


def _backup(args) -> int:
    store = _open(args.data_dir)
    try:
        target = Path(args.destination) / "lmdb"
        store.backend.snapshot(target)
    except FileExistsError as exc:
        print(f"kvmem backup: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    size = sum(p.stat().st_size for p in target.iterdir())
    print(f"backup of {args.data_dir} written to {args.destination} ({size} bytes); serve it with --data-dir {args.destination}")
    return 0
