"""Opening a client's file without lending it the server's privileges (docs/security.md, "File regions").

Two routes, one rule: the server never opens a client-named path with its own privileges.

* **fd route** (``put_fds kind=file``, what the Python client always uses): the client opened the file for
  reading itself; ``check_file_fd`` accepts that fd only if it is a real read fd (no ``O_PATH``, not
  write-only) of a regular, non-empty file on an ordinary file system that is not a memfd, and the server reads
  through that very fd (never re-opens it by name).
* **path route** (gRPC-only clients such as grpcurl): ``open_as_peer`` opens the path *with the caller's
  credentials*: for the duration of the open the calling thread (only it: Linux credentials are per thread, and
  the raw syscalls below do not broadcast to the process as glibc's wrappers do) takes the peer's fsuid/fsgid and
  supplementary groups and drops every effective capability, so the kernel checks each directory's search bit,
  each symlink and the file's read bit exactly as for the peer. ``openat2(RESOLVE_NO_MAGICLINKS)`` refuses
  ``/proc/<pid>/fd/N``-style links (which would otherwise reach this server's own fds, since ``/proc/self`` is
  always accessible to itself), an ``O_PATH`` probe classifies the target before anything is opened for reading
  (FIFOs, sockets, devices, directories and pseudo file systems are refused without a blocking or side-effecting
  open), and the read open is ``O_NONBLOCK | O_NOCTTY`` so even a file swapped for a FIFO in between cannot park
  a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from ..linux._libc import libc

NOBODY = 65534
"""The identity a session without a known uid (pre-authorized token) opens paths with: the kernel's overflow
uid/gid, no supplementary groups; the file must also be world-readable (see ``open_as_peer``)."""

# Raw syscall numbers (glibc's setfsuid/setgroups wrappers would change every thread of the process).
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"setgroups": 116, "setfsuid": 122, "setfsgid": 123, "capget": 125, "capset": 126},
    "aarch64": {"setgroups": 159, "setfsuid": 151, "setfsgid": 152, "capget": 90, "capset": 91},
    "riscv64": {"setgroups": 159, "setfsuid": 151, "setfsgid": 152, "capget": 90, "capset": 91},
}
_SYSCALLS["arm64"] = _SYSCALLS["aarch64"]
SYS = _SYSCALLS.get(platform.machine())
SYS_OPENAT2 = 437  # the same on every architecture (added after the syscall tables were unified)
AT_FDCWD = -100
RESOLVE_NO_MAGICLINKS = 0x02
_CAP_VERSION_3 = 0x20080522

# Pseudo file systems whose "regular files" are kernel interfaces, not data: /proc/<pid>/mem or environ of this
# very server, sysfs/debugfs knobs that check privileges at read time, etc. (statfs(2) f_type values).
PSEUDO_FS: dict[int, str] = {
    0x9FA0: "proc", 0x62656572: "sysfs", 0x64626720: "debugfs", 0x74726163: "tracefs", 0x73636673: "securityfs",
    0x27E0EB: "cgroup", 0x63677270: "cgroup2", 0xCAFE4A11: "bpf", 0x62656570: "configfs", 0xDE5E81E4: "efivarfs",
    0x6165676C: "pstore", 0x1CD1: "devpts", 0xF97CFF8C: "selinuxfs", 0x43415D53: "smackfs", 0x65735543: "fusectl",
    0x42494E4D: "binfmt_misc", 0x6E736673: "nsfs", 0x09041934: "anon_inode", 0x534F434B: "sockfs",
    0x50495045: "pipefs",
}
REFUSED_PREFIXES = ("/proc", "/dev", "/sys")


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _sys(name: str, *args: object) -> int:
    assert SYS is not None
    ctypes.set_errno(0)
    result = int(libc.syscall(ctypes.c_long(SYS[name]), *args))
    if result < 0 and name not in ("setfsuid", "setfsgid"):
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return result


def _fs_type(fd: int) -> int:
    buf = ctypes.create_string_buffer(512)  # struct statfs; f_type (a long) comes first on every 64-bit arch
    if libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder, signed=True)


def fd_target(fd: int) -> str:
    """The kernel's name of what ``fd`` refers to (``/memfd:x (deleted)``, ``pipe:[..]``, a path)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


