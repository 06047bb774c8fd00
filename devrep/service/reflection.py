"""Server reflection under both names clients ask for: ``grpc.reflection.v1.ServerReflection`` (grpcurl, current
grpc clients) and the older ``grpc.reflection.v1alpha.ServerReflection``.

grpcio-reflection (1.85) implements only v1alpha. The v1 protocol is the same messages with the same field numbers
in package ``grpc.reflection.v1``, so the v1alpha servicer answers v1 requests byte for byte; the v1 method is
registered with a generic handler, and a v1 copy of the reflection file is added to the descriptor pool so the v1
service can describe itself too. A grpcio-reflection that ships ``grpc_reflection.v1`` is used as it is.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME: str = v1alpha.SERVICE_NAME
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_file(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    try:
        pool.FindServiceByName(V1_SERVICE_NAME)  # registered under another file name (a newer library)
        return
    except KeyError:
        pass
    fdp = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = V1_FILE
    fdp.package = "grpc.reflection.v1"
    fdp.ClearField("options")
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in fdp.message_type:
        for f in message.field:
            if f.HasField("type_name"):  # (assigning "" would mark a scalar field as typed)
                f.type_name = f.type_name.replace(old, new)
    for service in fdp.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.AddSerializedFile(fdp.SerializeToString())


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection v1 and v1alpha on ``server``, listing ``service_names`` and both reflection services."""
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    try:  # a grpcio-reflection with v1 support
        from grpc_reflection.v1 import reflection as v1  # type: ignore[import-not-found,unused-ignore]

        v1.enable_server_reflection(names, server)
        v1alpha.enable_server_reflection(names, server)
        return
    except ImportError:
        pass
    _add_v1_file(descriptor_pool.Default())
    servicer = v1alpha.ReflectionServicer(names)
    v1alpha_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),))
