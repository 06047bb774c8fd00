"""One API in process and through the service (issue 11 item 6): progress units, odd region sizes, error classes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from _devrep_service import inproc_server, short_tmpdir

import devrep
from devrep import errors
from devrep.client import ServiceUnavailableError, connect
from devrep.engine import Replicator
from devrep.errors import UnauthenticatedError
from devrep.region import Region
from devrep.service import DevrepServer, build_server
from devrep.wire._gen import devrep_pb2 as pb
from devrep.wire._gen import devrep_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def check_progress(calls: list[tuple[int, int]], expected_total: int) -> None:
    totals = {total for _, total in calls}
    dones = [done for done, _ in calls]
    print(f"progress: {len(calls)} calls, totals {totals}, last done {dones[-1] if dones else None}, "
          f"expected total {expected_total}")
    assert calls, "progress was never called"
    assert totals == {expected_total}, f"expected total {expected_total} (every replica), got {totals}"
    assert all(0 <= d <= expected_total for d in dones), f"done outside [0, total]: {dones}"
    assert dones == sorted(dones), f"done went backwards: {dones}"
    assert dones[-1] == expected_total, f"last call: expected done {expected_total}, got {dones[-1]}"


def test_progress_is_done_total_over_every_replica_in_process_and_through_the_client() -> None:
    devices = ["cpu:0", "cpu:1"]
    with Replicator(cpu_devices=4) as rep:
        region = rep.create_region("p", 2 * MiB)
        region.array[:] = 3
        local: list[tuple[int, int]] = []
        report = rep.replicate("p", devices, progress=lambda done, total: local.append((done, total)))
        assert report.bytes_copied == 2 * 2 * MiB
        check_progress(local, report.bytes_copied)
    with inproc_server() as server, connect(server.address) as client:
        handle = client.create_region("p", 2 * MiB)
        handle.array[:] = 3
        remote: list[tuple[int, int]] = []
        report = client.replicate("p", devices, progress=lambda done, total: remote.append((done, total)))
        assert report.bytes_copied == 2 * 2 * MiB
        check_progress(remote, report.bytes_copied)
        # The raw stream: progress and the final report in the same units.
        handle.array[: 4 * 4096] = 4
        client.invalidate("p", 0, 4 * 4096)
        stub = pb_grpc.DevrepServiceStub(grpc.insecure_channel(server.address))
        messages = list(stub.Replicate(pb.ReplicateRequest(name="p", devices=devices),
                                       metadata=(("authorization", f"Bearer {client.token}"),), timeout=60))
        final = messages[-1]
        assert final.HasField("report")
        assert final.bytes_total == final.report.bytes_copied == 2 * 4 * 4096, final
        for m in messages[:-1]:
            assert 0 <= m.bytes_copied <= m.bytes_total, m


def test_odd_region_size_is_the_same_in_process_and_through_the_service() -> None:
    nbytes = 3 * 4096 + 100
    with Replicator(cpu_devices=1) as rep:
        local = rep.create_region("odd", nbytes)
        expected = (local.nbytes, local.npages, local.array.nbytes)
    with inproc_server() as server, connect(server.address) as client:
        handle = client.create_region("odd", nbytes)
        info = client.describe("odd")
        got = (info.nbytes, info.npages, handle.array.nbytes)
    print(f"in process {expected}, through the service {got}")
    assert expected == got == (nbytes, 4, nbytes)


def test_a_lease_timeout_arrives_as_lease_timeout() -> None:
    with inproc_server() as server, connect(server.address) as client:
        client.create_region("d", MiB)
        client.replicate("d", ["cpu:0"])
        held = [client.acquire("d", "cpu:0")]
        client.invalidate("d", 0, 4096)
        held.append(client.acquire("d", "cpu:0"))       # syncs into the spare
        client.invalidate("d", 0, 4096)
        with pytest.raises(errors.DevrepError) as exc:   # the server gave up waiting for readers
            client.sync("d", timeout=0.3)
        assert type(exc.value) is errors.LeaseTimeoutError, repr(exc.value)
        for lease in held:
            lease.release()


class FailingReplicator(Replicator):
    """Fault injection: ``region("boom")`` raises ``fail_with`` (every RPC on a region goes through it)."""

    fail_with: type[BaseException] | None = None
    delay = 0.0

    def region(self, name: str) -> Region:
        short = name.rsplit("/", 1)[-1]  # the service keys regions by session ("<session id>/<name>")
        if short == "slow":
            time.sleep(self.delay)
        if short == "boom" and self.fail_with is not None:
            raise self.fail_with(f"injected {self.fail_with.__name__}")
        return super().region(name)


ERROR_CLASSES = sorted(
    {v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, errors.DevrepError)}
    | {UnauthenticatedError, ServiceUnavailableError}, key=lambda c: c.__name__)


@pytest.fixture(scope="module")
def failing() -> Iterator[tuple[DevrepServer, FailingReplicator]]:
    with short_tmpdir() as tmp:
        rep = FailingReplicator(cpu_devices=2)
        server = build_server(f"unix:{tmp}/devrep.sock", replicator=rep).start()
        try:
            yield server, rep
        finally:
            server.stop(1.0)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_round_trips_through_a_real_server(
        failing: tuple[DevrepServer, FailingReplicator], cls: type[errors.DevrepError]) -> None:
    server, rep = failing
    with connect(server.address) as client:
        client.create_region("boom", 4096)
        client.replicate("boom", ["cpu:0"])
        rep.fail_with = cls
        try:
            with pytest.raises(errors.DevrepError) as grpc_path:
                client.describe("boom")
            with pytest.raises(errors.DevrepError) as side_path:
                client.acquire("boom", "cpu:0")          # the side channel's one-round-trip acquire
        finally:
            rep.fail_with = None
    print(f"{cls.__name__} ({cls.grpc_code}): gRPC -> {type(grpc_path.value).__name__}, "
          f"side channel -> {type(side_path.value).__name__}")
    assert type(grpc_path.value) is cls, repr(grpc_path.value)
    assert type(side_path.value) is cls, repr(side_path.value)
    assert f"injected {cls.__name__}" in str(grpc_path.value)


def test_alignment_error_is_exported() -> None:
    assert issubclass(devrep.AlignmentError, devrep.InvalidArgumentError)
    assert devrep.DeadlineExceededError.grpc_code == "DEADLINE_EXCEEDED"


def test_transport_deadline_is_not_a_lease_timeout(failing: tuple[DevrepServer, FailingReplicator]) -> None:
    server, rep = failing
    with connect(server.address, timeout=2.0) as client:
        client.create_region("slow", 4096)
        rep.delay = 6.0                                   # the server takes longer than the call's deadline
        try:
            with pytest.raises(errors.DevrepError) as exc:
                client.describe("slow")
        finally:
            rep.delay = 0.0
    print(f"a gRPC deadline arrives as {type(exc.value).__name__}: {exc.value}")
    assert type(exc.value) is errors.DeadlineExceededError, repr(exc.value)
    assert isinstance(exc.value, TimeoutError) and not isinstance(exc.value, errors.LeaseTimeoutError)
