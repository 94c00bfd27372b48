"""Names of compacted sessions (standard library only: the client CLI uses them too)."""
from __future__ import annotations

import hashlib
import json

COMPACTION_LABEL = "compaction"  # label key every compacted session carries (value: the method)


SOURCE_SUFFIX = "@source"  # where ``replace`` keeps the lossless original: "<session_id>@source"


def options_tag(options: dict | None) -> str:
    """"" for no options, else "-o" + 8 hex digits of the sorted options: two variants of one
    method at one ratio get two ids."""
    if not options:
        return ""
    canonical = json.dumps({str(k): str(v) for k, v in options.items()}, sort_keys=True, separators=(",", ":"))
    return "-o" + hashlib.blake2b(canonical.encode(), digest_size=4).hexdigest()


def option_value(text: str):
    """A method option as the wire and the CLI carry it (a string), parsed: booleans and numbers
    become bool, int, float; anything else stays text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def compacted_id(session_id: str, method: str, ratio: float | None = None, budget: int | None = None, options: dict | None = None) -> str:
    """Default id of the compacted copy: ``<session_id>@<method>-r<ratio>`` or ``-b<budget>``,
    then ``-o<hash>`` when method options were given (they change the result)."""
    amount = f"r{ratio:g}" if ratio is not None else f"b{budget}"
    return f"{session_id}@{method}-{amount}{options_tag(options)}"
