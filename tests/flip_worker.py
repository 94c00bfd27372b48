"""Byte-flip trials against a copy of a pristine store (run by tests/test_byte_flips.py).

    python tests/flip_worker.py PRISTINE_DIR WORK_DIR EXPECTED_JSON TRIALS_JSON

TRIALS_JSON is a list of {"index", "offset", "mask"}. For each trial, in order: copy
PRISTINE_DIR to WORK_DIR afresh, XOR byte ``offset`` of lmdb/data.mdb with ``mask``, then open
the store, list every tenant (all pages), restore (and read the text of) every expected session
and close it. Allowed outcomes: the open is refused with CorruptData/Unavailable naming data.mdb;
a list raises CorruptData or names exactly the expected ids (healthy or DamagedSession); a
restore is bit-exact or raises CorruptData (DATA_LOSS). Anything else is a violation.

One JSON line per trial goes to stdout (flushed) as soon as the trial ends, so a parent that
sees the process die from a signal knows which trial killed it: the first one not printed.
faulthandler writes the Python stack of such a crash to stderr.
"""
from __future__ import annotations

import faulthandler
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvstore.catalog import DamagedSession  # noqa: E402
from kvstore.errors import CorruptData, Unavailable  # noqa: E402
from kvstore.records import SessionRecord  # noqa: E402
from kvstore.store import SessionStore, StoreConfig  # noqa: E402

LIST_PAGE_SIZE = 4  # small pages: every tenant's list goes through several page tokens


def store_config(data_dir) -> StoreConfig:
    """The config the pristine store is built with and every trial opens it with."""
    return StoreConfig(data_dir=Path(data_dir), chunk_tokens=16, cpu_tier_bytes=0, lmdb_map_bytes=4 << 20, lmdb_max_map_bytes=64 << 20)


def content_digests(plan) -> dict[str, str]:
    """sha256 of a restore's KV (keys, values, bias per layer) and of its token ids + positions."""
    keys, values, bias = plan.tensors()
    kv = hashlib.sha256()
    for layer, (k, v) in enumerate(zip(keys, values)):
        kv.update(k.contiguous().numpy().tobytes())
        kv.update(v.contiguous().numpy().tobytes())
        if bias is not None:
            kv.update(bias[layer].contiguous().numpy().tobytes())
    tokens = hashlib.sha256(plan.token_ids.astype("<u4").tobytes())
    tokens.update(plan.positions.astype("<i8").tobytes())
    return {"kv": kv.hexdigest(), "tokens": tokens.hexdigest()}


def list_all(store: SessionStore, tenant: str) -> list:
    entries, token = [], ""
    for _ in range(10_000):  # a page token that never ends is a violation, not a hang
        page, token = store.list(tenant, page_size=LIST_PAGE_SIZE, page_token=token)
        entries += page
        if not token:
            return entries
    raise RuntimeError(f"list of tenant {tenant!r} did not end after 10000 pages")


def _trace(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-8)).strip()


def flip(path: Path, offset: int, mask: int) -> tuple[int, int]:
    with open(path, "r+b") as f:
        f.seek(offset)
        before = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([before ^ mask]))
    return before, before ^ mask


