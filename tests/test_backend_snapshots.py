"""Property test of snapshot reads against a model, on every backend of the contract suite: random
write transactions (puts and deletes over a few keys of two spaces, some raising halfway) with
read transactions opened between them and read later. Each read must see exactly the committed
state of the moment it opened (gets, full scans, prefix scans from a start key, counts), however
many commits landed since; a write that raised must leave no trace. On Redis this checks the
multi-version layer (undo entries, snapshot scans over pages) in kvstore.redis_scripts."""
from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_backend_contract import BACKENDS

SPACES = ("meta", "aux")
KEYS = [bytes([a, b]) for a in b"ab" for b in b"xyz"] + [b"a", b"ab\xff", b"b\x00"]  # shared prefixes, edge bytes
_runs = itertools.count()


class _Abort(Exception):
    pass


change = st.tuples(st.sampled_from(SPACES), st.sampled_from(KEYS), st.one_of(st.none(), st.binary(min_size=0, max_size=12)))
step = st.one_of(
    st.tuples(st.just("write"), st.lists(change, min_size=1, max_size=6), st.booleans()),  # changes, abort halfway
    st.tuples(st.just("open")),
    st.tuples(st.just("check"), st.integers(min_value=0, max_value=50)),
)


def _expected_scan(state: dict, space: str, start: bytes, prefix: bytes) -> list[tuple[bytes, bytes]]:
    return sorted((key, value) for (s, key), value in state.items() if s == space and key >= start and key.startswith(prefix))


def _check(txn, state: dict) -> None:
    for space in SPACES:
        for key in KEYS + [key for s, key in state if s == space]:
            got = txn.get(space, key)
            assert (None if got is None else bytes(got)) == state.get((space, key)), (space, key)
        assert txn.count(space) == sum(1 for s, _ in state if s == space)
        for start, prefix in ((b"", b""), (b"", b"a"), (b"ay", b"a"), (b"b", b""), (b"ab", b"ab")):
            got = [(bytes(key), bytes(value)) for key, value in txn.scan(space, start=start, prefix=prefix)]
            assert got == _expected_scan(state, space, start, prefix), (space, start, prefix)


@pytest.mark.parametrize("backend_name", sorted(BACKENDS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=25))
def test_every_read_sees_the_committed_state_of_the_moment_it_opened(backend_name, steps, request, tmp_path):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("kvstore.redis_backend._PAGE", 3)  # snapshot scans page by 3 keys: continuation across pages is exercised
        _run(BACKENDS[backend_name](tmp_path / f"run-{next(_runs)}", request), steps)


def _run(backend, steps) -> None:
    with backend.read() as txn:  # what a fresh backend holds of its own (LMDB's schema version in meta)
        state: dict[tuple[str, bytes], bytes] = {(space, bytes(key)): bytes(value) for space in SPACES for key, value in txn.scan(space)}
    snapshots: list[tuple[object, dict]] = []
    try:
        with contextlib.ExitStack() as open_reads:
            for item in steps:
                if item[0] == "write":
                    changes, abort = item[1], item[2]

                    def apply(txn, changes=changes, abort=abort):
                        for at, (space, key, value) in enumerate(changes):
                            if abort and at == len(changes) // 2:
                                raise _Abort()
                            if value is None:
                                txn.delete(space, key)
                            else:
                                txn.put(space, key, value)

                    try:
                        backend.write(apply)
                    except _Abort:
                        continue
                    for space, key, value in changes:
                        if value is None:
                            state.pop((space, key), None)
                        else:
                            state[(space, key)] = value
                elif item[0] == "open":
                    snapshots.append((open_reads.enter_context(backend.read()), dict(state)))
                elif snapshots:
                    txn, seen = snapshots[item[1] % len(snapshots)]
                    _check(txn, seen)
            for txn, seen in snapshots:
                _check(txn, seen)
        with backend.read() as txn:
            _check(txn, state)
    finally:
        backend.close()
