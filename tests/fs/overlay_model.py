"""Helpers for the differential test (tests/fs/test_differential.py).

Everything here is backend-agnostic plumbing:

* ``build_lower_tree``  – the deterministic lower layer,
* the operation classes (one per syscall family, plus operations on held
  file descriptors, ``AsUser`` for unprivileged callers, ``DropCaches`` and
  ``Check``) and ``apply_op`` – apply an operation below a mount root and
  return its outcome (``"ok"`` plus optional data, or the errno name),
* ``snapshot`` / ``diff_snapshots`` – a comparable picture of a merged tree and
  a readable ``path: field a != b`` diff,
* ``Kernel`` / ``Sdeefs`` mount backends and ``Workspace`` which owns every
  temporary directory and every mount of one example and tears them down
  unconditionally.

Paths may be deeper than PATH_MAX (``DEEP_4K``, ``DEEP_20K``, the lower's ``z/``
chain): every path is handed to the kernel through ``Reach``, which opens the
directories of a deep path one at a time (as ``mv``, ``rm -r`` or ``find`` do,
following symlinks on the way as a path walk would) and gives each syscall a
``/proc/self/fd/N/name`` string below PATH_MAX.  Short paths are passed as they
are, so the original operations are unchanged; nothing here recurses per level.

Symlink targets used anywhere (lower tree and generated operations) are
relative and never contain ``..``, so following a symlink can never leave
the mount.  Explicit timestamps are all before ``EXPLICIT_TIME_LIMIT``; any
timestamp the filesystem sets by itself ("now") is after it, which makes
mtimes comparable without racing the clock.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from sdeefs.fs.daemon import daemon_pid as mount_daemon_pid
from sdeefs.sysio import fallocate
from sdeefs.trees import rmtree

# --------------------------------------------------------------------------
# constants

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
AT_FDCWD = -100
SYS_renameat2_x86_64 = 316

#: every explicit timestamp (lower tree, Utime ops) is before this
EXPLICIT_TIME_LIMIT = 1_500_000_000  # 2017-07-14

#: names used for every path component: lower tree and operations alike,
#: so that operations collide with lower entries (and with each other)
NAMES = ("a", "b", "d", "e", "x")

#: relative symlink targets without "..": following them stays in the mount
SYMLINK_TARGETS = ("a", "b", "d", "d/a", "e", "x", "missing", "d/e/a")

XATTR_NAMES = ("user.foo", "user.bar")

#: directory chains deeper than PATH_MAX (each syscall argument stays below it)
DEEP_NAME = "L" * 200
DEEP_4K = "/".join([DEEP_NAME] * 21)  # 4220 bytes
DEEP_20K = "/".join([DEEP_NAME] * 100)  # 20099 bytes
#: the lower's deep chain: z/DEEP_4K holds lf (a file), ld/ (a directory) and ll (a symlink)
LOWER_DEEP = "z/" + DEEP_4K

#: the interpreter that runs ``python -m sdeefs`` (default: the one running the tests)
SDEEFS_PYTHON = os.environ.get("SDEEFS_PYTHON", sys.executable)
SDEEFS_SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OP_TIMEOUT = float(os.environ.get("SDEEFS_DIFF_OP_TIMEOUT", "30"))
#: the sdeefs engine under test (hybrid: expect ESTALE in the hard-link scenarios,
#: docs/hardlinks.md)
SDEEFS_ENGINE = os.environ.get("SDEEFS_DIFF_ENGINE", "fuse")
MOUNT_TIMEOUT = float(os.environ.get("SDEEFS_DIFF_MOUNT_TIMEOUT", "60"))


# --------------------------------------------------------------------------
# lower tree

def _t(k: int) -> int:
    """An explicit timestamp in ns (2004-ish, with a nanosecond part)."""
    return (1_100_000_000 + k * 86_400) * 1_000_000_000 + 123_456_789 + k


def build_lower_tree(root: str, hardlink: bool = True) -> None:
    """Create the lower layer below ``root`` (must exist and be empty).

    Layout (mode uid:gid)::

        a        file "lower a\\n"                 0644 0:0
        b        file 5000 bytes, 2 links (d/b)   0600 1000:1000  user.foo=1
        x        symlink -> d/a
        d/       dir                              0755 0:0  user.dirattr=yes
        d/a      file                             0640 1000:100 user.foo, user.bar
        d/b      hard link of b (hardlink=False: an independent copy of b)
        d/d/     empty dir                        0755
        d/e/     dir                              0750 1000:1000
        d/e/a    empty file                       0755 (executable)
        d/e/x    symlink -> missing (dangling)
        d/x      fifo                             0644
        e/       empty dir                        0700 1000:1000
        z/DEEP_4K/         21 dirs of 200-byte names, 4.2 KB deep   0755
        z/DEEP_4K/lf       file "deep lower\\n"         0644  user.foo=deep
        z/DEEP_4K/ld/      empty dir                      0755
        z/DEEP_4K/ll       symlink -> lf
    """
    j = lambda *p: os.path.join(root, *p)  # noqa: E731

    with open(j("a"), "wb") as f:
        f.write(b"lower a\n")
    os.chmod(j("a"), 0o644)

    with open(j("b"), "wb") as f:
        f.write(bytes((i * 7 + 3) % 251 for i in range(5000)))
    os.chmod(j("b"), 0o600)
    os.chown(j("b"), 1000, 1000)
    os.setxattr(j("b"), "user.foo", b"1")

    os.symlink("d/a", j("x"))

    os.mkdir(j("d"))
    os.chmod(j("d"), 0o755)
    os.setxattr(j("d"), "user.dirattr", b"yes")

    with open(j("d", "a"), "wb") as f:
        f.write(b"d/a: some lower content\n" * 3)
    os.chmod(j("d", "a"), 0o640)
    os.chown(j("d", "a"), 1000, 100)
    os.setxattr(j("d", "a"), "user.foo", b"lower-foo")
    os.setxattr(j("d", "a"), "user.bar", b"")

    if hardlink:
        os.link(j("b"), j("d", "b"))
    else:  # an independent file with the same data and attributes
        shutil.copy2(j("b"), j("d", "b"))
        os.chown(j("d", "b"), 1000, 1000)

    os.mkdir(j("d", "d"))
    os.chmod(j("d", "d"), 0o755)

    os.mkdir(j("d", "e"))
    os.chmod(j("d", "e"), 0o750)
    os.chown(j("d", "e"), 1000, 1000)
    open(j("d", "e", "a"), "wb").close()
    os.chmod(j("d", "e", "a"), 0o755)
    os.symlink("missing", j("d", "e", "x"))

    os.mkfifo(j("d", "x"))
    os.chmod(j("d", "x"), 0o644)

    os.mkdir(j("e"))
    os.chmod(j("e"), 0o700)
    os.chown(j("e"), 1000, 1000)

    reach = Reach(root)
    try:
        prefix = "z"
        os.mkdir(j("z"), 0o755)
        for part in DEEP_4K.split("/"):
            prefix += "/" + part
            os.mkdir(reach(prefix), 0o755)
        fd = os.open(reach(LOWER_DEEP + "/lf"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"deep lower\n")
        os.close(fd)
        os.setxattr(reach(LOWER_DEEP + "/lf"), "user.foo", b"deep")
        os.mkdir(reach(LOWER_DEEP + "/ld"), 0o755)
        os.symlink("lf", reach(LOWER_DEEP + "/ll"))

        # explicit, distinct, old timestamps on everything; deepest first so that
        # directory times are not disturbed afterwards
        entries = [rel for rel in walk_rel(root, reach) if rel != "."]
        entries.sort(key=lambda p: (-p.count("/"), p))
        for k, rel in enumerate(entries):
            os.utime(reach(rel), ns=(_t(100 + k), _t(k)), follow_symlinks=False)
    finally:
        reach.close()
    os.chmod(root, 0o755)
    os.utime(root, ns=(_t(99), _t(98)))


# --------------------------------------------------------------------------
# paths of any depth

class Reach:
    """Strings that reach paths below ``root`` of any length, each below PATH_MAX.

    A short path is returned as it is (``root/rel``); a deep one as
    ``/proc/self/fd/N/name``, N an O_PATH fd of its directory, opened one
    component at a time (symlinks on the way followed, as the kernel's path walk
    does) and kept until ``close``.  Permission and lookup errors on the way are
    the ones the whole path would give.
    """

    LIMIT = 3000  # bytes of a path handed over as it is

    def __init__(self, root: str) -> None:
        self.root = root
        self.fds: dict[str, int] = {}  # relative directory -> its O_PATH fd

    def __call__(self, rel: str) -> str:
        full = self.root if rel in (".", "") else os.path.join(self.root, rel)
        if len(os.fsencode(full)) < self.LIMIT:
            return full
        head, _, tail = rel.rpartition("/")
        return f"/proc/self/fd/{self.dir_fd(head)}/{tail}"

    def dir_fd(self, rel: str) -> int:
        fd = self.fds.get(rel)
        if fd is not None:
            return fd
        parts = rel.split("/")
        i = len(parts)  # the longest prefix already open, or short enough for one call
        while i > 0 and "/".join(parts[:i]) not in self.fds and \
                len(os.fsencode(os.path.join(self.root, *parts[:i]))) >= self.LIMIT:
            i -= 1
        key = "/".join(parts[:i])
        fd = self.fds.get(key, -1)
        if fd < 0:
            fd = os.open(os.path.join(self.root, *parts[:i]),
                         os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self.fds[key] = fd
        for j in range(i, len(parts)):
            fd = os.open(parts[j], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            self.fds["/".join(parts[: j + 1])] = fd
        return fd

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def walk_rel(root: str, reach: Reach) -> list[str]:
    """"." and every relative path below ``root`` (directories first, sorted), any depth,
    without following symlinks; no recursion."""
    out = ["."]
    stack = ["."]
    while stack:
        rel = stack.pop()
        names = sorted(os.listdir(reach(rel)))
        for n in names:
            child = n if rel == "." else f"{rel}/{n}"
            out.append(child)
        for n in reversed(names):
            child = n if rel == "." else f"{rel}/{n}"
            if stat.S_ISDIR(os.lstat(reach(child)).st_mode):
                stack.append(child)
    return out


# --------------------------------------------------------------------------
# operations

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src: str, dst: str, flags: int) -> None:
    fn = getattr(_libc, "renameat2", None)
    s, d = os.fsencode(src), os.fsencode(dst)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                       ctypes.c_char_p, ctypes.c_uint]
        r = fn(AT_FDCWD, s, AT_FDCWD, d, flags)
    else:  # old libc: raw syscall (x86_64 number)
        r = _libc.syscall(SYS_renameat2_x86_64, AT_FDCWD, s, AT_FDCWD, d,
                          ctypes.c_uint(flags))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst)


Outcome = tuple  # ("ok", data) | ("err", "ENOENT")


class Op:
    """Base class: ``run(root)`` performs the operation below ``root``."""

    def run(self, c: Ctx) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def paths(self) -> tuple[str, ...]:
        return ()


class Ctx:
    """Per-mount execution context: the mount root, the open fd slots, and (during one
    operation) the Reach that resolves its paths."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fds: dict[int, int] = {}
        self.reach = Reach(root)

    def close_all(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def _p(c: Ctx, rel: str) -> str:
    return c.reach(rel)


@dataclasses.dataclass(frozen=True)
class Write(Op):
    """open(O_WRONLY|O_NONBLOCK|mode flags) + pwrite/write."""
    path: str
    mode: str  # "trunc" | "create" | "append" | "excl" | "existing"
    offset: int
    data: bytes | Blob

    def run(self, c: Ctx) -> Any:
        flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
        flags |= {
            "trunc": os.O_CREAT | os.O_TRUNC,
            "create": os.O_CREAT,
            "append": os.O_APPEND,
            "excl": os.O_CREAT | os.O_EXCL,
            "existing": 0,
        }[self.mode]
        fd = os.open(_p(c, self.path), flags, 0o644)
        try:
            if self.mode == "append":
                n = os.write(fd, as_bytes(self.data))
            else:
                n = os.pwrite(fd, as_bytes(self.data), self.offset)
            st = os.fstat(fd)
            return (n, st.st_size)
        finally:
            os.close(fd)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def __repr__(self) -> str:
        return f"Write({self.path!r}, {self.mode!r}, offset={self.offset}, data={self.data!r})"


@dataclasses.dataclass(frozen=True)
class Blob:
    """A large deterministic data block (keeps reprs of failing examples short)."""
    size: int
    seed: int

    def __bytes__(self) -> bytes:
        return bytes((i * 13 + self.seed) % 256 for i in range(self.size))


def as_bytes(data: bytes | Blob) -> bytes:
    return bytes(data)


@dataclasses.dataclass(frozen=True)
class Read(Op):
    path: str

    def run(self, c: Ctx) -> Any:
        fd = os.open(_p(c, self.path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            chunks = []
            while True:
                b = os.read(fd, 1 << 16)
                if not b:
                    break
                chunks.append(b)
            return _short(b"".join(chunks))
        finally:
            os.close(fd)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class Truncate(Op):
    path: str
    size: int

    def run(self, c: Ctx) -> Any:
        os.truncate(_p(c, self.path), self.size)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class Mkdir(Op):
    path: str
    mode: int

    def run(self, c: Ctx) -> Any:
        old = os.umask(0)
        try:
            os.mkdir(_p(c, self.path), self.mode)
        finally:
            os.umask(old)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def __repr__(self) -> str:
        return f"Mkdir({self.path!r}, mode={self.mode:#o})"


@dataclasses.dataclass(frozen=True)
class MkdirP(Op):
    """``mkdir -p``: each missing component in turn (a chain deeper than PATH_MAX)."""
    path: str
    mode: int = 0o755

    def run(self, c: Ctx) -> Any:
        old = os.umask(0)
        try:
            parts = self.path.split("/")
            for i in range(1, len(parts) + 1):
                try:
                    os.mkdir(_p(c, "/".join(parts[:i])), self.mode)
                except FileExistsError:
                    if not os.path.isdir(_p(c, "/".join(parts[:i]))):
                        raise
        finally:
            os.umask(old)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def __repr__(self) -> str:
        return f"MkdirP({short_path(self.path)!r}, mode={self.mode:#o})"


def short_path(path: str) -> str:
    """A deep path as failure reports show it: the deep chains by name."""
    for name, chain in (("DEEP_20K", DEEP_20K), ("DEEP_4K", DEEP_4K)):
        path = path.replace(chain, f"<{name}>")
    return path


@dataclasses.dataclass(frozen=True)
class Rmdir(Op):
    path: str

    def run(self, c: Ctx) -> Any:
        os.rmdir(_p(c, self.path))

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class Unlink(Op):
    path: str

    def run(self, c: Ctx) -> Any:
        os.unlink(_p(c, self.path))

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class RmTree(Op):
    """``rm -r``: depth-first, sorted, stops at (and reports) the first error."""
    path: str

    def run(self, c: Ctx) -> Any:
        # (directory, its remaining names), deepest last: no recursion per level
        st = os.lstat(_p(c, self.path))
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(_p(c, self.path))
            return
        stack = [(self.path, sorted(os.listdir(_p(c, self.path))))]
        while stack:
            rel, names = stack[-1]
            if not names:
                stack.pop()
                os.rmdir(_p(c, rel))
                continue
            child = f"{rel}/{names.pop(0)}"
            if stat.S_ISDIR(os.lstat(_p(c, child)).st_mode):
                stack.append((child, sorted(os.listdir(_p(c, child)))))
            else:
                os.unlink(_p(c, child))

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class Rename(Op):
    src: str
    dst: str
    flags: int = 0  # 0 | RENAME_NOREPLACE | RENAME_EXCHANGE

    def run(self, c: Ctx) -> Any:
        if self.flags == 0:
            os.rename(_p(c, self.src), _p(c, self.dst))
        else:
            renameat2(_p(c, self.src), _p(c, self.dst), self.flags)

    def paths(self) -> tuple[str, ...]:
        return (self.src, self.dst)

    def __repr__(self) -> str:
        f = {0: "", RENAME_NOREPLACE: ", NOREPLACE", RENAME_EXCHANGE: ", EXCHANGE"}
        return f"Rename({self.src!r}, {self.dst!r}{f.get(self.flags, self.flags)})"


@dataclasses.dataclass(frozen=True)
class Symlink(Op):
    target: str
    path: str

    def run(self, c: Ctx) -> Any:
        os.symlink(self.target, _p(c, self.path))

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class Link(Op):
    src: str
    dst: str

    def run(self, c: Ctx) -> Any:
        os.link(_p(c, self.src), _p(c, self.dst), follow_symlinks=False)

    def paths(self) -> tuple[str, ...]:
        return (self.src, self.dst)


@dataclasses.dataclass(frozen=True)
class Chmod(Op):
    path: str
    mode: int

    def run(self, c: Ctx) -> Any:
        os.chmod(_p(c, self.path), self.mode)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)

    def __repr__(self) -> str:
        return f"Chmod({self.path!r}, {self.mode:#o})"


@dataclasses.dataclass(frozen=True)
class Chown(Op):
    path: str
    uid: int
    gid: int
    follow: bool = True

    def run(self, c: Ctx) -> Any:
        os.chown(_p(c, self.path), self.uid, self.gid,
                 follow_symlinks=self.follow)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class Utime(Op):
    path: str
    atime_ns: int
    mtime_ns: int
    follow: bool = True

    def run(self, c: Ctx) -> Any:
        os.utime(_p(c, self.path), ns=(self.atime_ns, self.mtime_ns),
                 follow_symlinks=self.follow)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class SetXattr(Op):
    path: str
    name: str
    value: bytes
    flags: int = 0  # 0 | os.XATTR_CREATE | os.XATTR_REPLACE

    def run(self, c: Ctx) -> Any:
        os.setxattr(_p(c, self.path), self.name, self.value, self.flags)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class RemoveXattr(Op):
    path: str
    name: str

    def run(self, c: Ctx) -> Any:
        os.removexattr(_p(c, self.path), self.name)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class GetXattr(Op):
    path: str
    name: str

    def run(self, c: Ctx) -> Any:
        return os.getxattr(_p(c, self.path), self.name)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class Mkfifo(Op):
    path: str

    def run(self, c: Ctx) -> Any:
        old = os.umask(0)
        try:
            os.mkfifo(_p(c, self.path), 0o640)
        finally:
            os.umask(old)

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class MknodWhiteout(Op):
    """mknod(path, S_IFCHR, 0/0): a user must not be able to create a whiteout."""
    path: str

    def run(self, c: Ctx) -> Any:
        os.mknod(_p(c, self.path), 0o600 | stat.S_IFCHR, os.makedev(0, 0))

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


# ---- operations on open file descriptors (held across other operations)

_OPEN_FLAGS = {
    "r": os.O_RDONLY,
    "rw": os.O_RDWR,
    "w-creat": os.O_WRONLY | os.O_CREAT,
}


@dataclasses.dataclass(frozen=True)
class OpenFd(Op):
    """Open ``path`` into fd slot ``slot`` (closing what the slot held)."""
    slot: int
    path: str
    mode: str  # key of _OPEN_FLAGS

    def run(self, c: Ctx) -> Any:
        old = c.fds.pop(self.slot, None)
        if old is not None:
            os.close(old)
        fd = os.open(_p(c, self.path),
                     _OPEN_FLAGS[self.mode] | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        c.fds[self.slot] = fd

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


class _FdOp(Op):
    slot: int

    def fd(self, c: Ctx) -> int | None:
        return c.fds.get(self.slot)


@dataclasses.dataclass(frozen=True)
class FdRead(_FdOp):
    slot: int

    def run(self, c: Ctx) -> Any:
        fd = self.fd(c)
        if fd is None:
            return "no fd"
        return _short(os.pread(fd, 1 << 20, 0))


@dataclasses.dataclass(frozen=True)
class FdWrite(_FdOp):
    slot: int
    offset: int
    data: bytes | Blob

    def run(self, c: Ctx) -> Any:
        fd = self.fd(c)
        if fd is None:
            return "no fd"
        return os.pwrite(fd, as_bytes(self.data), self.offset)

    def __repr__(self) -> str:
        return f"FdWrite(slot={self.slot}, offset={self.offset}, data={self.data!r})"


@dataclasses.dataclass(frozen=True)
class FdTruncate(_FdOp):
    slot: int
    size: int

    def run(self, c: Ctx) -> Any:
        fd = self.fd(c)
        if fd is None:
            return "no fd"
        os.ftruncate(fd, self.size)


@dataclasses.dataclass(frozen=True)
class FdChmod(_FdOp):
    slot: int
    mode: int

    def run(self, c: Ctx) -> Any:
        fd = self.fd(c)
        if fd is None:
            return "no fd"
        os.fchmod(fd, self.mode)


@dataclasses.dataclass(frozen=True)
class FdFallocate(_FdOp):
    """fallocate(2) of a held fd: mode 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE[|KEEP_SIZE].

    The outcome is the file's size and its bytes (a hash) after it: block counts differ
    between an upper of its own and one behind FUSE, contents and sizes may not."""

    slot: int
    mode: int
    offset: int
    length: int

    def run(self, c: Ctx) -> Any:
        fd = self.fd(c)
        if fd is None:
            return "no fd"
        fallocate(fd, self.mode, self.offset, self.length)
        st = os.fstat(fd)
        readable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY
        return {"size": st.st_size,
                "data": hashlib.sha256(os.pread(fd, st.st_size, 0)).hexdigest()[:16]
                if readable else None}


@dataclasses.dataclass(frozen=True)
class FdStat(_FdOp):
    slot: int

    def run(self, c: Ctx) -> Any:
        fd = self.fd(c)
        if fd is None:
            return "no fd"
        st = os.fstat(fd)
        return {"type": _type(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
                "uid": st.st_uid, "gid": st.st_gid,
                "size": st.st_size if stat.S_ISREG(st.st_mode) else None,
                "nlink": st.st_nlink if stat.S_ISREG(st.st_mode) else None}


@dataclasses.dataclass(frozen=True)
class CloseFd(_FdOp):
    slot: int

    def run(self, c: Ctx) -> Any:
        fd = c.fds.pop(self.slot, None)
        if fd is None:
            return "no fd"
        os.close(fd)


@dataclasses.dataclass(frozen=True)
class ListDir(Op):
    path: str

    def run(self, c: Ctx) -> Any:
        return sorted(os.listdir(_p(c, self.path)))

    def paths(self) -> tuple[str, ...]:
        return (self.path,)


@dataclasses.dataclass(frozen=True)
class AsUser(Op):
    """Run a path-based ``op`` in a forked child with uid/gid (no groups),
    so that permission checks and the owner of new files are exercised."""
    uid: int
    gid: int
    op: Op

    def run(self, c: Ctx) -> Any:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never return into pytest
            code = 0
            try:
                os.close(r)
                os.setgroups([])
                os.setresgid(self.gid, self.gid, self.gid)
                os.setresuid(self.uid, self.uid, self.uid)
                child_ctx = Ctx(c.root)
                out = repr(apply_op(child_ctx, self.op)).encode()
                while out:
                    out = out[os.write(w, out):]
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        chunks = []
        try:
            while True:
                b = os.read(r, 1 << 16)
                if not b:
                    break
                chunks.append(b)
        finally:
            os.close(r)
            _, status = os.waitpid(pid, 0)
        if not chunks or os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"AsUser child failed: status {status}")
        outcome = ast.literal_eval(b"".join(chunks).decode())
        if outcome[0] == "err":
            # re-raise so that apply_op() reports the errno like any other op
            num = getattr(errno, outcome[1], None)
            if num is None:
                raise RuntimeError(f"AsUser: unknown errno {outcome[1]}")
            raise OSError(num, outcome[1])
        return outcome[1]

    def paths(self) -> tuple[str, ...]:
        return self.op.paths()


@dataclasses.dataclass(frozen=True)
class DropCaches(Op):
    """Drop the kernel's dentry and inode caches (FUSE gets FORGETs and must
    answer fresh LOOKUPs afterwards).  Affects the whole machine, harmlessly."""

    def run(self, c: Ctx) -> Any:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")


@dataclasses.dataclass(frozen=True)
class Check(Op):
    """Compare complete snapshots of both mounts at this point."""

    def run(self, c: Ctx) -> Any:
        return None


def _ename(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def _short(b: bytes) -> Any:
    if len(b) <= 64:
        return b
    return (len(b), hashlib.sha256(b).hexdigest()[:16])


def apply_op(c: Ctx, op: Op) -> Outcome:
    """Run ``op`` in ``c``; return ``("ok", result)`` or ``("err", ENAME)``."""
    try:
        return ("ok", op.run(c))
    except OSError as e:
        if e.errno is None:
            raise
        return ("err", _ename(e))
    finally:
        c.reach.close()  # the tree may change: resolve afresh for the next operation


def same_size_truncate(c: Ctx, op: Op) -> tuple[str, int] | None:
    """(its path, its mtime) if ``op`` truncates a regular file to the size it has, else None.

    The one place where sdeefs times a change differently from kernel overlayfs, on
    purpose: with the writeback cache the FUSE kernel keeps a regular file's mtime
    itself and times a truncate(2) only when the size changes, and sdeefs follows it
    (else its upper would hold a time its view never shows), where kernel overlayfs
    hands the truncate to its upper filesystem, which times it (ext4 and tmpfs on 6.x).
    """
    inner = op.op if isinstance(op, AsUser) else op
    if not isinstance(inner, Truncate):
        return None
    try:
        st = os.stat(_p(c, inner.path))
    except OSError:
        return None
    finally:
        c.reach.close()
    if not stat.S_ISREG(st.st_mode) or st.st_size != inner.size:
        return None
    return inner.path, st.st_mtime_ns


def keep_mtime(c: Ctx, path: str, mtime_ns: int) -> None:
    """Set the mtime of ``path`` back to ``mtime_ns`` (see ``same_size_truncate``)."""
    try:
        target = _p(c, path)
        os.utime(target, ns=(os.stat(target).st_atime_ns, mtime_ns))
    finally:
        c.reach.close()


# --------------------------------------------------------------------------
# snapshots

def _mtime_class(ns: int) -> Any:
    """Explicitly set (old) times compare exactly; fresh ones only as "now"."""
    if ns < EXPLICIT_TIME_LIMIT * 1_000_000_000:
        return ns
    return "now"


def _type(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISCHR, "chardev"), (stat.S_ISBLK, "blockdev"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return f"?{mode:o}"


def _xattrs(p: str) -> dict[str, bytes] | str:
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError as e:
        return "listxattr:" + _ename(e)
    out: dict[str, Any] = {}
    for n in sorted(names):
        if n.startswith("trusted.overlay."):
            continue
        try:
            out[n] = os.getxattr(p, n, follow_symlinks=False)
        except OSError as e:
            out[n] = "getxattr:" + _ename(e)
    return out


SYS_getdents64_x86_64 = 217
_DT_NAMES = {0: "unknown", 1: "fifo", 2: "chardev", 4: "dir", 6: "blockdev",
             8: "file", 10: "symlink", 12: "socket", 14: "whiteout"}


def raw_readdir(path: str) -> list[tuple[str, str]]:
    """(name, d_type) of every getdents64 entry, "." and ".." included, in the
    order the filesystem returns them (os.listdir/scandir hide the dots)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buf = ctypes.create_string_buffer(1 << 16)
        out: list[tuple[str, str]] = []
        while True:
            n = _libc.syscall(SYS_getdents64_x86_64, fd, buf, ctypes.c_uint(len(buf)))
            if n < 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e), path)
            if n == 0:
                return out
            raw = buf.raw[:n]
            pos = 0
            while pos < n:
                reclen = int.from_bytes(raw[pos + 16:pos + 18], "little")
                dtype = raw[pos + 18]
                name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
                out.append((os.fsdecode(name), _DT_NAMES.get(dtype, str(dtype))))
                pos += reclen
    finally:
        os.close(fd)


def lower_inodes(lower: str) -> dict[int, str]:
    """st_ino -> relative path (first in sorted order) of every lower entry."""
    out: dict[int, str] = {}
    reach = Reach(lower)
    try:
        for rel in walk_rel(lower, reach):
            out.setdefault(os.lstat(reach(rel)).st_ino, rel)
    finally:
        reach.close()
    return out


def snapshot(root: str, exact_times: bool = False,
             lower_inos: dict[int, str] | None = None) -> dict[str, dict[str, Any]]:
    """Map each relative path ("." for the root) to its comparable attributes.

    ``exact_times`` records mtime/ctime/ino exactly (used to prove the lower
    layer is never modified).  With ``lower_inos`` an ``ino`` field records
    which inode each entry reports, comparably across mounts: ``lower:P`` if it
    is the inode number of lower entry P (kernel overlayfs keeps it across
    copy-up), else ``same-as:Q`` with Q the first path (traversal order) that
    reported the same inode number.
    """
    snap: dict[str, dict[str, Any]] = {}
    seen_inos: dict[int, str] = {}
    reach = Reach(root)  # the tree may be deeper than PATH_MAX
    listed: list[tuple[str, dict[str, str]]] = []  # directories' d_types, checked at the end

    def visit(rel: str) -> list[str]:
        """Record ``rel``; return its children to visit (in order)."""
        try:
            p = reach(rel)
            st = os.lstat(p)
        except OSError as e:
            snap[rel] = {"lstat": _ename(e)}
            return []
        t = _type(st.st_mode)
        info: dict[str, Any] = {
            "type": t,
            "mode": oct(stat.S_IMODE(st.st_mode)),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "xattrs": _xattrs(p),
        }
        if exact_times:
            info["mtime"] = st.st_mtime_ns
            info["ctime"] = st.st_ctime_ns
            info["ino"] = st.st_ino
            info["nlink"] = st.st_nlink
        else:
            info["mtime"] = _mtime_class(st.st_mtime_ns)
        if lower_inos is not None:
            if st.st_ino in lower_inos:
                info["ino"] = "lower:" + lower_inos[st.st_ino]
            else:
                info["ino"] = "same-as:" + seen_inos.setdefault(st.st_ino, rel)
        if t == "file":
            info["nlink"] = st.st_nlink
            info["size"] = st.st_size
            try:
                with open(p, "rb") as f:
                    info["content"] = _short(f.read())
            except OSError as e:
                info["content"] = "read:" + _ename(e)
        elif t == "symlink":
            info["size"] = st.st_size
            try:
                info["target"] = os.readlink(p)
            except OSError as e:
                info["target"] = "readlink:" + _ename(e)
        elif t in ("chardev", "blockdev"):
            info["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        snap[rel] = info
        if t != "dir":
            return []
        try:
            names = os.listdir(p)
        except OSError as e:
            info["listing"] = "listdir:" + _ename(e)
            return []
        info["listing"] = sorted(names)
        try:
            raw = raw_readdir(p)
        except OSError as e:
            info["readdir"] = "getdents64:" + _ename(e)
        else:
            # the dots must be there; d_type must agree with lstat (or be
            # DT_UNKNOWN, which is always allowed)
            info["dots"] = sorted(n for n, _ in raw if n in (".", ".."))
            info["readdir_names"] = sorted(n for n, _ in raw if n not in (".", ".."))
            listed.append((rel, {n: t for n, t in sorted(raw) if n not in (".", "..")}))
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            info["duplicate_names"] = dups
        return [n if rel == "." else f"{rel}/{n}" for n in sorted(set(names))]

    try:
        stack = ["."]  # depth first, in sorted order, as a recursion would go
        while stack:
            stack.extend(reversed(visit(stack.pop())))
    finally:
        reach.close()
    for rel, dtypes in listed:
        for n, t in dtypes.items():
            child = snap.get(n if rel == "." else f"{rel}/{n}", {})
            if t != "unknown" and child.get("type") not in (None, t):
                snap[rel].setdefault("d_type_wrong", {})[n] = f"{t} but lstat: {child['type']}"
    return snap


#: fields left out of every comparison, e.g. SDEEFS_DIFF_IGNORE=ino,dir.mtime
#: to look for further mismatches behind a known one ("TYPE.FIELD" restricts
#: it to entries of that type: file, dir, symlink, fifo)
IGNORED_FIELDS = frozenset(
    f.strip() for f in os.environ.get("SDEEFS_DIFF_IGNORE", "").split(",") if f.strip())


def diff_snapshots(a: dict, b: dict, name_a: str = "a", name_b: str = "b",
                   ignore: frozenset[str] = IGNORED_FIELDS) -> list[str]:
    """``path: field a != b`` lines (empty list == equal)."""
    out: list[str] = []
    for path in sorted(set(a) | set(b)):
        shown = short_path(path)
        if path not in b:
            out.append(f"{shown}: only in {name_a} ({_fmt(a[path])})")
            continue
        if path not in a:
            out.append(f"{shown}: only in {name_b} ({_fmt(b[path])})")
            continue
        ea, eb = a[path], b[path]
        kind = ea.get("type", eb.get("type"))
        for field in sorted((set(ea) | set(eb)) - ignore):
            if f"{kind}.{field}" in ignore:
                continue
            va, vb = ea.get(field, "<absent>"), eb.get(field, "<absent>")
            if va != vb:
                out.append(short_path(f"{path}: {field} {name_a}={va!r} != {name_b}={vb!r}"))
    return out


def _fmt(info: dict) -> str:
    keys = ("type", "mode", "uid", "gid", "size", "target")
    return " ".join(f"{k}={info[k]}" for k in keys if k in info)


def check_overlay_upper_format(upper: str) -> list[str]:
    """Problems that make ``upper`` not a kernel-overlayfs-format upper dir."""
    problems = []
    reach = Reach(upper)  # the upper may be deeper than PATH_MAX
    try:
        for rel in walk_rel(upper, reach)[1:]:
            st = os.lstat(reach(rel))
            shown = short_path(rel)
            if rel.rpartition("/")[2].startswith(".wh."):
                problems.append(f"{shown}: aufs-style whiteout name")
            if stat.S_ISCHR(st.st_mode) and st.st_rdev != 0:
                problems.append(f"{shown}: char device {os.major(st.st_rdev)}/"
                                f"{os.minor(st.st_rdev)} (whiteouts must be 0/0)")
            if stat.S_ISBLK(st.st_mode):
                problems.append(f"{shown}: block device in upper")
    finally:
        reach.close()
    return problems


# --------------------------------------------------------------------------
# mounts

def mounted_under(prefix: str) -> list[str]:
    """Mount points (from /proc/mounts) at or below ``prefix``."""
    prefix = os.path.realpath(prefix)
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            mp = line.split()[1].encode().decode("unicode_escape")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


def is_mounted(mnt: str) -> bool:
    return os.path.realpath(mnt) in mounted_under(mnt)


def _run(cmd: list[str], timeout: float = MOUNT_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


def force_unmount(mnt: str) -> None:
    """Best-effort unmount used in cleanup: umount, then umount -l."""
    if not is_mounted(mnt):
        return
    for cmd in (["umount", mnt], ["umount", "-l", mnt]):
        with contextlib.suppress(subprocess.TimeoutExpired):
            _run(cmd, timeout=30)
        if not is_mounted(mnt):
            return


class MountError(Exception):
    pass


class Kernel:
    """Kernel overlayfs; ``aux`` is the workdir."""

    name = "kernel"
    is_fuse = False
    times_same_size_truncate = True  # its upper filesystem does (see same_size_truncate)

    options = "redirect_dir=on,index=off,metacopy=off,xino=off"

    def mount(self, lower: str, upper: str, aux: str, mnt: str) -> None:
        opts = f"lowerdir={lower},upperdir={upper},workdir={aux},{self.options}"
        r = _run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt])
        if r.returncode != 0 or not is_mounted(mnt):
            raise MountError(f"kernel overlay mount failed ({r.returncode}): "
                             f"{r.stderr.strip()} {r.stdout.strip()}")

    def umount(self, mnt: str) -> None:
        r = _run(["umount", mnt])
        if r.returncode != 0 or is_mounted(mnt):
            raise MountError(f"umount {mnt} failed ({r.returncode}): {r.stderr.strip()}")


class Sdeefs:
    """sdeefs through its command line; ``aux`` is the state directory."""

    name = "sdeefs"
    is_fuse = True
    times_same_size_truncate = False  # the writeback cache's rule (see same_size_truncate)

    def _cmd(self, *args: str) -> list[str]:
        return [SDEEFS_PYTHON, "-m", "sdeefs", *args]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = SDEEFS_SRC + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def _run_cli(self, cmd: list[str]) -> tuple[int, str, str]:
        """Run the CLI with its output in files, not pipes: a daemon that keeps
        an inherited pipe open must not make us wait forever."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                      timeout=MOUNT_TIMEOUT, env=self._env(), cwd="/",
                                      check=False)
            except subprocess.TimeoutExpired as e:
                raise MountError(f"{' '.join(cmd)}: did not return within "
                                 f"{MOUNT_TIMEOUT}s") from e
            out.seek(0)
            err.seek(0)
            return (proc.returncode, out.read().decode(errors="replace").strip(),
                    err.read().decode(errors="replace").strip())

    def __init__(self) -> None:
        self.states: dict[str, str] = {}  # mountpoint -> state dir

    extra: tuple[str, ...] = ()

    def mount(self, lower: str, upper: str, aux: str, mnt: str) -> None:
        self.states[mnt] = aux
        cmd = self._cmd("mount", "--engine", SDEEFS_ENGINE, "--lower", lower,
                        "--upper", upper, "--state", aux, *self.extra, mnt)
        rc, out, err = self._run_cli(cmd)
        if rc != 0 or not is_mounted(mnt):
            raise MountError(f"sdeefs mount failed (exit {rc}, mounted={is_mounted(mnt)}): "
                             f"{' '.join(cmd)}\nstderr: {err[-3000:]}\nstdout: {out[-1000:]}"
                             + self.diagnostics(aux))

    def umount(self, mnt: str) -> None:
        cmd = self._cmd("umount", mnt)
        rc, out, err = self._run_cli(cmd)
        if rc != 0 or is_mounted(mnt):
            state = self.states.get(mnt)
            diag = self.diagnostics(state) if state else ""
            if state:
                self.wait_daemon(state, 60)  # let it finish before the dirs are removed
            raise MountError(f"sdeefs umount failed (exit {rc}, still mounted="
                             f"{is_mounted(mnt)}): {' '.join(cmd)}\nstderr: {err[-2000:]}"
                             + diag)

    @staticmethod
    def check(upper: str, state: str) -> list[str]:
        """``sdeefs check`` of an unmounted upper: format, journal, replay == upper."""
        from sdeefs.check import run_checks

        return [short_path(line) for line in run_checks(upper, state)]

    @staticmethod
    def daemon_pid(state: str) -> int | None:
        """The pid in STATE/lock while somebody holds the lock (the daemon)."""
        return mount_daemon_pid(state)

    def wait_daemon(self, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.daemon_pid(state) is not None and time.monotonic() < deadline:
            time.sleep(0.2)

    def diagnostics(self, state: str) -> str:
        """Daemon log tail and, if it still runs, where its threads are blocked."""
        out = []
        with contextlib.suppress(OSError), open(os.path.join(state, "daemon.log"),
                                                errors="replace") as f:
            out.append("daemon.log (tail):\n" + "".join(f.readlines()[-40:]))
        pid = self.daemon_pid(state)
        if pid is not None:
            out.append(f"daemon pid {pid} still running")
            with contextlib.suppress(OSError):
                for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
                    info = []
                    for name in ("comm", "wchan", "stack"):
                        with contextlib.suppress(OSError), \
                                open(f"/proc/{pid}/task/{tid}/{name}") as f:
                            info.append(f"{name}: {f.read().strip()}")
                    out.append(f"  thread {tid}: " + " | ".join(info))
        return ("\n" + "\n".join(out)) if out else ""


class KernelUserXattr(Kernel):
    """Kernel overlayfs with ``userxattr`` (as a user namespace mounts it): user.overlay.*
    xattrs, and no redirects (the kernel refuses redirect_dir=on with userxattr and
    implies redirect_dir=nofollow)."""

    options = "userxattr,index=off,metacopy=off,xino=off"


class SdeefsUserXattr(Sdeefs):
    """sdeefs writing user.overlay.* (``--xattr-namespace user``)."""

    extra = ("--xattr-namespace", "user")


class Hung(Exception):
    pass


def call_with_watchdog(fn: Callable[[], Any], mnt: str, is_fuse: bool,
                       what: str, timeout: float = OP_TIMEOUT) -> Any:
    """Run ``fn``; if it blocks longer than ``timeout`` on a FUSE mount, abort
    the FUSE connection (``umount -f``) so the blocked syscall returns, then
    raise ``Hung``."""
    if not is_fuse:
        return fn()
    fired = threading.Event()

    def abort() -> None:
        fired.set()
        with contextlib.suppress(Exception):
            _run(["umount", "-f", mnt], timeout=30)

    timer = threading.Timer(timeout, abort)
    timer.daemon = True
    timer.start()
    try:
        result = fn()
    except BaseException:
        if fired.is_set():
            raise Hung(f"{what}: no answer within {timeout}s; FUSE connection "
                       f"aborted with umount -f {mnt}") from None
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise Hung(f"{what}: no answer within {timeout}s; FUSE connection "
                   f"aborted with umount -f {mnt}")
    return result


#: every Workspace root created by this process (for the final leak check)
WORKSPACE_ROOTS: list[str] = []


class Workspace:
    """Temporary directories + mounts of one example.

    ``close()`` unmounts everything it mounted (``umount`` then ``umount -l``)
    and only removes the temporary directory once nothing is mounted below
    it any more (so ``rmtree`` can never reach into a lower layer).
    """

    def __init__(self, base: str | None = None) -> None:
        self.root = tempfile.mkdtemp(prefix="sdeefs-diff-", dir=base)
        WORKSPACE_ROOTS.append(self.root)
        os.chmod(self.root, 0o755)
        self.mounts: list[tuple[Any, str]] = []

    def dir(self, name: str) -> str:
        p = os.path.join(self.root, name)
        os.mkdir(p)
        return p

    def mount(self, backend: Any, lower: str, upper: str, aux: str, mnt: str) -> None:
        self.mounts.append((backend, mnt))
        backend.mount(lower, upper, aux, mnt)

    def umount(self, backend: Any, mnt: str) -> None:
        backend.umount(mnt)
        self.mounts = [(b, m) for b, m in self.mounts if m != mnt]

    def close(self) -> list[str]:
        """Returns a list of cleanup problems (empty if clean)."""
        problems = []
        for backend, mnt in reversed(self.mounts):
            if is_mounted(mnt):
                try:
                    backend.umount(mnt)
                except Exception as e:  # noqa: BLE001
                    problems.append(f"cleanup: {e}")
                force_unmount(mnt)
        self.mounts = []
        # anything else below our root (should never happen)
        for mp in sorted(mounted_under(self.root), key=len, reverse=True):
            force_unmount(mp)
        left = mounted_under(self.root)
        if left:
            problems.append(f"mounts left behind, NOT removing {self.root}: {left}")
        else:
            with contextlib.suppress(OSError):
                rmtree(self.root)  # fd by fd: the uppers may be deeper than shutil goes
        return problems


def log(msg: str) -> None:
    if os.environ.get("SDEEFS_DIFF_VERBOSE"):
        print(msg, file=sys.stderr, flush=True)

