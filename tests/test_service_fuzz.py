"""Hypothesis drives every RPC with arbitrary field values: the answer is always a documented status (never
INTERNAL/UNKNOWN, never a hang) and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from _devrep_service import inproc_server
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devrep.client import connect
from devrep.wire._gen import devrep_pb2 as pb
from devrep.wire._gen import devrep_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.DEADLINE_EXCEEDED}
SERVICE = pb.DESCRIPTOR.services_by_name["DevrepService"]
WORDS = ["", "r", "cpu:0", "cpu:1", "cpu:9", "cuda:0", "x" * 300, "/etc/hostname", "/", "relative", "*", "uid:0",
         "label:x", "nope", "\x00", "r/../r"]
INTS = st.one_of(st.sampled_from([0, 1, -1, 4096, 4095, 1 << 20, 1 << 40, 2**63 - 1, -(2**63)]),
                 st.integers(-(2**63), 2**63 - 1))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(WORDS), st.text(max_size=20))
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-1, 8)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.sampled_from([0, 1, 4096, 2**64 - 1]), st.integers(0, 2**64 - 1))
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.integers(-(2**31), 2**31 - 1)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True)
    return INTS


def message_strategy(descriptor: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    cls = pb.__dict__.get(descriptor.name) or getattr(pb, descriptor.full_name.split(".")[-1])

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        msg = cls()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            repeated = field.is_repeated
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth > 1:
                    continue
                sub = message_strategy(field.message_type, depth + 1)
                if repeated:
                    getattr(msg, field.name).extend(draw(st.lists(sub, max_size=2)))
                else:
                    getattr(msg, field.name).CopyFrom(draw(sub))
            elif repeated:
                getattr(msg, field.name).extend(draw(st.lists(_scalar(field), max_size=6)))
            else:
                setattr(msg, field.name, draw(_scalar(field)))
        return msg

    return build()


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[pb_grpc.DevrepServiceStub, tuple[tuple[str, str], ...]]]:
    with inproc_server() as server, connect(server.address) as client:
        client.create_region("r", 1 << 16).array[:] = 1
        client.replicate("r", ["cpu:0"])
        channel = grpc.insecure_channel(server.address)
        yield pb_grpc.DevrepServiceStub(channel), (("authorization", f"Bearer {client.token}"),)
        channel.close()


@pytest.mark.parametrize("method", sorted(SERVICE.methods_by_name))
def test_fuzz_rpc(target: tuple[pb_grpc.DevrepServiceStub, Any], method: str) -> None:
    stub, md = target
    descriptor = SERVICE.methods_by_name[method]

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=message_strategy(descriptor.input_type), good_token=st.booleans())
    def check(request: Any, good_token: bool) -> None:
        metadata = md if good_token else (("authorization", "Bearer forged"),)
        try:
            result = getattr(stub, method)(request, metadata=metadata, timeout=5)
            if descriptor.server_streaming:
                for _ in zip(range(3), result, strict=False):  # a Watch stream never ends by itself
                    pass
                result.cancel()
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
            assert code in DOCUMENTED or (code == grpc.StatusCode.CANCELLED and descriptor.server_streaming), \
                f"{method}({request}) -> {code}: {exc.details()}"
        if not good_token:
            assert code == grpc.StatusCode.UNAUTHENTICATED
        stub.Ping(pb.PingRequest(), metadata=md, timeout=5)

    check()
