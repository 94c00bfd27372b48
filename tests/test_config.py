"""Configuration: TOML < env < flags, and unknown keys refuse to start."""
import subprocess
import sys

import pytest

from kvmem.config import ConfigError, load_config
from tests.conftest import REPO


def test_precedence_file_env_flags(tmp_path):
    path = tmp_path / "kvmem.toml"
    path.write_text('[server]\nport = 7000\nmax_workers = 4\n[store]\nchunk_tokens = 128\ndurable = true\n')
    config = load_config(path, {"KVMEM_SERVER_PORT": "7001", "KVMEM_STORE_DURABLE": "false", "HOME": "/x"}, ["server.port=7002"])
    assert config.server.port == 7002 and config.server.max_workers == 4
    assert config.store.chunk_tokens == 128 and config.store.durable is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"env": {"KVMEM_STORE_CHUNKTOKENS": "1"}}, "unknown key store.chunktokens"),
        ({"env": {"KVMEM_NOPE_X": "1"}}, "unknown section [nope]"),
        ({"overrides": ["server.port=abc"]}, "expected int"),
        ({"overrides": ["store.chunk_tokens=0"]}, "chunk_tokens"),
        ({"overrides": ["store.durable=maybe"]}, "true/false"),
        ({"overrides": ["port=1"]}, "section.key=value"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    assert message in str(info.value)


@pytest.mark.slow
def test_server_refuses_to_start_on_unknown_keys(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[store]\nlmdb_size = 5\n")
    for args, env in ((["--config", str(path)], {}), (["--set", "server.bogus=1"], {}), ([], {"KVMEM_SERVER_BOGUS": "1"})):
        result = subprocess.run([sys.executable, "server.py", "--data-dir", str(tmp_path / "d"), *args], cwd=REPO, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", **env})
        assert result.returncode == 2, result.stderr
        assert "unknown" in result.stderr
    assert not (tmp_path / "d").exists()  # nothing was created before the refusal
