"""Per-allocation tokens: how the device plugin tells the devrep service which tokens to accept.

The plugin hands each container a fresh token in ``DEVREP_TOKEN`` and gives the same token to a
``TokenSink``. Two sinks work:

* in one process, the service's own token table (anything with ``add(token, label)`` and
  ``remove(token)``, e.g. the gRPC server's ``tokens``);
* across containers of one pod, ``TokenDirectory``: one file per allocation, ``<dir>/<label>.token``
  holding the token, written atomically with mode 0600. The service reads the directory
  (``devrep serve --token-dir DIR``); a removed file is a revoked token.

Kubelet never tells a device plugin that a pod has gone: the plugin asks kubelet's PodResources API which pods
still hold its devices and revokes the tokens of the others (``DevicePlugin.reconcile``), or, without that API,
revokes a token when one of its slots is allocated again.

On a node the directory is a hostPath on disk (``/var/lib/devrep/tokens``), so tokens outlive the DaemonSet pod: a
rollout, an eviction or a reboot starts a plugin and a server that re-adopt them, and running workloads (whose
``DEVREP_TOKEN`` kubelet replays from its checkpoint without calling ``Allocate`` again) keep working.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Protocol

from ..errors import InvalidArgumentError

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,200}")
SUFFIX = ".token"


class TokenSink(Protocol):
    """Where the plugin publishes the tokens it hands out."""

    def add(self, token: str, label: str) -> None: ...

    def remove(self, token: str) -> None: ...


class TokenDirectory:
    """A directory of ``<label>.token`` files, one per live allocation (see the module doc)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Only root may read the tokens: a hostPath the kubelet created (DirectoryOrCreate) starts out 0755.
        os.chmod(self.path, 0o700)
        self._lock = threading.Lock()

    def add(self, token: str, label: str) -> None:
        if not _LABEL.fullmatch(label):
            raise InvalidArgumentError(f"bad token label {label!r}: letters, digits and ._+- only")
        if not token or any(c.isspace() for c in token):
            raise InvalidArgumentError("a token must be a non-empty string without whitespace")
        with self._lock:
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-")
            try:
                with os.fdopen(fd, "w") as f:  # mkstemp already made it 0600
                    f.write(token + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path / (label + SUFFIX))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def remove(self, token: str) -> None:
        with self._lock:
            for label, known in self._read().items():
                if known == token:
                    (self.path / (label + SUFFIX)).unlink(missing_ok=True)

    def tokens(self) -> dict[str, str]:
        """label -> token for every file now in the directory."""
        with self._lock:
            return self._read()

    def _read(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for entry in self.path.glob("*" + SUFFIX):
            try:
                token = entry.read_text().strip()
            except FileNotFoundError:  # removed between glob and read
                continue
            if token:
                out[entry.name[: -len(SUFFIX)]] = token
        return out
