"""A client with nothing but reflection (no generated code) can discover and call the API; health works."""

from __future__ import annotations

import grpc
from _devrep_service import inproc_server
from google.protobuf import descriptor_pool, message_factory
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
