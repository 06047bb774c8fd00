"""Fair-sharing limits: how much of the server's shared capacity one client may hold at a time.

The server's capacity is finite and shared by every local user who may connect: gRPC worker threads (a long
``Sync`` or a ``Watch`` stream holds one), side-channel connections (a thread and an fd each) and file
descriptors. A ``Limiter`` counts what each *principal* holds (a session, or a uid for everything its sessions
hold together) and refuses, with ``RESOURCE_EXHAUSTED``, a request that would take more than its share, so that
one client can never starve the others. Refusing at once (instead of queueing) keeps the refused request from
holding a thread while it waits. See docs/security.md ("6. Fair sharing").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

from ..errors import ResourceExhaustedError

ROOT_UID = 0
"""uid 0 is not limited per uid (only per session): root can stop the server anyway, and the service's own
tooling, tests and pods that run as root open many sessions legitimately. An unprivileged uid is limited."""


class Limiter:
    """Count holdings per key, at most ``limit`` each; ``refuse(message)`` builds the error (counted in metrics)."""

    def __init__(self, what: str, limit: int,
                 refuse: Callable[[str], ResourceExhaustedError] = ResourceExhaustedError) -> None:
        if limit < 1:
            raise ValueError(f"{what} limit must be >= 1, got {limit}")
        self.what = what
        self.limit = limit
        self.refuse = refuse
        self._held: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def held(self, key: Hashable) -> int:
        with self._lock:
            return self._held.get(key, 0)

    def try_acquire(self, key: Hashable) -> bool:
        with self._lock:
            n = self._held.get(key, 0)
            if n >= self.limit:
                return False
            self._held[key] = n + 1
            return True

    def acquire(self, key: Hashable, who: str) -> None:
        if not self.try_acquire(key):
            raise self.refuse(f"{who} already holds {self.limit} {self.what} (the most one may hold at a time); "
                              "retry when one finishes")

    def release(self, key: Hashable) -> None:
        with self._lock:
            n = self._held.get(key, 0) - 1
            if n > 0:
                self._held[key] = n
            else:
                self._held.pop(key, None)

    @contextmanager
    def hold(self, key: Hashable, who: str) -> Iterator[None]:
        self.acquire(key, who)
        try:
            yield
        finally:
            self.release(key)


@contextmanager
def holding(*holds: tuple[Limiter, Hashable | None, str]) -> Iterator[None]:
    """Acquire several ``(limiter, key, who)`` at once, all or none (a ``None`` key is not limited)."""
    taken: list[tuple[Limiter, Hashable]] = []
    try:
        for limiter, key, who in holds:
            if key is None:
                continue
            limiter.acquire(key, who)
            taken.append((limiter, key))
        yield
    finally:
        for limiter, key in reversed(taken):
            limiter.release(key)
