"""Admission control: bounds on what one tenant or one connection can make the server hold.

Streams (Save, Append, Restore, Retrieve) are counted per tenant and per connection while they
are open; one more than a limit is refused with RESOURCE_EXHAUSTED before anything is read. The
counters live on the server's event loop (every call enters and leaves there), so they need no
lock. Idle streams are ended by the front end (server.stream_idle_timeout_s).
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from kvstore.errors import CapacityExceeded


class StreamLimits:
    def __init__(self, per_tenant: int, per_connection: int):
        if per_tenant < 1 or per_connection < 1:
            raise ValueError("server.max_streams_per_tenant and max_streams_per_connection must be >= 1")
        self.per_tenant = per_tenant
        self.per_connection = per_connection
        self.by_tenant: Counter[str] = Counter()
        self.by_connection: Counter[str] = Counter()

    @contextmanager
    def hold(self, tenant: str, connection: str) -> Iterator[None]:
        """Count one open stream of ``tenant`` on ``connection`` for the duration of the block."""
        if self.by_tenant[tenant] >= self.per_tenant:
            raise CapacityExceeded(
                f"tenant {tenant!r} already has {self.by_tenant[tenant]} open streams (server.max_streams_per_tenant="
                f"{self.per_tenant}); finish or cancel some before opening more"
            )
        if self.by_connection[connection] >= self.per_connection:
            raise CapacityExceeded(
                f"this connection already has {self.by_connection[connection]} open streams (server.max_streams_per_connection="
                f"{self.per_connection}); finish some or open another connection"
            )
        self.by_tenant[tenant] += 1
        self.by_connection[connection] += 1
        try:
            yield
        finally:
            for counter, key in ((self.by_tenant, tenant), (self.by_connection, connection)):
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

    def open_streams(self) -> int:
        return sum(self.by_tenant.values())
