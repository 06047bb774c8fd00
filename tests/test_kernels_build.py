"""Every kernel source builds: each ``devrep/kernels/*.cu`` with nvcc (so a CUDA syntax error fails CI without a
GPU), each ``devrep/kernels/*.cl`` on PoCL, and the prebuilt PoCL bitcode is current with ``devrep.cl``, its build
script and the installed PoCL, and rebuilds byte for byte."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash
from _support import child_argv

from devrep._pages import PAGE_SIZE
from devrep.backends import load_backend
from devrep.backends._kernels import bitcode_stamp, kernels_dir, pocl_version

pytestmark = pytest.mark.timeout(180)

KERNELS = Path(str(kernels_dir()))
KERNEL_NAMES = {"hash_all", "hash_list", "compare", "scatter_pages", "copy_pages"}


def _nvcc() -> str:
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.skip("nvcc not found on PATH, /usr/local/cuda/bin or /usr/local/bin: the CUDA kernels were not compiled")


@pytest.mark.parametrize("source", sorted(KERNELS.glob("*.cu")), ids=lambda p: p.name)
def test_cuda_sources_compile_with_nvcc(source: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [_nvcc(), "--cubin", "-arch=sm_80", "-DPAGE_WORDS=512", "-Werror", "all-warnings", "-o",
         str(tmp_path / "out.cubin"), str(source)],
        capture_output=True, text=True, timeout=150,
    )
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "out.cubin").stat().st_size > 0


def test_there_are_kernel_sources() -> None:
    assert sorted(p.name for p in KERNELS.glob("*.cu")) == ["devrep.cu"]
    assert sorted(p.name for p in KERNELS.glob("*.cl")) == ["devrep.cl"]


def _kernels_in(text: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, text))


def test_cuda_and_opencl_define_the_same_kernels() -> None:
    cl = _kernels_in((KERNELS / "devrep.cl").read_text(), r"__kernel\s+void\s+(\w+)")
    cu = _kernels_in((KERNELS / "devrep.cu").read_text(), r'extern\s+"C"\s+__global__\s+void\s+(\w+)')
    # OpenCL also runs on CPU devices, where the hash kernels do four pages per work-item (hash_all4/hash_list4).
    assert cl == KERNEL_NAMES | {"hash_all4", "hash_list4"} and cu == KERNEL_NAMES, (cl, cu)


@pytest.mark.parametrize("source", sorted(KERNELS.glob("*.cl")), ids=lambda p: p.name)
def test_opencl_sources_build_on_pocl(source: Path) -> None:
    backend = load_backend("opencl", platform="portable")
    try:
        device = backend._devices[0]  # type: ignore[attr-defined]
        for name in KERNEL_NAMES:  # builds the program (from source, or the bitcode where PoCL cannot)
            assert backend._kernel(device, name) is not None  # type: ignore[attr-defined]
        assert "program from " in backend.describe(0) and "not built" not in backend.describe(0)
    finally:
        backend.close()


def test_pocl_bitcode_is_current() -> None:
    recorded = (KERNELS / "pocl" / "STAMP").read_text()
    actual = bitcode_stamp()
    assert recorded == actual, (f"devrep/kernels/pocl/STAMP says\n{recorded}but devrep.cl, build_pocl_bitcode.sh "
                                f"and the installed PoCL give\n{actual}run devrep/kernels/build_pocl_bitcode.sh and "
                                f"commit devrep/kernels/pocl/ (or install the pinned PoCL)")
    for variant in ("sse2", "avx2", "avx512"):
        assert (KERNELS / "pocl" / f"devrep-{variant}.bc").read_bytes()[:4] == b"BC\xc0\xde"


def test_stamp_covers_source_flags_and_pocl_version(tmp_path: Path) -> None:
    base = bitcode_stamp()
    assert f"pocl-binary-distribution {pocl_version()}\n" in base
    assert bitcode_stamp(pocl="0.0") != base  # another PoCL
    shutil.copytree(KERNELS, tmp_path / "k")
    script = tmp_path / "k" / "build_pocl_bitcode.sh"
    script.write_text(script.read_text().replace("-O2", "-O3"))  # another flag
    assert bitcode_stamp(tmp_path / "k") != base
    shutil.copy(KERNELS / "build_pocl_bitcode.sh", script)
    assert bitcode_stamp(tmp_path / "k") == base
    (tmp_path / "k" / "devrep.cl").write_text((KERNELS / "devrep.cl").read_text() + "\n")  # another source
    assert bitcode_stamp(tmp_path / "k") != base


def test_pocl_bitcode_rebuilds_byte_for_byte(tmp_path: Path) -> None:
    """The committed bitcode is exactly what build_pocl_bitcode.sh makes from the committed source with the
    pinned PoCL (`make test` installs clang-14 where it can)."""
    missing = [tool for tool in ("clang-14", "llvm-link-14") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian: apt-get install clang-14 llvm-14): the PoCL "
                    f"bitcode was not rebuilt")
    build = subprocess.run(["sh", str(KERNELS / "build_pocl_bitcode.sh"), str(tmp_path / "out")],
                           env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=150)
    assert build.returncode == 0, build.stdout + build.stderr
    names = sorted(p.name for p in (KERNELS / "pocl").iterdir())
    assert names == ["STAMP", "devrep-avx2.bc", "devrep-avx512.bc", "devrep-sse2.bc"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (KERNELS / "pocl" / name).read_bytes(), (
            f"devrep/kernels/pocl/{name} differs from a fresh build: rerun build_pocl_bitcode.sh and commit it")


def test_stale_bitcode_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(KERNELS, tmp_path / "kernels")
    edited = tmp_path / "kernels" / "devrep.cl"
    edited.write_text(edited.read_text() + "\n// edited after the bitcode was built\n")
    monkeypatch.setenv("DEVREP_KERNELS_DIR", str(tmp_path / "kernels"))
    backend = load_backend("opencl", platform="portable")
    try:
        try:
            backend._kernel(backend._devices[0], "hash_all")  # type: ignore[attr-defined]
        except Exception as exc:  # PoCL cannot build source here: the stale bitcode must not be used
            assert "build_pocl_bitcode.sh" in str(exc) and "opencl:0" in str(exc)
        else:  # a PoCL that builds source never needs the bitcode
            assert "program from source" in backend.describe(0)
    finally:
        backend.close()


def test_cuda_kernels_compute_the_spec_on_the_host(tmp_path: Path) -> None:
    """The .cu kernels, compiled for the CPU with shims for blockIdx/threadIdx/atomicAdd/__shfl_sync
    (tests/data/cuda_host_harness.cpp): the warp hash kernels run warp by warp (32 host threads in lockstep),
    the others thread by thread. Hashes bit-identical to xxhash under two launch geometries, compare and both
    page copies exact. This checks the CUDA arithmetic, indexing and lane exchange where no GPU is; the GPU run
    is tests/gpu."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/c++) on PATH: the CUDA kernels were not run on the host")
    harness = tmp_path / "harness"
    build = subprocess.run(
        [cxx, "-O2", "-std=c++20", "-pthread", "-Wall", "-Werror", "-Wno-unknown-pragmas", f"-I{KERNELS}", "-o",
         str(harness),
         str(Path(__file__).parent / "data" / "cuda_host_harness.cpp")],
        capture_output=True, text=True, timeout=120,
    )
    assert build.returncode == 0, build.stderr
    npages = 261  # not a multiple of the 128-thread block, nor of the 3 x 32 copy grid
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, npages * PAGE_SIZE, dtype=np.uint8)
    data[:PAGE_SIZE] = 0
    data[PAGE_SIZE:2 * PAGE_SIZE] = 0xFF
    data[2 * PAGE_SIZE:3 * PAGE_SIZE] = data[3 * PAGE_SIZE:4 * PAGE_SIZE]
    data[2 * PAGE_SIZE + 77] ^= 0x10  # one bit flipped
    (tmp_path / "data").write_bytes(data.tobytes())
    run = subprocess.run([str(harness), str(tmp_path / "data"), str(npages), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "warp shuffles checked: " in run.stderr and int(run.stderr.split("checked: ")[1].split()[0]) > 0
    out = np.frombuffer((tmp_path / "out").read_bytes(), dtype=np.uint64)
    expected = np.array([xxhash.xxh64_intdigest(data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE].tobytes())
                         for p in range(npages)], dtype=np.uint64)
    assert np.array_equal(out[:npages], expected)  # hash_all
    assert np.array_equal(out[npages:2 * npages], expected[::-1])  # hash_list, reversed list
    count = int(out[2 * npages])
    diff = np.sort(out[2 * npages + 1:2 * npages + 1 + count].astype(np.int64))
    assert np.array_equal(diff, np.arange(0, npages, 3))
    pages = out[2 * npages + 1 + count:].view(np.uint8)
    scattered, copied = pages[:data.size], pages[data.size:]
    as_pages = data.reshape(npages, PAGE_SIZE)
    assert np.array_equal(scattered.reshape(npages, PAGE_SIZE), as_pages[::-1])
    copied = copied.reshape(npages, PAGE_SIZE)
    assert np.array_equal(copied[::2], as_pages[::2]) and not copied[1::2].any()


def test_every_pocl_bitcode_variant_this_cpu_runs_is_exact(tmp_path: Path) -> None:
    """Each prebuilt variant this CPU can execute, forced in a child process (PoCL settings are per process):
    it builds, and its hashes match xxhash. The variant in use is covered by every other OpenCL test."""
    from devrep.backends._opencl import _cpu_variant

    native = _cpu_variant()
    runnable = ["sse2", "avx2", "avx512"][: ["sse2", "avx2", "avx512"].index(native) + 1]
    for variant in runnable:
        env = dict(os.environ, DEVREP_POCL_VARIANT=variant, POCL_CACHE_DIR=str(tmp_path / variant))
        out = subprocess.run(child_argv("pocl_variant"), capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, f"{variant}: {out.stdout}{out.stderr}"
        assert out.stdout.strip() == f"devrep-{variant}.bc"


def test_opencl_hash_kernel_geometry_per_device_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPUs get one page per work-item (``hash_all``: work-item k hashes exactly page k, a launch of n
    work-items), so a large GPU has enough work-items to fill it; CPU devices get four (``hash_all4``), which
    keeps two multiply chains in flight per core. Both kernels are bit-exact with xxhash."""
    import pyopencl as cl

    from devrep.backends._opencl import hash_geometry
    from devrep.backends._staging import aligned_empty

    assert hash_geometry(int(cl.device_type.GPU)) == (1, "")
    assert hash_geometry(int(cl.device_type.ACCELERATOR)) == (1, "")
    assert hash_geometry(int(cl.device_type.CPU)) == (4, "4")
    backend = load_backend("opencl", platform="portable")
    try:
        device = backend._devices[0]  # type: ignore[attr-defined]
        npages = 10
        host = aligned_empty(npages * PAGE_SIZE)
        host[:] = np.random.default_rng(9).integers(0, 256, host.size, dtype=np.uint8)
        buf = backend.allocate(0, host.nbytes)
        backend.copy_runs(host, np.array([[0, npages]]), [buf])
        want = [xxhash.xxh64_intdigest(host[p * PAGE_SIZE:(p + 1) * PAGE_SIZE].tobytes()) for p in range(npages)]
        for name, items, pages in (("hash_all", 3, 3), ("hash_all4", 1, 4)):
            sentinel = np.full(npages, 7, dtype=np.uint64)
            out_buf = cl.Buffer(device.ctx.context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR,
                                hostbuf=sentinel)
            kernel = backend._kernel(device, name)  # type: ignore[attr-defined]
            kernel.set_args(buf.handle, out_buf, np.int64(npages))
            cl.enqueue_nd_range_kernel(device.queue, kernel, (items,), (1,))
            out = np.empty(npages, dtype=np.uint64)
            cl.enqueue_copy(device.queue, out, out_buf).wait()
            out_buf.release()
            assert out.tolist() == want[:pages] + [7] * (npages - pages), f"{name}: {out}"

        launched: list[tuple[str, int]] = []
        real = cl.enqueue_nd_range_kernel

        def record(queue: object, k: object, global_size: tuple[int, ...], *args: object, **kw: object) -> object:
            if getattr(k, "function_name", "").startswith("hash_"):
                launched.append((getattr(k, "function_name", ""), int(global_size[0])))
            return real(queue, k, global_size, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(cl, "enqueue_nd_range_kernel", record)
        big = backend.allocate(0, 1000 * PAGE_SIZE)
        assert backend.hash_pages(big).size == 1000
        assert backend.hash_pages(big, np.arange(0, 1000, 2)).size == 500
        per_item, suffix = hash_geometry(int(device.device.type))
        assert [name for name, _ in launched] == ["hash_all" + suffix, "hash_list" + suffix], launched
        assert launched[0][1] * per_item >= 1000 and launched[1][1] * per_item >= 500, launched
        assert backend.hash_pages(buf).tolist() == want
        assert backend.hash_pages(buf, np.array([9, 0, 5])).tolist() == [want[9], want[0], want[5]]
    finally:
        backend.close()
