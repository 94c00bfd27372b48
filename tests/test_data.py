"""The shipped test texts are the exact bytes the token-count-dependent tests were written against."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

LICENSES = Path(__file__).parent / "data" / "licenses"

# SHA-256 of Debian's /usr/share/common-licenses/{GPL-3,Apache-2.0,MPL-2.0} (base-files, bookworm)
DIGESTS = {
    "GPL-3": "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986",
    "Apache-2.0": "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30",
    "MPL-2.0": "fab3dd6bdab226f1c08630b1dd917e11fcb4ec5e1e020e2c16f83a0a13863e85",
}


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_licence_text_is_a_verbatim_copy(name):
    assert hashlib.sha256((LICENSES / name).read_bytes()).hexdigest() == DIGESTS[name]


def test_long_text_is_the_three_licences_in_order(long_text):
    parts = [(LICENSES / name).read_text(encoding="utf-8") for name in ("GPL-3", "Apache-2.0", "MPL-2.0")]
    assert long_text == "\n\n".join(parts)
    assert len(long_text) == 35149 + 11358 + 16726 + 4
