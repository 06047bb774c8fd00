"""issue 11 item 4: a non-root user of a root-owned install (here uid 65534, ``nobody``, with a home it cannot
write) runs the CLI and numba-compiled code without "cannot cache function ... no locator available".

The child really runs as uid/gid 65534 with no capabilities. It must reach the interpreter, the standard library,
the virtualenv's packages and this checkout, which may all sit under a directory ``nobody`` cannot search (CI
clones under /root, mode 0700; pyenv lives there too). So the test opens those directories as root (``O_PATH``)
and hands the fds to the child, which reaches them as ``/proc/self/fd/N/...``: a /proc fd link jumps straight to
the directory, without the search permission on its ancestors that ``nobody`` lacks. Everything below those
directories is root-owned and not writable by ``nobody``, exactly like a root-owned install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash
from _devrep_service import ROOT, short_tmpdir
from _support import child_path

NOBODY = 65534

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as uid 65534 (nobody)"),
              pytest.mark.timeout(600)]  # a cold numba compile as nobody, bounded by the run timeout below


class Nobody:
    """Runs this interpreter with this checkout as uid/gid 65534 (see the module doc)."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.exe = self._open(os.path.realpath(sys.executable), directory=False)
        self.home = self._open(sys.base_prefix)
        self.paths = [self._open(str(ROOT))] + [self._open(p) for p in dict.fromkeys(
            (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]))]

    def _open(self, path: str, directory: bool = True) -> int:
        fd = os.open(path, os.O_PATH | (os.O_DIRECTORY if directory else 0) | os.O_CLOEXEC)
        self.fds.append(fd)
        return fd

    def run(self, *argv: str, tmpdir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": "/nonexistent",  # no home to put ~/.cache in (nobody's home on Debian)
            "PYTHONHOME": f"/proc/self/fd/{self.home}",
            "PYTHONPATH": ":".join(f"/proc/self/fd/{fd}" for fd in self.paths),
            "TMPDIR": str(tmpdir),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        return subprocess.run([f"/proc/self/fd/{self.exe}", *argv], env=env, user=NOBODY, group=NOBODY,
                              extra_groups=[], pass_fds=tuple(self.fds), capture_output=True, text=True,
                              cwd="/", timeout=timeout)

    def child(self, name: str) -> str:
        """Child program ``name`` as a path ``nobody`` can open (through the checkout's fd)."""
        return f"/proc/self/fd/{self.paths[0]}/{child_path(name).relative_to(ROOT)}"

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def nobody() -> Iterator[Nobody]:
    runner = Nobody()
    try:
        yield runner
    finally:
        runner.close()


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A temp dir nobody can reach (pytest's own lives under a 0700 directory)."""
    with short_tmpdir() as path:
        os.chmod(path, 0o755)
        yield path


def _tmpdir(base: Path, name: str, *, writable: bool) -> Path:
    path = base / name
    path.mkdir()
    os.chmod(path, 0o1777 if writable else 0o755)
    return path


def _clean(result: subprocess.CompletedProcess[str], what: str) -> None:
    print(f"{what}: exit {result.returncode}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-4000:]}")
    assert result.returncode == 0, f"{what} as uid {NOBODY}: expected exit 0, got {result.returncode}"
    assert "Traceback" not in result.stderr and "cannot cache" not in result.stderr


def test_the_install_is_not_writable_by_nobody(nobody: Nobody, tmp_path: Path) -> None:
    """The premise: nobody can write neither the package's __pycache__ nor a home (else the test proves nothing)."""
    tmp = _tmpdir(tmp_path, "t", writable=True)
    result = nobody.run(nobody.child("nonroot_probe"), "premise", tmpdir=tmp)
    _clean(result, "probe")
    assert result.stdout.split() == [str(NOBODY), "False", "False"]


def test_help_as_nobody(nobody: Nobody, tmp_path: Path) -> None:
    tmp = _tmpdir(tmp_path, "t", writable=True)
    result = nobody.run("-m", "devrep.cli", "--help", tmpdir=tmp)
    _clean(result, "devrep --help")
    assert "usage: devrep" in result.stdout


def test_numba_kernel_as_nobody_caches_in_a_private_dir(nobody: Nobody, tmp_path: Path) -> None:
    """A jitted hash runs (and is right); its cache lands in <TMPDIR>/devrep-numba-65534, owned by nobody, 0700."""
    tmp = _tmpdir(tmp_path, "t", writable=True)
    page = np.arange(4096, dtype=np.uint8)
    result = nobody.run(nobody.child("nonroot_probe"), "hash", tmpdir=tmp)
    _clean(result, "hash_pages")
    assert int(result.stdout.split()[-1]) == xxhash.xxh64_intdigest(page.tobytes())
    cache = tmp / f"devrep-numba-{NOBODY}"
    st = cache.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o700)
    assert any(cache.rglob("*.nbi")), f"no numba cache index under {cache}: {list(cache.rglob('*'))}"


def test_planted_cache_dir_is_refused_and_numba_runs_uncached(nobody: Nobody, tmp_path: Path) -> None:
    """The per-user temp dir exists but another user made it (world-writable, owned by root): never load code
    from there; compile without a cache instead, silently."""
    tmp = _tmpdir(tmp_path, "t", writable=True)
    planted = tmp / f"devrep-numba-{NOBODY}"
    planted.mkdir()
    os.chmod(planted, 0o777)
    result = nobody.run(nobody.child("nonroot_probe"), "hash-uncached", tmpdir=tmp)
    _clean(result, "hash_pages without a cache")
    assert result.stdout.split() == ["False", str(xxhash.xxh64_intdigest(bytes(4096)))]
    assert list(planted.iterdir()) == []


def test_doctor_as_nobody(nobody: Nobody, tmp_path: Path) -> None:
    """``devrep doctor`` (a real userfaultfd/pagemap/inotify probe plus numba code) runs as nobody and reports
    what works for that user: exit 0 if every mode works, else 1 (documented), never a traceback."""
    tmp = _tmpdir(tmp_path, "t", writable=True)
    result = nobody.run("-m", "devrep.cli", "doctor", "--json", tmpdir=tmp)
    print(f"doctor: exit {result.returncode}\nstdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}")
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert report["euid"] == NOBODY
    assert report["modes"]["explicit"]["works"] and report["modes"]["file"]["works"], report["modes"]
