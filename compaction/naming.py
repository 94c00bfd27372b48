"""Names of compacted sessions (standard library only: the client CLI uses them too)."""
from __future__ import annotations

COMPACTION_LABEL = "compaction"  # label key every compacted session carries (value: the method)


def compacted_id(session_id: str, method: str, ratio: float | None = None, budget: int | None = None) -> str:
    """Default id of the compacted copy: ``<session_id>@<method>-r<ratio>`` or ``-b<budget>``."""
    amount = f"r{ratio:g}" if ratio is not None else f"b{budget}"
    return f"{session_id}@{method}-{amount}"
