"""The wheel is the product: build it, install it (not editable) into a fresh virtualenv, and run it from a directory
outside the checkout, so nothing can come from the source tree (kernels, generated stubs, dependencies).

The virtualenv is built once per test run (session fixture, under pytest's tmp directory); installing its
dependencies takes a minute or so (from the package index or pip's cache).
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _support import child_path
from packaging.requirements import Requirement

pytestmark = [pytest.mark.wheel, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
KERNEL_FILES = {"devrep/kernels/devrep.cl", "devrep/kernels/devrep.cu", "devrep/kernels/build_pocl_bitcode.sh",
                "devrep/kernels/README.md", "devrep/kernels/pocl/STAMP", "devrep/kernels/pocl/devrep-sse2.bc",
                "devrep/kernels/pocl/devrep-avx2.bc", "devrep/kernels/pocl/devrep-avx512.bc"}


@dataclass
class Installed:
    wheel: Path
    venv: Path
    outside: Path
    """An empty directory outside the checkout to run from."""

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DEVREP_KERNELS_DIR", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["POCL_CACHE_DIR"] = str(self.outside / "pocl-cache")  # a fresh PoCL cache: the kernels really build
        env["NUMBA_CACHE_DIR"] = str(self.outside / "numba-cache")
        return env

    def run(self, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=self.outside, env=self.env(), capture_output=True, text=True,
                              timeout=timeout)


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode == 0, f"{what}: exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the tree: an in-tree build would leave build/ and *.egg-info in the checkout.
    source = base / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "results.json",
        "*.so"))  # an editable install's in-tree extension: the wheel must build its own
    # Build isolation (the default): the wheel is built with the build-system requirements pyproject.toml
    # declares, not with whatever this virtualenv happens to hold.
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--wheel-dir", str(base / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    _check(build, "pip wheel")
    [wheel] = (base / "dist").glob("devrep-*.whl")
    venv = base / "venv"
    _check(subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=120),
           "python -m venv")
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", f"{wheel}[opencl]"],
                             capture_output=True, text=True, timeout=800, cwd=base)
    _check(install, f"pip install {wheel.name}[opencl] into a fresh venv")
    outside = base / "elsewhere"
    outside.mkdir()
    yield Installed(wheel, venv, outside)


def test_wheel_ships_the_kernels_and_license(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
    missing = KERNEL_FILES - names
    assert not missing, f"the wheel lacks {sorted(missing)}"
    assert not any(n.startswith("kernels/") for n in names), "kernels must live inside the devrep package"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "devrep/wire/_gen/devrep_pb2.py" in names
    # The sync-mode rearm loop in C, compiled for this interpreter (CI and this machine have gcc).
    assert any(n.startswith("devrep/linux/_wp.cpython-") and n.endswith(".so") for n in names), sorted(names)
    assert "devrep/linux/_wp.pyi" in names, "the extension's type stub ships beside it (the package is typed)"


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as whl:
        [meta] = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(whl.read(meta).decode())


def _extra(meta: email.message.Message, extra: str | None) -> dict[str, Requirement]:
    """The requirements a plain install (``extra=None``) or ``pip install devrep[extra]`` adds."""
    out = {}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        in_extra = req.marker is not None and extra is not None and req.marker.evaluate({"extra": extra})
        if (req.marker is None and extra is None) or in_extra:
            out[req.name] = req
    return out


def test_wheel_metadata_declares_what_each_command_needs(installed: Installed) -> None:
    meta = _metadata(installed.wheel)
    assert meta["License-Expression"] == "Apache-2.0"
    assert {"cuda", "cuda12", "cuda13", "opencl", "test"} <= set(meta.get_all("Provides-Extra") or [])
    runtime = _extra(meta, None)
    # devrep demo writes a safetensors file; serve/doctor/the client need the rest.
    assert {"numpy", "numba", "xxhash", "rich", "grpcio", "protobuf", "safetensors", "inotify_simple"} <= set(runtime)

    # CuPy, an NVRTC and the driver bindings (VMM fd sharing) of the same CUDA major version (the driver has no
    # NVRTC; cuda-bindings pulls cuda-pathfinder itself).
    for major in ("12", "13"):
        reqs = _extra(meta, f"cuda{major}")
        assert set(reqs) == {f"cupy-cuda{major}x", "cuda-toolkit", "cuda-bindings"}, reqs
        bindings = reqs["cuda-bindings"].specifier
        assert bindings.contains(f"{major}.9.10") and not bindings.contains(f"{int(major) + 1}.0.0"), bindings
        assert not bindings.contains(f"{int(major) - 1}.9.0"), bindings
        assert {"nvrtc", "cudart"} <= reqs["cuda-toolkit"].extras
        assert reqs["cuda-toolkit"].specifier.contains(f"{major}.9.0")
        assert not reqs["cuda-toolkit"].specifier.contains(f"{int(major) + 1}.0.0")
        assert reqs[f"cupy-cuda{major}x"].specifier.contains("14.2.0")
    alias = _extra(meta, "cuda")
    assert set(alias) == {"devrep"} and alias["devrep"].extras == {"cuda12"}

    # PoCL pinned to the version the prebuilt bitcode was linked against.
    stamp = (ROOT / "devrep" / "kernels" / "pocl" / "STAMP").read_text().splitlines()
    [pocl_version] = [line.split()[1] for line in stamp if line.startswith("pocl-binary-distribution ")]
    pocl = _extra(meta, "opencl")["pocl-binary-distribution"]
    assert str(pocl.specifier) == f"=={pocl_version}"


def test_devrep_demo_and_doctor_from_the_installed_wheel(installed: Installed) -> None:
    where = installed.run("python", "-c", "import devrep; print(devrep.__file__)")
    _check(where, "import devrep")
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout
    version = installed.run("devrep", "--version")
    _check(version, "devrep --version")
    assert version.stdout.strip() == "devrep 0.1.0"

    demo = installed.run("devrep", "demo", "--size-mib", "8", timeout=600)
    _check(demo, "devrep demo")
    assert "FAILED" not in demo.stdout and "safetensors rewrite" in demo.stdout

    doctor = installed.run("devrep", "doctor", "--json")
    report = json.loads(doctor.stdout)
    assert doctor.returncode == (0 if all(m["works"] for m in report["modes"].values()) else 1), doctor.stderr
    assert report["modes"]["explicit"]["works"]
    assert report["rearm_loop"] == "c", "the installed wheel's rearm loop is not the compiled one"
    assert any(d.startswith("opencl:") for d in report["backends"]["opencl"]["devices"]), report["backends"]


def test_opencl_hashes_from_the_installed_kernels_match_xxhash(installed: Installed) -> None:
    script = installed.outside / "opencl_crosscheck.py"
    shutil.copy(child_path("opencl_crosscheck"), script)
    result = installed.run("python", str(script))
    _check(result, "OpenCL cross-check")
    kernels, described = result.stdout.strip().splitlines()[-2:]
    assert Path(kernels).is_relative_to(installed.venv), kernels  # the kernels came from the installed package
    assert "program from " in described and "not built" not in described, described
