"""Byte flips over the whole LMDB file: every restore is bit-exact or DATA_LOSS, a list is never
silently shorter, and the store (and the server) either starts or refuses clearly.

A pristine store (3 tenants, ~15 sessions each: shared prefixes, text, a fork, an append, a
compacted private-key session with bias, a TTL) is built once; each trial flips one byte of a
fresh copy of its data.mdb and checks it in ``tests/flip_worker.py``, run as a subprocess (so a
crash of LMDB is a failed trial, not a dead test run). Trials are batched: a worker pays the
torch import once, and a worker killed by a signal is restarted for the trials after the one
that killed it.
"""
from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from kvstore.store import SessionStore
from tests.conftest import REPO, TOY_SPEC, random_layers
from tests.flip_worker import content_digests, store_config

WORKER = REPO / "tests" / "flip_worker.py"
PAGE = 4096  # LMDB's page size here (the OS page size): pages 0 and 1 are the two meta pages
# fields of MDB_meta in each meta page: magic, version, main DB's md_branch_pages / md_root,
# mm_last_pg, mm_txnid (these made the server exit with a traceback before)
META_FIELDS = (16, 20, 100, 128, 136, 144)
CI_RANDOM_TRIALS = 40
SLOW_RANDOM_TRIALS = 300
STALL_SECONDS = 60  # a worker silent this long is hung on the trial it is running
WORKERS = max(1, min(2, os.cpu_count() or 1))
TENANTS = ("alpha", "beta", "gamma")


# ----------------------------------------------------------------------------- the pristine store
def _pieces(store, layers, start=0, spec=TOY_SPEC, bias=None):
    end = start + layers[0][0].shape[1]
    pieces = store.new_pieces(spec, start, end, has_bias=bias is not None)
    for layer, (k, v) in enumerate(layers):
        pieces.add_tensors(layer, start, k, v, None if bias is None else bias[layer])
    return pieces


def _slice(layers, lo, hi):
    return [(k[:, lo:hi].contiguous(), v[:, lo:hi].contiguous()) for k, v in layers]


