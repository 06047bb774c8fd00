"""The one exception table, ``devrep.errors.STATUS_OF`` (issue 13 item 3).

The server (``service.status``, the token interceptor), the side channel (``wire.sidechannel.error_reply``), the
client (``errors.error_from_status``) and the CLI (``cli.EXIT_CODES``) derive from it. The unit tests check the table
and each seam; the round trips provoke every error class against a real server, over gRPC and over the side channel,
and check that the client raises exactly that class: provoked the way a user would wherever the server has a path
to it, otherwise raised inside the real server by the fault injector of ``test_api_consistency`` (its region lookup,
which every region RPC and the side channel's ``acquire`` go through).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from _devrep_service import inproc_server, server_process, short_tmpdir
from test_api_consistency import FailingReplicator

import devrep.client
import devrep.wire.sidechannel
from devrep import errors
from devrep.cli import EXIT_CODES, exit_code
from devrep.client import Client, connect
from devrep.errors import DEFAULT_CLASS, STATUS_OF, DevrepError, error_class, error_from_status, status_name
from devrep.service import DevrepServer, Quota, build_server
from devrep.service.status import status_code
from devrep.wire import sidechannel as protocol

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]
GRPC, SIDE_CHANNEL = "gRPC", "side channel"


# ---------------------------------------------------------------------------------------------------- the table
def _devrep_error_classes() -> set[type[DevrepError]]:
    """Every DevrepError subclass that a devrep module defines (the server's, client's and CLI's modules loaded)."""
    found: set[type[DevrepError]] = set()
    todo: list[type[DevrepError]] = [DevrepError]
    while todo:
        cls = todo.pop()
        if cls.__module__.split(".")[0] == "devrep":
            found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_devrep_error_class_is_defined_in_errors_py_and_listed_in_the_table() -> None:
    in_errors = {v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, DevrepError)}
    everywhere = _devrep_error_classes()
    print(f"classes in errors.py: {sorted(c.__name__ for c in in_errors)}")
    assert set(STATUS_OF) == in_errors, f"not in STATUS_OF: {in_errors - set(STATUS_OF)}"
    outside = {f"{c.__module__}.{c.__name__}" for c in everywhere - in_errors}
    assert not outside, f"devrep error classes defined outside devrep/errors.py: {outside}"


def test_every_status_is_a_grpc_status_and_documented() -> None:
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", (ROOT / "docs/api.md").read_text(), re.MULTILINE))
    for cls, status in STATUS_OF.items():
        assert status in grpc.StatusCode.__members__, f"{cls.__name__}: {status!r} is not a gRPC status"
        assert status in documented, f"{cls.__name__}: {status} is not in docs/api.md's status table"
        assert cls.grpc_code == cls("x").grpc_code == status_name(cls) == status  # the attribute is derived


def test_the_inverse_returns_the_class_the_server_named_subclasses_included() -> None:
    for cls, status in STATUS_OF.items():
        err = error_from_status(status, cls.__name__, "why")
        print(f"{status} + {cls.__name__} -> {type(err).__name__}")
        assert type(err) is cls and str(err) == "why"
    # The old client inverse raised the status's class for these (it never knew ProtocolError, for one).
    assert type(error_from_status("INVALID_ARGUMENT", "ProtocolError", "m")) is errors.ProtocolError
    assert type(error_from_status("FAILED_PRECONDITION", "BackendUnavailableError", "m")) is \
        errors.BackendUnavailableError


def test_the_inverse_falls_back_to_the_status_default_class() -> None:
    # No class, an unknown class, or a class of another status: the status's documented class.
    expected = {"INTERNAL": DevrepError, "INVALID_ARGUMENT": errors.InvalidArgumentError,
                "NOT_FOUND": errors.NotFoundError, "ALREADY_EXISTS": errors.AlreadyExistsError,
                "PERMISSION_DENIED": errors.PermissionDeniedError, "UNAUTHENTICATED": errors.UnauthenticatedError,
                "RESOURCE_EXHAUSTED": errors.ResourceExhaustedError,
                "FAILED_PRECONDITION": errors.FailedPreconditionError,
                # unnamed DEADLINE_EXCEEDED: the call's own deadline, not the server's lease timeout
                "DEADLINE_EXCEEDED": errors.DeadlineExceededError,
                "UNAVAILABLE": errors.ServiceUnavailableError}
    assert expected == DEFAULT_CLASS
    for status, cls in expected.items():
        for name in (None, "", "NoSuchError", "AlignmentError" if status != "INVALID_ARGUMENT" else "NotFoundError"):
            assert error_class(status, name) is cls, (status, name)
    assert error_class("DEADLINE_EXCEEDED", "LeaseTimeoutError") is errors.LeaseTimeoutError
    assert error_class("UNKNOWN", None) is error_class("CANCELLED", "NotFoundError") is DevrepError


