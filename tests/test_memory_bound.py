"""Server memory for one write of any size stays bounded (RSS measured from the server process):
peak growth <= 64 MB plus one chunk per open stream, for a 32k-token SmolLM2-shaped save and for
1 GiB of valid chunks that never commit (twice: what a refused stream leaves must not add up).

The measuring code is bench/storage.py's (one implementation): a fresh server process per
case, CPU tier off, /proc/PID/status sampled every 20 ms."""
from __future__ import annotations

import pytest

from bench.storage import BYTES_PER_TOKEN, GiB, MB, TokenSource, memory_case, random_kv, stream_case

pytestmark = pytest.mark.slow  # 1.5 GB and 2 GiB through a server process (about a minute)


def test_a_32k_token_save_keeps_server_memory_bounded(tmp_path):
    tokens = TokenSource()
    _, layers = random_kv(32768, seed=1)

    def save(server, client, chunk_tokens):
        response = client.save("big", layers, tokens.take(32768), reuse_prefix=False)
        assert response.session.num_tokens == 32768
        return {"outcome": "OK"}

    result = memory_case(tmp_path, "save 32768", save, open_streams=1)
    assert result["samples"] > 10  # the sampler saw the save, not just its ends
    assert result["met"], f"peak RSS growth {result['peak_growth_mb']:.0f} MB over the goal of {result['goal_mb']:.0f} MB: {result['peaks']}"
    assert result["goal_mb"] < 32768 * BYTES_PER_TOKEN / MB / 10  # the bound is far below the session (1.5 GB)


def test_a_gibibyte_that_never_commits_keeps_memory_bounded_and_leaves_nothing(tmp_path):
    tokens = TokenSource()

    def stream(server, client, chunk_tokens):
        outcome = stream_case(server, GiB, chunk_tokens, tokens, cancel=False)
        assert outcome["bytes_sent"] >= GiB
        return outcome

    result = memory_case(tmp_path, "stream no commit", stream, open_streams=1, rounds=2)
    assert result["outcomes"] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]  # refused: the commit never came
    assert result["met"], f"peak RSS growth {result['peak_growth_mb']:.0f} MB over the goal of {result['goal_mb']:.0f} MB"
    assert max(result["left_anon_after_mb"]) < result["goal_mb"]  # nothing held after the refusal ...
    assert result["left_anon_after_mb"][1] - result["left_anon_after_mb"][0] < 16  # ... and nothing adds up