def _build(store, rng: random.Random) -> tuple[dict[str, list[str]], dict[tuple[str, str], str]]:
    """Save the sessions; returns ({tenant: ids}, {(tenant, id): text})."""
    ids: dict[str, list[str]] = {}
    texts: dict[tuple[str, str], str] = {}
    for t_index, tenant in enumerate(TENANTS):
        ids[tenant] = []
        base_tokens = np.array([rng.randrange(50_000) for _ in range(96)], dtype=np.uint32)
        base_kv = random_layers(TOY_SPEC, 96, seed=100 + t_index)  # one KV per token sequence: dedup shares it
        for index in range(12):
            sid = f"s{index:02d}" if index != 7 else "sessão-λ"  # one non-ASCII id
            shared = rng.choice([0, 0, 16, 32, 40, 64, 96])  # tokens of the tenant's base prefix
            tail = rng.randrange(1, 60)
            tail_tokens = np.array([rng.randrange(50_000) for _ in range(tail)], dtype=np.uint32)
            tokens = np.concatenate([base_tokens[:shared], tail_tokens])
            tail_kv = random_layers(TOY_SPEC, tail, seed=1000 * (t_index + 1) + index)
            kv = [(torch.cat([bk[:, :shared], tk], 1), torch.cat([bv[:, :shared], tv], 1)) for (bk, bv), (tk, tv) in zip(base_kv, tail_kv)]
            options = {}
            if index in (2, 9):
                options["text"] = f"{tenant} {sid}: " + " ".join(f"word{rng.randrange(1000)}" for _ in range(rng.randrange(5, 400)))
                texts[(tenant, sid)] = options["text"]
            if index == 4:
                options["labels"] = {"kind": "labelled", "tenant": tenant}
            if index == 5:
                options["ttl_seconds"] = 10 * 365 * 86400  # in the TTL index, never expires during the test
            store.save(tenant, sid, TOY_SPEC, tokens, _pieces(store, kv), **options)
            ids[tenant].append(sid)
        # the whole base prefix, twice: refcounts of 2+ on every base chunk
        for sid in ("base", "base-copy"):
            store.save(tenant, sid, TOY_SPEC, base_tokens, _pieces(store, base_kv))
            ids[tenant].append(sid)
        # a fork inside a chunk (its boundary chunk is copied), then appended to
        store.fork(tenant, "base", "fork", 37)
        extra = random_layers(TOY_SPEC, 11, seed=5000 + t_index)
        store.append(tenant, "fork", TOY_SPEC, np.arange(11, dtype=np.uint32) + 7, _pieces(store, extra, start=37))
        ids[tenant].append("fork")
        if tenant == "alpha":  # a compacted session: positions, logical_length, bias -> private keys
            layers = random_layers(TOY_SPEC, 20, seed=77)
            bias = [torch.randn(TOY_SPEC.num_kv_heads, 20, generator=torch.Generator().manual_seed(layer)) for layer in range(TOY_SPEC.num_layers)]
            positions = np.array([0, 1, 2, 3, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 130, 197, 198, 199])
            store.save(tenant, "compacted", TOY_SPEC, np.arange(20), _pieces(store, layers, bias=bias), positions=positions, logical_length=200)
            store.save(tenant, "gapped", TOY_SPEC, np.arange(30), _pieces(store, random_layers(TOY_SPEC, 30, seed=78)), logical_length=64)
            ids[tenant] += ["compacted", "gapped"]
    # churn: a deleted and an overwritten session leave freed pages and reused refcounts behind
    store.save("beta", "doomed", TOY_SPEC, np.arange(50), _pieces(store, random_layers(TOY_SPEC, 50, seed=9)))
    store.delete("beta", "doomed")
    store.save("gamma", "s03", TOY_SPEC, np.arange(70, dtype=np.uint32) + 3, _pieces(store, random_layers(TOY_SPEC, 70, seed=10)), overwrite=True)
    return ids, texts


@dataclass(frozen=True)
class Pristine:
    data_dir: Path
    expected_json: Path
    expected: dict
    size: int  # bytes of lmdb/data.mdb


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    root = tmp_path_factory.mktemp("flip-pristine")
    data_dir = root / "data"
    store = SessionStore.open(store_config(data_dir))
    try:
        ids, texts = _build(store, random.Random(20240611))
        sessions = []
        for tenant, tenant_ids in ids.items():
            for sid in tenant_ids:
                sessions.append({"tenant": tenant, "id": sid, **content_digests(store.restore(tenant, sid)), "text": texts.get((tenant, sid))})
        stats = store.stats()
        listed = {tenant: sorted(r.session_id for r in store.list(tenant, page_size=1000)[0]) for tenant in ids}
    finally:
        store.close()
    assert listed == {tenant: sorted(tenant_ids) for tenant, tenant_ids in ids.items()}
    assert stats["sessions"] == len(sessions) and stats["damaged_tenants"] == 0
    expected = {"tenants": ids, "sessions": sessions, "stats": {k: stats[k] for k in ("sessions", "chunks", "stored_bytes", "logical_bytes")}}
    assert stats["logical_bytes"] > stats["stored_bytes"]  # dedup is in play
    expected_json = root / "expected.json"
    expected_json.write_text(json.dumps(expected, indent=1))
    size = (data_dir / "lmdb" / "data.mdb").stat().st_size
    return Pristine(data_dir, expected_json, expected, size)


