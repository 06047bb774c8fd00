"""Typed read-only views of leases: ``lease.numpy(dtype, shape, offset)`` / ``lease.torch(...)`` on the in-process
``Lease`` and the client's ``ClientLease``, and the safetensors accessor; writes through a torch view of a CPU
replica die with SIGSEGV (checked in child processes)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from _devrep_service import ROOT, inproc_server
from _support import child_argv

from devrep import Replicator
from devrep.client import connect
from devrep.errors import FailedPreconditionError, InvalidArgumentError
from devrep.service.server import DevrepServer

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch==2.13.0, the test extra)")

pytestmark = pytest.mark.timeout(120)

NBYTES = 8 * 4096
DATA = np.random.default_rng(3).integers(0, 256, NBYTES, dtype=np.uint8)


@pytest.fixture
def replicator() -> Iterator[Replicator]:
    with Replicator(cpu_devices=1) as rep:
        region = rep.create_region("t", NBYTES, tracking="explicit")
        region.array[:] = DATA
        region.invalidate()
        rep.replicate("t", ["cpu:0"])
        yield rep


@pytest.fixture(scope="module")
def server() -> Iterator[DevrepServer]:
    with inproc_server() as srv:
        yield srv


@pytest.fixture
def client_lease(server: DevrepServer) -> Iterator[Any]:
    with connect(server.address) as client:
        region = client.create_region("views", NBYTES, tracking="explicit")
        region.array[:] = DATA
        client.invalidate("views")
        client.replicate("views", ["cpu:0"])
        with client.acquire("views", "cpu:0") as lease:
            yield lease
        client.unregister("views")


@pytest.fixture(params=["in-process", "client"])
def lease(request: pytest.FixtureRequest) -> Any:
    if request.param == "in-process":
        rep = request.getfixturevalue("replicator")
        with rep.region("t").acquire("cpu:0") as lease:
            yield lease
    else:
        yield request.getfixturevalue("client_lease")


def test_numpy_view_is_typed_zero_copy_and_read_only(lease: Any) -> None:
    view = lease.numpy(np.float32, (4, 16), offset=256)
    expected = DATA[256:256 + 4 * 16 * 4].view(np.float32).reshape(4, 16)
    assert view.shape == (4, 16) and view.dtype == np.float32
    assert np.array_equal(view, expected, equal_nan=True)
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0, 0] = 1
    mine = view.copy()
    mine[0, 0] = 1  # the documented way to a writable copy
    assert lease.numpy(np.uint16, 3, offset=NBYTES - 6).tolist() == DATA[-6:].view(np.uint16).tolist()
    assert lease.numpy("<u8", ()).item() == int(DATA[:8].view(np.uint64)[0])  # a scalar view


def test_torch_view_is_typed_and_zero_copy(lease: Any) -> None:
    tensor = lease.torch(torch.float32, (4, 16), offset=256)
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (4, 16) and tensor.device.type == "cpu"
    expected = torch.from_numpy(DATA[256:256 + 256].copy().view(np.float32).reshape(4, 16))
    assert torch.equal(torch.nan_to_num(tensor), torch.nan_to_num(expected))
    # zero-copy: the tensor's memory is the lease's mapping (the same bytes a numpy view of it sees)
    assert tensor.data_ptr() == lease.numpy(np.float32, (4, 16), offset=256).ctypes.data
    bf16 = lease.torch("bfloat16", (2, 8), offset=4096)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16.view(torch.int16), torch.from_numpy(DATA[4096:4128].copy().view(np.int16)).view(2, 8))
    assert lease.torch(np.int64, 5, offset=8).tolist() == DATA[8:48].view(np.int64).tolist()
    clone = tensor.clone()
    clone[0, 0] = 1.0  # clone() is the writable copy


@pytest.mark.parametrize(("args", "match"), [
    ((np.float32, -1), "negative"),
    ((np.float32, (2, -3)), "negative"),
    ((np.float32, 4, 2), "alignment"),
    ((np.float64, 1, 4), "alignment"),
    ((np.float32, 4, -4), "negative"),
    ((np.uint8, NBYTES + 1), "past the end"),
    ((np.float32, 2, NBYTES - 4), "past the end"),
    ((np.uint8, 1, NBYTES), "past the end"),
    ((object, 1), "object"),
    (("no-such-dtype", 1), "dtype"),
    ((np.uint8, "4"), "shape must be"),
    ((np.uint8, 4, 1.5), "shape must be"),
])
def test_bad_views_are_invalid_argument(lease: Any, args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        lease.numpy(*args)
    if args[0] is not object and args[0] != "no-such-dtype":
        with pytest.raises(InvalidArgumentError, match=match):
            lease.torch(*args)


def test_views_after_release_are_refused(replicator: Replicator) -> None:
    lease = replicator.region("t").acquire("cpu:0")
    lease.release()
    with pytest.raises(FailedPreconditionError, match="released"):
        lease.numpy(np.uint8, 4)
    with pytest.raises(FailedPreconditionError, match="released"):
        lease.torch(torch.uint8, 4)


def test_torch_missing_is_a_clear_error(lease: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(FailedPreconditionError, match="pip install torch"):
        lease.torch("float32", 4)
    assert lease.numpy(np.uint8, 4).tolist() == DATA[:4].tolist()  # numpy views need no torch


def test_opencl_replicas_give_read_only_host_copies() -> None:
    with Replicator(cpu_devices=1) as rep:
        region = rep.create_region("o", NBYTES, tracking="explicit")
        region.array[:] = DATA
        region.invalidate()
        rep.replicate("o", ["opencl:0"])
        with region.acquire("opencl:0") as lease:
            view = lease.numpy(np.int32, (2, 3), offset=4096)
            assert not view.flags.writeable
            assert view.tolist() == DATA[4096:4120].view(np.int32).reshape(2, 3).tolist()
            tensor = lease.torch(torch.int32, (2, 3), offset=4096)
            assert tensor.tolist() == view.tolist()
            with pytest.raises(InvalidArgumentError, match="past the end"):
                lease.numpy(np.uint8, NBYTES + 1)


@pytest.mark.parametrize("where", ["in-process", "client"])
def test_writing_a_torch_view_of_a_cpu_replica_raises_sigsegv(where: str, server: DevrepServer) -> None:
    args = ["in-process"] if where == "in-process" else ["client", server.address]
    child = subprocess.run(child_argv("torch_view_writer", *args),
                           capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert "viewed" in child.stdout, child.stderr
    assert "wrote" not in child.stdout
    assert child.returncode == -signal.SIGSEGV, f"expected SIGSEGV, got {child.returncode}: {child.stderr[-2000:]}"


def test_safetensors_accessor_gives_typed_numpy_and_torch_views(server: DevrepServer, tmp_path: Any) -> None:
    import safetensors.torch

    tensors = {
        "emb": torch.randn(64, 32, dtype=torch.bfloat16),
        "w": torch.randn(16, 8),
        "ids": torch.arange(10, dtype=torch.int64),
        "f8": torch.randn(4, 4).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "m.safetensors"
    path.write_bytes(safetensors.torch.save(tensors))
    with connect(server.address) as client:
        client.register_file("st", path, tracking="explicit")
        client.replicate("st", ["cpu:0"])
        with client.acquire_safetensors("st", "cpu:0") as model:
            assert set(model) == set(tensors) and len(model) == 4 and "emb" in model
            for name, ref in tensors.items():
                got = model.torch(name)
                assert got.dtype == ref.dtype and got.shape == ref.shape
                assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), name
            assert np.array_equal(model["w"], tensors["w"].numpy()) and not model["w"].flags.writeable
            assert model.numpy("emb").dtype == np.uint16  # bfloat16 as raw bits in numpy
            with pytest.raises(KeyError, match="nope"):
                model.torch("nope")
        client.unregister("st")
