"""The committed gRPC stubs are generated from proto/ and import without path hacks."""
import subprocess
import sys

from tests.conftest import REPO


def test_committed_stubs_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'proto'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", str(REPO / "proto/kvmem/v1/kvmem.proto")],
        check=True,
    )
    for name in ("kvmem_pb2.py", "kvmem_pb2.pyi", "kvmem_pb2_grpc.py"):
        fresh = (tmp_path / "kvmem/v1" / name).read_text()
        committed = (REPO / "kvmem/v1" / name).read_text()
        assert fresh == committed, f"kvmem/v1/{name} is stale: run `make proto` and commit the result"


def test_stubs_import_as_a_package_not_a_top_level_proto_module():
    code = "import kvmem.v1.kvmem_pb2_grpc as g, sys; assert 'proto' not in sys.modules; print(g.KVMemStub.__name__)"
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "KVMemStub"
