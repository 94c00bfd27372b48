"""Batch compaction's pure parts: jobs, outcomes, tallies, round-robin servers, and the CLI's
refusals for `kvmem compact --ray` (no Ray started; tests/test_ray_compact.py runs it)."""
import sys

import pytest

from kvmem.batch_compact import COMPACTED, FAILED, SKIPPED, Job, Outcome, StoreWorkerConfig, Tally
from kvmem.cli import main
from kvmem.ray_compact import round_robin
from kvstore.errors import NotFound


def test_a_job_names_the_servers_default_target_and_needs_exactly_one_amount():
    assert Job("knorm", ratio=0.25).destination("s") == "s@knorm-r0.25"
    assert Job("knorm", budget=16, options={"seed": "1"}).destination("s").startswith("s@knorm-b16-o")
    for bad in (dict(), dict(ratio=0.5, budget=3)):
        with pytest.raises(ValueError, match="exactly one"):
            Job("knorm", **bad)
    with pytest.raises(ValueError, match="threads"):
        StoreWorkerConfig(store=None, threads=0)


def test_outcomes_report_each_session_and_the_tally_counts_them():
    tally = Tally(4)
    outcomes = [
        Outcome("a", COMPACTED, "a@knorm-r0.5", 2_000_000, 1_000_000, 12.0, 0.5),
        Outcome("b", SKIPPED, "b@knorm-r0.5"),
        Outcome.failure("c", NotFound("session 'c' of tenant 't' does not exist")),
        Outcome.failure("d", RuntimeError("Traceback (most recent call last):\n  ...\nValueError: bad\n")),
    ]
    for outcome in outcomes:
        tally.add(outcome)
    lines = [outcome.line() for outcome in outcomes]
    assert lines[0] == "a -> a@knorm-r0.5: 2.0 MB -> 1.0 MB, 12.0 keys/head, 0.5s"
    assert lines[1] == "b: already compacted as b@knorm-r0.5, skipped"
    assert lines[2] == "c: FAILED: NotFound: session 'c' of tenant 't' does not exist"
    assert lines[3] == "d: FAILED: RuntimeError: ValueError: bad"  # the last line of a long message
    assert outcomes[2].status == FAILED
    assert tally.summary() == "done: 1 compacted, 1 already done, 2 failed (c, d), 4 sessions"
    assert tally.interrupted().startswith("interrupted after 1 compacted, 1 skipped, 2 failed; run the same command again")


def test_workers_take_the_servers_in_turn():
    assert round_robin(["a", "b"], 5) == ["a", "b", "a", "b", "a"]
    assert round_robin(["a"], 2) == ["a", "a"]
    for addresses, workers in (([], 2), (["a"], 0)):
        with pytest.raises(ValueError):
            round_robin(addresses, workers)


def compact_args(*extra):
    return ["compact", "--method", "knorm", "--ratio", "0.5", "--sessions", "a", *extra]


def test_without_ray_installed_the_cli_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(compact_args("--ray", "--address", "127.0.0.1:1")) == 2
    assert "pip install 'kvmem[ray]'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--store-url", "redis://127.0.0.1:1"], "--store-url works with --ray"),
    (["--ray", "--store-url", "/tmp/data"], "redis:// or rediss://"),
    (["--ray", "--ray-workers", "0"], "at least 1"),
    (["--address", "a:1", "--address", "b:2"], "several --address values need --ray"),
])
def test_the_cli_refuses_flags_that_do_not_fit(extra, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(compact_args(*extra))
    assert exited.value.code == 2 and message in capsys.readouterr().err