def check_file_fd(fd: int, what: str = "file fd") -> os.stat_result:
    """Raise unless ``fd`` is a read fd of a regular, non-empty data file (not a memfd, not on a pseudo file
    system); returns its ``fstat``. Never re-opens anything."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        st = os.fstat(fd)
    except OSError as exc:
        raise InvalidArgumentError(f"{what} is not usable: {exc.strerror}") from None
    target = fd_target(fd)
    if flags & os.O_PATH:
        raise InvalidArgumentError(f"{what} is an O_PATH fd ({target}); open the file for reading (O_RDONLY)")
    if flags & os.O_ACCMODE not in (os.O_RDONLY, os.O_RDWR):
        raise InvalidArgumentError(f"{what} was opened write-only ({target}); devrep needs to read it")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgumentError(f"{what} is not a regular file (it is {target})")
    if target.startswith("/memfd:"):
        raise InvalidArgumentError(f"{what} is a memfd ({target}); register memory with kind='memfd'")
    try:
        kind = PSEUDO_FS.get(_fs_type(fd))
    except OSError as exc:
        raise InvalidArgumentError(f"{what}: cannot fstatfs it: {exc.strerror}") from None
    if kind is not None:
        raise InvalidArgumentError(f"{what} is on {kind} ({target}); devrep replicates data files only")
    if st.st_size <= 0:
        raise InvalidArgumentError(f"{what} is empty ({target})")
    return st


@contextlib.contextmanager
def _thread_credentials(uid: int, gid: int, groups: Sequence[int]) -> Iterator[None]:
    """This thread's file-system identity becomes ``uid``/``gid``/``groups`` with no effective capability;
    restored on exit. Needs CAP_SETUID/CAP_SETGID (a root server)."""
    if SYS is None:
        raise OSError(errno.ENOSYS, f"per-thread credentials are not implemented on {platform.machine()}")
    header = _CapHeader(_CAP_VERSION_3, 0)
    saved_caps = (_CapData * 2)()
    _sys("capget", ctypes.byref(header), ctypes.byref(saved_caps))
    saved_groups = os.getgroups()  # glibc's getgroups reads this thread's credentials
    saved_fsuid = _sys("setfsuid", ctypes.c_long(-1))  # -1 is invalid: only returns the current fsuid
    saved_fsgid = _sys("setfsgid", ctypes.c_long(-1))
    group_array = (ctypes.c_uint32 * max(1, len(groups)))(*groups)
    try:
        _sys("setgroups", ctypes.c_long(len(groups)), group_array)
        _sys("setfsgid", ctypes.c_long(gid))
        _sys("setfsuid", ctypes.c_long(uid))
        if (_sys("setfsuid", ctypes.c_long(-1)), _sys("setfsgid", ctypes.c_long(-1))) != (uid, gid):
            raise OSError(errno.EPERM, "setfsuid/setfsgid refused (the server lacks CAP_SETUID/CAP_SETGID)")
        dropped = (_CapData * 2)()
        for i in range(2):  # no effective capability: no DAC override, no CAP_SYS_PTRACE for /proc
            dropped[i].permitted, dropped[i].inheritable = saved_caps[i].permitted, saved_caps[i].inheritable
        _sys("capset", ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), ctypes.byref(dropped))
        yield
    finally:
        # Effective capabilities back first (allowed: they stay within the permitted set), then the ids.
        _sys("capset", ctypes.byref(_CapHeader(_CAP_VERSION_3, 0)), ctypes.byref(saved_caps))
        _sys("setfsuid", ctypes.c_long(saved_fsuid))
        _sys("setfsgid", ctypes.c_long(saved_fsgid))
        restore = (ctypes.c_uint32 * max(1, len(saved_groups)))(*saved_groups)
        _sys("setgroups", ctypes.c_long(len(saved_groups)), restore)


def _openat2(path: str, flags: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_NO_MAGICLINKS)
    while True:
        fd = int(libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(AT_FDCWD), os.fsencode(path),
                              ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err), path)


def _classify(fd: int, path: str) -> os.stat_result:
    """On the ``O_PATH`` probe: refuse anything but a regular data file before it is opened for reading."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise InvalidArgumentError(f"{path} is {kind}; devrep replicates regular files only")
    kind_fs = PSEUDO_FS.get(_fs_type(fd))
    if kind_fs is not None:
        raise InvalidArgumentError(f"{path} is on {kind_fs}; devrep replicates data files only")
    return st


