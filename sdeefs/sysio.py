"""Thin, checked wrappers around the Linux syscalls that ``os`` does not expose.

Everything here is synchronous and may block; callers decide whether a call
runs on the trio loop or in a worker thread (see docs/threading.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import struct
import tempfile
from collections.abc import Iterator

# x86_64 syscall numbers (the only architecture we build for; checked at import).
_SYS_RENAMEAT2 = 316
_SYS_NAME_TO_HANDLE_AT = 303
_SYS_OPEN_BY_HANDLE_AT = 304
_SYS_OPEN_TREE = 428

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC

FICLONE = 0x40049409  # _IOW(0x94, 9, int)
MAX_HANDLE_SZ = 128

if os.uname().machine != "x86_64":  # pragma: no cover - documented restriction
    raise ImportError("sdeefs.sysio knows syscall numbers for x86_64 only")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(ret: int, what: str, path: bytes | None = None) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def renameat2(
    olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0
) -> None:
    """renameat2(2); ``flags`` is a mask of RENAME_NOREPLACE/EXCHANGE/WHITEOUT."""
    ret = _syscall(
        _SYS_RENAMEAT2,
        ctypes.c_int(olddirfd),
        ctypes.c_char_p(oldname),
        ctypes.c_int(newdirfd),
        ctypes.c_char_p(newname),
        ctypes.c_uint(flags),
    )
    _check(ret, "renameat2", oldname)


def open_tree_clone(path: str | bytes) -> int:
    """A detached, non-recursive clone of the mount at ``path`` (needs CAP_SYS_ADMIN).

    Lookups below the returned fd never cross into submounts, exactly like
    kernel overlayfs with ``lowerdir=path``: /proc, /sys and the sdeefs
    mountpoint itself show as the (empty) directories of the root filesystem.
    """
    p = os.fsencode(path)
    ret = _syscall(
        _SYS_OPEN_TREE,
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(p),
        ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
    )
    return _check(ret, "open_tree", p)


_HANDLE_HDR = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type
assert _HANDLE_HDR.size == 8


def name_to_handle(fd: int) -> bytes:
    """Return an opaque, persistent file handle (type + bytes) for the open ``fd``.

    Encoded as ``struct file_handle`` so :func:`open_by_handle` takes it back.
    Returns b"" when the filesystem does not support handles.
    """
    buf = ctypes.create_string_buffer(_HANDLE_HDR.size + MAX_HANDLE_SZ)
    _HANDLE_HDR.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    ret = _syscall(
        _SYS_NAME_TO_HANDLE_AT,
        ctypes.c_int(fd),
        ctypes.c_char_p(b""),
        buf,
        ctypes.byref(mount_id),
        ctypes.c_int(AT_EMPTY_PATH),
    )
    if ret < 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            return b""
        raise OSError(err, f"name_to_handle_at: {os.strerror(err)}")
    size, _ = _HANDLE_HDR.unpack_from(buf, 0)
    return bytes(buf.raw[: _HANDLE_HDR.size + size])


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2) for a handle made by :func:`name_to_handle` (needs root)."""
    if len(handle) < _HANDLE_HDR.size:
        raise OSError(errno.EINVAL, "file handle too short")
    size, _ = _HANDLE_HDR.unpack_from(handle, 0)
    if size != len(handle) - _HANDLE_HDR.size or size > MAX_HANDLE_SZ:
        raise OSError(errno.EINVAL, "file handle has an inconsistent length")
    buf = ctypes.create_string_buffer(handle, len(handle))
    ret = _syscall(
        _SYS_OPEN_BY_HANDLE_AT, ctypes.c_int(mount_fd), buf, ctypes.c_int(flags | os.O_CLOEXEC)
    )
    return _check(ret, "open_by_handle_at")


