"""The read-only lower tree, as the overlay view shows it.

Never written.  Everything the view learns of the lower comes through
:class:`Lower`: entries are reached below a detached clone of the lower mount
(submounts cut, as kernel overlayfs with ``lowerdir=`` sees them), in pieces for
trees deeper than PATH_MAX; what the hide policy hides does not exist; owners
may be mapped (host root shown as the user, as the launcher's idmapped lower
does for kernel overlayfs).

The origin xattr.  A copied-up entry carries ``<prefix>origin``: what kernel
overlayfs writes there (``struct ovl_fb``, fs/overlayfs/overlayfs.h), a file
handle of its lower original, which keeps ``st_ino`` across copy-up and remount
for copies made by sdeefs and by kernel overlayfs alike::

    offset  size  field
    0       1     version   0
    1       1     magic     0xfb
    2       1     len       of the whole value, this header included
    3       1     flags     0 (handle bytes little endian; what the kernel writes here)
    4       1     type      the file handle's type (struct file_handle.handle_type)
    5       16    uuid      of the lower filesystem (zeros if it has none)
    21      len-21  fid     the file handle's bytes (struct file_handle.f_handle)

The handles themselves are ``struct file_handle`` (``sysio.name_to_handle``): a
native-endian u32 byte count and i32 type, then the bytes.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Iterator

import attrs

from ..identity import Identity
from ..sysio import (
    PATH_CHUNK,
    fd_path,
    filesystem_uuid,
    name_to_handle,
    open_at,
    open_by_handle,
    open_tree_clone,
)

OVL_FB = struct.Struct("<BBBBB16s")  # version, magic, len, flags, type, uuid
assert OVL_FB.size == 21
OVL_FB_MAGIC = 0xFB
FILE_HANDLE = struct.Struct("=Ii")  # struct file_handle: handle_bytes, handle_type
assert FILE_HANDLE.size == 8

# What the hide policy is asked: (lower path, its lstat) -> hidden?
HidePolicy = Callable[[bytes, os.stat_result], bool]

_STAT_EXTRA = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
               "st_blksize", "st_blocks", "st_rdev")


def encode_origin(handle: bytes, uuid: bytes) -> bytes:
    """The origin xattr of the lower entry whose file handle is ``handle`` (b"": none)."""
    if len(handle) <= FILE_HANDLE.size or len(uuid) != 16:
        return b""
    _, fh_type = FILE_HANDLE.unpack_from(handle)
    fid = handle[FILE_HANDLE.size:]
    if OVL_FB.size + len(fid) > 0xFF:
        return b""
    return OVL_FB.pack(0, OVL_FB_MAGIC, OVL_FB.size + len(fid), 0, fh_type & 0xFF, uuid) + fid


def decode_origin(origin: bytes) -> tuple[bytes, bytes] | None:
    """(uuid, file handle) of an origin xattr, or None if it is not one (hostile input)."""
    if len(origin) <= OVL_FB.size:
        return None
    _, magic, length, _, fh_type, uuid = OVL_FB.unpack_from(origin)
    if magic != OVL_FB_MAGIC or length != len(origin):
        return None
    fid = origin[OVL_FB.size:]
    return uuid, FILE_HANDLE.pack(len(fid), fh_type) + fid


def with_owner(st: os.stat_result, uid: int, gid: int) -> os.stat_result:
    """``st`` with another owner (os.stat_result is immutable)."""
    fields = list(st[:10])
    fields[4], fields[5] = uid, gid
    return os.stat_result(fields, {name: getattr(st, name) for name in _STAT_EXTRA})


def shown_owner(st: os.stat_result, ids: Identity | None) -> os.stat_result:
    """``st`` as the view shows it: owners as the idmapped lower of ``ids`` shows them
    (system ids as the user's subordinate ids, sdeefs.identity), if set."""
    if ids is None:
        return st
    uid, gid = ids.shown(st.st_uid, st.st_gid)
    return st if (uid, gid) == (st.st_uid, st.st_gid) else with_owner(st, uid, gid)


@attrs.define(eq=False)
class Lower:
    """The lower tree of one view (read only).

    Attributes:
        fd: a detached non-recursive clone of the lower mount (or a plain O_PATH
            directory fd when cloning is not allowed); -1 for a view without a lower.
        mount_fd: a readable fd on the lower's root, for open_by_handle_at.
        dev: st_dev of the lower root.
        uuid: uuid of the lower filesystem (part of origin file handles).
        hide: lower entries it says to hide do not show (sdeefs.fs.guard.Policy.hides:
            deny patterns and root-only entries, decided at lookup time).
        ids: the launcher's user (sdeefs.identity): lower entries show (and are copied
            up) with owners as its idmapped lower shows them.
        origin_inos: decoded origin xattrs -> lower inode numbers.
    """

    fd: int
    mount_fd: int
    dev: int
    uuid: bytes
    hide: HidePolicy | None = None
    ids: Identity | None = None
    origin_inos: dict[bytes, int] = attrs.field(factory=dict)

    @classmethod
    def open(cls, path: bytes, hide: HidePolicy | None = None,
             ids: Identity | None = None) -> Lower:
        try:
            fd = open_tree_clone(path)
        except OSError:  # not root, or an old kernel: plain directory, mounts not cut
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mount_fd = os.open(fd_path(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mount_fd, os.stat(fd).st_dev, filesystem_uuid(mount_fd), hide,
                   ids)

    @classmethod
    def absent(cls, dev: int) -> Lower:
        """No lower (the passthrough upper): nothing is ever looked up in it."""
        return cls(-1, -1, dev, bytes(16))

    def close(self) -> None:
        for fd in (self.fd, self.mount_fd):
            if fd >= 0:
                os.close(fd)

    # -- reaching entries ---------------------------------------------------------------------

    @contextlib.contextmanager
    def at(self, path: bytes) -> Iterator[tuple[int, bytes]]:
        """(directory fd, rest of ``path``) that syscalls reach the lower entry ``path`` by.

        The lower root and ``path`` itself when one syscall takes it; for a lower tree
        deeper than PATH_MAX, the entry's directory, opened in pieces (closed on exit).
        ``rest`` is b"" for the lower root itself.
        """
        if len(path) <= PATH_CHUNK:
            yield self.fd, path
            return
        head, _, name = path.rpartition(b"/")
        fd = open_at(self.fd, head, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def lstat_raw(self, path: bytes) -> os.stat_result | None:
        """The lower entry's own stat (no owner mapping, no hiding), None if there is none."""
        try:
            if not path:
                return os.stat(self.fd)
            if len(path) <= PATH_CHUNK:  # all but trees deeper than PATH_MAX: one call
                return os.stat(path, dir_fd=self.fd, follow_symlinks=False)
            with self.at(path) as (fd, rest):
                return os.stat(rest, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def lstat(self, path: bytes) -> os.stat_result | None:
        """A lower entry's stat as the view shows it (owner mapped)."""
        st = self.lstat_raw(path)
        return self.shown(st) if st is not None else None

    def visible(self, path: bytes) -> os.stat_result | None:
        """The lower entry at ``path`` unless the hide policy hides it (as shown)."""
        st = self.lstat_raw(path)
        if st is None or (self.hide is not None and self.hide(path, st)):
            return None
        return self.shown(st)

    def shown(self, st: os.stat_result) -> os.stat_result:
        return shown_owner(st, self.ids)

    def listdir(self, path: bytes) -> list[bytes]:
        """The names in a lower directory ([] if it is none)."""
        try:
            fd = open_at(self.fd, path or b".", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return []
        try:
            return [os.fsencode(n) for n in os.listdir(fd)]
        finally:
            os.close(fd)

    def readlink(self, path: bytes) -> bytes:
        with self.at(path) as (fd, rest):
            return os.readlink(rest, dir_fd=fd)

    def open_file(self, path: bytes, flags: int) -> int:
        """Open a lower file (never through a symlink at its end)."""
        with self.at(path) as (dfd, rest):
            return os.open(rest, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)

    def getxattr(self, path: bytes, name: bytes) -> bytes:
        with self.at(path) as (fd, rest):
            return os.getxattr(fd_path(fd, rest or None), name, follow_symlinks=False)

    def listxattr(self, path: bytes) -> list[bytes]:
        with self.at(path) as (fd, rest):
            return [os.fsencode(n) for n in os.listxattr(fd_path(fd, rest or None),
                                                          follow_symlinks=False)]

    def xattrs(self, path: bytes) -> list[tuple[bytes, bytes]]:
        """Every (name, value) a lower entry carries that can be read ([] if none can)."""
        with self.at(path) as (dfd, rest):
            where = fd_path(dfd, rest or None)
            try:
                names = os.listxattr(where, follow_symlinks=False)
            except OSError:
                return []
            values = []
            for sname in names:
                try:
                    values.append((os.fsencode(sname),
                                   os.getxattr(where, sname, follow_symlinks=False)))
                except OSError:
                    continue
            return values

    # -- identity ----------------------------------------------------------------------------

    def origin_of(self, path: bytes) -> bytes:
        """The origin xattr kernel overlayfs would give a copy of the lower entry ``path``."""
        try:
            with self.at(path) as (dfd, rest):
                fd = os.open(rest, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError:
            return b""
        try:
            handle = name_to_handle(fd)
        finally:
            os.close(fd)
        return encode_origin(handle, self.uuid) if handle else b""

    def origin_ino(self, origin: bytes | None) -> int | None:
        """The lower inode number a copied-up entry came from (its origin xattr), if any."""
        if origin is None:
            return None
        if origin in self.origin_inos:
            return self.origin_inos[origin]
        ino = self._resolve_origin(origin)
        if ino is not None:
            self.origin_inos[origin] = ino
        return ino

    def _resolve_origin(self, origin: bytes) -> int | None:
        decoded = decode_origin(origin)
        if decoded is None:
            return None
        uuid, handle = decoded
        if uuid != self.uuid and any(uuid) and any(self.uuid):
            return None  # a handle of another filesystem
        try:
            fd = open_by_handle(self.mount_fd, handle, os.O_PATH)
        except OSError:
            return None  # the original is gone from the lower (or not ours)
        try:
            return os.fstat(fd).st_ino
        finally:
            os.close(fd)

    def names_of(self, lst: os.stat_result, exclude: bytes | None) -> list[bytes]:
        """Every path in the lower tree of the inode ``lst`` (a scan; only for nlink > 1)."""
        found: list[bytes] = []
        root = os.fsencode(fd_path(self.fd))
        wanted = lst.st_nlink
        for dirpath, dirnames, filenames in os.walk(root):
            for name in filenames:
                full = os.path.join(dirpath, name)
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if st.st_ino == lst.st_ino and st.st_dev == lst.st_dev:
                    rel = full[len(root) + 1:]
                    if rel != exclude:
                        found.append(rel)
                    if len(found) + 1 >= wanted:
                        return found
            dirnames.sort()
        return found
