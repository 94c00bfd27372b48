"""Per-tenant usage and quotas.

The store keeps, per tenant and inside the same LMDB write transaction as the change itself,
how many sessions it holds, the bytes of blocks stored for it after deduplication (chunk keys
include the tenant and private keys belong to one session, so every block belongs to exactly
one tenant) and the bytes its sessions refer to before deduplication. A write that would take a
tenant over its quota is refused with CapacityExceeded and its transaction aborted, so nothing
of it is stored; a write that lowers a usage figure is always allowed, even over quota.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import CapacityExceeded, InvalidRequest


@dataclass(frozen=True)
class Quota:
    """Limits of one tenant; 0 = unlimited."""

    max_stored_bytes: int = 0  # bytes of blocks stored for the tenant, after deduplication
    max_sessions: int = 0  # sessions held (expired ones count until they are collected)

    def __post_init__(self) -> None:
        for name in ("max_stored_bytes", "max_sessions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidRequest(f"quota.{name} must be a non-negative integer (0 = unlimited), got {value!r}")


UNLIMITED = Quota()


@dataclass(frozen=True)
class TenantUsage:
    """What one tenant stores now."""

    tenant: str
    sessions: int = 0
    stored_bytes: int = 0  # bytes of blocks stored for it, after deduplication
    logical_bytes: int = 0  # bytes of KV its sessions refer to, before deduplication


def check_quota(before: TenantUsage, after: TenantUsage, quota: Quota) -> None:
    """Raise CapacityExceeded if ``after`` grows a figure past its limit (shrinking is allowed)."""
    tenant = after.tenant
    if quota.max_stored_bytes and after.stored_bytes > quota.max_stored_bytes and after.stored_bytes > before.stored_bytes:
        raise CapacityExceeded(
            f"tenant {tenant!r} would store {after.stored_bytes} bytes, over its quota of {quota.max_stored_bytes} "
            "(quota.max_stored_bytes); delete sessions or ask for a larger quota"
        )
    if quota.max_sessions and after.sessions > quota.max_sessions and after.sessions > before.sessions:
        raise CapacityExceeded(
            f"tenant {tenant!r} would hold {after.sessions} sessions, over its quota of {quota.max_sessions} "
            "(quota.max_sessions); delete sessions or ask for a larger quota"
        )