def test_status_of_a_subclass_defined_elsewhere_and_of_a_bug() -> None:
    class Mine(errors.UnknownDeviceError):
        pass

    assert status_name(Mine("x")) == "NOT_FOUND"
    assert status_name(RuntimeError("x")) == status_name(KeyError("x")) == status_name(DevrepError) == "INTERNAL"


def test_server_and_side_channel_encode_from_the_table() -> None:
    for cls, status in STATUS_OF.items():
        assert status_code(cls("m")) is grpc.StatusCode[status]
        assert protocol.error_reply(cls("m")) == {"ok": False, "code": status, "error": "m", "class": cls.__name__}
    assert status_code(ValueError("m")) is grpc.StatusCode.INTERNAL
    assert protocol.error_reply(ValueError("m")) == {"ok": False, "code": "INTERNAL", "error": "m"}


DOCUMENTED_EXIT = {  # docs/api.md (CLI): 2 usage / invalid argument; 3 cannot connect; 4 not found;
    "INVALID_ARGUMENT": 2, "UNAVAILABLE": 3, "NOT_FOUND": 4,  # 5 unauthenticated or permission denied;
    "PERMISSION_DENIED": 5, "UNAUTHENTICATED": 5, "RESOURCE_EXHAUSTED": 6,  # 6 resource exhausted;
    "FAILED_PRECONDITION": 7, "DEADLINE_EXCEEDED": 8,  # 7 failed precondition; 8 timed out; 1 other errors
    "ALREADY_EXISTS": 1, "INTERNAL": 1,
}


def test_cli_exit_codes_follow_the_table_and_the_documented_codes() -> None:
    assert set(EXIT_CODES) <= set(STATUS_OF.values())
    for cls, status in STATUS_OF.items():
        print(f"{cls.__name__} ({status}) -> exit {exit_code(cls('x'))}")
        assert exit_code(cls("x")) == DOCUMENTED_EXIT[status], cls
    assert exit_code(RuntimeError("x")) == exit_code(TimeoutError()) == 1


# ---------------------------------------------------------------------------------------------------- round trips
@dataclass
class Env:
    server: DevrepServer
    rep: FailingReplicator
    tmp: Path

    @property
    def address(self) -> str:
        return self.server.address


_names = itertools.count()


def fresh(client: Client, replicas: tuple[str, ...] = ("cpu:0",)) -> str:
    """A new region of ``client``'s, replicated on ``replicas``."""
    name = f"r{next(_names)}"
    client.create_region(name, 4 * 4096)
    if replicas:
        client.replicate(name, list(replicas))
    return name


@contextlib.contextmanager
def two_shared_regions_named(env: Env, name: str) -> Iterator[Client]:
    """A third session, to which two owners share a region named ``name``: the bare name is ambiguous."""
    with connect(env.address) as a, connect(env.address) as b, connect(env.address) as reader:
        for owner in (a, b):
            owner.create_region(name, 4096)
            owner.replicate(name, ["cpu:0"])
            owner.share(name, "*")
        yield reader


@contextlib.contextmanager
def both_buffers_leased(client: Client) -> Iterator[str]:
    """A region whose cpu:0 replica is stale while readers hold both its buffers: a fresh acquire or a sync must
    wait for them (and gives up at its timeout)."""
    name = fresh(client)
    held = [client.acquire(name, "cpu:0")]
    client.invalidate(name, 0, 4096)
    held.append(client.acquire(name, "cpu:0"))  # syncs into the spare buffer
    client.invalidate(name, 0, 4096)
    try:
        yield name
    finally:
        for lease in held:
            lease.release()


