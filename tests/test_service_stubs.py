"""The committed gRPC stubs are what protoc generates from the committed proto (CI catches a stale stub)."""

from __future__ import annotations

from pathlib import Path

from devrep.wire import _codegen


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    written = _codegen.generate(tmp_path)
    assert {p.name for p in written} == {"__init__.py", *_codegen.FILES}
    for path in written:
        committed = _codegen.GEN_DIR / path.name
        assert committed.exists(), f"{committed} is missing: run python -m devrep.wire._codegen"
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run python -m devrep.wire._codegen and commit the result")


def test_proto_declares_every_rpc_the_servicer_implements() -> None:
    from devrep.service.servicer import DevrepServicer
    from devrep.wire._gen import devrep_pb2 as pb

    methods = pb.DESCRIPTOR.services_by_name["DevrepService"].methods_by_name
    assert pb.DESCRIPTOR.package == "devrep.v1"
    for name in methods:
        assert name in vars(DevrepServicer), f"RPC {name} is not implemented"
