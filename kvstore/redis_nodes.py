"""Where each Redis key lives: one Redis server, or the primaries of a Redis Cluster.

``Nodes`` keeps the slot map (``CLUSTER SLOTS``, refreshed on MOVED, failover or a lost
connection) and one connection pool per primary, and runs a call against the primary of a key
with retries until ``failover_seconds`` have passed. A pipeline runs on one connection, so a
write and the ``WAIT`` after it (replica acknowledgements) go together.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar
from urllib.parse import urlsplit

import redis
from redis.connection import parse_url
from redis.crc import key_slot

from kvstore.errors import CapacityExceeded, InvalidRequest, Unavailable

log = logging.getLogger("kvmem.redis")
T = TypeVar("T")
SLOTS = 16384
# replies that mean "not here or not now" while a cluster moves slots or fails over; redis-py strips
# the code from the message of those it maps to a class (MovedError("3999 127.0.0.1:7002"))
_RETRY_CODES = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN", "READONLY", "LOADING", "MASTERDOWN", "NOREPLICAS")
_RETRY_CLASSES = (redis.exceptions.AskError, redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError,
                  redis.exceptions.ReadOnlyError, redis.exceptions.BusyLoadingError)
_CREDENTIAL_CLASSES = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError, redis.exceptions.NoPermissionError)


@dataclass(frozen=True)
class NodeSettings:
    url: str  # redis:// or rediss:// (TLS), with user and password when the server wants them
    timeout_seconds: float = 5.0  # one command on one connection
    failover_seconds: float = 30.0  # how long calls retry through a failover before UNAVAILABLE


def is_retryable(exc: Exception) -> bool:
    """A failover, a slot move or a lost connection: worth trying again once the map is fresh."""
    if isinstance(exc, _CREDENTIAL_CLASSES):
        return False
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError) + _RETRY_CLASSES):
        return True
    code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
    return isinstance(exc, redis.ResponseError) and code in _RETRY_CODES


def as_kvmem_error(exc: redis.RedisError, what: str) -> Exception:
    """What a Redis error that retrying cannot cure means to a kvmem caller."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return CapacityExceeded(f"Redis is out of memory (maxmemory reached) during {what}: {exc}; free space or grow the cluster")
    if isinstance(exc, _CREDENTIAL_CLASSES):
        return Unavailable(f"Redis refused kvmem's credentials during {what} ({exc}); check the user and password in store.redis_url")
    return exc


def _raise_final(exc: redis.RedisError, what: str):
    """Raise what a Redis error that retrying cannot cure means to a kvmem caller."""
    mapped = as_kvmem_error(exc, what)
    if mapped is exc:
        raise exc
    raise mapped from exc


