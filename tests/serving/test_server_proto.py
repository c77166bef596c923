"""The committed gRPC stubs are what the pinned grpcio-tools makes of the committed .proto."""

import subprocess
import sys
from pathlib import Path

import pytest

from serving.proto import generate

pytest.importorskip("grpc_tools", reason="grpcio-tools (the `test` extra) regenerates stubs")


def test_committed_stubs_are_current(tmp_path):
    # In a child process: protoc's own copy of the protobuf library stays out of this one,
    # which holds XLA's.
    out = subprocess.run([sys.executable, "-m", "serving.proto.generate", "--out", str(tmp_path)],
                         cwd=generate.ROOT, capture_output=True, text=True, check=True).stdout
    fresh = [Path(line) for line in out.split()]
    committed = generate.ROOT / Path(generate.PROTO).parent
    assert [p.name for p in fresh] == list(generate.STUBS)
    for path in fresh:
        assert path.read_text() == (committed / path.name).read_text(), (
            f"{committed / path.name} is stale: run python -m serving.proto.generate")


def test_stubs_import_as_package_modules():
    from serving.proto.jlora.v1 import jlora_pb2, jlora_pb2_grpc
    service = jlora_pb2.DESCRIPTOR.services_by_name["Jlora"]
    assert service.full_name == "jlora.v1.Jlora"
    assert {m.name for m in service.methods} == {
        "Generate", "Abort", "LoadAdapter", "UnloadAdapter", "ListAdapters", "GetAdapter",
        "GetServerInfo"}
    assert service.methods_by_name["Generate"].server_streaming
    assert hasattr(jlora_pb2_grpc, "JloraStub")
