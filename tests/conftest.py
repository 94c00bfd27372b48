"""Shared fixtures: the real model (loaded once per test session), temp stores, running servers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kvmem.client import Client
from kvmem.config import ModelConfig, RetrievalSettings, ServerConfig, ServiceConfig
from kvstore.spec import ModelSpec
from kvstore.store import SessionStore, StoreConfig

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("KVMEM_TEST_MODEL_CACHE", REPO / ".cache" / "models"))
# verbatim copies of Debian's /usr/share/common-licenses/{GPL-3,Apache-2.0,MPL-2.0} (see tests/data/README.md),
# shipped so the suite runs on any distribution; test_data.py pins their digests
LICENSES = REPO / "tests" / "data" / "licenses"
TOY_SPEC = ModelSpec("toy-model", num_layers=4, num_kv_heads=3, head_dim=8, dtype="float32", max_position=4096)


# fixtures that load a real model (smollm2 here; embedder: test_text_retrieval's all-MiniLM-L6-v2): a test
# that uses one, directly or through another fixture, must be marked slow, or `make test-fast`
# (-m "not slow") would quietly spend minutes on it
HEAVY_FIXTURES = frozenset({"smollm2", "embedder"})


def pytest_collection_modifyitems(config, items):
    unmarked = [
        f"{item.nodeid} (uses {', '.join(sorted(HEAVY_FIXTURES.intersection(item.fixturenames)))})"
        for item in items
        if HEAVY_FIXTURES.intersection(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests that load a real model must be marked slow (@pytest.mark.slow or pytestmark = pytest.mark.slow):\n  "
            + "\n  ".join(unmarked)
        )
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; run on a machine with a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# what the running test (its setup included) loaded through the guarded loaders below
_heavy_loads: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _record_heavy_loads():
    """Record every load of the causal LM or the text embedder, wherever it happens (a test, a
    fixture, a server the test started in this process), for the check in pytest_runtest_makereport.
    Calls through names bound before the patch (``from modelhost.models import load_model`` at the top
    of a test module) and loads in server subprocesses are not seen: mark those tests by hand."""
    import modelhost.models
    from retrieval.embedder import TextEmbedder

    load_model, prepare_model = modelhost.models.load_model, modelhost.models.prepare_model
    load_embedder = TextEmbedder.load.__func__

    def recording_load_model(*args, **kwargs):
        _heavy_loads.append("modelhost.models.load_model (the causal LM)")
        return load_model(*args, **kwargs)

    def recording_prepare_model(*args, **kwargs):
        _heavy_loads.append("modelhost.models.prepare_model (the GGUF conversion)")
        return prepare_model(*args, **kwargs)

    def recording_load_embedder(cls, *args, **kwargs):
        _heavy_loads.append("TextEmbedder.load (the text embedder)")
        return load_embedder(cls, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modelhost.models, "load_model", recording_load_model)
        patch.setattr(modelhost.models, "prepare_model", recording_prepare_model)
        patch.setattr(TextEmbedder, "load", classmethod(recording_load_embedder))
        yield


def pytest_runtest_logstart(nodeid, location):
    _heavy_loads.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test not marked slow that loads a model (itself, through a fixture, or through a server it
    started) fails, naming what it loaded: a missing marker is an error, not a silently slow test."""
    report = yield
    if call.when == "call" and report.passed and _heavy_loads and item.get_closest_marker("slow") is None:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} loaded {', '.join(sorted(set(_heavy_loads)))} but is not marked slow: "
            "add @pytest.mark.slow (or pytestmark = pytest.mark.slow for a heavy file)"
        )
    return report


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, converted once into .cache/models."""
    from modelhost.models import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m-instruct", cache_dir=MODEL_CACHE)


@pytest.fixture(scope="session")
def long_text() -> str:
    """Natural English text (the GPL-3, Apache-2.0 and MPL-2.0 licence texts), several thousand tokens."""
    return "\n\n".join((LICENSES / name).read_text(encoding="utf-8") for name in ("GPL-3", "Apache-2.0", "MPL-2.0"))


def random_layers(spec: ModelSpec, tokens: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shape = (spec.num_kv_heads, tokens, spec.head_dim)
    return [
        (torch.randn(shape, generator=generator).to(spec.torch_dtype), torch.randn(shape, generator=generator).to(spec.torch_dtype))
        for _ in range(spec.num_layers)
    ]


@pytest.fixture
def store_config(tmp_path) -> StoreConfig:
    return StoreConfig(data_dir=tmp_path / "data", chunk_tokens=16, cpu_tier_bytes=8 << 20, lmdb_map_bytes=8 << 20, lmdb_max_map_bytes=256 << 20)


@pytest.fixture
def store(store_config):
    store = SessionStore.open(store_config)
    yield store
    store.close()


@pytest.fixture
def service(tmp_path):
    """An in-process kvmem server on 127.0.0.1 (free port), small chunks, stopped afterwards."""
    from server import create_service

    config = ServiceConfig(
        server=ServerConfig(port=0, log_format="text", max_message_bytes=8 << 20),
        store=StoreConfig(data_dir=tmp_path / "svc", chunk_tokens=16, lmdb_map_bytes=16 << 20, lmdb_max_map_bytes=256 << 20),
        model=ModelConfig(cache_dir=str(MODEL_CACHE), prepare=False),  # hosted lazily, shared with the tests
        retrieval=RetrievalSettings(index_on_save=False),  # tests of indexing turn it on
    )
    running = create_service(config).start()
    yield running
    running.stop(grace=1)


@pytest.fixture
def client(service):
    with Client(f"127.0.0.1:{service.port}", spec=TOY_SPEC) as c:
        yield c


@dataclass
class ServerProcess:
    """A kvmem server in its own process (for restarts and SIGKILL)."""

    data_dir: Path
    extra: list[str]
    process: subprocess.Popen | None = None
    port: int = 0

    def start(self, timeout: float = 60.0) -> "ServerProcess":
        port_file = self.data_dir.parent / f"port-{time.monotonic_ns()}"
        command = [
            sys.executable, str(REPO / "server.py"), "--port", "0", "--data-dir", str(self.data_dir),
            "--set", f"server.port_file={port_file}", "--set", "model.prepare=false", "--set", "server.log_format=text",
            "--set", "server.grace_seconds=15", *self.extra,
        ]
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text():
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.process.stdout.read()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError("server did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def terminate(self, timeout: float = 30.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def server_process(tmp_path):
    servers: list[ServerProcess] = []

    def start(data_dir: Path | None = None, *extra: str) -> ServerProcess:
        server = ServerProcess(data_dir or tmp_path / "proc-data", list(extra)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def service_config(tmp_path, **sections) -> ServiceConfig:
    """The test service's config; ``server={...}`` overrides server fields, other sections whole."""
    import dataclasses

    server = dataclasses.replace(ServerConfig(port=0, log_format="text", max_message_bytes=8 << 20), **sections.pop("server", {}))
    return ServiceConfig(
        server=server,
        store=StoreConfig(data_dir=tmp_path / "svc", chunk_tokens=16, lmdb_map_bytes=16 << 20, lmdb_max_map_bytes=256 << 20),
        model=ModelConfig(cache_dir=str(MODEL_CACHE), prepare=False),
        retrieval=RetrievalSettings(index_on_save=False),
        **sections,
    )


@pytest.fixture
def start_service(tmp_path):
    """start(**sections) -> a started in-process service with that config; all stopped afterwards."""
    from server import create_service

    running = []

    def start(**sections):
        service = create_service(service_config(tmp_path, **sections)).start()
        running.append(service)
        return service

    yield start
    for service in running:
        service.stop(grace=1)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real Redis Cluster for the whole test session: 3 masters and 3 replicas on free loopback
    ports, AOF on, from Debian's redis-server (``make install`` installs it); removed afterwards.
    Tests keep apart by namespace. A test that kills a node uses its own cluster instead."""
    from kvmem.local_cluster import LocalRedisCluster

    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop(remove=True)