# ----------------------------------------------------------------------------- running trials
def _supervise(pristine: Pristine, trials: list[dict], work: Path) -> list[dict]:
    """Run ``trials`` in worker processes, one after the other; a trial whose worker died (a
    signal, an exit) or went silent is a violation, and a new worker takes the rest."""
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    remaining = list(trials)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "PYTHONFAULTHANDLER": "1"}
    attempt = 0
    while remaining:
        attempt += 1
        trials_json = work / f"trials-{attempt}.json"
        trials_json.write_text(json.dumps(remaining))
        stderr_path = work / f"stderr-{attempt}.txt"
        with open(stderr_path, "w") as stderr:
            process = subprocess.Popen(
                [sys.executable, str(WORKER), str(pristine.data_dir), str(work / "copy"), str(pristine.expected_json), str(trials_json)],
                cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
            )
            lines: queue.Queue = queue.Queue()
            reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout] + [lines.put(None)], daemon=True)
            reader.start()
            hung = False
            while True:
                try:
                    line = lines.get(timeout=STALL_SECONDS)
                except queue.Empty:
                    hung = True
                    process.kill()
                    break
                if line is None:
                    break
                try:
                    result = json.loads(line)
                except ValueError:
                    continue  # not a result line (a library printing to stdout)
                if remaining and result.get("index") == remaining[0]["index"]:
                    remaining.pop(0)
                    results.append(result)
            returncode = process.wait(30)
            reader.join(5)
        if not remaining:
            break
        victim = remaining.pop(0)  # the first trial without a result is the one that killed (or hung) the worker
        tail = stderr_path.read_text(errors="replace")[-4000:]
        if hung:
            kind = f"hang (no result in {STALL_SECONDS} s)"
        elif returncode < 0:
            kind = f"crash ({signal.Signals(-returncode).name})"
        else:
            kind = f"worker exited with {returncode}"
        results.append({**victim, "open": "crash", "violations": [{"kind": kind, "tenant": None, "session": None, "detail": tail}]})
    return results


def run_trials(pristine: Pristine, trials: list[dict], work: Path) -> list[dict]:
    """Every trial's result, in trial order; trials shared out among WORKERS processes."""
    for index, trial in enumerate(trials):
        trial["index"] = index
    shares = [trials[i::WORKERS] for i in range(WORKERS)]
    with ThreadPoolExecutor(WORKERS) as pool:
        done = list(pool.map(lambda i: _supervise(pristine, shares[i], work / f"worker-{i}"), range(WORKERS)))
    return sorted((r for share in done for r in share), key=lambda r: r["index"])


def random_trials(size: int, count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"offset": rng.randrange(size), "mask": rng.randrange(1, 256)} for _ in range(count)]


def meta_trials() -> list[dict]:
    return [{"offset": page * PAGE + field, "mask": mask} for page in (0, 1) for field in META_FIELDS for mask in (0x01, 0xFF)]


def _category(result: dict) -> str:
    if result.get("open") == "refused":
        return "refused at open"
    if result.get("open") in ("crash", "error"):
        return "crash / error"
    lost = result["restores"]["data_loss"] + result["texts"]["data_loss"] + result["damaged_listed"]
    lost += sum(state == "data_loss" for state in result["lists"].values())
    return "DATA_LOSS somewhere" if lost else "no effect"


def summarize(label: str, results: list[dict], seconds: float) -> str:
    categories = Counter(_category(r) for r in results)
    restores = Counter()
    for r in results:
        restores.update(r.get("restores", {}))
    violations = sum(len(r["violations"]) for r in results)
    return (f"byte flips [{label}]: {len(results)} trials in {seconds:.1f} s: "
            + ", ".join(f"{name} {categories[name]}" for name in ("no effect", "DATA_LOSS somewhere", "refused at open", "crash / error"))
            + f"; restores exact {restores['exact']}, DATA_LOSS {restores['data_loss']}; violations {violations}")


