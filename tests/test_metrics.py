"""Prometheus metrics: scraped over real HTTP after a real replicate/invalidate/sync cycle, and a real gRPC
server whose interceptor counts requests by method and code."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from _support import metric_samples, scrape
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import devrep
import devrep.metrics
from devrep.backends import load_backend
from devrep.errors import InvalidArgumentError
from devrep.metrics import Metrics

pytestmark = pytest.mark.timeout(60)
PAGE = 4096


@pytest.fixture
def rep() -> Iterator[devrep.Replicator]:
    r = devrep.Replicator(backends={"cpu": load_backend("cpu", devices=2)})
    try:
        yield r
    finally:
        r.close()


def test_scrape_after_replicate_invalidate_sync(rep: devrep.Replicator) -> None:
    metrics = Metrics(rep)
    port = metrics.serve(0, "127.0.0.1")
    try:
        before = scrape(port)
        assert before[("devrep_regions", ())] == 0
        assert ("devrep_invalidated_pages_total", ()) in before

        region = rep.create_region("emb", 16 * PAGE)
        region.array[:] = 1
        rep.replicate("emb", ["cpu:0", "cpu:1"])
        first = scrape(port)
        for dev in ("cpu:0", "cpu:1"):
            assert first[("devrep_replicated_bytes_total", (("device", dev),))] == 16 * PAGE
            assert first[("devrep_syncs_total", (("device", dev),))] == 1
            assert first[("devrep_sync_duration_seconds_count", (("device", dev),))] == 1
            assert first[("devrep_replicas", (("device", dev),))] == 1
            assert first[("devrep_device_bytes", (("device", dev),))] >= 16 * PAGE
        assert first[("devrep_regions", ())] == 1
        assert first[("devrep_region_bytes", ())] == 16 * PAGE

        region.array[3 * PAGE] = 2  # a host write to two pages, reported (explicit mode)
        region.array[9 * PAGE] = 2
        region.invalidate(3 * PAGE, 1)
        region.invalidate(9 * PAGE, 1)
        after_invalidate = scrape(port)
        assert after_invalidate[("devrep_invalidated_pages_total", ())] == 2
        assert after_invalidate[("devrep_invalidations_total", ())] == 2

        rep.sync("emb")
        second = scrape(port)
        for dev in ("cpu:0", "cpu:1"):
            assert second[("devrep_replicated_bytes_total", (("device", dev),))] == 18 * PAGE
            assert second[("devrep_syncs_total", (("device", dev),))] == 2
        with region.acquire("cpu:1") as lease:
            assert int(lease.array[9 * PAGE]) == 2

        rep.unregister("emb")
        gone = scrape(port)
        assert gone[("devrep_regions", ())] == 0
        assert ("devrep_replicas", (("device", "cpu:0"),)) not in gone
        assert gone[("devrep_metrics_listener_errors_total", ())] == 0
    finally:
        metrics.close()


def test_hooks_fault_roundtrip_and_quota() -> None:
    metrics = Metrics()
    other = Metrics()  # registries are separate: no duplicate-timeseries clash
    try:
        devrep.metrics.observe_fault_roundtrip(12e-6)  # the module hook reaches every live Metrics
        metrics.observe_fault_roundtrip(3e-3)
        metrics.quota_rejected("bytes")
        samples = metric_samples(metrics.render())
        assert samples[("devrep_fault_roundtrip_seconds_count", ())] == 2
        assert samples[("devrep_fault_roundtrip_seconds_bucket", (("le", "2e-05"),))] == 1
        assert samples[("devrep_quota_rejections_total", (("resource", "bytes"),))] == 1
        assert b"devrep_fault_roundtrip_seconds_count 1.0" in other.render()
    finally:
        metrics.close()
        other.close()
    with pytest.raises(InvalidArgumentError, match="port"):
        Metrics().serve(70000)


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    if request == b"bad":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
    if request == b"crash":
        raise RuntimeError("handler bug")
    return request


def _count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()
    if int(request) == 0:
        context.abort(grpc.StatusCode.OUT_OF_RANGE, "nothing to count")


def test_grpc_interceptor_counts_methods_and_codes() -> None:
    metrics = Metrics()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[metrics.interceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
    })])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError):
                stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
            echo = channel.unary_unary("/test.Echo/Echo")
            count = channel.unary_stream("/test.Echo/Count")
            assert echo(b"hi", timeout=10) == b"hi"
            for payload, code in ((b"bad", grpc.StatusCode.INVALID_ARGUMENT), (b"crash", grpc.StatusCode.UNKNOWN)):
                with pytest.raises(grpc.RpcError) as err:
                    echo(payload, timeout=10)
                assert err.value.code() == code
            assert list(count(b"3", timeout=10)) == [b"0", b"1", b"2"]
            with pytest.raises(grpc.RpcError):
                list(count(b"0", timeout=10))
            with pytest.raises(grpc.RpcError):
                channel.unary_unary("/test.Echo/Missing")(b"", timeout=10)
    finally:
        server.stop(0).wait(10)
    samples = metric_samples(metrics.render())

    def requests(method: str, code: str) -> float:
        return samples.get(("devrep_grpc_requests_total", (("code", code), ("method", method))), 0.0)

    assert requests("/grpc.health.v1.Health/Check", "OK") == 1
    assert requests("/grpc.health.v1.Health/Check", "NOT_FOUND") == 1
    assert requests("/test.Echo/Echo", "OK") == 1
    assert requests("/test.Echo/Echo", "INVALID_ARGUMENT") == 1
    assert requests("/test.Echo/Echo", "UNKNOWN") == 1
    assert requests("/test.Echo/Count", "OK") == 1
    assert requests("/test.Echo/Count", "OUT_OF_RANGE") == 1
    assert requests("other", "UNIMPLEMENTED") == 1  # unknown names share one bounded label value
    assert samples[("devrep_grpc_request_duration_seconds_count", (("method", "/test.Echo/Echo"),))] == 3
    metrics.close()
