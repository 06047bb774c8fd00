"""A client with nothing but reflection (no generated code) can discover and call the API; health works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from _devrep_service import inproc_server
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from devrep.client import connect


def test_reflection_only_client_and_health() -> None:
    with inproc_server() as server, connect(server.address) as owner:
        owner.create_region("refl", 8192)
        channel = grpc.insecure_channel(server.address)
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "devrep.v1.DevrepService" in set(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("devrep.v1.DevrepService")
        method = service.methods_by_name["DescribeRegion"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary("/devrep.v1.DevrepService/DescribeRegion",
                                   request_serializer=request_cls.SerializeToString,
                                   response_deserializer=response_cls.FromString)
        reply = call(request_cls(name="refl"), metadata=(("authorization", f"Bearer {owner.token}"),), timeout=5)
        assert reply.region.nbytes == 8192 and reply.region.npages == 2

        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "devrep.v1.DevrepService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        channel.close()


def _v1_messages(tmp_path: Path) -> tuple[Any, Any]:
    """Request/response classes of reflection v1, compiled by protoc from the v1 proto into a private pool (so
    nothing here comes from the server's own code)."""
    from grpc_tools import protoc

    out = tmp_path / "v1.pb"
    data = Path(__file__).parent / "data"
    assert protoc.main(["protoc", f"-I{data}", "--include_imports", f"--descriptor_set_out={out}",
                        str(data / "reflection_v1.proto")]) == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in files.file:
        pool.Add(f)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")))


def test_reflection_v1_is_served(tmp_path: Path) -> None:
    request_cls, response_cls = _v1_messages(tmp_path)
    with inproc_server() as server:
        channel = grpc.insecure_channel(server.address)
        call = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=request_cls.SerializeToString,
                                     response_deserializer=response_cls.FromString)
        replies = list(call(iter([request_cls(list_services=""),
                                  request_cls(file_containing_symbol="devrep.v1.DevrepService"),
                                  request_cls(file_containing_symbol="grpc.reflection.v1.ServerReflection")]),
                            timeout=10))
        channel.close()
    services = {s.name for s in replies[0].list_services_response.service}
    print("v1 list_services:", sorted(services))
    assert {"devrep.v1.DevrepService", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection", "grpc.health.v1.Health"} <= services
    for reply, package in ((replies[1], "devrep.v1"), (replies[2], "grpc.reflection.v1")):
        assert reply.WhichOneof("message_response") == "file_descriptor_response", reply
        protos = [descriptor_pb2.FileDescriptorProto.FromString(b)
                  for b in reply.file_descriptor_response.file_descriptor_proto]
        assert package in {p.package for p in protos}, [p.name for p in protos]