@contextlib.contextmanager
def environ(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def _grpc_invalid_argument(env: Env) -> None:
    with connect(env.address) as c:
        c.describe("x" * 300)  # over 200 characters


def _sc_invalid_argument(env: Env) -> None:
    with connect(env.address) as c:
        c.acquire(fresh(c), "cpu:0", timeout=4000)  # timeout_ms over 3 600 000


def _grpc_not_found(env: Env) -> None:
    with connect(env.address) as c:
        c.describe("missing")


def _sc_not_found(env: Env) -> None:
    with connect(env.address) as c:
        c.acquire("missing", "cpu:0")


def _grpc_unknown_device(env: Env) -> None:
    with connect(env.address) as c:
        c.replicate(fresh(c, ()), ["cpu:99"])


def _grpc_already_exists(env: Env) -> None:
    with connect(env.address) as c:
        c.create_region("twice", 4096)
        c.create_region("twice", 4096)


def _grpc_permission_denied(env: Env) -> None:
    with connect(env.address) as owner, connect(env.address) as other:
        name = fresh(owner)
        owner.share(name, "*")
        other.invalidate(name, 0, 4096)  # shared read-only


def _grpc_unauthenticated(env: Env) -> None:
    # No side channel (as over TCP): the token goes in gRPC metadata and the server refuses it.
    Client(env.address, token="not-a-token", fd_socket=env.tmp / "no-side-channel.sock").close()


def _sc_unauthenticated(env: Env) -> None:
    connect(env.address, token="not-a-token").close()  # the side channel's hello


def _grpc_resource_exhausted(env: Env) -> None:
    with inproc_server(quota=Quota(max_regions=1)) as server, connect(server.address) as c:
        c.create_region("one", 4096)
        c.create_region("two", 4096)


def _sc_resource_exhausted(env: Env) -> None:
    with inproc_server(quota=Quota(max_leases=1)) as server, connect(server.address) as c:
        name = fresh(c)
        with c.acquire(name, "cpu:0"):
            c.acquire(name, "cpu:0")


def _grpc_failed_precondition(env: Env) -> None:
    with two_shared_regions_named(env, "amb-grpc") as reader:
        reader.describe("amb-grpc")


def _sc_failed_precondition(env: Env) -> None:
    with two_shared_regions_named(env, "amb-sc") as reader:
        reader.acquire("amb-sc", "cpu:0")


def _grpc_lease_timeout(env: Env) -> None:
    with connect(env.address) as c, both_buffers_leased(c) as name:
        c.sync(name, timeout=0.3)


def _sc_lease_timeout(env: Env) -> None:
    with connect(env.address) as c, both_buffers_leased(c) as name:
        c.acquire(name, "cpu:0", timeout=0.3)


def _grpc_backend_error(env: Env) -> None:
    # A backend failure on the server: OpenCL cannot read its kernels (a fresh server: a fresh backend).
    with inproc_server() as server, connect(server.address) as c, \
            environ("DEVREP_KERNELS_DIR", str(env.tmp / "no-kernels")):
        c.replicate(fresh(c, ()), ["opencl:0"])


def _grpc_backend_unavailable(env: Env) -> None:
    with connect(env.address) as c:
        c.replicate(fresh(c, ()), ["cuda:0"])  # without CuPy on the server


def _grpc_service_unavailable(env: Env) -> None:
    with inproc_server() as server, connect(server.address) as c:
        server.stop(1.0)
        c.describe("anything")


def _all_threads_stopped(pid: int) -> bool:
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        with contextlib.suppress(OSError):  # a thread that just exited
            states.append(stat.read_text().rpartition(")")[2].split()[0])
    return bool(states) and all(state in "tT" for state in states)


def _grpc_deadline_exceeded(env: Env) -> None:
    # A stuck server (a real `devrep serve`, stopped): the call's own gRPC deadline passes first.
    with server_process() as (address, proc), connect(address) as c:
        c.timeout = 1.0  # the calls' deadline from now on (connecting under load may take longer)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30  # SIGSTOP reaches each thread when it next runs: wait for all
            while not _all_threads_stopped(proc.pid):
                assert time.monotonic() < deadline, f"devrep serve (pid {proc.pid}) did not stop"
                time.sleep(0.01)
            c.describe("anything")
        finally:
            os.kill(proc.pid, signal.SIGCONT)


NATURAL: dict[tuple[type[DevrepError], str], Callable[[Env], None]] = {
    (errors.InvalidArgumentError, GRPC): _grpc_invalid_argument,
    (errors.InvalidArgumentError, SIDE_CHANNEL): _sc_invalid_argument,
    (errors.NotFoundError, GRPC): _grpc_not_found,
    (errors.NotFoundError, SIDE_CHANNEL): _sc_not_found,
    (errors.UnknownDeviceError, GRPC): _grpc_unknown_device,
    (errors.AlreadyExistsError, GRPC): _grpc_already_exists,
    (errors.PermissionDeniedError, GRPC): _grpc_permission_denied,
    (errors.UnauthenticatedError, GRPC): _grpc_unauthenticated,
    (errors.UnauthenticatedError, SIDE_CHANNEL): _sc_unauthenticated,
    (errors.ResourceExhaustedError, GRPC): _grpc_resource_exhausted,
    (errors.ResourceExhaustedError, SIDE_CHANNEL): _sc_resource_exhausted,
    (errors.FailedPreconditionError, GRPC): _grpc_failed_precondition,
    (errors.FailedPreconditionError, SIDE_CHANNEL): _sc_failed_precondition,
    (errors.LeaseTimeoutError, GRPC): _grpc_lease_timeout,
    (errors.LeaseTimeoutError, SIDE_CHANNEL): _sc_lease_timeout,
    (errors.BackendError, GRPC): _grpc_backend_error,
    (errors.ServiceUnavailableError, GRPC): _grpc_service_unavailable,
    (errors.DeadlineExceededError, GRPC): _grpc_deadline_exceeded,
}
"""(class, transport) -> a way a user meets it. Every other pair is raised by the fault injector: nothing in the
server raises the bare ``DevrepError``, ``AlignmentError`` or ``UnsupportedModeError`` (client regions on this
kernel), ``ProtocolError`` needs a malformed packet the client never sends (see the raw-packet test), and the side
channel has no op that creates, changes or replicates a region."""
if importlib.util.find_spec("cupy") is None:  # with CuPy, cuda:0 is either a device or an UnknownDeviceError
    NATURAL[errors.BackendUnavailableError, GRPC] = _grpc_backend_unavailable


def _inject(env: Env, cls: type[DevrepError], transport: str) -> None:
    with connect(env.address) as c:
        c.create_region("boom", 4096)
        c.replicate("boom", ["cpu:0"])
        env.rep.fail_with = cls
        try:
            if transport == GRPC:
                c.describe("boom")
            else:
                c.acquire("boom", "cpu:0")  # the side channel's one-round-trip acquire
        finally:
            env.rep.fail_with = None


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with short_tmpdir() as tmp:
        rep = FailingReplicator(cpu_devices=2)
        server = build_server(f"unix:{tmp}/devrep.sock", replicator=rep).start()
        try:
            yield Env(server, rep, tmp)
        finally:
            server.stop(1.0)


CASES = [(cls, transport) for cls in sorted(STATUS_OF, key=lambda c: c.__name__) for transport in (GRPC, SIDE_CHANNEL)]


@pytest.mark.parametrize(("cls", "transport"), CASES, ids=[f"{c.__name__}-{t}" for c, t in CASES])
def test_every_error_class_comes_back_from_a_real_server_as_itself(
        env: Env, cls: type[DevrepError], transport: str) -> None:
    provoke = NATURAL.get((cls, transport))
    with pytest.raises(DevrepError) as got:
        if provoke is not None:
            provoke(env)
        else:
            _inject(env, cls, transport)
    err = got.value
    status = getattr(err, "status", None)
    how = "provoked" if provoke is not None else "injected"
    print(f"{cls.__name__} over {transport} ({how}): expected {cls.__name__} {STATUS_OF[cls]}, "
          f"got {type(err).__name__} {status}: {err}")
    assert type(err) is cls, repr(err)
    # ``status`` is set only on what the server (or the gRPC transport) answered: not a client-side check.
    assert status is grpc.StatusCode[STATUS_OF[cls]], status
    if provoke is None:
        assert f"injected {cls.__name__}" in str(err)


@pytest.mark.parametrize("transport", [GRPC, SIDE_CHANNEL])
def test_a_server_bug_comes_back_as_devrep_error_internal(env: Env, transport: str) -> None:
    with pytest.raises(DevrepError) as got:
        _inject(env, RuntimeError, transport)  # type: ignore[arg-type]
    print(f"a bug over {transport}: {type(got.value).__name__} {getattr(got.value, 'status', None)}: {got.value}")
    assert type(got.value) is DevrepError
    assert got.value.status is grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    assert "RuntimeError" in str(got.value)


def test_a_malformed_packet_is_named_protocol_error(env: Env) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(30)
        sock.connect(str(env.server.fd_socket_path))
        sock.send(b"not json")
        reply, fds = protocol.recv(sock)
    finally:
        sock.close()
    print(f"reply to a malformed packet: {reply}")
    assert reply is not None and not fds
    err = error_from_status(str(reply["code"]), str(reply.get("class")), str(reply["error"]))
    assert type(err) is errors.ProtocolError, repr(err)


def test_the_public_names_elsewhere_are_the_classes_of_errors_py() -> None:
    assert devrep.client.UnauthenticatedError is errors.UnauthenticatedError
    assert devrep.client.ServiceUnavailableError is errors.ServiceUnavailableError
    assert devrep.wire.sidechannel.ProtocolError is errors.ProtocolError
