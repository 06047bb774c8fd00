"""safetensors: our header parser against the reference writer, bad files, and a replicated model whose
rewrite moves only the changed tensors' pages."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from _devrep_service import inproc_server

import devrep
from devrep.client import Client, connect
from devrep.safetensors_io import DTYPES, changed_pages, parse_header, tensors_from_buffer
from devrep.service import DevrepServer
from devrep.service.watch import merge_runs

pytestmark = pytest.mark.timeout(60)

NUMPY_TYPES = [np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.float16, np.uint32, np.int32, np.float32,
               np.uint64, np.int64, np.float64]


def test_every_numpy_dtype_round_trips_zero_copy() -> None:
    rng = np.random.default_rng(1)
    tensors: dict[str, np.ndarray] = {f"t{i}": (rng.integers(0, 100, size=(3, 5)) > 50 if t is np.bool_ else
                         rng.integers(0, 100, size=(3, 5))).astype(t) for i, t in enumerate(NUMPY_TYPES)}
    tensors["scalar"] = np.array(3.5, dtype=np.float32)
    tensors["empty"] = np.zeros((0, 4), dtype=np.int32)
    data = np.frombuffer(safetensors.numpy.save(tensors, metadata={"k": "v"}), dtype=np.uint8)
    out = tensors_from_buffer(data)
    assert set(out) == set(tensors)
    for name, value in tensors.items():
        assert out[name].dtype == value.dtype and out[name].shape == value.shape
        assert np.array_equal(out[name], value)
        assert not out[name].flags.writeable  # a view of the read-only buffer, not a copy
    assert parse_header(data)[1] == {"k": "v"}
    assert set(DTYPES) >= {"BF16", "F8_E4M3"}


def _file(header: object, body: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


@pytest.mark.parametrize(("data", "message"), [
    (b"abc", "shorter than"),
    (_file({}, length=1 << 40), "does not fit"),
    (struct.pack("<Q", 3) + b"{x}", "not JSON"),
    (_file([1, 2]), "JSON object"),
    (_file({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"x"), "unknown dtype"),
    (_file({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}, b"xy"), "outside the file"),
    (_file({"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 2]}}, b"xy"), "does not match"),
    (_file({"a": {"dtype": "U8", "shape": [2], "data_offsets": [2, 0]}}, b"xy"), "outside the file"),
    (_file({"a": {"dtype": "U8"}}), "bad entry"),
    (_file({"a": {"dtype": "U8", "shape": [-2], "data_offsets": [0, 0]}}), "does not match"),
])
def test_malformed_files_are_invalid_argument(data: bytes, message: str) -> None:
    with pytest.raises(devrep.InvalidArgumentError, match=message):
        parse_header(np.frombuffer(data, dtype=np.uint8))


@pytest.fixture
def client() -> Iterator[tuple[DevrepServer, Client]]:
    with inproc_server() as server, connect(server.address) as c:
        yield server, c


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {f"layer{i}.w": rng.standard_normal((256, 512)).astype(np.float32) for i in range(5)}


@pytest.mark.parametrize("tracking", ["file", "explicit"])
def test_rewrite_moves_only_the_changed_tensors_pages(client: tuple[DevrepServer, Client], tmp_path: Path,
                                                      tracking: str) -> None:
    _, c = client
    rng = np.random.default_rng(7)
    tensors = _model(rng)
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors.numpy.save(tensors))
    c.register_file("model", path, tracking=tracking)
    c.replicate("model", ["cpu:0", "cpu:1"])
    with c.acquire_safetensors("model", "cpu:1") as model:
        assert all(np.array_equal(model[k], v) for k, v in tensors.items())
        infos = model.infos
    copied_before = c.describe("model").stats.pages_copied
    watch = c.watch("model", coalesce_ms=1)
    events = iter(watch)

    changed = ["layer1.w", "layer3.w"]
    for name in changed:
        tensors[name] = tensors[name] * 2
    with open(path, "r+b") as f:  # same names, shapes and dtypes: the layout is unchanged
        f.write(safetensors.numpy.save(tensors))
    expect = changed_pages(infos, changed)
    if tracking == "explicit":
        c.invalidate("model", runs=expect)
    deadline = time.monotonic() + 10
    while True:  # file mode notices on its own (inotify); the next acquire syncs
        with c.acquire_safetensors("model", "cpu:0") as model:
            if np.array_equal(model["layer1.w"], tensors["layer1.w"]):
                assert all(np.array_equal(model[k], v) for k, v in tensors.items())
                break
        assert time.monotonic() < deadline, "the rewrite was never noticed"
        time.sleep(0.05)
    c.sync("model")
    seen: list[np.ndarray] = []
    while sum(int(r[:, 1].sum()) for r in seen) < int(expect[:, 1].sum()):
        event = next(events)
        if event.kind == "invalidate":
            seen.append(event.runs)
    watch.cancel()
    moved = c.describe("model").stats.pages_copied - copied_before
    assert moved == 2 * int(expect[:, 1].sum())  # both replicas, and nothing but the changed tensors' pages
    assert merge_runs(seen).tolist() == expect.tolist()
    assert all(r.mismatched_pages == 0 for r in c.verify("model"))
