"""Prometheus metrics (prometheus-client), all ``devrep_``-prefixed and in base units (bytes, seconds).

``Metrics`` owns its own ``CollectorRegistry`` (so several can live in one process, e.g. in tests). It is fed by

* ``attach(replicator)``: a ``Replicator`` listener for region events (invalidate, sync, verify,
  region_failed) plus scrape-time gauges read from the replicator (replicas and device bytes by device);
* ``interceptor()``: a ``grpc.ServerInterceptor`` counting requests by method and status code;
* hooks: ``observe_fault_roundtrip(seconds)`` (write-fault round trips, from the sync tracker) and
  ``quota_rejected(resource)`` (from the service's quota checks). The module-level
  ``observe_fault_roundtrip`` feeds every live ``Metrics`` so trackers need no reference to one.

``serve(port)`` exposes ``/metrics`` over HTTP (``prometheus_client.start_http_server``).

>>> m = Metrics()
>>> m.quota_rejected("bytes")
>>> b"devrep_quota_rejections_total" in m.render()
True
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ._pages import PAGE_SIZE
from .errors import InvalidArgumentError
from .model import EventKind

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .engine import Replicator
    from .model import Event

log = logging.getLogger("devrep.metrics")

# Sync durations span a one-page copy (tens of µs) to a multi-GiB first replication (seconds).
SYNC_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)
# Write-fault round trips are 1-50 µs when healthy (see shared/limits.md); the tail shows contention.
FAULT_BUCKETS = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 1e-2, 0.1)
RPC_BUCKETS = (1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)

DEFAULT_ADDRESS = "127.0.0.1"
"""Where ``/metrics`` listens unless told otherwise (``devrep serve --metrics-address``)."""
OTHER_METHOD = "other"
"""The ``method`` label of every request for a method this server does not serve: a client chooses method names,
so counting them verbatim would let it create any number of series (unbounded memory in the server and in
Prometheus)."""

_live: weakref.WeakSet[Metrics] = weakref.WeakSet()


def observe_fault_roundtrip(seconds: float) -> None:
    """Record one write-fault round trip in every live ``Metrics`` (cheap no-op when there is none)."""
    for metrics in list(_live):
        metrics.observe_fault_roundtrip(seconds)


class _ReplicatorCollector(Collector):
    """Scrape-time gauges read from the replicators' region descriptions: never drift from the truth."""

    def __init__(self) -> None:
        self.replicators: list[Replicator] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        replicas = GaugeMetricFamily("devrep_replicas", "Replicas by device", labels=["device"])
        device_bytes = GaugeMetricFamily("devrep_device_bytes", "Device memory held by replica buffers",
                                         labels=["device"])
        # NUMA replicas once more, labelled by the node their pages are bound to (numa:I is not always node I).
        node_replicas = GaugeMetricFamily("devrep_numa_replicas", "NUMA-backend replicas by device and node",
                                          labels=["device", "node"])
        node_bytes = GaugeMetricFamily("devrep_numa_replica_bytes", "Memory held by NUMA-backend replica buffers",
                                       labels=["device", "node"])
        nodes: dict[str, str] = {}
        regions = GaugeMetricFamily("devrep_regions", "Registered regions")
        host_bytes = GaugeMetricFamily("devrep_region_bytes", "Host bytes covered by registered regions")
        count: dict[str, int] = {}
        used: dict[str, int] = {}
        n_regions = 0
        n_bytes = 0
        for rep in list(self.replicators):
            for region in rep.regions():
                try:
                    info = region.describe()
                except Exception:  # closed between listing and describing: it no longer counts
                    continue
                n_regions += 1
                n_bytes += info.nbytes
                for r in info.replicas:
                    count[r.device] = count.get(r.device, 0) + 1
                    used[r.device] = used.get(r.device, 0) + r.nbytes
                    if r.device.startswith("numa:") and r.device not in nodes:
                        nodes[r.device] = _numa_node(rep, r.device)
        for device in sorted(count):
            replicas.add_metric([device], count[device])
            device_bytes.add_metric([device], used[device])
            if device in nodes:
                node_replicas.add_metric([device, nodes[device]], count[device])
                node_bytes.add_metric([device, nodes[device]], used[device])
        regions.add_metric([], n_regions)
        host_bytes.add_metric([], n_bytes)
        yield from (replicas, device_bytes, node_replicas, node_bytes, regions, host_bytes)


def _numa_node(replicator: Replicator, device: str) -> str:
    """The node id behind a ``numa:I`` device, as a label value."""
    try:
        backend, index = replicator.resolve(device)
        return str(backend.node(index))  # type: ignore[attr-defined]
    except Exception:  # not a NumaBackend after all: never break a scrape over a label
        return ""