def run_trial(pristine: Path, work: Path, expected: dict, trial: dict) -> dict:
    """One flip; returns the JSON-able result: what happened and every violation."""
    started = time.monotonic()
    offset, mask = int(trial["offset"]), int(trial["mask"])
    result = {"index": trial.get("index"), "offset": offset, "mask": mask, "open": "ok", "open_error": None,
              "lists": {}, "damaged_listed": 0, "restores": {"exact": 0, "data_loss": 0}, "texts": {"exact": 0, "data_loss": 0},
              "violations": []}
    violations = result["violations"]

    def violation(kind: str, detail: str, tenant: str | None = None, session: str | None = None) -> None:
        violations.append({"kind": kind, "tenant": tenant, "session": session, "detail": detail})

    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work)
    data_file = work / "lmdb" / "data.mdb"
    result["byte_before"], result["byte_after"] = flip(data_file, offset, mask)

    try:
        store = SessionStore.open(store_config(work))
    except (CorruptData, Unavailable) as exc:
        result["open"], result["open_error"] = "refused", f"{type(exc).__name__}: {exc}"
        if "data.mdb" not in str(exc):
            violation(f"open: {type(exc).__name__} that does not name data.mdb", _trace(exc))
        result["seconds"] = round(time.monotonic() - started, 3)
        return result
    except BaseException as exc:  # noqa: BLE001 - every other failure is what the suite looks for
        result["open"], result["open_error"] = "error", f"{type(exc).__name__}: {exc}"
        violation(f"open: {type(exc).__name__}", _trace(exc))
        result["seconds"] = round(time.monotonic() - started, 3)
        return result
    result["damaged_tenants_at_open"] = sorted(store.damaged_tenants)

    try:
        for tenant, ids in expected["tenants"].items():
            try:
                entries = list_all(store, tenant)
            except CorruptData:
                result["lists"][tenant] = "data_loss"
                continue
            except BaseException as exc:  # noqa: BLE001
                result["lists"][tenant] = "error"
                violation(f"list: {type(exc).__name__}", _trace(exc), tenant)
                continue
            listed, damaged, odd = [], 0, []
            for entry in entries:
                if isinstance(entry, DamagedSession):
                    damaged += 1
                elif not isinstance(entry, SessionRecord):
                    odd.append(repr(entry)[:200])
                listed.append(entry.session_id)
            result["damaged_listed"] += damaged
            result["lists"][tenant] = "damaged_entries" if damaged else "ok"
            if odd:
                violation("list: entry that is neither SessionRecord nor DamagedSession", "; ".join(odd), tenant)
            if sorted(listed) != sorted(ids):
                missing = sorted((Counter(ids) - Counter(listed)).elements())
                surplus = Counter(listed) - Counter(ids)  # ids listed more often than they exist (altered or duplicated)
                healthy = Counter(e.session_id for e in entries if isinstance(e, SessionRecord))
                if len(listed) < len(ids):
                    kind = "list: silently shorter"
                elif len(listed) > len(ids):
                    kind = "list: longer than the catalogue"
                elif any(count > 1 or session_id not in ids for session_id, count in healthy.items()):
                    kind = "list: a healthy entry with an altered or duplicated id"
                else:  # as many entries as sessions; what differs are DamagedSessions whose key (so id) was hit
                    kind = "list: ids differ (a DamagedSession listed under an altered id)"
                damaged_detail = [(e.session_id, e.damage[:160]) for e in entries if isinstance(e, DamagedSession)]
                violation(kind, f"missing={missing} surplus={sorted(surplus.elements())} listed={len(listed)} expected={len(ids)} "
                                f"damaged_entries={damaged_detail}", tenant)

        for session in expected["sessions"]:
            tenant, sid = session["tenant"], session["id"]
            try:
                got = content_digests(store.restore(tenant, sid))
            except CorruptData:
                result["restores"]["data_loss"] += 1
            except BaseException as exc:  # noqa: BLE001 - NotFound, Conflict, lmdb.Error, KeyError, ...
                violation(f"restore: {type(exc).__name__}", _trace(exc), tenant, sid)
            else:
                if got == {"kv": session["kv"], "tokens": session["tokens"]}:
                    result["restores"]["exact"] += 1
                else:
                    which = [part for part in ("kv", "tokens") if got[part] != session[part]]
                    violation("restore: wrong bytes returned as OK", f"{' and '.join(which)} differ from the pristine store", tenant, sid)
            if session.get("text") is None:
                continue
            try:
                text = store.session_text(tenant, sid)
            except CorruptData:
                result["texts"]["data_loss"] += 1
            except BaseException as exc:  # noqa: BLE001
                violation(f"text: {type(exc).__name__}", _trace(exc), tenant, sid)
            else:
                if text == session["text"]:
                    result["texts"]["exact"] += 1
                else:
                    violation("text: wrong text returned as OK", f"got {str(text)[:80]!r}", tenant, sid)
    finally:
        try:
            store.close()
        except BaseException as exc:  # noqa: BLE001
            violation(f"close: {type(exc).__name__}", _trace(exc))
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    faulthandler.enable()  # a SIGSEGV in LMDB leaves the Python stack on stderr
    logging.basicConfig(level=logging.CRITICAL)  # the store logs damage at ERROR; the results say it
    pristine, work, expected_path, trials_path = (Path(a) for a in argv)
    expected = json.loads(expected_path.read_text())
    trials = json.loads(trials_path.read_text())
    # FLIP_WORKER_SELFTEST="1:crash,2:hang": the harness's own test (a SIGSEGV, a hang at those trials)
    selftest = dict(item.split(":") for item in os.environ.get("FLIP_WORKER_SELFTEST", "").split(",") if item)
    for trial in trials:
        action = selftest.get(str(trial.get("index")))
        if action == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif action == "hang":
            time.sleep(3600)
        try:
            result = run_trial(pristine, work, expected, trial)
        except BaseException as exc:  # noqa: BLE001 - the harness itself failed: still one line
            result = {"index": trial.get("index"), "offset": trial["offset"], "mask": trial["mask"],
                      "violations": [{"kind": f"harness: {type(exc).__name__}", "tenant": None, "session": None, "detail": _trace(exc)}]}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
