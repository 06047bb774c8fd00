"""Where numba may cache devrep's compiled kernels, for any user.

numba's ``cache=True`` needs a writable directory: the ``__pycache__`` beside the source, else the user's cache
directory (``$XDG_CACHE_HOME`` or ``~/.cache``). A non-root user of a root-owned install with no writable home
(``runuser -u nobody``, a service account) has neither, and numba then refuses to even *define* the function
("cannot cache function ... no locator available"), so ``import devrep`` (and ``devrep --help``) died.

``NUMBA_CACHE`` is decided once, at import, before any kernel is defined: keep numba's own choice when it has
one, else point ``NUMBA_CACHE_DIR`` at a private per-user directory in the temp dir, else compile without a
cache (slower first calls, nothing else changes). An explicit ``NUMBA_CACHE_DIR`` is always respected.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path


def _usable(path: Path) -> bool:
    """Whether numba could use ``path`` as a cache directory (the same test as its ``ensure_cache_path``)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return False
    return True


def _private_dir() -> Path | None:
    """``<tmp>/devrep-numba-<uid>``: created mode 0700; refused unless it is a real directory owned by us that
    nobody else can write (another user could otherwise plant compiled code for us to load)."""
    path = Path(tempfile.gettempdir()) / f"devrep-numba-{os.geteuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return None
    return path if _usable(path) else None


def _user_cache_dir() -> Path:
    """numba's user-wide cache directory on Linux (``appdirs.user_cache_dir("numba")``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "numba"


def configure() -> bool:
    """Make sure numba has a cache directory it can write, or say there is none. Returns whether to cache."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    here = Path(__file__).parent
    if all(_usable(d / "__pycache__") for d in (here, here / "backends")) or _usable(_user_cache_dir()):
        return True
    private = _private_dir()
    if private is None:
        return False
    os.environ["NUMBA_CACHE_DIR"] = str(private)
    config = sys.modules.get("numba.core.config")
    if config is not None:  # numba was imported before devrep: it read its environment already
        setattr(config, "CACHE_DIR", str(private))  # noqa: B010
    return True


NUMBA_CACHE = configure()
"""Pass as ``cache=`` to every ``numba.njit`` in devrep."""
