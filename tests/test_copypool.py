"""``devrep.backends._copypool.CopyPool``: the CPU backend's scattered copies on several threads.

What must hold whatever the scheduler does: every listed page copied exactly, nothing else touched, the call
returns only once every claimed chunk is done, a helper that never runs costs nothing but its share, errors
reach the caller, and a forked child copies without the parent's threads.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import numpy.typing as npt
import pytest

from devrep import PAGE_SIZE
from devrep._pages import runs_from_pages
from devrep._warmup import kernels
from devrep.backends import _copypool
from devrep.backends._copypool import CopyPool


def _arrays(npages: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    src = np.random.default_rng(npages).integers(0, 256, npages * PAGE_SIZE, dtype=np.uint8)
    return src, np.zeros_like(src)


def _expected(src: npt.NDArray[np.uint8], pages: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    out = np.zeros_like(src).reshape(-1, PAGE_SIZE)
    out[pages] = src.reshape(-1, PAGE_SIZE)[pages]
    return out.reshape(-1)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("count", [1, 100, 700, 5000])
def test_copies_exactly_the_runs(threads: int, count: int) -> None:
    npages = 8192
    src, dst = _arrays(npages)
    pages = np.sort(np.random.default_rng(count).choice(npages, count, replace=False)).astype(np.int64)
    runs = np.ascontiguousarray(runs_from_pages(pages))
    CopyPool(threads).copy(kernels().scatter, src, dst, runs)
    assert np.array_equal(dst, _expected(src, pages))


def test_long_runs_stay_whole_and_every_page_is_copied_once() -> None:
    """Chunks end at run boundaries: a run longer than a chunk is one kernel call, and no run is copied twice."""
    calls: list[npt.NDArray[np.int64]] = []
    lock = threading.Lock()

    def recording(src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8], runs: npt.NDArray[np.int64]) -> None:
        with lock:
            calls.append(runs.copy())
        kernels().scatter(src, dst, runs)

    npages = 4096
    src, dst = _arrays(npages)
    runs = np.array([[0, 1000], [1500, 1], [1502, 3], [2000, 900], [3000, 1], [4000, 96]], dtype=np.int64)
    CopyPool(3).copy(recording, src, dst, runs)
    copied = np.concatenate(calls)
    assert sorted(map(tuple, copied.tolist())) == sorted(map(tuple, runs.tolist()))
    assert len(calls) > 1  # shared out, not one call
    pages = np.concatenate([np.arange(f, f + c) for f, c in runs.tolist()])
    assert np.array_equal(dst, _expected(src, pages))


def test_a_helper_that_never_runs_does_not_hold_up_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other core busy: the helpers are not scheduled. The caller copies every chunk itself and returns."""
    pool = CopyPool(2)
    blocked = threading.Event()
    monkeypatch.setattr(CopyPool, "_serve", staticmethod(lambda jobs: blocked.wait()))  # helpers that never wake
    src, dst = _arrays(4096)
    pages = np.arange(0, 4096, 3, dtype=np.int64)
    caller = threading.Thread(target=pool.copy,
                              args=(kernels().scatter, src, dst, np.ascontiguousarray(runs_from_pages(pages))))
    caller.start()
    caller.join(30)  # a caller waiting for the helper would wait until ``blocked`` is set
    blocked.set()
    assert not caller.is_alive(), "the caller waited for a helper that never ran"
    assert np.array_equal(dst, _expected(src, pages))


def test_the_caller_waits_for_a_chunk_a_helper_claimed() -> None:
    """A helper slow inside its chunk: the caller must not return before that chunk is in place."""
    main = threading.get_ident()
    slow_done = threading.Event()

    def kernel(src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8], runs: npt.NDArray[np.int64]) -> None:
        if threading.get_ident() != main and not slow_done.is_set():
            time.sleep(0.3)
            kernels().scatter(src, dst, runs)
            slow_done.set()
            return
        if threading.get_ident() == main:
            time.sleep(0.05)  # leave the helper time to wake and claim a chunk, even on a loaded machine
        kernels().scatter(src, dst, runs)

    src, dst = _arrays(8192)
    pages = np.arange(0, 8192, 2, dtype=np.int64)
    pool = CopyPool(2)
    for _ in range(20):  # until the helper claims a chunk (it must be scheduled before the caller takes all)
        dst[:] = 0
        pool.copy(kernel, src, dst, np.ascontiguousarray(runs_from_pages(pages)))
        assert np.array_equal(dst, _expected(src, pages))
        if slow_done.is_set():
            break
    assert slow_done.is_set(), "the helper never claimed a chunk in 20 copies"


