"""Write records: data by reference, and the two halves of the rule that makes it safe.

Shared core.  A ``Write`` record (``sdeefs.records``) carries no data: it names a
file of the upper (path and a persistent file handle) and a byte range.  Whoever
ships or replays the record reads the bytes from the live upper at that time
(``sdeefs.journal``, "Data by reference").  Two processes take part, and this
module holds both of their halves:

* the **writer** (the journaling FUSE daemon, :class:`DataWriter`): write-locks the
  range (an OFD lock on its descriptor), appends the record, ``pwrite``s the bytes,
  unlocks.  This is where a user's write becomes journaled: the record is in the
  journal before the bytes are in the file.
* the **reader** (the login replicad shipping the journal live, replay, ``sdeefs
  check``: :func:`open_write_data`): opens the file by handle and read-locks the
  range, so it waits for a write of that range still in progress and never ships a
  range before its bytes landed.  Reading later bytes than the record saw is
  harmless: every later change has its own later record.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable

import attrs

from . import records as rec
from .layers import LayerRoot
from .offload import Offload
from .sysio import open_by_handle, open_regular_at, range_lock


@attrs.define(eq=False)
class DataWriter:
    """The writer's half: ``write`` journals a range, then writes it, under a range lock.

    Attributes:
        offload: where blocking writes run.
        nowait: the filesystem accepts RWF_NOWAIT buffered writes (found out once).
    """

    offload: Offload
    nowait: bool = True

    async def write(self, fd: int, offset: int, data: bytes,
                    journal: Callable[[int, int], None]) -> int:
        """Call ``journal(offset, len(data))`` then write ``data`` at ``offset`` of ``fd``.

        If the process dies between the two, the record names a range whose bytes a
        shipper reads from the file as they are, so the journal still covers it.
        """
        length = max(len(data), 1)
        if not range_lock(fd, offset, length, fcntl.F_WRLCK, wait=False):
            await self.offload.run(range_lock, fd, offset, length, fcntl.F_WRLCK, True)
        try:
            journal(offset, len(data))
            if self.nowait:  # page-cache writes on the loop, where the filesystem offers it
                try:
                    return os.pwritev(fd, [data], offset, os.RWF_NOWAIT)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self.nowait = False  # e.g. ext4 buffered writes: always a thread
            return await self.offload.run(os.pwrite, fd, data, offset)
        finally:
            range_lock(fd, offset, length, fcntl.F_UNLCK, wait=False)


def open_write_data(source: LayerRoot, record: rec.Write) -> int | None:
    """An fd on the file a Write record refers to, its range read-locked; None if gone.

    By file handle first (the file may have been renamed since), by path when the
    filesystem has no handles.  The read lock waits for a write of this range still in
    progress (:class:`DataWriter`); closing the fd drops it.
    """
    fd = -1
    if record.handle:
        try:
            fd = open_by_handle(source.mount_fd(), record.handle, os.O_RDONLY)
        except OSError as exc:
            if exc.errno in (errno.ESTALE, errno.ENOENT):
                return None
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
    if fd < 0:  # by path: whatever the user put there now, so looked at before it is opened
        try:
            parent, name = source.parent_fd(record.path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            # only a regular file: a FIFO put there would hold this thread in open(2)
            fd = open_regular_at(parent, name, os.O_RDONLY)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR,
                                 errno.ENXIO):
                raise
            return None  # gone, or no longer a file: as a file gone
        finally:
            os.close(parent)
    if record.length:
        try:
            range_lock(fd, record.offset, record.length, fcntl.F_RDLCK, wait=True)
        except BaseException:
            os.close(fd)
            raise
    return fd


def read_write_data(source: LayerRoot, record: rec.Write) -> bytes | None:
    """The bytes a Write record refers to, read from the live source layer root."""
    fd = open_write_data(source, record)
    if fd is None:
        return None
    try:
        return os.pread(fd, record.length, record.offset)
    finally:
        os.close(fd)  # drops the lock