class Nodes:
    def __init__(self, settings: NodeSettings):
        if urlsplit(settings.url).scheme not in ("redis", "rediss"):
            raise InvalidRequest(f"store.redis_url must start with redis:// or rediss://, got {settings.url[:40]!r}")
        self.settings = settings
        options = parse_url(settings.url)
        self._options = {name: value for name, value in options.items() if name not in ("host", "port", "db", "path")}
        self._options.update(socket_timeout=settings.timeout_seconds, socket_connect_timeout=settings.timeout_seconds)
        self._seeds = [(options.get("host", "127.0.0.1"), int(options.get("port", 6379)))]
        self._clients: dict[tuple[str, int], redis.Redis] = {}
        self._slots: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kvmem-redis-io")  # one pipeline per primary at once
        self.cluster = False
        self.refresh()

    def client(self, address: tuple[str, int]) -> redis.Redis:
        with self._lock:
            found = self._clients.get(address)
            if found is None:
                found = self._clients[address] = redis.Redis(host=address[0], port=address[1], **self._options)
            return found

    def refresh(self) -> None:
        """Read the slot map from any node that answers (the seeds, then every known node)."""
        candidates = list(dict.fromkeys(self._seeds + list(self._clients)))
        last: Exception | None = None
        for address in candidates:
            try:
                client = self.client(address)
                if not self.cluster and not self._slots:
                    self.cluster = client.info("cluster").get("cluster_enabled", 0) == 1
                if not self.cluster:
                    self._slots = [address] * SLOTS
                    return
                slots: list[tuple[str, int] | None] = [None] * SLOTS
                for start, end, primary, *_ in client.execute_command("CLUSTER SLOTS"):
                    host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
                    owner = (host or address[0], int(primary[1]))
                    for slot in range(start, end + 1):
                        slots[slot] = owner
                if any(owner is None for owner in slots):
                    raise Unavailable("the Redis Cluster does not cover all hash slots (a shard has no primary)")
                self._slots = slots  # type: ignore[assignment]
                for owner in set(slots):
                    self.client(owner)  # type: ignore[arg-type]
                return
            except (redis.RedisError, Unavailable) as exc:
                last = exc
        raise Unavailable(f"no Redis node at {self.settings.url.split('@')[-1]} answers ({last}); check store.redis_url and that the servers run")

    def primary(self, key: bytes) -> tuple[str, int]:
        return self._slots[key_slot(key)]

    def primaries(self) -> list[tuple[str, int]]:
        return sorted(set(self._slots))

    def per_primary(self, names: Sequence[bytes], fn: Callable[[redis.Redis, list[int]], list], what: str) -> list:
        """``fn(client, indexes)`` -> one result per index, for the names each primary holds, on
        every primary at once; results in the order of ``names``. A group that meets a failover
        or a slot move is grouped again by the fresh slot map and retried, for up to
        failover_seconds (``fn`` must be safe to repeat: GET, SET NX, DEL)."""
        results: list = [None] * len(names)
        remaining = list(range(len(names)))
        deadline = time.monotonic() + self.settings.failover_seconds
        delay = 0.02
        while remaining:
            groups: dict[tuple[str, int], list[int]] = {}
            for index in remaining:
                groups.setdefault(self.primary(names[index]), []).append(index)
            if len(groups) == 1:
                address, indexes = next(iter(groups.items()))
                outcomes = {address: self._attempt(fn, address, indexes)}
            else:
                futures = {address: self._io.submit(self._attempt, fn, address, indexes) for address, indexes in groups.items()}
                outcomes = {address: future.result() for address, future in futures.items()}
            remaining, last = [], None
            for address, (values, error) in outcomes.items():
                if error is None:
                    for index, value in zip(groups[address], values):
                        results[index] = value
                    continue
                if not is_retryable(error):
                    _raise_final(error, what)
                remaining += groups[address]
                last = (address, error)
            if not remaining:
                return results
            delay = self._before_retry(deadline, delay, what, *last)
        return results

    def on_each(self, items: Sequence[tuple], fn: Callable[..., T]) -> list[T]:
        """``fn(*item)`` for every item at once on the I/O threads (one call per primary, say),
        not retried; results in order, the first error raised after all have finished."""
        futures = [self._io.submit(fn, *item) for item in items]
        wait(futures)
        return [future.result() for future in futures]

    def _attempt(self, fn: Callable[[redis.Redis, list[int]], list], address: tuple[str, int], indexes: list[int]):
        """(fn's results, None), or (None, the Redis error it raised); anything else propagates."""
        try:
            return fn(self.client(address), indexes), None
        except redis.RedisError as exc:
            return None, exc

    def call(self, key: bytes | None, fn: Callable[[redis.Redis], T], what: str) -> T:
        """``fn(client of the primary of key)`` (key None: any primary), retried through
        failovers and slot moves for up to failover_seconds."""
        deadline = time.monotonic() + self.settings.failover_seconds
        delay = 0.02
        while True:
            address = self.primary(key) if key is not None else self.primaries()[0]
            try:
                return fn(self.client(address))
            except redis.RedisError as exc:
                if not is_retryable(exc):
                    _raise_final(exc, what)
                delay = self._before_retry(deadline, delay, what, address, exc)

    def _before_retry(self, deadline: float, delay: float, what: str, address: tuple[str, int], error: Exception) -> float:
        """Past the deadline: UNAVAILABLE. Else log, back off (jittered), refresh the slot map;
        the next delay."""
        if time.monotonic() >= deadline:
            raise Unavailable(f"Redis did not complete {what} within {self.settings.failover_seconds:g} s ({error}); retry later") from error
        log.warning("redis call retried", extra={"fields": {"what": what, "node": f"{address[0]}:{address[1]}", "error": str(error)[:200]}})
        time.sleep(delay * (0.5 + random.random()))
        try:
            self.refresh()
        except Unavailable:
            pass
        return min(delay * 2, 0.5)

    def close(self) -> None:
        self._io.shutdown(wait=True)
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