def _open_checked(path: str) -> int:
    """The probe + read open, in the caller's current credentials; errors are devrep errors."""
    try:
        probe = _openat2(path, os.O_PATH)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise NotFoundError(f"no such file: {path}") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDeniedError(f"{path}: permission denied for this session's user") from None
        if exc.errno in (errno.ELOOP, errno.EXDEV):
            raise InvalidArgumentError(f"{path}: resolving it goes through a /proc magic link or too many "
                                       "symlinks; devrep does not follow those") from None
        if exc.errno == errno.ENOSYS:
            raise PermissionDeniedError("this kernel has no openat2(2) (Linux >= 5.6): path registration is "
                                        "off; open the file and send its fd (put_fds kind='file')") from None
        raise InvalidArgumentError(f"cannot open {path}: {exc.strerror}") from None
    try:
        probed = _classify(probe, path)
        try:
            fd = _openat2(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PermissionDeniedError(f"{path} is not readable by this session's user") from None
            raise InvalidArgumentError(f"cannot open {path}: {exc.strerror}") from None
    finally:
        os.close(probe)
    try:
        st = check_file_fd(fd, path)
        if (st.st_dev, st.st_ino) != (probed.st_dev, probed.st_ino):
            raise InvalidArgumentError(f"{path} changed while it was being opened; try again")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_as_peer(path: str, uid: int | None, gid: int | None, groups: Sequence[int] = ()) -> int:
    """Open ``path`` for reading as the peer ``uid``/``gid``/``groups`` would; returns an O_RDONLY fd the caller
    owns. ``uid=None`` (a session with no SO_PEERCRED identity) opens as nobody and needs a world-readable file."""
    if not os.path.isabs(path) or "\0" in path or len(path) > 4096:
        raise InvalidArgumentError(f"file.path must be an absolute path, got {path!r}")
    norm = os.path.normpath(path)
    if any(norm == p or norm.startswith(p + "/") for p in REFUSED_PREFIXES):
        raise InvalidArgumentError(f"{path}: devrep does not replicate /proc, /dev or /sys files")
    anonymous = uid is None
    if anonymous:
        uid, gid, groups = NOBODY, NOBODY, ()
    assert uid is not None
    if gid is None:
        gid = NOBODY  # the group class then grants nothing the peer's own group would not
    if os.geteuid() == 0:
        try:
            with _thread_credentials(uid, gid, groups):
                fd = _open_checked(path)
        except OSError as exc:
            raise PermissionDeniedError(f"cannot take the caller's identity to open {path} ({exc.strerror}); "
                                        "open the file and send its fd (put_fds kind='file')") from None
    elif uid == os.geteuid():
        fd = _open_checked(path)  # a server of the caller's own uid: its own rights are the caller's
    else:
        raise PermissionDeniedError(f"this server (uid {os.geteuid()}) cannot open files as uid {uid}: open "
                                    f"{path} and send its fd (put_fds kind='file')")
    if anonymous and not os.fstat(fd).st_mode & stat.S_IROTH:
        os.close(fd)
        raise PermissionDeniedError(f"{path} is not world-readable and this session has no uid (pre-authorized "
                                    "token): open the file and send its fd (put_fds kind='file')")
    return fd


def kernel_path(fd: int) -> Path | None:
    """The path the kernel knows ``fd`` by (for messages and the file tracker's inotify watch)."""
    target = fd_target(fd)
    return Path(target.removesuffix(" (deleted)")) if target.startswith("/") else None