def test_an_error_in_a_helper_reaches_the_caller() -> None:
    main = threading.get_ident()

    def kernel(src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8], runs: npt.NDArray[np.int64]) -> None:
        if threading.get_ident() != main:
            raise RuntimeError("helper failed")
        time.sleep(0.05)  # leave chunks for the helper, even on a loaded machine
        kernels().scatter(src, dst, runs)

    src, dst = _arrays(4096)
    runs = np.ascontiguousarray(runs_from_pages(np.arange(0, 4096, 2, dtype=np.int64)))
    pool = CopyPool(2)
    with pytest.raises(RuntimeError, match="helper failed"):
        for _ in range(50):
            pool.copy(kernel, src, dst, runs)
    pool.copy(kernels().scatter, src, dst, runs)  # the pool still works afterwards
    pool.close()


def test_the_callers_own_error_wins_and_no_array_outlives_the_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that fails gets its own error back, not a helper's; once ``copy`` returns or raises, the job holds
    no array (a helper waking late must not keep a replica mapping alive)."""
    jobs: list[_copypool._Job] = []
    real_job = _copypool._Job

    def recording_job(*args: object) -> _copypool._Job:
        job = real_job(*args)  # type: ignore[arg-type]
        jobs.append(job)
        return job

    main = threading.get_ident()

    def kernel(src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8], runs: npt.NDArray[np.int64]) -> None:
        time.sleep(0.05)
        raise (ValueError if threading.get_ident() == main else RuntimeError)("failed")

    src, dst = _arrays(4096)
    runs = np.ascontiguousarray(runs_from_pages(np.arange(0, 4096, 2, dtype=np.int64)))
    pool = CopyPool(2)
    monkeypatch.setattr(_copypool, "_Job", recording_job)
    try:
        with pytest.raises(ValueError, match="failed"):
            pool.copy(kernel, src, dst, runs)
        pool.copy(kernels().scatter, src, dst, runs)
    finally:
        pool.close()
    assert jobs and all(job.src is None and job.dst is None and job.runs is None for job in jobs)


def test_a_forked_child_copies_without_the_parents_threads() -> None:
    pool = CopyPool(2)
    src, dst = _arrays(4096)
    runs = np.ascontiguousarray(runs_from_pages(np.arange(0, 4096, 3, dtype=np.int64)))
    pool.copy(kernels().scatter, src, dst, runs)  # the parent's helper exists now
    pool.close()  # and a new one after close
    pool.copy(kernels().scatter, src, dst, runs)
    dst[:] = 0
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            pool.copy(kernels().scatter, src, dst, runs)
            ok = np.array_equal(dst, _expected(src, np.arange(0, 4096, 3, dtype=np.int64)))
            ok = ok and any(t.name.startswith("devrep-copy-") for t in threading.enumerate())
            os._exit(0 if ok else 1)
        finally:
            os._exit(2)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child did not finish its copy within 60 s")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_default_thread_count_follows_the_cpus_allowed() -> None:
    assert CopyPool().threads == min(len(os.sched_getaffinity(0)), _copypool.MAX_THREADS)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        CopyPool(0)


def test_concurrent_callers_share_one_pool() -> None:
    """Syncs of several regions at once: every caller gets its own runs copied, whoever's helper claims what."""
    pool = CopyPool(3)
    results: list[bool] = []

    def one(seed: int) -> None:
        src, dst = _arrays(4096 + seed)
        pages = np.sort(np.random.default_rng(seed).choice(4096, 1500, replace=False)).astype(np.int64)
        for _ in range(5):
            dst[:] = 0
            pool.copy(kernels().scatter, src, dst, np.ascontiguousarray(runs_from_pages(pages)))
            results.append(bool(np.array_equal(dst, _expected(src, pages))))

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [True] * 20
