"""fanotify(7) for the capture daemon: a notification group with FID reporting and a
filesystem mark, and the decoding of its events.

Event layout
============

A read(2) of the group returns whole events, packed, in the machine's byte order
(little endian: sysio refuses to import elsewhere).  Every event is

``struct fanotify_event_metadata`` (``METADATA``, 24 bytes)::

    event_len     u32  bytes of this event, info records included
    vers          u8   FANOTIFY_METADATA_VERSION (3)
    reserved      u8
    metadata_len  u16  24
    mask          u64  FAN_* bits of what happened
    fd            i32  FAN_NOFD (-1): groups that report FIDs get no descriptors
    pid           i32  the process that caused it

followed, up to ``event_len``, by info records, each starting with
``struct fanotify_event_info_header`` (``INFO_HEADER``, 4 bytes: info_type u8, pad u8,
len u16).  The FID kinds (``INFO_FID``, ``INFO_DFID``, ``INFO_DFID_NAME``,
``INFO_OLD_DFID_NAME``, ``INFO_NEW_DFID_NAME`` ...) continue with (``FID_INFO``)::

    fsid          8 bytes (two i32)
    handle_bytes  u32  \\  a ``struct file_handle``, exactly as name_to_handle_at(2)
    handle_type   i32   | returns it and open_by_handle_at(2) takes it
    f_handle      handle_bytes bytes /
    name          (the *_NAME kinds) NUL-terminated, then padding up to ``len``

What a group set up by :meth:`Group.open` reports (``FAN_REPORT_DFID_NAME |
FAN_REPORT_FID | FAN_REPORT_TARGET_FID``): for a directory entry event (create,
delete) the directory's handle with the entry's name, and the entry's own handle;
for a rename (``FAN_RENAME``, one event) the old and the new directory with their
names, and the moved entry's handle; for events on an inode (modify, attrib,
close_write) its handle, and its parent with its name when the kernel still knows
them; for events on a directory itself (``FAN_ONDIR``) no FID record but the
directory's own handle with the name ".".  Names can be stale (a hard link written
to is reported under the name used to open it, even if that name is gone by now):
the capture treats events as hints of where to look, never as the truth.

ext4 encodes handles as ``FILEID_INO32_GEN`` (type 1: u32 inode number, u32
generation), so the inode number of an event's object needs no syscall
(:func:`handle_ino`).

Blocking: the group is opened ``FAN_NONBLOCK``; :meth:`Group.read` returns an
empty list when nothing is queued, and ``trio.lowlevel.wait_readable(group.fd)``
waits for more (``sdeefs.fs.capture``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import attrs

from .. import sysio  # also: refuses to import on machines other than x86_64

# fanotify_init flags
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_UNLIMITED_QUEUE = 0x10
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_TARGET_FID = 0x1000
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

# fanotify_mark flags
FAN_MARK_ADD = 0x1
FAN_MARK_FILESYSTEM = 0x100

# event mask bits
FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_CLOSE_WRITE = 0x8
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_MOVE_SELF = 0x800
FAN_Q_OVERFLOW = 0x4000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000

FANOTIFY_METADATA_VERSION = 3
FAN_NOFD = -1

# info record types
INFO_FID = 1
INFO_DFID_NAME = 2
INFO_DFID = 3
INFO_OLD_DFID_NAME = 10
INFO_OLD_DFID = 11
INFO_NEW_DFID_NAME = 12
INFO_NEW_DFID = 13
DIR_INFOS = (INFO_DFID_NAME, INFO_DFID, INFO_OLD_DFID_NAME, INFO_OLD_DFID, INFO_NEW_DFID_NAME,
             INFO_NEW_DFID)
NAMED_INFOS = (INFO_DFID_NAME, INFO_OLD_DFID_NAME, INFO_NEW_DFID_NAME)

FILEID_INO32_GEN = 1

METADATA = struct.Struct("<IBBHQii")
assert METADATA.size == 24
INFO_HEADER = struct.Struct("<BBH")
assert INFO_HEADER.size == 4
FID_INFO = struct.Struct("<BBH8xIi")  # header, fsid (skipped), handle_bytes, handle_type
assert FID_INFO.size == 20
HANDLE_HEADER = struct.Struct("<Ii")  # struct file_handle: handle_bytes, handle_type
assert HANDLE_HEADER.size == 8
INO32_GEN = struct.Struct("<II")

READ_SIZE = 1 << 18  # bytes per read(2); an event is at most a few hundred bytes

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_SYS_NAME_TO_HANDLE_AT = 303  # x86_64


class BadEvent(Exception):
    """The kernel handed us an event we cannot decode (a version we do not know)."""


@attrs.frozen
class Event:
    """One event.

    ``handle`` is the object's file handle (``struct file_handle`` bytes), None if the
    event has none (overflow).  ``dirs`` holds, per directory info record, (info type,
    directory handle, name or b"").
    """

    mask: int
    pid: int
    handle: bytes | None
    dirs: tuple[tuple[int, bytes, bytes], ...]


@attrs.define(eq=False)
class Group:
    """A fanotify notification group (CAP_SYS_ADMIN: filesystem marks need it).

    Attributes:
        fd: the group's descriptor (non-blocking, close-on-exec).
    """

    fd: int

    @classmethod
    def open(cls, unlimited_queue: bool = True) -> Group:
        """A group reporting directory handles with names and the objects' handles.

        ``unlimited_queue``: no limit on queued events (the kernel charges their memory
        to this process's memory cgroup; when an allocation fails it queues an overflow
        event, as it does at the limit).  Otherwise the queue holds at most
        fs.fanotify.max_queued_events (16384 by default).
        """
        flags = (FAN_CLOEXEC | FAN_NONBLOCK | FAN_CLASS_NOTIF | FAN_REPORT_DFID_NAME
                 | FAN_REPORT_FID | FAN_REPORT_TARGET_FID)
        if unlimited_queue:
            flags |= FAN_UNLIMITED_QUEUE
        fd = _libc.fanotify_init(flags, os.O_RDONLY | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_init: {os.strerror(err)}")
        return cls(fd)

    def mark_filesystem(self, path: str | bytes, mask: int) -> None:
        """Watch every inode of the filesystem that holds ``path``."""
        p = os.fsencode(path)
        ret = _libc.fanotify_mark(self.fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, -100, p)
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fanotify_mark {p!r}: {os.strerror(err)}", p)

    def read(self, size: int = READ_SIZE) -> list[Event]:
        """The events queued now (one read(2)); empty when there are none."""
        return decode_events(self.read_raw(size))

    def read_raw(self, size: int = READ_SIZE) -> bytes:
        """The packed events queued now (one read(2)); b"" when there are none."""
        try:
            return os.read(self.fd, size)
        except (BlockingIOError, InterruptedError):
            return b""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def decode_events(data: bytes) -> list[Event]:
    """Decode a buffer of packed events (``METADATA`` + info records each)."""
    events = []
    view = memoryview(data)
    off = 0
    end_all = len(data)
    while off + METADATA.size <= end_all:
        event_len, vers, _, meta_len, mask, fd, pid = METADATA.unpack_from(data, off)
        if vers != FANOTIFY_METADATA_VERSION or event_len < meta_len \
                or off + event_len > end_all or meta_len < METADATA.size:
            raise BadEvent(f"fanotify event version {vers}, length {event_len}")
        if fd >= 0:  # never with FID reporting; do not leak it if a kernel sends one
            os.close(fd)
        end = off + event_len
        pos = off + meta_len
        handle = None
        dirs = []
        while pos + INFO_HEADER.size <= end:
            itype, _, ilen = INFO_HEADER.unpack_from(data, pos)
            if ilen < INFO_HEADER.size or pos + ilen > end:
                raise BadEvent(f"fanotify info record of length {ilen}")
            if itype == INFO_FID or itype in DIR_INFOS:
                _, _, _, hbytes, _ = FID_INFO.unpack_from(data, pos)
                hstart = pos + 12
                hend = hstart + HANDLE_HEADER.size + hbytes
                if hend > pos + ilen:
                    raise BadEvent("fanotify file handle runs past its info record")
                h = bytes(view[hstart:hend])
                if itype == INFO_FID:
                    handle = h
                else:
                    name = b""
                    if itype in NAMED_INFOS:
                        raw = bytes(view[hend:pos + ilen])
                        name = raw[:raw.find(b"\0")] if b"\0" in raw else raw
                    dirs.append((itype, h, name))
            pos += ilen
        events.append(Event(mask, pid, handle, tuple(dirs)))
        off = end
    return events


def handle_ino(handle: bytes) -> int | None:
    """The inode number in a handle, if its type carries one we can decode (ext4's)."""
    if len(handle) < HANDLE_HEADER.size:
        return None
    hbytes, htype = HANDLE_HEADER.unpack_from(handle)
    if htype == FILEID_INO32_GEN and hbytes == INO32_GEN.size == len(handle) - 8:
        return int(INO32_GEN.unpack_from(handle, 8)[0])
    return None


def handle_buffer() -> ctypes.Array[ctypes.c_char]:
    """A buffer for :func:`handle_of` (one per thread that calls it)."""
    return ctypes.create_string_buffer(HANDLE_HEADER.size + sysio.MAX_HANDLE_SZ)


def handle_of(dir_fd: int, name: bytes, buf: object = None) -> bytes:
    """name_to_handle_at(dir_fd, name, 0): the entry's own handle (a symlink is not
    followed), b"" if the filesystem has none.  ``buf``: from :func:`handle_buffer`.

    Identity beyond the inode number: the generation in the handle changes when the
    filesystem reuses a number for a new inode.
    """
    if not isinstance(buf, ctypes.Array):
        buf = handle_buffer()
    HANDLE_HEADER.pack_into(buf, 0, sysio.MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    ret = _syscall(_SYS_NAME_TO_HANDLE_AT, ctypes.c_int(dir_fd), ctypes.c_char_p(name), buf,
                   ctypes.byref(mount_id), ctypes.c_int(0))
    if ret < 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            return b""
        raise OSError(err, f"name_to_handle_at: {os.strerror(err)}", name)
    size, _ = HANDLE_HEADER.unpack_from(buf, 0)
    return bytes(buf.raw[:HANDLE_HEADER.size + size])