def failure_report(pristine: Pristine, results: list[dict], work: Path) -> str:
    """Each violation with its offset, and a command that replays exactly the failing trials."""
    bad = [r for r in results if r["violations"]]
    if not bad:
        return ""
    replay = work / "replay-trials.json"
    replay.write_text(json.dumps([{"index": r["index"], "offset": r["offset"], "mask": r["mask"]} for r in bad]))
    kinds = Counter(v["kind"] for r in bad for v in r["violations"])
    lines = [f"{sum(kinds.values())} violations in {len(bad)} of {len(results)} trials (data.mdb is {pristine.size} bytes):"]
    lines += [f"  {count} x {kind}" for kind, count in kinds.most_common()]
    for r in bad:
        lines.append(f"- offset {r['offset']} (0x{r['offset']:x}, page {r['offset'] // PAGE} + {r['offset'] % PAGE}), xor 0x{r['mask']:02x}"
                     f" (byte 0x{r.get('byte_before', 0):02x} -> 0x{r.get('byte_after', 0):02x}); open: {r.get('open')} {r.get('open_error') or ''}")
        for v in r["violations"][:6]:
            where = f" [{v['tenant']}/{v['session']}]" if v.get("session") else (f" [{v['tenant']}]" if v.get("tenant") else "")
            detail = v["detail"].replace("\n", "\n      ")
            lines.append(f"    {v['kind']}{where}:\n      {detail[-2500:]}")
        if len(r["violations"]) > 6:
            lines.append(f"    ... and {len(r['violations']) - 6} more")
    lines.append(f"replay: {sys.executable} {WORKER} {pristine.data_dir} {work / 'replay-copy'} {pristine.expected_json} {replay}")
    return "\n".join(lines)


def check(pristine: Pristine, results: list[dict], work: Path, label: str, seconds: float, capsys) -> None:
    with capsys.disabled():
        print("\n" + summarize(label, results, seconds))
    report = failure_report(pristine, results, work)
    assert not report, report


# ----------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def ci_run(pristine, tmp_path_factory):
    """The CI batch (random offsets and both meta pages), run once for the tests below."""
    random_part = random_trials(pristine.size, CI_RANDOM_TRIALS, seed=1)
    trials = random_part + meta_trials()
    work = tmp_path_factory.mktemp("flip-ci")
    started = time.monotonic()
    results = run_trials(pristine, trials, work)
    return results[:CI_RANDOM_TRIALS], results[CI_RANDOM_TRIALS:], work, time.monotonic() - started


def test_random_byte_flips_are_exact_or_data_loss(pristine, ci_run, capsys):
    random_results, _, work, seconds = ci_run
    assert len(random_results) == CI_RANDOM_TRIALS
    check(pristine, random_results, work, f"{CI_RANDOM_TRIALS} random offsets, CI (batch with meta pages)", seconds, capsys)


def test_meta_page_flips_start_or_refuse_clearly(pristine, ci_run, capsys):
    _, meta_results, work, seconds = ci_run
    assert {r["offset"] for r in meta_results} == {page * PAGE + field for page in (0, 1) for field in META_FIELDS}
    check(pristine, meta_results, work, "both LMDB meta pages", seconds, capsys)


@pytest.mark.slow
def test_many_random_byte_flips_are_exact_or_data_loss(pristine, tmp_path, capsys):
    trials = random_trials(pristine.size, SLOW_RANDOM_TRIALS, seed=2)
    started = time.monotonic()
    results = run_trials(pristine, trials, tmp_path)
    check(pristine, results, tmp_path, f"{SLOW_RANDOM_TRIALS} random offsets", time.monotonic() - started, capsys)


@pytest.mark.slow  # starts a server process
def test_server_refuses_a_file_with_both_meta_pages_damaged(pristine, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(pristine.data_dir, data_dir)
    with open(data_dir / "lmdb" / "data.mdb", "r+b") as f:
        f.write(random.Random(3).randbytes(2 * PAGE))
    port_file = tmp_path / "port"
    command = [sys.executable, str(REPO / "server.py"), "--data-dir", str(data_dir), "--port", "0",
               "--set", f"server.port_file={port_file}", "--set", "model.prepare=false", "--set", "server.log_format=text"]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=90,
                                env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the server neither started nor exited within 90 s on a damaged file; stderr: {exc.stderr}")
    output = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 2, output
    assert "Traceback" not in result.stderr + result.stdout, output
    assert "data.mdb" in result.stderr, output
    assert not port_file.exists() or not port_file.read_text(), output  # it never served
