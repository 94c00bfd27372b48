"""Packaging: one version string, dependency floors that match the committed stubs, a client-only base install.

Fast and offline: reads pyproject.toml, the installed (editable) metadata and the stubs' own version checks.
`make wheel-check` is the slow counterpart (builds the wheel and installs it into a fresh venv).
"""
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement  # packaging comes with pytest
from packaging.version import Version

import kvmem
from tests.conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

STUBS = REPO / "kvmem" / "v1"
SERVER_ONLY = {"lmdb", "faiss-cpu", "transformers", "accelerate", "gguf", "safetensors", "grpcio-reflection", "prometheus-client"}


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _requirements(specs: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(spec) for spec in specs]
    return {_canonical(r.name): r for r in parsed}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _protobuf_version_the_stubs_check() -> Version:
    text = (STUBS / "kvmem_pb2.py").read_text()
    found = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", text)
    assert found, "kvmem_pb2.py no longer checks the protobuf runtime version: update this test"
    return Version(".".join(found.groups()))


def _grpc_version_the_stubs_name() -> Version:
    found = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", (STUBS / "kvmem_pb2_grpc.py").read_text(), re.MULTILINE)
    assert found, "kvmem_pb2_grpc.py no longer names GRPC_GENERATED_VERSION: update this test"
    return Version(found.group(1))


def _floor(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{requirement} has no lower bound"
    return max(floors)


def test_the_version_is_read_from_the_package(project):
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("kvmem") == kvmem.__version__


def test_the_package_init_imports_nothing():
    # setuptools reads __version__ statically only while the file is plain assignments
    source = (REPO / "kvmem" / "__init__.py").read_text()
    assert not re.search(r"^\s*(import|from)\s", source, re.MULTILINE)


def test_kvmem_version_prints_it():
    script = Path(sys.executable).with_name("kvmem")  # the console script of the editable install
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kvmem.cli"]
    result = subprocess.run(command + ["--version"], cwd="/", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"kvmem {kvmem.__version__}"


def test_the_protobuf_floor_is_what_the_stubs_check(project):
    protobuf = _requirements(project["dependencies"])["protobuf"]
    needed = _protobuf_version_the_stubs_check()
    assert _floor(protobuf) >= needed, f"kvmem_pb2.py refuses protobuf < {needed}; pyproject says {protobuf}"
    assert Version(f"{needed.major + 1}") not in protobuf.specifier, "a new protobuf major breaks the stubs: keep the upper bound"


def test_the_grpcio_floor_is_what_the_stubs_check(project):
    grpcio = _requirements(project["dependencies"])["grpcio"]
    assert _floor(grpcio) >= _grpc_version_the_stubs_name()


def test_grpcio_tools_is_pinned_to_the_version_that_generated_the_stubs(project):
    tools = _requirements(project["optional-dependencies"]["test"])["grpcio-tools"]
    pins = [s for s in tools.specifier if s.operator == "=="]
    assert len(pins) == 1, f"tests/test_stubs.py wants byte-identical stubs: pin grpcio-tools exactly, not {tools}"
    assert Version(pins[0].version) == _grpc_version_the_stubs_name()
    # grpcio-tools X bundles the protoc whose protobuf version the stubs' header names
    header = re.search(r"^# Protobuf Python Version: (\S+)$", (STUBS / "kvmem_pb2.py").read_text(), re.MULTILINE)
    assert header and Version(header.group(1)) == _protobuf_version_the_stubs_check()


def test_the_base_install_is_the_client(project):
    base = _requirements(project["dependencies"])
    assert not SERVER_ONLY & set(base), f"server-only packages in the base dependencies: {sorted(SERVER_ONLY & set(base))}"
    # what `import kvmem.client` and the `kvmem` CLI import (python -X importtime), tqdm for `kvmem compact` on a terminal
    assert {"torch", "numpy", "grpcio", "protobuf", "xxhash", "tqdm"} <= set(base)
    tomli = base["tomli"]
    assert tomli.marker is not None and tomli.marker.evaluate({"python_version": "3.10"}) and not tomli.marker.evaluate({"python_version": "3.11"})
    server = _requirements(project["optional-dependencies"]["server"])
    assert SERVER_ONLY <= set(server)
    for extra in ("test", "bench"):
        assert "kvmem[server]" in project["optional-dependencies"][extra]


def test_the_licence_is_an_spdx_expression(project):
    assert project["license"] == "Apache-2.0"
    assert importlib.metadata.metadata("kvmem")["License-Expression"] == "Apache-2.0"