def is_whiteout(st: os.stat_result) -> bool:
    """Kernel overlayfs whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def copy_file_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy ``size`` bytes in the kernel: reflink if the filesystem can, else copy_file_range.

    Never a Python read/write loop for the bulk of the data (field-facts §3).
    """
    try:
        import fcntl

        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError:
        pass
    offset = 0
    while offset < size:
        try:
            n = os.copy_file_range(src_fd, dst_fd, size - offset, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            n = _copy_by_sendfile(src_fd, dst_fd, offset, size - offset)
        if n == 0:  # source shrank under us: copy what there is
            break
        offset += n
    os.ftruncate(dst_fd, offset)


def _copy_by_sendfile(src_fd: int, dst_fd: int, offset: int, count: int) -> int:
    os.lseek(dst_fd, offset, os.SEEK_SET)
    return os.sendfile(dst_fd, src_fd, offset, count)


def fsync_dir(path: str | bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` (file mode ``mode``): temp file in the same directory,
    fsync, rename, fsync dir.

    Every call writes a temporary file of its own (``tempfile.mkstemp``): writers in several
    processes or threads may replace one file at once, and each renames what it wrote.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


_SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_OPEN_HOW = struct.Struct("=QQQ")


PATH_CHUNK = 4000  # bytes of path per syscall: below PATH_MAX with room for a /proc/self/fd/N/


def path_chunks(path: bytes, limit: int = PATH_CHUNK) -> list[bytes]:
    """``path`` cut at slashes into pieces of at most ``limit`` bytes, in order.

    A single component longer than ``limit`` stays whole (the kernel refuses it
    with ENAMETOOLONG, as it would the whole path).
    """
    chunks = []
    start = 0
    while len(path) - start > limit:
        cut = path.rfind(b"/", start + 1, start + limit + 1)
        if cut < 0:
            cut = path.find(b"/", start + limit + 1)
            if cut < 0:
                break
        chunks.append(path[start:cut])
        start = cut + 1
    chunks.append(path[start:])
    return chunks


def _openat2(dir_fd: int, path: bytes, flags: int) -> int:
    how = ctypes.create_string_buffer(
        _OPEN_HOW.pack(flags | os.O_CLOEXEC, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
                       | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV),
        _OPEN_HOW.size,
    )
    ret = _syscall(
        _SYS_OPENAT2, ctypes.c_int(dir_fd), ctypes.c_char_p(path), how,
        ctypes.c_size_t(_OPEN_HOW.size),
    )
    return _check(ret, "openat2", path[:64])


def openat2_beneath(dir_fd: int, path: bytes, flags: int) -> int:
    """Open ``path`` below ``dir_fd`` without following any symlink or leaving the tree.

    This is how every path inside a user-writable tree (the upper, a replica)
    is resolved: a planted symlink or ``..`` can never lead the root daemon
    outside it.  A path longer than one syscall takes (a tree deeper than
    PATH_MAX) is walked in pieces below PATH_CHUNK, each resolved with the same
    rules beneath the directory the previous one reached, so the walk as a whole
    follows no symlink and never leaves ``dir_fd`` either.
    """
    if not path:
        path = b"."
    if len(path) <= PATH_CHUNK:
        return _openat2(dir_fd, path, flags)
    pieces = path_chunks(path)
    fd = dir_fd
    try:
        for piece in pieces[:-1]:
            step = _openat2(fd, piece, os.O_PATH | os.O_DIRECTORY)
            if fd != dir_fd:
                os.close(fd)
            fd = step
        return _openat2(fd, pieces[-1], flags)
    finally:
        if fd != dir_fd:
            os.close(fd)


def open_at(dir_fd: int, path: bytes, flags: int, mode: int = 0o777) -> int:
    """``os.open(path, flags, dir_fd=dir_fd)`` for a path of any length (a trusted tree:
    symlinks on the way are followed, as the kernel would for the whole path)."""
    if len(path) <= PATH_CHUNK:
        return os.open(path, flags | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    pieces = path_chunks(path)
    fd = dir_fd
    try:
        for piece in pieces[:-1]:
            step = os.open(piece, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            if fd != dir_fd:
                os.close(fd)
            fd = step
        return os.open(pieces[-1], flags | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        if fd != dir_fd:
            os.close(fd)


def fd_path(fd: int, name: bytes | None = None) -> bytes:
    """A path that reaches ``name`` inside the directory ``fd`` (or the fd's own inode).

    Used for calls that only take paths (xattrs, chmod): the kernel follows
    the /proc magic link to the already-resolved directory, then looks up only
    ``name`` itself, never a symlink on the way.
    """
    base = b"/proc/self/fd/%d" % fd
    return base if name is None else base + b"/" + name


FS_IOC_GETFSUUID = 0x80111500  # _IOR(0x15, 0, struct fsuuid2 {u8 len; u8 uuid[16]})


def filesystem_uuid(fd: int) -> bytes:
    """The 16-byte uuid of the filesystem holding ``fd`` (zeros if it has none)."""
    import fcntl

    buf = bytearray(17)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFSUUID, buf)
    except OSError:
        return bytes(16)
    return bytes(buf[1:17]).ljust(16, b"\0")


def chmod_at(dir_fd: int, name: bytes, mode: int) -> None:
    """chmod ``name`` in ``dir_fd`` without following a symlink there (symlinks are left alone).

    ``fchmodat(AT_SYMLINK_NOFOLLOW)`` is not implemented on Linux; an O_PATH
    descriptor of the entry itself, reached through /proc, is.
    """
    fd = os.open(name or b".", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            # Linux has no lchmod: a mode change aimed at a symlink comes only from a
            # tampered upper or record stream.  Refuse it (the journal records an Abort).
            raise OSError(errno.ELOOP, "refusing to chmod a symlink", name)
        os.chmod(fd_path(fd), mode)
    finally:
        os.close(fd)


def open_regular_at(dir_fd: int, name: bytes, flags: int) -> int:
    """Open ``name`` in ``dir_fd`` with ``flags`` only if it is a regular file: it is
    looked at through an O_PATH descriptor first (which opens nothing), then that same
    inode is opened through its /proc link, so what is checked is what is opened.

    Why: a plain ``open(O_WRONLY)`` of a name a peer chose opens whatever is there, and
    opening a device node is itself an action (a watchdog starts counting down, a tape
    rewinds, a tty becomes a controlling terminal), done as root on a replica whose tree
    a peer's ``Mkdev`` records filled.  OSError otherwise, with the errno opening that
    entry for writing would give where it did no harm: ELOOP for a symlink (O_NOFOLLOW),
    EISDIR for a directory, ENXIO for anything else (a FIFO without a reader, a socket,
    a device node)."""
    fd = os.open(name or b".", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            code = errno.ELOOP if stat.S_ISLNK(mode) else \
                errno.EISDIR if stat.S_ISDIR(mode) else errno.ENXIO
            raise OSError(code, f"not a regular file: {os.strerror(code)}", name)
        return os.open(fd_path(fd), flags | os.O_CLOEXEC)
    finally:
        os.close(fd)


def syncfs(fd: int) -> None:
    """syncfs(2): flush the whole filesystem holding ``fd`` (one call for a batch of changes)."""
    _check(_libc.syncfs(ctypes.c_int(fd)), "syncfs")


# fallocate(2) modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with every mode (``os.posix_fallocate`` has mode 0 only)."""
    _check(_fallocate(fd, mode, offset, length), "fallocate")


SYNC_FILE_RANGE_WRITE = 2
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """sync_file_range(SYNC_FILE_RANGE_WRITE): start writing the range's dirty pages
    back, without waiting (length 0: to the end).  Makes nothing durable by itself (no
    metadata, no flush): a later fdatasync has less to write."""
    _check(_sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE), "sync_file_range")


def boot_id() -> bytes:
    """This boot's random id: a replica's unsynced state is trusted only within one boot."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return bytes.fromhex(f.read().strip().replace("-", ""))


_FLOCK = struct.Struct("@hhqqi4x")  # struct flock on Linux/x86-64 and arm64 (l_pid 0 for OFD)


def range_lock(fd: int, offset: int, length: int, kind: int, wait: bool) -> bool:
    """Take (or with F_UNLCK drop) an open-file-description lock on a byte range.

    The daemon holds a write lock from journaling a Write record until its pwrite is
    done; a shipper reading that range for a replica takes a read lock first, so it
    never reads the bytes before they landed.  Returns False if ``wait`` is False and
    the range is locked by someone else.
    """
    cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    try:
        fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, offset, length, 0))
    except BlockingIOError:
        return False
    except PermissionError:  # EACCES: some kernels report a conflict so
        if wait:
            raise
        return False
    return True


# inotify(7): the login node's replicad waits for a journal to grow instead of polling it.
IN_MODIFY = 0x2
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_IGNORED = 0x8000  # the watch is gone (its directory was deleted)
INOTIFY_EVENT = struct.Struct("<iIII")  # wd, mask, cookie, name length (then the name)


def inotify_watch(path: str, mask: int) -> int:
    """A non-blocking inotify fd with one watch on ``path``; close it to stop."""
    fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")
    try:
        _check(_libc.inotify_add_watch(ctypes.c_int(fd), ctypes.c_char_p(os.fsencode(path)),
                                       ctypes.c_uint32(mask)), "inotify_add_watch",
               os.fsencode(path))
    except OSError:
        os.close(fd)
        raise
    return fd


def inotify_drain(fd: int) -> int:
    """Read every pending event of a non-blocking inotify fd (never blocks); the union of
    their masks (0: none was pending)."""
    mask = 0
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return mask
        offset = 0
        while offset + INOTIFY_EVENT.size <= len(data):
            _, event, _, length = INOTIFY_EVENT.unpack_from(data, offset)
            mask |= event
            offset += INOTIFY_EVENT.size + length


def malloc_trim() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim(0)).

    After a stream the heap holds the freed frames: glibc raises its mmap threshold to
    the size of the frames it freed, so later ones come from the heap and stay there.
    """
    _libc.malloc_trim(ctypes.c_size_t(0))


@contextlib.contextmanager
def filesystem_ids(uid: int, gid: int) -> Iterator[None]:
    """Act on files as ``uid``/``gid`` in this thread (setfsuid/setfsgid: per thread, so
    other workers of a service keep theirs), root again afterwards.  A journaling daemon
    whose id door refuses host root as a creator sees the user's id instead."""
    _libc.setfsgid(gid)
    _libc.setfsuid(uid)
    try:
        yield
    finally:
        _libc.setfsuid(0)
        _libc.setfsgid(0)
