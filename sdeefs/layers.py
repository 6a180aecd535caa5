"""The layer root: a user's upper and work directories, reached safely, changed through the journal.

Shared core (login node, compute nodes, tools).  Layer paths are ``upper/...`` and
``work/...`` (see ``sdeefs.journal``): every journal record names one, and every
place that reads or changes a layer (the FUSE daemons, crash recovery, replicas,
``sdeefs check``) goes through a :class:`LayerRoot`, which

* resolves every path with ``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`` in
  pieces below PATH_MAX (``sysio.openat2_beneath``): the upper is user-owned in
  the launcher's set-up, so a symlink planted there must never lead a root
  process elsewhere, and trees may be deeper than PATH_MAX;
* journals every mutation before performing it (record, syscall, then Done, or
  Abort if it failed: the write-ahead rule of ``sdeefs.journal``).

Every method is synchronous; callers decide where it runs (docs/threading.md).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

import attrs

from . import records as rec
from .journal import Journal, NullJournal
from .sysio import (
    chmod_at,
    fallocate,
    fd_path,
    open_regular_at,
    openat2_beneath,
    renameat2,
)

AnyJournal = Journal | NullJournal


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


def split(path: bytes) -> tuple[bytes, bytes]:
    head, _, tail = path.rpartition(b"/")
    return head, tail


def open_layer_root(upper: str | bytes, work: str | bytes,
                    journal: AnyJournal | None = None) -> LayerRoot:
    """The layer root of the directories ``upper`` and ``work`` (unjournaled unless a
    ``journal`` is given).  Close it, or use it as a context manager."""
    upper_fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        work_fd = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        os.close(upper_fd)
        raise
    return LayerRoot(upper_fd, work_fd, journal if journal is not None else NullJournal())


@attrs.define(eq=False)
class LayerRoot:
    """The upper and work directories: reached only by safe resolution, changed via the journal.

    Layer paths are ``upper/...`` and ``work/...`` (see ``sdeefs.journal``).
    """

    upper_fd: int
    work_fd: int
    journal: AnyJournal
    generation: int = 0  # counts namespace mutations
    _mount_fd: int = -1

    def __enter__(self) -> LayerRoot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _root(self, path: bytes) -> tuple[int, bytes]:
        top, _, rest = path.partition(b"/")
        if top == b"upper":
            return self.upper_fd, rest
        if top == b"work":
            return self.work_fd, rest
        raise OSError(errno.EINVAL, f"not a layer path: {path!r}")

    def close(self) -> None:
        for fd in (self.upper_fd, self.work_fd, self._mount_fd):
            if fd >= 0:
                os.close(fd)
        self.upper_fd = self.work_fd = self._mount_fd = -1

    def mount_fd(self) -> int:
        """A readable fd on the upper's filesystem, for open_by_handle_at (kept open)."""
        if self._mount_fd < 0:
            self._mount_fd = os.open(fd_path(self.upper_fd), os.O_RDONLY | os.O_DIRECTORY
                                     | os.O_CLOEXEC)
        return self._mount_fd

    def open_dir(self, path: bytes) -> int:
        root, rest = self._root(path)
        return openat2_beneath(root, rest, os.O_PATH | os.O_DIRECTORY)

    def parent_fd(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the parent directory, final name); the caller closes the fd.

        For ``upper`` or ``work`` themselves: (fd of that directory, b"").
        """
        if b"/" not in path:
            return self.open_dir(path), b""
        head, name = split(path)
        return self.open_dir(head), name

    def lstat(self, path: bytes) -> os.stat_result | None:
        try:
            fd, name = self.parent_fd(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            if not name:
                return os.stat(fd)
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)

    def lstat_with_xattr(self, path: bytes, name: bytes
                         ) -> tuple[os.stat_result | None, bytes | None]:
        """lstat and one xattr of the same entry, resolving its directory once (lookups)."""
        try:
            fd, leaf = self.parent_fd(path)
        except (FileNotFoundError, NotADirectoryError):
            return None, None
        try:
            st = os.stat(leaf, dir_fd=fd, follow_symlinks=False) if leaf else os.stat(fd)
            try:
                value = os.getxattr(fd_path(fd, leaf or None), name, follow_symlinks=not leaf)
            except OSError:
                value = None
            return st, value
        except FileNotFoundError:
            return None, None
        finally:
            os.close(fd)

    def open(self, path: bytes, flags: int, mode: int = 0o600) -> int:
        root, rest = self._root(path)
        return openat2_beneath(root, rest, flags | os.O_NOFOLLOW) if not flags & os.O_CREAT \
            else self._create(path, flags, mode)

    def _create(self, path: bytes, flags: int, mode: int) -> int:
        fd, name = self.parent_fd(path)
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
        finally:
            os.close(fd)

    def readlink(self, path: bytes) -> bytes:
        fd, name = self.parent_fd(path)
        try:
            return os.readlink(name, dir_fd=fd)
        finally:
            os.close(fd)

    def listdir(self, path: bytes) -> list[bytes]:
        fd = self.open_dir(path)
        try:
            dfd = os.open(fd_path(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            os.close(fd)
        try:
            return [os.fsencode(n) for n in os.listdir(dfd)]
        finally:
            os.close(dfd)

    def getxattr(self, path: bytes, name: bytes) -> bytes:
        fd, leaf = self.parent_fd(path)
        try:
            return os.getxattr(fd_path(fd, leaf or None), name, follow_symlinks=not leaf)
        finally:
            os.close(fd)

    def listxattr(self, path: bytes) -> list[bytes]:
        fd, leaf = self.parent_fd(path)
        try:
            names = os.listxattr(fd_path(fd, leaf or None), follow_symlinks=not leaf)
        finally:
            os.close(fd)
        return [os.fsencode(n) for n in names]

    # -- journaled mutations: record first, then the syscall (no await in between) ---------

    def _do(self, record: rec.Record, action: Callable[[], None]) -> None:
        """Journal ``record``, perform it, then mark it Done (or Abort if it failed)."""
        self.generation += 1  # invalidates what CowFS cached about names
        seq = self.journal.append(record)
        try:
            action()
        except BaseException:
            if seq:
                self.journal.append(rec.Abort(seq))
            raise
        if seq:
            self.journal.append(rec.Done(seq))

    def _at(self, path: bytes, fn: Callable[[int, bytes], None]) -> None:
        fd, name = self.parent_fd(path)
        try:
            fn(fd, name)
        finally:
            os.close(fd)

    def mkdir(self, path: bytes, mode: int, uid: int, gid: int) -> None:
        def action() -> None:
            def at(fd: int, name: bytes) -> None:
                os.mkdir(name, mode & 0o7777, dir_fd=fd)
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
                chmod_at(fd, name, mode & 0o7777)
            self._at(path, at)
        self._do(rec.Mkdir(path, mode & 0o7777, uid, gid), action)

    def mknod(self, path: bytes, mode: int, uid: int, gid: int) -> None:
        """Empty regular file, fifo, socket, or (S_IFCHR) a whiteout; never a device."""
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR):
            raise OSError(errno.EPERM, "device nodes are refused by policy")
        perm = 0 if kind == stat.S_IFCHR else mode & 0o7777

        def action() -> None:
            def at(fd: int, name: bytes) -> None:
                os.mknod(name, kind | perm, 0, dir_fd=fd)
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
                if kind != stat.S_IFCHR:
                    chmod_at(fd, name, perm)
            self._at(path, at)
        self._do(rec.Mknod(path, kind | perm, uid, gid), action)

    def mkdev(self, path: bytes, mode: int, rdev: int, uid: int, gid: int) -> None:
        """A device node (S_IFCHR or S_IFBLK in ``mode``, not a 0/0 whiteout: ``mknod``)."""
        record = rec.Mkdev(path, stat.S_IFMT(mode) | (mode & 0o7777), rdev, uid, gid)

        def action() -> None:
            def at(fd: int, name: bytes) -> None:
                os.mknod(name, record.mode, rdev, dir_fd=fd)
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
                chmod_at(fd, name, mode & 0o7777)
            self._at(path, at)
        self._do(record, action)

    def symlink(self, path: bytes, target: bytes, uid: int, gid: int) -> None:
        def action() -> None:
            def at(fd: int, name: bytes) -> None:
                os.symlink(target, name, dir_fd=fd)
                os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
            self._at(path, at)
        self._do(rec.Symlink(path, target, uid, gid), action)

    def link(self, src: bytes, dst: bytes) -> None:
        def action() -> None:
            sfd, sname = self.parent_fd(src)
            try:
                self._at(dst, lambda fd, name: os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=fd,
                                                       follow_symlinks=False))
            finally:
                os.close(sfd)
        self._do(rec.Link(src, dst), action)

    def unlink(self, path: bytes) -> None:
        self._do(rec.Unlink(path), lambda: self._at(path, lambda fd, n: os.unlink(n, dir_fd=fd)))

    def rmdir(self, path: bytes) -> None:
        self._do(rec.Rmdir(path), lambda: self._at(path, lambda fd, n: os.rmdir(n, dir_fd=fd)))

    def rename(self, src: bytes, dst: bytes, flags: int = 0) -> None:
        st = self.lstat(src)
        src_ino = st.st_ino if st else 0

        def action() -> None:
            sfd, sname = self.parent_fd(src)
            try:
                self._at(dst, lambda fd, name: renameat2(sfd, sname, fd, name, flags))
            finally:
                os.close(sfd)
        self._do(rec.Rename(src, dst, flags, src_ino), action)

    def fallocate(self, record: rec.Fallocate, fd: int) -> None:
        """fallocate(2) of the file ``record`` names, through ``fd`` open on it for writing
        (blocking: a worker thread's call)."""
        self._do(record, lambda: fallocate(fd, record.mode, record.offset, record.length))

    def setattr(self, record: rec.Setattr) -> None:
        self._do(record, lambda: apply_setattr(self, record))

    def setxattr(self, path: bytes, name: bytes, value: bytes) -> None:
        def action() -> None:
            def at(fd: int, leaf: bytes) -> None:
                os.setxattr(fd_path(fd, leaf or None), name, value, follow_symlinks=not leaf)
            self._at(path, at)
        self._do(rec.Setxattr(path, name, value), action)

    def removexattr(self, path: bytes, name: bytes) -> None:
        def action() -> None:
            def at(fd: int, leaf: bytes) -> None:
                os.removexattr(fd_path(fd, leaf or None), name, follow_symlinks=not leaf)
            self._at(path, at)
        self._do(rec.Removexattr(path, name), action)


def apply_fallocate(fd: int, r: rec.Fallocate) -> None:
    """fallocate(2) of a Fallocate record on ``fd``; where the filesystem lacks the mode,
    the same bytes another way (zeros written, the size extended), only not sparse."""
    try:
        fallocate(fd, r.mode, r.offset, r.length)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    emulate_fallocate(fd, r)


def emulate_fallocate(fd: int, r: rec.Fallocate) -> None:
    """The bytes and size a Fallocate record leaves, by writing zeros and truncating."""
    size = os.fstat(fd).st_size
    end = r.offset + r.length
    if r.mode & (rec.FALLOC_PUNCH_HOLE | rec.FALLOC_ZERO_RANGE):
        stop = min(end, size) if r.mode & rec.FALLOC_KEEP_SIZE else end
        zeros = bytes(min(1 << 20, max(stop - r.offset, 0)))
        for start in range(r.offset, stop, len(zeros) or 1):
            os.pwrite(fd, zeros[:stop - start], start)
    elif not r.mode & rec.FALLOC_KEEP_SIZE and end > size:
        os.ftruncate(fd, end)


def apply_setattr(layers: LayerRoot, r: rec.Setattr) -> None:
    """Apply a Setattr record's fields in an order that keeps them all: size, owner, mode, times."""
    fd, name = layers.parent_fd(r.path)
    try:
        # ``name`` is empty for the layer directories themselves: then the /proc magic
        # link is the target and must be followed; otherwise nothing is followed.
        target, follow = fd_path(fd, name or None), not name
        if r.mask & rec.SET_SIZE:
            # (never a device node's open: sysio.open_regular_at; a truncate of anything
            # but a regular file is EINVAL, as the kernel's)
            try:
                wfd = open_regular_at(fd, name, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                raise OSError(errno.EINVAL, "truncate of a file that is not regular",
                              r.path[:64]) from None
            try:
                os.ftruncate(wfd, r.size)
            finally:
                os.close(wfd)
        if r.mask & rec.SET_OWNER:
            os.chown(target, r.uid, r.gid, follow_symlinks=follow)
        if r.mask & rec.SET_MODE:
            chmod_at(fd, name, r.mode)  # after chown, which clears set-id bits
        if r.mask & (rec.SET_ATIME | rec.SET_MTIME):
            st = os.stat(target, follow_symlinks=follow)
            atime = r.atime_ns if r.mask & rec.SET_ATIME else st.st_atime_ns
            mtime = r.mtime_ns if r.mask & rec.SET_MTIME else st.st_mtime_ns
            os.utime(target, ns=(atime, mtime), follow_symlinks=follow)
    finally:
        os.close(fd)