class Metrics:
    """One registry of devrep metrics; see the module doc for what feeds it."""

    def __init__(self, replicator: Replicator | None = None, *, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.replicated_bytes = Counter("devrep_replicated_bytes", "Bytes copied from host into replicas",
                                        ["device"], registry=r)
        self.invalidated_pages = Counter("devrep_invalidated_pages", "Host pages invalidated by writes",
                                         registry=r)
        self.invalidations = Counter("devrep_invalidations", "Invalidation events (batches of runs)", registry=r)
        self.syncs = Counter("devrep_syncs", "Replica syncs that copied pages", ["device"], registry=r)
        self.sync_duration = Histogram("devrep_sync_duration_seconds", "Wall time of a sync", ["device"],
                                       buckets=SYNC_BUCKETS, registry=r)
        self.verify_mismatches = Counter("devrep_verify_mismatched_pages",
                                         "Replica pages whose hash differed from the host's", ["device"], registry=r)
        self.region_failures = Counter("devrep_region_failures", "Regions marked failed", registry=r)
        self.fault_roundtrip = Histogram("devrep_fault_roundtrip_seconds",
                                         "Write-fault round trip (fault to writer resumed)",
                                         buckets=FAULT_BUCKETS, registry=r)
        self.quota_rejections = Counter("devrep_quota_rejections", "Requests refused by a quota", ["resource"],
                                        registry=r)
        self.grpc_requests = Counter("devrep_grpc_requests", "gRPC requests handled", ["method", "code"],
                                     registry=r)
        self.grpc_duration = Histogram("devrep_grpc_request_duration_seconds", "gRPC handling time", ["method"],
                                       buckets=RPC_BUCKETS, registry=r)
        self.listener_errors = Counter("devrep_metrics_listener_errors", "Events the metrics listener failed on",
                                       registry=r)
        # Labelled children per device, looked up once: labels() takes a lock and builds a tuple each call.
        self._per_device: dict[str, tuple[Any, Any, Any]] = {}
        self._collector = _ReplicatorCollector()
        r.register(self._collector)
        self._attached: list[tuple[Replicator, Callable[[Event], None]]] = []
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        _live.add(self)
        if replicator is not None:
            self.attach(replicator)

    # ------------------------------------------------------------------ feeding
    def attach(self, replicator: Replicator) -> None:
        """Count ``replicator``'s events from now on and report its replicas at scrape time."""
        replicator.add_listener(self.on_event)
        self._attached.append((replicator, self.on_event))
        self._collector.replicators.append(replicator)

    def detach(self) -> None:
        for replicator, listener in self._attached:
            with contextlib.suppress(ValueError):  # already removed by its owner
                replicator.remove_listener(listener)
        self._attached.clear()
        self._collector.replicators.clear()

    def on_event(self, event: Event) -> None:
        """Replicator listener. Runs on the engine's threads, so it is short and never raises."""
        try:
            if event.kind == EventKind.INVALIDATE:
                self.invalidations.inc()
                self.invalidated_pages.inc(event.pages)
            elif event.kind == EventKind.SYNC:
                device = event.device or ""
                children = self._per_device.get(device)
                if children is None:
                    children = self._per_device[device] = (self.syncs.labels(device),
                                                            self.replicated_bytes.labels(device),
                                                            self.sync_duration.labels(device))
                syncs, replicated, duration = children
                syncs.inc()
                replicated.inc(event.nbytes or event.pages * PAGE_SIZE)
                duration.observe(event.seconds)
            elif event.kind == EventKind.VERIFY:
                self.verify_mismatches.labels(event.device or "").inc(event.pages)
            elif event.kind == EventKind.REGION_FAILED:
                self.region_failures.inc()
        except Exception:  # a metrics bug must not break replication
            self.listener_errors.inc()
            log.exception("metrics listener failed on %s event", event.kind)

    def observe_fault_roundtrip(self, seconds: float) -> None:
        self.fault_roundtrip.observe(seconds)

    def quota_rejected(self, resource: str = "") -> None:
        """Count one request refused by a quota on ``resource`` (e.g. ``bytes``, ``regions``)."""
        self.quota_rejections.labels(resource).inc()

    def interceptor(self) -> grpc.ServerInterceptor:
        return _MetricsInterceptor(self)

    # ------------------------------------------------------------------ exposing
    def render(self) -> bytes:
        """The text exposition format, as ``/metrics`` serves it."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = DEFAULT_ADDRESS) -> int:
        """Serve ``/metrics`` on ``addr:port`` in a daemon thread; returns the bound port (``port=0`` picks one).

        Loopback by default: the metrics name devices, regions' sizes and request rates, which is nobody else's
        business on a shared host; a Prometheus elsewhere needs ``addr`` given explicitly (``--metrics-address``)."""
        if not 0 <= port <= 65535:
            raise InvalidArgumentError(f"metrics port must be 0..65535, not {port}")
        if self._http is not None:
            raise InvalidArgumentError("metrics are already served")
        self._http, self._http_thread = start_http_server(port, addr, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop serving and stop listening to replicators."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            if self._http_thread is not None:
                self._http_thread.join(timeout=5.0)
            self._http = None
        self.detach()
        _live.discard(self)


def _method_name(full: str) -> str:
    return full if full.startswith("/") else "/" + full


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by method and final status code (streams when they end)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself; the label value stays bounded
            self.metrics.grpc_requests.labels(OTHER_METHOD, "UNIMPLEMENTED").inc()
            return None
        method = _method_name(handler_call_details.method)
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._stream(handler.stream_stream, method))
        return handler

    def _record(self, method: str, context: grpc.ServicerContext, start: float, failed: bool,
                default: str = "UNKNOWN") -> None:
        code = context.code()  # set by abort()/set_code(); None means the handler let it default
        name = code.name if isinstance(code, grpc.StatusCode) else (default if failed else "OK")
        self.metrics.grpc_requests.labels(method, name).inc()
        self.metrics.grpc_duration.labels(method).observe(time.perf_counter() - start)

    def _unary(self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str
               ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                result = behavior(request, context)
            except BaseException:
                self._record(method, context, start, failed=True)
                raise
            self._record(method, context, start, failed=False)
            return result

        return wrapped

    def _stream(self, behavior: Callable[[Any, grpc.ServicerContext], Iterable[Any]], method: str
                ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start = time.perf_counter()
            try:
                yield from behavior(request, context)
            except GeneratorExit:  # the client went away mid-stream
                self._record(method, context, start, failed=True, default="CANCELLED")
                raise
            except BaseException:
                self._record(method, context, start, failed=True)
                raise
            self._record(method, context, start, failed=False)

        return wrapped
