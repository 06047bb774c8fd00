"""Shared fixtures. The engine suite runs once per backend that can run here (CPU and NUMA always, OpenCL on PoCL)."""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator

import pytest
from hypothesis import settings

import devrep
from devrep.backends import Backend, load_backend
from devrep.testing.pytest_plugin import devrep_client, devrep_server  # noqa: F401  (fixtures: a real in-process server)

# No timed assertions in unit tests: hypothesis's default 200 ms per-example deadline fails under load (2 vCPUs,
# load 10) for a test that takes 3 ms on a quiet machine.
settings.register_profile("devrep", deadline=None)
settings.load_profile("devrep")

ENGINE_BACKENDS = ["cpu", "numa", "opencl"]


def _backend_or_skip(kind: str) -> Backend:
    if kind == "cpu":
        return load_backend("cpu", devices=4)
    try:
        return load_backend(kind)
    except devrep.BackendError as exc:  # only where the optional package is truly absent
        pytest.skip(f"{kind} backend unavailable: {exc}")


@pytest.fixture(params=ENGINE_BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def replicator(backend_kind: str) -> Iterator[devrep.Replicator]:
    backends = {"cpu": load_backend("cpu", devices=4)}
    if backend_kind != "cpu":
        backends[backend_kind] = _backend_or_skip(backend_kind)
    rep = devrep.Replicator(backends=backends)
    try:
        yield rep
    finally:
        rep.close()


@pytest.fixture
def devices(backend_kind: str, replicator: devrep.Replicator) -> list[str]:
    """Two device names: both on the backend under test where it has two, else its first plus cpu:1."""
    count = replicator.backend(backend_kind).device_count()
    if count >= 2:
        return [f"{backend_kind}:0", f"{backend_kind}:1"]
    return [f"{backend_kind}:0", "cpu:1"]


@pytest.fixture
def hang_guard() -> Iterator[None]:
    """A C-level watchdog: a store blocked on a userfaultfd fault holds the GIL, so no Python timeout fires."""
    faulthandler.dump_traceback_later(90, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def rep() -> Iterator[devrep.Replicator]:
    """A plain two-device CPU replicator."""
    with devrep.Replicator(cpu_devices=2) as r:
        yield r


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    """The address of a ``devrep serve`` process shared by one test module (the CLI tests)."""
    from _devrep_service import server_process

    with server_process() as (addr, _proc):
        yield addr
