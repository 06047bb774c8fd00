"""A socket directory nobody else can swap entries in (docs/security.md, "Sockets").

The server binds its sockets by path, then changes their mode and group by path (gRPC binds the socket itself,
and ``fchmod`` on a socket fd does not change the socket file's permissions). Those path operations are only
safe where nobody but the server (or root) can rename, remove or create entries: otherwise a local user swaps a
socket for a symlink to a file of its choosing (the chmod/chgrp lands there) or for a socket of its own (the
victim's clients send it their memfds, writable). So before binding, the directory and every directory above it
must belong to root or the server's uid, and none may be writable by anyone else; an ancestor writable by others
is accepted only with the sticky bit (as ``/tmp``: others cannot rename or remove entries they do not own).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InvalidArgumentError


def check_socket_directory(directory: Path) -> None:
    """Raise ``InvalidArgumentError`` unless ``directory`` (existing) and its ancestors are safe, see above."""
    euid = os.geteuid()
    trusted = {0, euid}
    real = Path(os.path.realpath(directory))
    # Symlinks on the way as written (e.g. /var/run -> /run) must be trusted's too: another user's symlink in a
    # sticky /tmp could be re-pointed at its own directory between this check and the bind.
    lexical = Path(os.path.abspath(directory))
    for path in [lexical, *lexical.parents]:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise InvalidArgumentError(f"socket directory {path}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in trusted:
            raise InvalidArgumentError(
                f"socket directory {directory}: the symlink {path} belongs to uid {st.st_uid}, not root or this "
                f"server's uid {euid}, so that user could re-point it; choose another --socket")
    for level, path in enumerate([real, *real.parents]):
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise InvalidArgumentError(f"socket directory {path}: {exc.strerror}") from None
        mode = stat.S_IMODE(st.st_mode)
        others_write = mode & (stat.S_IWGRP | stat.S_IWOTH)
        if st.st_uid not in trusted:
            raise InvalidArgumentError(
                f"socket directory {real}: {path} belongs to uid {st.st_uid}, not root or this server's uid "
                f"{euid}, so that user could swap the server's sockets; remove it or choose another --socket")
        if level == 0 and others_write:
            raise InvalidArgumentError(
                f"socket directory {real} is writable by its group or others (mode {mode:#o}), so they could "
                "swap the server's sockets; use a directory only this server's uid can write (chmod go-w), or "
                "another --socket")
        if level > 0 and others_write and not mode & stat.S_ISVTX:
            raise InvalidArgumentError(
                f"socket directory {real}: its parent {path} is writable by its group or others without the "
                f"sticky bit (mode {mode:#o}), so they could rename the socket directory; choose another --socket")
