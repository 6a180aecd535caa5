"""pyfuse3 protocol adapter: FUSE types in, ``EntryAttributes``/``FileInfo`` out, ``FUSEError`` out.

No overlay policy lives here (that is ``sdeefs.fs.cow``, and ``sdeefs.fs.guard``
for the guard), and no journal record is built here.  This module translates, and
decides only *where* each call runs:

* namespace mutations and copy-ups run one at a time under ``self.mutex``;
  their cow parts are synchronous on the loop; of a copy-up, which cow decides
  and stages (its ``copy_up_for_*`` methods), only the data copy goes to a
  worker thread;
* ``read``/``write``/``fsync`` run in worker threads (``Offload``), so many
  readers proceed in parallel; a write goes through ``sdeefs.writeahead``
  (range lock, Write record, pwrite, in that order);
* lookups and getattrs are synchronous on the loop: a handful of ``lstat``
  calls on local filesystems, cheaper than a thread hop (docs/threading.md).

The only exceptions that may leave a handler are ``FUSEError``s; ``_errors``
is the single place that turns ``OSError`` into one.  Anything else is a bug
and is allowed to take the mount down loudly.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import attrs
import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileHandleT, FileInfo, InodeT, RequestContext

from ..offload import Offload
from ..sysio import RENAME_EXCHANGE, name_to_handle
from ..writeahead import DataWriter
from .cow import AttrChange, CopyUp, CowFS
from .guard import GuardView
from .inodes import Attr, Node

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# pyfuse3 with the sdeefs patch (third_party/pyfuse3, recognised by opendir_stateless) lets
# opendir answer a FileInfo with cache_readdir (FOPEN_CACHE_DIR); the stock build takes only
# a handle, and listings are then read anew at every open, as before.
CACHE_DIR = hasattr(pyfuse3.Operations, "opendir_stateless")


def _errors(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Translate OSError into FUSEError (the one place that does)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s%r", fn.__name__, tuple(a for a in args[1:]
                                                 if not isinstance(a, RequestContext)))
        try:
            return await fn(*args, **kwargs)
        except OSError as exc:
            if exc.errno is None:
                raise  # not a filesystem error: a bug, let it surface
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s -> %s", fn.__name__, errno.errorcode.get(exc.errno, exc.errno))
            raise pyfuse3.FUSEError(exc.errno) from None

    return wrapper


def entry_attributes(attr: Attr, timeout: float) -> EntryAttributes:
    """The one place that builds EntryAttributes."""
    st = attr.st
    entry = EntryAttributes()
    entry.st_ino = InodeT(attr.ino)
    entry.generation = 0
    entry.entry_timeout = timeout
    entry.attr_timeout = timeout
    entry.st_mode = st.st_mode
    entry.st_nlink = st.st_nlink
    entry.st_uid, entry.st_gid = attr.owner or (st.st_uid, st.st_gid)
    entry.st_rdev = st.st_rdev
    entry.st_size = st.st_size
    entry.st_blksize = st.st_blksize
    entry.st_blocks = st.st_blocks
    entry.st_atime_ns = st.st_atime_ns
    entry.st_mtime_ns = st.st_mtime_ns
    entry.st_ctime_ns = st.st_ctime_ns
    return entry


def statvfs_data(sv: os.statvfs_result) -> pyfuse3.StatvfsData:
    data = pyfuse3.StatvfsData()
    data.f_bsize, data.f_frsize = sv.f_bsize, sv.f_frsize
    data.f_blocks, data.f_bfree, data.f_bavail = sv.f_blocks, sv.f_bfree, sv.f_bavail
    data.f_files, data.f_ffree, data.f_favail = sv.f_files, sv.f_ffree, sv.f_favail
    data.f_namemax = 255
    return data


@attrs.define(eq=False)
class OpenFile:
    fd: int
    node: Node
    writable: bool
    handle: bytes  # file handle of the upper file, for Write records (b"" if read-only)


@attrs.define(eq=False)
class OpenDir:
    node: Node
    names: list[bytes]


class Operations(pyfuse3.Operations):
    """The FUSE face of a :class:`~sdeefs.fs.cow.CowFS`.

    Attributes:
        fs: the overlay semantics.
        offload: worker threads for data I/O.
        timeout: entry/attribute cache lifetime in seconds (the lower may change under us).
        mutex: serialises namespace mutations and copy-ups.
        files / dirs: open handles.
        _read_buffer: where read's fast path reads to (reused; see read).
        initialized: set once the kernel's INIT is answered (mount.raise_readahead waits).
    """

    supports_dot_lookup = False

    def __init__(self, fs: CowFS, offload: Offload, timeout: float,
                 writeback_cache: bool) -> None:
        super().__init__()
        self.fs = fs
        self.offload = offload
        self.timeout = timeout
        self.enable_writeback_cache = writeback_cache
        self.mutex = trio.Lock()
        self.files: dict[int, OpenFile] = {}
        self.writer = DataWriter(offload)
        self.dirs: dict[int, OpenDir] = {}
        self._next_fh = 1
        self._read_buffer = memoryview(bytearray(0))  # read's fast path (see there)
        self.initialized = trio.Event()

    def init(self) -> None:
        # (pyfuse3 calls this during INIT, before libfuse's reply: after the reply, which
        # the kernel takes before this task's next step, the mount's settings are final)
        self.initialized.set()

    # -- helpers ------------------------------------------------------------------------------

    def _entry(self, attr: Attr) -> EntryAttributes:
        return entry_attributes(attr, self.timeout)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def _copy_ups(self, next_plan: Callable[[], CopyUp | None]) -> None:
        """The copy-ups cow decides (``next_plan``: one of its ``copy_up_for_*``), each data
        copy in a worker thread (the caller holds the mutex)."""
        while (plan := next_plan()) is not None:
            try:
                await self.offload.run(self.fs.copy_data, plan)
            except BaseException:
                self.fs.abort_copy_up(plan)
                raise
            self.fs.finish_copy_up(plan)

    # -- lookups and attributes ---------------------------------------------------------------

    @_errors
    async def lookup(self, parent_inode: InodeT, name: bytes, ctx: RequestContext
                     ) -> EntryAttributes:
        attr = self.fs.lookup(parent_inode, name)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("lookup -> %d mode %o", attr.ino, attr.st.st_mode)
        self._shed()
        return self._entry(attr)

    def _shed(self) -> None:
        """Ask the kernel to drop what the node limit says (CowFS.overflow).  Its own thread
        sends the notices: one sent from a handler could wait for this very request."""
        for parent, name in self.fs.overflow():
            pyfuse3.invalidate_entry_async(InodeT(parent), name, ignore_enoent=True)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, count in inode_list:
            self.fs.forget(ino, count)

    @_errors
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return self._entry(self.fs.getattr(inode))

    @_errors
    async def setattr(self, inode: InodeT, attr: EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: FileHandleT | None, ctx: RequestContext) -> EntryAttributes:
        change = AttrChange(
            mode=stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            # the kernel keeps regular files' times itself: it sends the ones it changes
            keep_mtime=self.enable_writeback_cache)
        async with self.mutex:
            self.fs.admit(change.uid, change.gid)  # before a copy-up
            await self._copy_ups(functools.partial(self.fs.copy_up_for_setattr, inode, change))
            return self._entry(self.fs.setattr(inode, change))

    @_errors
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> bytes:
        return self.fs.readlink(inode)

    @_errors
    async def access(self, inode: InodeT, mode: int, ctx: RequestContext) -> bool:
        return True  # mounted with default_permissions: the kernel checks modes itself

    @_errors
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        return statvfs_data(self.fs.statfs())

    # -- namespace mutations ------------------------------------------------------------------

    @_errors
    async def mkdir(self, parent_inode: InodeT, name: bytes, mode: int, ctx: RequestContext
                    ) -> EntryAttributes:
        async with self.mutex:
            return self._entry(self.fs.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_errors
    async def mknod(self, parent_inode: InodeT, name: bytes, mode: int, rdev: int,
                    ctx: RequestContext) -> EntryAttributes:
        async with self.mutex:
            return self._entry(self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_errors
    async def symlink(self, parent_inode: InodeT, name: bytes, target: bytes,
                      ctx: RequestContext) -> EntryAttributes:
        async with self.mutex:
            return self._entry(self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @_errors
    async def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: bytes,
                   ctx: RequestContext) -> EntryAttributes:
        async with self.mutex:
            await self._copy_ups(functools.partial(self.fs.copy_up_for_link, inode,
                                                   new_parent_inode, new_name))
            return self._entry(self.fs.link(inode, new_parent_inode, new_name))

    async def _find_other_name(self, parent_inode: InodeT, name: bytes, flags: int = 0) -> None:
        """Before a removal (an unlink, a rename with ``flags`` over it) that leaves a
        hard-linked file's node without a known name, find the file's other name in a
        worker thread (a scan of the upper; the caller holds the mutex, so nothing renames
        it meanwhile)."""
        needed = self.fs.other_name_needed(parent_inode, name, flags)
        if needed is not None:
            found = await self.offload.run(self.fs.find_other_name, *needed)
            if found is not None:
                self.fs.hint_other_name(needed[0], found)

    @_errors
    async def unlink(self, parent_inode: InodeT, name: bytes, ctx: RequestContext) -> None:
        async with self.mutex:
            await self._find_other_name(parent_inode, name)
            stale = self.fs.stale_if_removed(parent_inode, name)
            self.fs.unlink(parent_inode, name)
            self._refresh(stale)

    @_errors
    async def rmdir(self, parent_inode: InodeT, name: bytes, ctx: RequestContext) -> None:
        async with self.mutex:
            self.fs.rmdir(parent_inode, name)

    @_errors
    async def rename(self, parent_inode_old: InodeT, name_old: bytes, parent_inode_new: InodeT,
                     name_new: bytes, flags: int, ctx: RequestContext) -> None:
        async with self.mutex:
            await self._copy_ups(functools.partial(self.fs.copy_up_for_rename, parent_inode_old,
                                                   name_old, parent_inode_new, name_new, flags))
            await self._find_other_name(parent_inode_new, name_new, flags)
            stale = None if flags & RENAME_EXCHANGE else \
                self.fs.stale_if_removed(parent_inode_new, name_new)
            self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
            self._refresh(stale)

    @staticmethod
    def _refresh(ino: int | None) -> None:
        """Make the kernel ask getattr for ``ino`` (CowFS.stale_if_removed) next time.
        Sent before the reply, after which the kernel drops its cached nlink; attributes
        only: nothing to write back, so it cannot wait for another request."""
        if ino is not None:
            # (ENOENT: the kernel let go of it meanwhile, its FORGET on the way: done)
            with contextlib.suppress(FileNotFoundError):
                pyfuse3.invalidate_inode(InodeT(ino), attr_only=True)

    # -- extended attributes ------------------------------------------------------------------

    @_errors
    async def getxattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> bytes:
        return self.fs.getxattr(inode, name)

    @_errors
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[bytes]:
        return self.fs.listxattr(inode)

    @_errors
    async def setxattr(self, inode: InodeT, name: bytes, value: bytes, ctx: RequestContext
                       ) -> None:
        async with self.mutex:
            await self._copy_ups(functools.partial(self.fs.copy_up_for_xattr, inode, name,
                                                   value=value))
            self.fs.setxattr(inode, name, value)

    @_errors
    async def removexattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> None:
        async with self.mutex:
            await self._copy_ups(functools.partial(self.fs.copy_up_for_xattr, inode, name,
                                                   removing=True))
            self.fs.removexattr(inode, name)

    # -- files --------------------------------------------------------------------------------

    def _open_flags(self, flags: int) -> tuple[int, bool, bool]:
        """(flags for the backing open, writable, truncate)."""
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        truncate = bool(flags & os.O_TRUNC) and writable
        # Only flags that mean the same for the backing file survive: the kernel computes
        # append offsets itself (a backing O_APPEND would make pwrite ignore the offset the
        # journal records), and exec opens carry the kernel-internal __FMODE_EXEC bit, which
        # openat2 rightly rejects.
        flags &= os.O_ACCMODE | os.O_NONBLOCK | os.O_DSYNC | os.O_SYNC | os.O_LARGEFILE
        if self.enable_writeback_cache and flags & os.O_ACCMODE == os.O_WRONLY:
            # The kernel may read through a write-only handle to fill its cache
            # (libfuse's passthrough_ll does the same).
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags, writable, truncate

    async def _open(self, node: Node, flags: int) -> FileInfo:
        backing, writable, truncate = self._open_flags(flags)
        # (the lock only when something may change: cow decides what, under it)
        if writable and (truncate or self.fs.needs_copy_up(node)):
            async with self.mutex:
                await self._copy_ups(functools.partial(self.fs.copy_up_for_write, node.ino,
                                                       truncate))
                if truncate:
                    self.fs.setattr(node.ino, AttrChange(size=0))
        fd = self.fs.open_fd(node.ino, backing)
        try:
            handle = name_to_handle(fd) if writable else b""
        except BaseException:
            os.close(fd)
            raise
        self.fs.opened(node, fd)
        fh = self._new_fh()
        self.files[fh] = OpenFile(fd, node, writable, handle)
        return FileInfo(fh=FileHandleT(fh), keep_cache=True)

    @_errors
    async def open(self, inode: InodeT, flags: int, ctx: RequestContext) -> FileInfo:
        return await self._open(self.fs.node(inode), flags)

    @_errors
    async def create(self, parent_inode: InodeT, name: bytes, mode: int, flags: int,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        async with self.mutex:
            attr = self.fs.create(parent_inode, name, mode, ctx.uid, ctx.gid)
        info = await self._open(self.fs.node(attr.ino), flags & ~os.O_TRUNC)
        return info, self._entry(attr)

    @_errors  # (pyfuse3 replies with any buffer, PyObject_GetBuffer; its stub says bytes)
    async def read(self, fh: FileHandleT, off: int, size: int  # type: ignore[override]
                   ) -> bytes | memoryview:
        fd = self.files[fh].fd
        # Fast path: data already in the page cache is copied on the loop (RWF_NOWAIT
        # refuses, rather than waits for, anything that would block); the rest goes to
        # a worker thread.  A thread hop costs more than a cached 1 MiB read.
        #
        # The fast path reads into one buffer kept for the life of the mount and answers
        # with a view of it: pyfuse3 takes any buffer and copies it into its reply with no
        # await between this return and that copy, so no other read can overwrite it
        # meanwhile.  A fresh buffer of 1 MiB (the requests' size once the readahead is
        # raised, mount.raise_readahead) costs its page faults and zeroing every time, and
        # slicing it into bytes two more copies.  Anything that awaits copies out first.
        if len(self._read_buffer) < size:
            self._read_buffer = memoryview(bytearray(size))
        view = self._read_buffer[:size]
        try:
            n = os.preadv(fd, [view], off, os.RWF_NOWAIT)
        except BlockingIOError:
            return await self.offload.run(os.pread, fd, size, off)
        if n == size or n == 0:
            return view[:n]
        head = bytes(view[:n])  # before the await: another read may reuse the buffer
        return head + await self.offload.run(os.pread, fd, size - n, off + n)

    @_errors
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        handle = self.files[fh]
        return await self.writer.write(
            handle.fd, off, buf,
            lambda offset, length: self.fs.journal_write(handle.node, handle.handle, offset,
                                                         length))

    @_errors
    async def flush(self, fh: FileHandleT) -> None:
        return None

    @_errors
    async def release(self, fh: FileHandleT) -> None:
        handle = self.files.pop(fh)
        self.fs.released(handle.node, handle.fd)
        os.close(handle.fd)

    @_errors
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        fd = self.files[fh].fd
        await self.offload.run(os.fdatasync if datasync else os.fsync, fd)
        await self.offload.run(self.fs.sync_journal)

    @_errors
    async def fallocate(self, fh: FileHandleT, mode: int, offset: int, length: int) -> None:
        """fallocate(2) (pyfuse3 with the sdeefs patch, third_party/pyfuse3; without it
        this is never called and the kernel answers EOPNOTSUPP)."""
        handle = self.files[fh]
        async with self.mutex:  # a metadata record: one in flight (docs/threading.md)
            await self.offload.run(self.fs.fallocate, handle.node, handle.fd, mode, offset,
                                   length)

    # -- directories --------------------------------------------------------------------------

    @_errors
    async def opendir(self, inode: InodeT, ctx: RequestContext  # type: ignore[override, unused-ignore]
                      ) -> FileHandleT | FileInfo:
        node = self.fs.node(inode)
        names, keep = self.fs.open_listing(inode)
        fh = self._new_fh()
        self.dirs[fh] = OpenDir(node, names)
        if not CACHE_DIR:
            return FileHandleT(fh)
        # FOPEN_CACHE_DIR: the kernel keeps the listing it reads through this handle and
        # answers later opens from it while we say keep (CowFS.open_listing: only while
        # our own listing is the one it cached); it drops it itself when a change through
        # the mount touches the directory.
        return FileInfo(fh=FileHandleT(fh), cache_readdir=True,  # type: ignore[call-arg, unused-ignore]
                        keep_cache=keep)

    @_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.dirs[fh]
        # Offsets 1 and 2 are "." and "..": the kernel does not count lookups for them.
        for index, name in ((0, b"."), (1, b"..")):
            if start_id <= index:
                ino = handle.node.ino if name == b"." else self.fs.parent_ino(handle.node)
                if not pyfuse3.readdir_reply(token, name, self._entry(self.fs.getattr(ino)),
                                             index + 1):
                    return
        for index in range(max(start_id, 2), len(handle.names) + 2):
            name = handle.names[index - 2]
            try:
                attr = self.fs.lookup(handle.node.ino, name)
            except FileNotFoundError:
                # removed since opendir: the kernel may cache this listing without it
                self.fs.listing_changed(handle.node.ino)
                continue
            if not pyfuse3.readdir_reply(token, name, self._entry(attr), index + 1):
                self.fs.forget(attr.ino, 1)  # not delivered: the kernel did not count it
                return
            self._shed()

    @_errors
    async def releasedir(self, fh: FileHandleT) -> None:
        del self.dirs[fh]

    @_errors
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        await self.offload.run(self.fs.sync_journal)


class GuardOperations(pyfuse3.Operations):
    """The FUSE face of a :class:`~sdeefs.fs.guard.GuardView`, mounted read-only.

    Lookups and getattrs run on the loop (a few syscalls, as above); a listing
    stats every entry of a host directory, so that part runs in a worker thread.
    Everything else is refused by pyfuse3 (ENOSYS) or by the kernel (``ro``).
    """

    supports_dot_lookup = False

    def __init__(self, view: GuardView, offload: Offload, timeout: float) -> None:
        super().__init__()
        self.view = view
        self.offload = offload
        self.timeout = timeout
        self.listings: dict[int, list[tuple[bytes, bytes, os.stat_result]]] = {}
        self._next_fh = 1

    @_errors
    async def lookup(self, parent_inode: InodeT, name: bytes, ctx: RequestContext
                     ) -> EntryAttributes:
        return entry_attributes(self.view.lookup(parent_inode, name), self.timeout)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, count in inode_list:
            self.view.forget(ino, count)

    @_errors
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return entry_attributes(self.view.getattr(inode), self.timeout)

    @_errors
    async def getxattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> bytes:
        self.view.node(inode)
        raise OSError(errno.ENODATA, "no extended attributes")

    @_errors
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[bytes]:
        self.view.node(inode)
        return []

    @_errors
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        return statvfs_data(self.view.statfs())

    @_errors
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        found = self.view.cached_hidden(inode)
        if found is None:
            found = await self.offload.run(self.view.scan_hidden, inode)
        fh = self._next_fh
        self._next_fh += 1
        self.listings[fh] = found
        return FileHandleT(fh)

    @_errors
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        found = self.listings[fh]
        for index in range(start_id, len(found)):
            name, rel, st = found[index]
            attr = self.view.remember_hidden(rel, st)  # a delivered entry counts as a lookup
            if not pyfuse3.readdir_reply(token, name, entry_attributes(attr, self.timeout),
                                         index + 1):
                self.view.forget(attr.ino, 1)
                return

    @_errors
    async def releasedir(self, fh: FileHandleT) -> None:
        del self.listings[fh]
