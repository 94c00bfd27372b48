"""``kvmem compact --ray``: sessions fanned out to Ray actors, one session per actor at a time.

Each actor owns one compactor (kvmem.batch_compact): a StoreCompactor over the shared backend (the
actor loads, computes and stores; it hosts a model only for methods that need reference queries)
or a ClientCompactor for one kvmem server (the server computes; several servers round-robin over
the actors). The driver hands an actor its next session when its last one comes back
(``ray.wait``), steps the progress bar, and reports each failure without stopping the others.
Ctrl-C kills the actors: a session being compacted stores nothing (every store is atomic), and the
same command resumes, skipping the sessions already compacted.

Ray is imported inside the functions: ``kvmem.cli`` imports without it.
"""
from __future__ import annotations

import sys
from collections import deque
from typing import Callable, Sequence, TextIO

from kvmem.batch_compact import FAILED, Job, Outcome, Tally

RAY_MISSING = "kvmem compact --ray needs Ray: pip install 'kvmem[ray]'"
LOCAL = "local"  # --ray without an address: start a local Ray cluster


class RayMissing(RuntimeError):
    """Ray is not installed."""


class RayFailed(RuntimeError):
    """The Ray cluster could not be joined, or no worker could list the sessions."""


class Interrupted(Exception):
    """Ctrl-C during a batch; ``tally`` holds what finished before it."""

    def __init__(self, tally: Tally):
        super().__init__(tally.interrupted())
        self.tally = tally


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise RayMissing(f"{RAY_MISSING} ({exc})") from None
    return ray


def connect(address: str) -> bool:
    """Join the Ray cluster at ``address`` (LOCAL: start one on this machine) unless this process
    is connected already; True when this call connected (so the caller shuts it down)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    try:
        if address == LOCAL:
            ray.init()
        else:
            ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayFailed(f"cannot join the Ray cluster at {address!r}: {exc}") from None
    return True


def round_robin(addresses: Sequence[str], workers: int) -> list[str]:
    """The server each of ``workers`` actors calls: the addresses in turn."""
    if not addresses:
        raise ValueError("give at least one server address")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return [addresses[index % len(addresses)] for index in range(workers)]


class CompactWorker:
    """The body of one Ray actor: builds its compactor once (``make()``), then compacts sessions.

    A session's failure comes back as a FAILED Outcome, so one bad session never stops the rest."""

    def __init__(self, make: Callable[[], object]):
        self.compactor = make()

    def sessions(self) -> list[str]:
        return self.compactor.sessions()

    def compact(self, job: Job, session_id: str) -> Outcome:
        try:
            return self.compactor.compact(job, session_id)
        except Exception as exc:  # noqa: BLE001 - reported per session by the driver
            return Outcome.failure(session_id, exc)


def compact_on_ray(job: Job, makers: Sequence[Callable[[], object]], sessions: Sequence[str] | None = None, *,
                   cpus_per_worker: float = 1, stream: TextIO | None = None) -> Tally:
    """Compact ``sessions`` (None: every uncompacted session, as the first worker lists them) with
    one Ray actor per maker; Ray must be connected (``connect``). Returns the tally; raises
    Interrupted on Ctrl-C after killing the actors."""
    from kvmem.progress import Progress

    ray = import_ray()
    if not makers:
        raise ValueError("give at least one worker")
    actor_class = ray.remote(num_cpus=cpus_per_worker)(CompactWorker)
    actors = [actor_class.remote(make) for make in makers]
    try:
        if sessions is None:
            try:
                sessions = ray.get(actors[0].sessions.remote())
            except ray.exceptions.RayError as exc:
                raise RayFailed(f"listing the sessions failed: {Outcome.failure('', exc).error}") from None
        tally = Tally(len(sessions))
        with Progress(len(sessions), "session", stream=stream or sys.stdout) as progress:
            try:
                _drive(ray, job, actors, deque(sessions), tally, progress)
            except KeyboardInterrupt:
                raise Interrupted(tally) from None
        return tally
    finally:
        for actor in actors:  # frees the workers; an unfinished session stores nothing
            ray.kill(actor)


def _drive(ray, job: Job, actors: list, queue: deque, tally: Tally, progress) -> None:
    running = {}  # object ref -> (actor, session id)

    def submit(actor) -> None:
        if queue:
            session_id = queue.popleft()
            running[actor.compact.remote(job, session_id)] = (actor, session_id)

    def report(outcome: Outcome) -> None:
        tally.add(outcome)
        progress.step(outcome.line())

    for actor in actors:
        submit(actor)
    while running:
        [ready], _ = ray.wait(list(running), num_returns=1)
        actor, session_id = running.pop(ready)
        try:
            report(ray.get(ready))
        except ray.exceptions.RayError as exc:  # the actor died (or its compactor could not be built): drop it
            report(Outcome.failure(session_id, exc))
            continue
        submit(actor)
    while queue:  # every actor died
        report(Outcome(queue.popleft(), FAILED, error="no Ray worker left (see the failures above)"))
