"""Streaming a user's journal to replicas: the wire format, the replica, the two ends of a link.

Model
=====

A user's upper changes only through journaled records (``sdeefs.journal``).  A
*replica* is a copy of the user's layer root on a compute node that applies the
same records in the same order; after record N it holds the upper as it was
after record N on the login node.  Records stream as they are written, so when
a job starts its environment is already on the node.

Replicas pull: ``sdeefs-replicad`` on a compute node connects to an upstream (the
login node's daemon, which reads the journal, or another replica relaying what it
applied: a tree, see ``sdeefs.replicad``), says which user and from which seq,
and receives RECORD frames; it answers with ACKs of what it applied.  When the
upstream no longer holds the records a replica needs (trimmed, or a relay's
buffer moved on), it sends a *snapshot*: the whole upper as a sequence of
ordinary records applied into a staging directory, verified against a digest of
the tree, then swapped in.  A replica never has a silent gap.

Wire format (version 3)
=======================

Every frame::

    header   FRAME_HEADER, 24 bytes, little endian
             magic    4s   b"SDRP"
             version  u8   3 (see "Versions" below)
             type     u8   HELLO RECORD ACK ERROR HEAD REDIRECT SNAPSHOT SNAPSHOT_END
             flags    u16  RECORD/SNAPSHOT: MORE (1) = more chunks of this seq follow;
                           RECORD: SKIP (2) = the seqs between the previous frame and
                           this one were markers (Done/Sync/Abort: nothing to apply)
             length   u32  payload bytes (at most MAX_FRAME_PAYLOAD)
             seq      u64  see below
             crc32    u32  of the header (crc field zero) and the payload
    payload  ``length`` bytes
    mac      32 bytes: HMAC-SHA256(key, header + payload)

A stream never stops short of the position it has reached (a replica's barrier
depends on it): markers (Done/Sync/Abort, nothing to apply) are left out only when
a later frame of the same batch follows them and carries SKIP; a batch that ends in
markers ends with the last of them as a RECORD frame of its own (applying it only
moves the replica's applied seq).  A relay forwards every RECORD frame it applied,
its SKIP flag included, and holds back only an incomplete record (MORE), so its
followers reach exactly its position.  The upstream never needs a later record to
say how far a follower is.

The two HELLOs are authenticated with the shared key; every later frame with the
session key HMAC-SHA256(shared key, b"sdeefs-replication" + replica nonce +
upstream nonce), so a frame recorded in one session is worthless in another.

==============  =========  ==========================================================
frame           direction  seq / payload
==============  =========  ==========================================================
HELLO           replica →  seq: first seq wanted.  nonce 16s, journal id 16s (zero:
                           none held), flags u16 (QUERY: answer the head, stream
                           nothing), port u16 (where this replica relays; 0: it
                           does not), user (u16 + bytes), node (u16 + bytes)
HELLO           ← upstream seq: upstream's head.  nonce 16s, journal id 16s
REDIRECT        ← upstream "host:port" of another upstream to ask (tree fan-out)
RECORD          ← upstream seq: journal seq.  rtype u16, record length u32, record
                           (``sdeefs.records``), then data for Write records; big
                           writes are chunks of one seq with MORE on all but the last
SNAPSHOT        ← upstream seq: the snapshot's position.  A RECORD-style payload
SNAPSHOT_END    ← upstream seq: as SNAPSHOT.  32 bytes: digest of the tree (tree_digest)
HEAD            ← upstream seq: upstream's head (sent when idle: lag, liveness)
ACK             replica →  seq: last applied.  Empty payload: the subtree report
                           is as last sent.  Otherwise the subtree report: u32
                           count, then per replica below this one (all of them, at
                           any depth): node (u16 + bytes), applied u64.  Sent when
                           it changed, at most every REPORT_INTERVAL; bounded only
                           by MAX_FRAME_PAYLOAD (over 100,000 nodes of short names;
                           a longer one is cut to what fits)
ERROR           either     UTF-8 message; the connection ends
==============  =========  ==========================================================

Versions: 3 carries records in encoding version 2 of ``sdeefs.records`` (path
fields with a u32 length, up to ``records.MAX_PATH``: trees deeper than PATH_MAX)
and ACK subtree reports with a u32 count, sent only when they change; version 2
carried encoding 1 (u16, at most 4096 bytes) and u16 report counts.  Frames of both have the
same header, so a peer of another version is recognised from its first frame and
refused with one clear error (``VersionMismatch``: "the peer speaks replication
protocol version 2, this node version 3: run the same sdeefs release on both"),
never misparsed.  A new upstream answers an old replica's HELLO with that ERROR in
version 2, which the old replica can read and shows; a new replica says it of the
old upstream's first frame.  Both ends must run the same release.

Replica rules (every byte from a peer is hostile): a frame with a bad magic,
version, CRC, MAC or length is rejected; a RECORD whose seq is neither applied + 1
nor a MORE continuation (nor, with SKIP, beyond it) is rejected ("out of sequence");
records are decoded
strictly (``sdeefs.records``: no unsafe path, no device node) and made safe:
set-user/group-ID bits are stripped from every mode, xattrs other than
``user.*`` and the overlay's own ``trusted.overlay.*`` are refused (so no
``security.capability``).  Paths resolve under the replica's layer root with
``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)``.  A rejected frame changes
nothing, is logged, and ends the connection with ERROR.

Replica state on disk (``REPLICA_DIR/USER/``)
=============================================

``upper/`` and ``work/`` (the copy), ``position`` (POSITION: journal id, boot id,
applied seq, in-flight seq and inode; rewritten in place after every record,
never fsynced: it survives a ``kill -9`` of the daemon, not a power loss) and
``durable`` (journal id, synced seq, clean flag; replaced atomically with fsync).
Before the first record after a sync point ``durable`` says *dirty*; every few
seconds the filesystem is ``syncfs``-ed and ``durable`` says *clean at seq N*.
On start: the same boot → trust ``position`` (re-apply the in-flight record,
idempotently: renames compare the replica's own inode number, saved in
``position`` before the rename); another boot → trust ``durable`` if clean,
otherwise start over (a full, verified resync).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import attrs
import trio

from . import records as rec
from .apply import apply_record
from .errors import BadRecord
from .layers import LayerRoot, open_layer_root
from .sysio import RENAME_EXCHANGE, boot_id, renameat2, syncfs, write_file_atomic
from .trees import rmtree, walk

log = logging.getLogger(__name__)

MAGIC = b"SDRP"
VERSION = 3  # records.RECORD_VERSION 2; the ACK's subtree report: u32 count, may be left out
OLD_VERSIONS = (2,)  # same frame header: told in their own version why they are refused
HELLO, RECORD, ACK, ERROR, HEAD, REDIRECT, SNAPSHOT, SNAPSHOT_END = range(1, 9)
FRAME_TYPES = range(1, 9)
MORE = 1
SKIP = 2  # the seqs before this frame's were markers, not sent (a third of a journal)
QUERY = 1  # HELLO flag: only tell me your head (the SLURM prolog's barrier), then close
FRAME_HEADER = struct.Struct("<4sBBHIQI")
assert FRAME_HEADER.size == 24
MAC_SIZE = 32
MAX_FRAME_PAYLOAD = 2 << 20
CHUNK = 1 << 20  # data bytes per RECORD frame
# A Write record (path, handle, range) and a chunk of data fit in one frame:
assert 6 + 4 + rec.MAX_PATH + 4 + rec.MAX_HANDLE + 16 + CHUNK <= MAX_FRAME_PAYLOAD
NONCE_SIZE = 16
ID_SIZE = 16
NO_ID = bytes(ID_SIZE)
REPORT_COUNT = struct.Struct("<I")
REPORT_ENTRY = struct.Struct("<Q")  # after the node's name
REPORT_INTERVAL = 1.0  # seconds: at most one subtree report per link this often
IN_FLIGHT_BYTES = 8 << 20  # payload received and not yet applied (a replica's memory bound)
ALLOWED_XATTR_PREFIXES = (b"user.", b"trusted.overlay.")
_NAME = re.compile(rb"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}\Z")


class ProtocolError(Exception):
    """A frame or a record that must not be applied; nothing was changed."""


class VersionMismatch(ProtocolError):
    """The peer speaks another version of the protocol (``peer_version``)."""

    def __init__(self, peer_version: int) -> None:
        super().__init__(f"the peer speaks replication protocol version {peer_version}, this "
                         f"node version {VERSION}: run the same sdeefs release on both")
        self.peer_version = peer_version


class Redirected(Exception):
    """The upstream has enough followers for this user: ask ``address`` instead."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address


@attrs.frozen
class Frame:
    type: int
    seq: int
    payload: bytes = b""
    flags: int = 0


def session_key(shared_key: bytes, replica_nonce: bytes, upstream_nonce: bytes) -> bytes:
    return hmac.new(shared_key, b"sdeefs-replication" + replica_nonce + upstream_nonce,
                    hashlib.sha256).digest()


def encode_frame(frame: Frame, key: bytes, version: int = VERSION) -> bytes:
    """The frame on the wire.  ``version`` other than VERSION only for an ERROR frame
    telling a peer of an old version (OLD_VERSIONS: same header) why it is refused."""
    if len(frame.payload) > MAX_FRAME_PAYLOAD:
        raise ValueError("frame payload too large")
    header = FRAME_HEADER.pack(MAGIC, version, frame.type, frame.flags, len(frame.payload),
                               frame.seq, 0)
    crc = zlib.crc32(frame.payload, zlib.crc32(header))
    header = header[:-4] + struct.pack("<I", crc)
    mac = hmac.new(key, header, hashlib.sha256)
    mac.update(frame.payload)
    return b"".join((header, frame.payload, mac.digest()))


def decode_header(data: bytes) -> tuple[int, int, int, int, int]:
    """(type, flags, length, seq, crc) of a frame header; ProtocolError if malformed."""
    if len(data) != FRAME_HEADER.size:
        raise ProtocolError("truncated frame header")
    magic, version, ftype, flags, length, seq, crc = FRAME_HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError("not an sdeefs replication frame (bad magic)")
    if version != VERSION:
        raise VersionMismatch(version)
    if ftype not in FRAME_TYPES or flags & ~(MORE | SKIP):
        raise ProtocolError(f"bad frame type {ftype} or flags {flags:#x}")
    if length > MAX_FRAME_PAYLOAD:
        raise ProtocolError(f"frame of {length} bytes is too large")
    return ftype, flags, length, seq, crc


def check_frame(header: bytes, payload: bytes, mac: bytes, key: bytes) -> Frame:
    """Verify CRC and MAC of a received frame; return it or raise ProtocolError."""
    ftype, flags, length, seq, crc = decode_header(header)
    if len(payload) != length or len(mac) != MAC_SIZE:
        raise ProtocolError("frame truncated")
    if zlib.crc32(payload, zlib.crc32(header[:-4] + b"\0\0\0\0")) != crc:
        raise ProtocolError("frame checksum mismatch")
    want = hmac.new(key, header, hashlib.sha256)
    want.update(payload)
    if not hmac.compare_digest(want.digest(), mac):
        raise ProtocolError("frame authentication failed")
    return Frame(ftype, seq, payload, flags)


async def _receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            if not data:
                raise EOFError("connection closed")
            raise ProtocolError("connection closed in the middle of a frame")
        data += chunk
    return bytes(data)


async def receive_frame(stream: trio.abc.ReceiveStream, key: bytes) -> Frame:
    """The next verified frame; EOFError at a clean end of stream."""
    header = await _receive_exactly(stream, FRAME_HEADER.size)
    try:
        _, _, length, _, _ = decode_header(header)
    except VersionMismatch:
        # Take in the rest of the peer's frame (the header is the same in every version):
        # closing on unread bytes would reset the connection, and the ERROR telling the
        # peer why could be lost with it.
        length = FRAME_HEADER.unpack(header)[4]
        if length <= MAX_FRAME_PAYLOAD:
            with contextlib.suppress(EOFError, ProtocolError):
                await _receive_exactly(stream, length + MAC_SIZE)
        raise
    try:
        payload = await _receive_exactly(stream, length) if length else b""
        mac = await _receive_exactly(stream, MAC_SIZE)
    except EOFError:
        raise ProtocolError("connection closed in the middle of a frame") from None
    return check_frame(header, payload, mac, key)


@contextlib.asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery that raises its first real error itself, not wrapped in an ExceptionGroup.

    A link has a few tasks (reader, applier, ACK receiver); when one fails the others
    are cancelled, and callers want to catch *that* error (ProtocolError, OSError) to
    log it and reconnect, not an ExceptionGroup they would have to unpack everywhere.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        raise _first_error(group) from None


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_error(exc)
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group.exceptions[0]


class FrameReader:
    """Frames from a stream through one buffer: a stream of small records costs one
    ``recv`` per READ_SIZE bytes, not three awaits per frame.  Never reads past what the
    caller consumes *in frames*, so it takes over a stream after receive_frame()."""

    READ_SIZE = 1 << 20

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.pos = 0

    async def _fill(self, need: int, started: bool) -> None:
        while len(self.buf) - self.pos < need:
            if self.pos:
                del self.buf[:self.pos]
                self.pos = 0
            chunk = await self.stream.receive_some(max(need - len(self.buf), self.READ_SIZE))
            if not chunk:
                if started or self.buf:
                    raise ProtocolError("connection closed in the middle of a frame")
                raise EOFError("connection closed")
            self.buf += chunk

    async def frame(self, key: bytes) -> Frame:
        """The next verified frame; EOFError at a clean end of stream."""
        await self._fill(FRAME_HEADER.size, False)
        start = self.pos
        header = bytes(self.buf[start:start + FRAME_HEADER.size])
        _, _, length, _, _ = decode_header(header)
        total = FRAME_HEADER.size + length + MAC_SIZE
        await self._fill(total, True)
        start = self.pos
        payload = bytes(self.buf[start + FRAME_HEADER.size:start + FRAME_HEADER.size + length])
        mac = bytes(self.buf[start + total - MAC_SIZE:start + total])
        self.pos = start + total
        return check_frame(header, payload, mac, key)


# -- HELLO and ACK payloads --------------------------------------------------------------------


@attrs.frozen
class Hello:
    """What a replica asks for: ``user``'s records from ``want`` on (see the module docstring)."""

    nonce: bytes
    journal_id: bytes
    user: str
    node: str
    want: int
    flags: int = 0
    port: int = 0


def _name_field(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<H", len(raw)) + raw


def _take_name(payload: bytes, offset: int, what: str) -> tuple[str, int]:
    if offset + 2 > len(payload):
        raise ProtocolError(f"{what} missing")
    (length,) = struct.unpack_from("<H", payload, offset)
    raw = payload[offset + 2:offset + 2 + length]
    if len(raw) != length or not _NAME.match(raw):
        raise ProtocolError(f"bad {what} {raw[:64]!r}")
    return raw.decode(), offset + 2 + length


def encode_hello(hello: Hello) -> Frame:
    payload = (hello.nonce + hello.journal_id + struct.pack("<HH", hello.flags, hello.port)
               + _name_field(hello.user) + _name_field(hello.node))
    return Frame(HELLO, hello.want, payload)


def decode_hello(frame: Frame) -> Hello:
    payload = frame.payload
    if frame.type != HELLO or len(payload) < NONCE_SIZE + ID_SIZE + 4:
        raise ProtocolError("expected HELLO")
    nonce, jid = payload[:NONCE_SIZE], payload[NONCE_SIZE:NONCE_SIZE + ID_SIZE]
    flags, port = struct.unpack_from("<HH", payload, NONCE_SIZE + ID_SIZE)
    user, offset = _take_name(payload, NONCE_SIZE + ID_SIZE + 4, "user name")
    node, offset = _take_name(payload, offset, "node name")
    if offset != len(payload) or flags & ~QUERY or frame.seq < 1:
        raise ProtocolError("malformed HELLO")
    return Hello(nonce, jid, user, node, frame.seq, flags, port)


def encode_report(report: list[tuple[str, int]]) -> bytes:
    """A subtree report for an ACK: every entry that fits in one frame."""
    parts, size = [], REPORT_COUNT.size
    for node, seq in report:
        part = _name_field(node) + REPORT_ENTRY.pack(seq)
        if size + len(part) > MAX_FRAME_PAYLOAD:
            break
        parts.append(part)
        size += len(part)
    return REPORT_COUNT.pack(len(parts)) + b"".join(parts)


def decode_report(payload: bytes) -> list[tuple[str, int]]:
    if len(payload) < REPORT_COUNT.size:
        raise ProtocolError("ACK report truncated")
    (count,) = REPORT_COUNT.unpack_from(payload)
    if count > len(payload) // (2 + 1 + REPORT_ENTRY.size):  # no count a payload cannot hold
        raise ProtocolError("ACK report too long for its frame")
    offset, report = REPORT_COUNT.size, []
    for _ in range(count):
        node, offset = _take_name(payload, offset, "node name")
        if offset + REPORT_ENTRY.size > len(payload):
            raise ProtocolError("ACK report truncated")
        (seq,) = REPORT_ENTRY.unpack_from(payload, offset)
        offset += REPORT_ENTRY.size
        report.append((node, seq))
    if offset != len(payload):
        raise ProtocolError("trailing bytes in ACK report")
    return report


# -- record payloads -------------------------------------------------------------------------


def encode_record_payload(record: rec.Record, data: bytes = b"") -> bytes:
    rtype, body = rec.encode_record(record)
    return struct.pack("<HI", rtype, len(body)) + body + data


def decode_record_payload(payload: bytes) -> tuple[rec.Record, bytes]:
    """(record, data) from a RECORD payload, made safe to apply; ProtocolError otherwise."""
    if len(payload) < 6:
        raise ProtocolError("record frame too short")
    rtype, length = struct.unpack_from("<HI", payload)
    if 6 + length > len(payload):
        raise ProtocolError("record runs past the frame")
    try:
        record = rec.decode_record(rtype, bytes(payload[6:6 + length]))
    except BadRecord as exc:
        raise ProtocolError(f"bad record: {exc}") from None
    data = payload[6 + length:]
    if isinstance(record, rec.Write):
        if len(data) > record.length:
            raise ProtocolError("more data than the write record covers")
    elif data:
        raise ProtocolError("data attached to a record that takes none")
    return sanitize(record), data


def sanitize(record: rec.Record) -> rec.Record:
    """What a replica applies: no set-ID bits, only the xattrs an upper legitimately has."""
    if isinstance(record, rec.Mkdir | rec.Mknod | rec.Setattr) and record.mode & 0o6000:
        record = attrs.evolve(record, mode=record.mode & ~0o6000)
    if isinstance(record, rec.Setxattr | rec.Removexattr) and not record.name.startswith(
            ALLOWED_XATTR_PREFIXES):
        raise ProtocolError(f"xattr {record.name[:64]!r} is not replicated")
    if isinstance(record, rec.Mknod) and stat.S_ISCHR(record.mode) and record.mode & 0o7777:
        raise ProtocolError("a whiteout must have mode 0")
    return record


def encode_write_frames(seq: int, record: rec.Write, fd: int | None, key: bytes,
                        first_flags: int = 0) -> list[bytearray]:
    """The encoded RECORD frames of a Write record, its data read from ``fd`` straight into
    the frame buffers (no copy of the data: this is the bulk of a stream).

    Byte for byte what ``encode_frame(record_frames(...))`` produces; ``fd`` None (the file
    is gone) or a short file gives a shorter write, as ``read_write_data`` would.
    ``first_flags`` (SKIP) goes on the first frame only.
    """
    out: list[bytearray] = []
    start = 0
    while True:
        want = min(CHUNK, record.length - start)
        part = attrs.evolve(record, offset=record.offset + start, length=want)
        rtype, body = rec.encode_record(part)
        head = FRAME_HEADER.size + 6 + len(body)
        buf = bytearray(head + want + MAC_SIZE)
        view = memoryview(buf)
        got = os.preadv(fd, [view[head:head + want]], record.offset + start) \
            if fd is not None and want else 0
        if got < want:  # the file is shorter now: send what it holds, as read_write_data
            rtype, body = rec.encode_record(attrs.evolve(part, length=got))  # same size
        more = MORE if got == want and start + want < record.length else 0
        length = head - FRAME_HEADER.size + got
        FRAME_HEADER.pack_into(buf, 0, MAGIC, VERSION, RECORD, more | (first_flags if not out
                                                                       else 0), length, seq, 0)
        struct.pack_into("<HI", buf, FRAME_HEADER.size, rtype, len(body))
        view[FRAME_HEADER.size + 6:head] = body
        end = head + got
        crc = zlib.crc32(view[FRAME_HEADER.size:end], zlib.crc32(view[:FRAME_HEADER.size]))
        struct.pack_into("<I", buf, FRAME_HEADER.size - 4, crc)
        mac = hmac.new(key, view[:end], hashlib.sha256).digest()
        view[end:end + MAC_SIZE] = mac
        del view
        if end + MAC_SIZE != len(buf):
            del buf[end + MAC_SIZE:]
        out.append(buf)
        start += got
        if not more:
            return out


def record_frames(seq: int, record: rec.Record, data: bytes | None,
                  ftype: int = RECORD) -> list[Frame]:
    """The frames of one record; a Write's data split into MORE-chained chunks."""
    if not isinstance(record, rec.Write):
        return [Frame(ftype, seq, encode_record_payload(record))]
    data = data or b""
    frames = []
    for start in range(0, max(len(data), 1), CHUNK):
        chunk = data[start:start + CHUNK]
        part = attrs.evolve(record, offset=record.offset + start, length=len(chunk))
        more = MORE if start + CHUNK < len(data) else 0
        frames.append(Frame(ftype, seq, encode_record_payload(part, chunk), more))
    return frames


# -- trees: digest and snapshot ------------------------------------------------------------------


def _allowed_xattrs(dir_fd: int, name: str) -> list[tuple[bytes, bytes]]:
    path = f"/proc/self/fd/{dir_fd}/{name}" if name else f"/proc/self/fd/{dir_fd}"
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    found = []
    for xname in sorted(names):
        raw = xname.encode()
        if raw.startswith(ALLOWED_XATTR_PREFIXES):
            with contextlib.suppress(OSError):
                found.append((raw, os.getxattr(path, xname, follow_symlinks=False)))
    return found


@attrs.frozen
class TreeEntry:
    """One entry of a tree as a replica must reproduce it (times and inode numbers aside)."""

    path: bytes  # relative to the tree, b"" for its root
    st: os.stat_result
    link_target: bytes
    xattrs: tuple[tuple[bytes, bytes], ...]

    def key(self, content_hash: bytes) -> bytes:
        st = self.st
        kind = stat.S_IFMT(st.st_mode)
        fields = (self.path, kind, stat.S_IMODE(st.st_mode) & ~0o6000, st.st_uid, st.st_gid,
                  st.st_size if kind == stat.S_IFREG else 0,
                  0 if kind == stat.S_IFDIR else st.st_nlink, st.st_rdev,
                  self.link_target, content_hash, self.xattrs)
        return repr(fields).encode()


def walk_tree(root_fd: int) -> Iterator[tuple[TreeEntry, int, str]]:
    """Every entry of the tree under ``root_fd``, parents first, without following symlinks.

    Yields (entry, parent fd, name); the fds are valid only until the next step.  Every
    directory is opened relative to its parent with O_NOFOLLOW (``sdeefs.trees``, any
    depth), so a tree that changes while it is walked (a user renaming a directory to a
    symlink) never leads outside.
    """
    for visit in walk(root_fd):
        name = os.fsdecode(visit.name)
        st = visit.st
        target = os.fsencode(os.readlink(name, dir_fd=visit.dir_fd)) \
            if visit.name and stat.S_ISLNK(st.st_mode) else b""
        xattrs = tuple(_allowed_xattrs(visit.dir_fd, name)) \
            if not stat.S_ISLNK(st.st_mode) else ()
        yield TreeEntry(visit.path, st, target, xattrs), visit.dir_fd, name


def _read_regular(dir_fd: int, name: str) -> Iterator[bytes]:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd) if name \
        else os.dup(dir_fd)
    try:
        offset = 0
        while True:
            chunk = os.pread(fd, CHUNK, offset)
            if not chunk:
                return
            yield chunk
            offset += len(chunk)
    finally:
        os.close(fd)


def tree_digest(root: str) -> bytes:
    """SHA-256 over every entry below a tree's root: type, mode (set-ID bits aside), owner,
    size, link count, content, symlink target, replicated xattrs.  Equal digests: equal
    trees.  The root directory's own mode and owner are not part of it: a layer root's
    are set by whoever made it (the launcher at login, the replica daemon)."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        keys = []
        for entry, dir_fd, name in walk_tree(root_fd):
            if not entry.path:
                keys.append(_root_key(entry))
                continue
            content = b""
            if stat.S_ISREG(entry.st.st_mode):
                h = hashlib.sha256()
                for chunk in _read_regular(dir_fd, name):
                    h.update(chunk)
                content = h.digest()
            keys.append(entry.key(content))
    finally:
        os.close(root_fd)
    return _digest_of(keys)


def _root_key(entry: TreeEntry) -> bytes:
    return repr((b"", entry.xattrs)).encode()


def _digest_of(keys: list[bytes]) -> bytes:
    h = hashlib.sha256()
    for key in sorted(keys):
        h.update(struct.pack("<I", len(key)) + key)
    return h.digest()


def snapshot_frames(upper: str, seq: int, digest_out: list[bytes]) -> Iterator[Frame]:
    """The upper as SNAPSHOT frames (records that rebuild it in an empty layer root).

    The digest of what was sent (the same function as ``tree_digest``) is appended
    to ``digest_out`` when the walk ends, for the SNAPSHOT_END frame.
    """
    root_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    keys: list[bytes] = []
    first_link: dict[tuple[int, int], bytes] = {}
    dirs: list[TreeEntry] = []
    try:
        for entry, dir_fd, name in walk_tree(root_fd):
            st, path = entry.st, b"upper/" + entry.path if entry.path else b"upper"
            kind = stat.S_IFMT(st.st_mode)
            perm = stat.S_IMODE(st.st_mode) & ~0o6000
            content = b""
            if kind == stat.S_IFDIR:
                if entry.path:
                    yield from record_frames(seq, rec.Mkdir(path, perm, st.st_uid, st.st_gid),
                                             None, SNAPSHOT)
                dirs.append(entry)
            elif kind == stat.S_IFLNK:
                yield from record_frames(seq, rec.Symlink(path, entry.link_target, st.st_uid,
                                                          st.st_gid), None, SNAPSHOT)
            elif kind == stat.S_IFREG and st.st_nlink > 1 and (st.st_dev, st.st_ino) \
                    in first_link:
                yield from record_frames(seq, rec.Link(first_link[st.st_dev, st.st_ino], path),
                                         None, SNAPSHOT)
                h = hashlib.sha256()
                for chunk in _read_regular(dir_fd, name):
                    h.update(chunk)
                content = h.digest()
            elif kind in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK) or (
                    kind == stat.S_IFCHR and st.st_rdev == 0):
                mode = kind | (0 if kind == stat.S_IFCHR else perm)
                yield from record_frames(seq, rec.Mknod(path, mode, st.st_uid, st.st_gid),
                                         None, SNAPSHOT)
                if kind == stat.S_IFREG:
                    first_link[st.st_dev, st.st_ino] = path
                    h = hashlib.sha256()
                    offset = 0
                    for chunk in _read_regular(dir_fd, name):
                        h.update(chunk)
                        write = rec.Write(path, b"", offset, len(chunk))
                        yield Frame(SNAPSHOT, seq, encode_record_payload(write, chunk))
                        offset += len(chunk)
                    content = h.digest()
                    if offset != st.st_size:  # changed under us: the digest will tell
                        log.warning("snapshot: %r changed size while read", path)
            else:
                log.warning("snapshot: skipping %r (a device node has no place in an upper)",
                            path)
                continue
            for xname, value in entry.xattrs:
                yield from record_frames(seq, rec.Setxattr(path, xname, value), None, SNAPSHOT)
            if kind not in (stat.S_IFDIR, stat.S_IFLNK):
                yield from record_frames(seq, _times(path, st, rec.SET_MODE | rec.SET_OWNER),
                                         None, SNAPSHOT)
            keys.append(entry.key(content) if entry.path else _root_key(entry))
        for entry in reversed(dirs):  # times last: creating the entries changed them
            path = b"upper/" + entry.path if entry.path else b"upper"
            yield from record_frames(seq, _times(path, entry.st, rec.SET_MODE | rec.SET_OWNER),
                                     None, SNAPSHOT)
    finally:
        os.close(root_fd)
    digest_out.append(_digest_of(keys))


def _times(path: bytes, st: os.stat_result, extra: int) -> rec.Setattr:
    return rec.Setattr(path, extra | rec.SET_ATIME | rec.SET_MTIME,
                       stat.S_IMODE(st.st_mode) & ~0o6000, st.st_uid, st.st_gid, 0,
                       st.st_atime_ns, st.st_mtime_ns)


# -- the replica -----------------------------------------------------------------------------

POSITION = struct.Struct("<8s16s16sQQQI")
POSITION_MAGIC = b"SDRPPOS1"
SNAPSHOT_MARK = (1 << 64) - 1  # in-flight "seq": a snapshot was being swapped in


def _open_layers(root: str) -> LayerRoot:
    return open_layer_root(os.path.join(root, "upper"), os.path.join(root, "work"))


@attrs.define(eq=False)
class Replica:
    """One user's copy of the layer root on a compute node (see "Replica state" above).

    Not thread-safe by itself: the daemon applies under ``lock`` (also held while a
    relay reads the tree for a snapshot, so it reads one consistent state).

    Attributes:
        root: ``<replica dir>/<user>``.
        journal_id: the history this copy follows (NO_ID: none yet).
        applied: the last journal seq fully applied.
        pending: the seq whose chunks are being applied (0 if none).
        synced: the last seq known to be on stable storage.
    """

    root: str
    journal_id: bytes = NO_ID
    applied: int = 0
    pending: int = 0
    synced: int = 0
    dirty: bool = False
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    boot: bytes = attrs.field(factory=lambda: boot_id())  # looked up per instance
    _layers: LayerRoot | None = None
    _pos_fd: int = -1
    _staging: LayerRoot | None = None
    _staging_seq: int = 0

    upper = property(lambda self: os.path.join(self.root, "upper"))

    @classmethod
    def open(cls, root: str) -> Replica:
        os.makedirs(root, mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)
        for sub in ("upper", "work"):
            os.makedirs(os.path.join(root, sub), mode=0o755, exist_ok=True)
        replica = cls(root)
        replica._pos_fd = os.open(os.path.join(root, "position"),
                                  os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        replica._load()
        replica._layers = _open_layers(root)
        rmtree(os.path.join(root, "incoming"))
        return replica

    def close(self) -> None:
        for layers in (self._layers, self._staging):
            if layers is not None:
                layers.close()
        self._layers = self._staging = None
        if self._pos_fd >= 0:
            os.close(self._pos_fd)
            self._pos_fd = -1

    # -- persistence -----------------------------------------------------------------------

    def _load(self) -> None:
        data = os.pread(self._pos_fd, POSITION.size, 0)
        durable = self._read_durable()
        if len(data) == POSITION.size:
            magic, jid, boot, applied, inflight, _ino, crc = POSITION.unpack(data)
            if magic == POSITION_MAGIC and zlib.crc32(data[:-4]) == crc and boot == self.boot:
                if inflight == SNAPSHOT_MARK:
                    log.warning("replica %s: interrupted while swapping in a snapshot; "
                                "starting over", self.root)
                    self.reset()
                    return
                self.journal_id, self.applied = jid, applied
                self.synced = durable[1] if durable and durable[0] == jid else 0
                return
        if durable is not None and durable[2]:
            self.journal_id, self.applied = durable[0], durable[1]
            self.synced = self.applied
            self._write_position()
            return
        if durable is not None or len(data):
            log.warning("replica %s: not cleanly synced before a restart of the machine; "
                        "starting over (full resync)", self.root)
        self.reset()

    def _read_durable(self) -> tuple[bytes, int, bool] | None:
        try:
            with open(os.path.join(self.root, "durable"), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if len(data) != 16 + 8 + 1 + 4 or zlib.crc32(data[:-4]) != struct.unpack(
                "<I", data[-4:])[0]:
            return None
        return data[:16], struct.unpack_from("<Q", data, 16)[0], bool(data[24])

    def _write_durable(self, clean: bool) -> None:
        body = self.journal_id + struct.pack("<QB", self.synced, clean)
        write_file_atomic(os.path.join(self.root, "durable"),
                          body + struct.pack("<I", zlib.crc32(body)))

    def _write_position(self, inflight: int = 0, inflight_ino: int = 0) -> None:
        body = POSITION.pack(POSITION_MAGIC, self.journal_id, self.boot, self.applied,
                             inflight, inflight_ino, 0)[:-4]
        os.pwrite(self._pos_fd, body + struct.pack("<I", zlib.crc32(body)), 0)

    def _saved_inflight(self) -> tuple[int, int]:
        data = os.pread(self._pos_fd, POSITION.size, 0)
        if len(data) != POSITION.size:
            return 0, 0
        _, _, _, _, inflight, ino, _ = POSITION.unpack(data)
        return inflight, ino

    def sync(self) -> None:
        """Make everything applied durable (one syncfs), then say so in ``durable``."""
        if not self.dirty and self.synced == self.applied:
            return
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            syncfs(fd)
        finally:
            os.close(fd)
        self.synced = self.applied
        self._write_durable(clean=True)
        self.dirty = False

    def _mark_dirty(self) -> None:
        if not self.dirty:
            self._write_durable(clean=False)
            self.dirty = True

    def reset(self) -> None:
        """Forget everything: an empty copy that needs the history from the start."""
        for sub in ("upper", "work"):
            path = os.path.join(self.root, sub)
            if os.path.lexists(path):
                trash = os.path.join(self.root, f".trash-{sub}-{time.monotonic_ns()}")
                os.rename(path, trash)
                with contextlib.suppress(OSError):
                    rmtree(trash)
            os.mkdir(path, 0o755)
        if self._layers is not None:
            self._layers.close()
            self._layers = _open_layers(self.root)
        self.journal_id, self.applied, self.pending, self.synced = NO_ID, 0, 0, 0
        self._write_position()
        self._write_durable(clean=True)
        self.dirty = False

    def adopt(self, journal_id: bytes) -> None:
        """Follow ``journal_id``; a copy of another history is reset first."""
        if self.journal_id != journal_id:
            if self.journal_id != NO_ID:
                log.warning("replica %s: the user's journal was replaced; starting over",
                            self.root)
                self.reset()
            self.journal_id = journal_id
            self._write_position()
            self._write_durable(clean=True)

    # -- applying records -----------------------------------------------------------------

    def accept(self, frame: Frame) -> bool:
        """Apply one RECORD frame; True when its seq is complete (then ACK it)."""
        if frame.type != RECORD:
            raise ProtocolError(f"unexpected frame type {frame.type}")
        if self.pending:
            if frame.seq != self.pending:
                raise ProtocolError(f"out of sequence: seq {frame.seq} while {self.pending} "
                                    "is incomplete")
        elif frame.seq != self.applied + 1 and not (frame.flags & SKIP
                                                      and frame.seq > self.applied):
            raise ProtocolError(f"out of sequence: seq {frame.seq} after {self.applied}")
        record, data = decode_record_payload(frame.payload)
        assert self._layers is not None
        self._mark_dirty()
        if record.METADATA:
            record = self._local_rename(frame.seq, record)
        try:
            apply_record(self._layers, record, data if isinstance(record, rec.Write) else None)
        except OSError as exc:
            raise ProtocolError(f"record {frame.seq} cannot be applied: {exc}") from None
        if frame.flags & MORE:
            self.pending = frame.seq
            return False
        self.pending = 0
        self.applied = frame.seq
        self._write_position()
        return True

    def _local_rename(self, seq: int, record: rec.Record) -> rec.Record:
        """Note the in-flight record (and, for a rename, the source's inode *here*).

        ``apply_record`` decides whether a rename already happened by comparing the
        destination's inode number with ``src_ino``; the login node's number means
        nothing here, so the replica saves its own before renaming and uses it when
        the record is delivered again after a crash.
        """
        if not isinstance(record, rec.Rename):
            self._write_position(seq, 0)
            return record
        saved_seq, saved_ino = self._saved_inflight()
        if saved_seq == seq and saved_ino:
            return attrs.evolve(record, src_ino=saved_ino)
        assert self._layers is not None
        st = self._layers.lstat(record.src)
        ino = st.st_ino if st is not None else 0
        self._write_position(seq, ino)
        return attrs.evolve(record, src_ino=ino)

    # -- snapshots --------------------------------------------------------------------------

    def begin_snapshot(self, seq: int) -> None:
        incoming = os.path.join(self.root, "incoming")
        rmtree(incoming)
        for sub in ("", "upper", "work"):
            os.mkdir(os.path.join(incoming, sub), 0o755 if sub else 0o700)
        if self._staging is not None:
            self._staging.close()
        self._staging = _open_layers(incoming)
        self._staging_seq = seq

    def accept_snapshot(self, frame: Frame) -> None:
        if self._staging is None or frame.seq != self._staging_seq:
            raise ProtocolError("snapshot frame outside a snapshot")
        record, data = decode_record_payload(frame.payload)
        if not isinstance(record, rec.Mkdir | rec.Mknod | rec.Symlink | rec.Link | rec.Setattr
                          | rec.Setxattr | rec.Write):
            raise ProtocolError(f"{type(record).__name__} has no place in a snapshot")
        try:
            apply_record(self._staging, record, data if isinstance(record, rec.Write) else None)
        except OSError as exc:
            raise ProtocolError(f"snapshot record cannot be applied: {exc}") from None

    def finish_snapshot(self, seq: int, digest: bytes) -> None:
        """Verify the staged tree against ``digest``, then swap it in as the copy at ``seq``."""
        if self._staging is None or seq != self._staging_seq:
            raise ProtocolError("snapshot end outside a snapshot")
        incoming = os.path.join(self.root, "incoming")
        self._staging.close()
        self._staging = None
        got = tree_digest(os.path.join(incoming, "upper"))
        if not hmac.compare_digest(got, digest):
            with contextlib.suppress(OSError):
                rmtree(incoming)
            raise ProtocolError("snapshot does not match its digest; discarded")
        self.applied = 0
        self._write_position(SNAPSHOT_MARK)
        self._write_durable(clean=False)
        root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        in_fd = os.open(incoming, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for sub in (b"upper", b"work"):
                renameat2(in_fd, sub, root_fd, sub, RENAME_EXCHANGE)
        finally:
            os.close(in_fd)
            os.close(root_fd)
        assert self._layers is not None
        self._layers.close()
        self._layers = _open_layers(self.root)
        self.applied, self.pending = seq, 0
        self._write_position()
        self.dirty = True
        self.sync()
        with contextlib.suppress(OSError):
            rmtree(incoming)


# -- reading a live journal incrementally ------------------------------------------------------


# -- the replica end of a link ------------------------------------------------------------------


@attrs.define(eq=False)
class LinkStats:
    """Counters of one link, for ``sdeefs status`` and the deploy benchmark."""

    head: int = 0  # upstream's head as last reported
    bytes_received: int = 0
    frames: int = 0
    snapshots: int = 0
    connected: bool = False
    last_error: str = ""


async def follow(stream: trio.abc.Stream, replica: Replica, shared_key: bytes, user: str,
                 node: str, stats: LinkStats,
                 report: Callable[[], list[tuple[str, int]]] = list,
                 on_applied: Callable[[int, list[Frame]], None] | None = None,
                 on_snapshot: Callable[[], None] | None = None,
                 silence_timeout: float = 10.0, relay_port: int = 0,
                 wait_room: Callable[[int], Awaitable[None]] | None = None,
                 batch_bytes: int = IN_FLIGHT_BYTES) -> None:
    """Pull ``user``'s records over ``stream`` into ``replica`` until the upstream closes.

    Blocking work (applying, syncing) runs in worker threads under ``replica.lock``;
    the trio loop only moves bytes.  At most IN_FLIGHT_BYTES are read ahead of what
    is applied (TCP holds the upstream back), and ``wait_room(bytes)``, when given, is
    awaited before a batch of RECORD frames of that size (at most about
    ``batch_bytes``) is applied (a relay's buffer waiting for its followers).  An
    upstream silent for ``silence_timeout`` (it sends HEAD every second when idle) is
    taken for a lost link.  Raises Redirected, ProtocolError, ConnectionError or the
    stream's own errors; the caller reconnects.
    """
    nonce = secrets.token_bytes(NONCE_SIZE)
    hello = Hello(nonce, replica.journal_id, user, node, replica.applied + 1, 0, relay_port)
    await stream.send_all(encode_frame(encode_hello(hello), shared_key))
    answer = await receive_frame(stream, shared_key)
    if answer.type == REDIRECT:
        raise Redirected(answer.payload.decode(errors="replace"))
    if answer.type == ERROR:
        raise ProtocolError("upstream refused: " + answer.payload.decode(errors="replace"))
    if answer.type != HELLO or len(answer.payload) != NONCE_SIZE + ID_SIZE:
        raise ProtocolError("the upstream did not answer HELLO")
    key = session_key(shared_key, nonce, answer.payload[:NONCE_SIZE])
    upstream_id = answer.payload[NONCE_SIZE:]
    stats.head, stats.connected = answer.seq, True
    if replica.journal_id != upstream_id:
        had_history = replica.journal_id != NO_ID
        await trio.to_thread.run_sync(_locked, replica, replica.adopt, upstream_id)
        if had_history:
            return  # reconnect asking from seq 1 of the new history
    send, receive = trio.open_memory_channel[Frame](256)
    in_flight = 0  # payload bytes in the channel and in the batch being applied
    drained = trio.Event()

    frames = FrameReader(stream)

    async def reader() -> None:
        nonlocal in_flight
        async with send:
            while True:
                try:
                    with trio.fail_after(silence_timeout):
                        frame = await frames.frame(key)
                except EOFError:
                    return
                except trio.TooSlowError:
                    raise ConnectionError(f"upstream silent for {silence_timeout:.0f} s") \
                        from None
                stats.bytes_received += FRAME_HEADER.size + len(frame.payload) + MAC_SIZE
                stats.frames += 1
                if frame.type == ERROR:
                    raise ProtocolError("upstream: " + frame.payload.decode(errors="replace"))
                if frame.type == HEAD:
                    stats.head = max(stats.head, frame.seq)
                    continue
                while in_flight >= IN_FLIGHT_BYTES:
                    await drained.wait()
                in_flight += len(frame.payload)
                await send.send(frame)

    async def applier() -> None:
        nonlocal in_flight, drained
        async with receive:
            while True:
                try:
                    batch = [await receive.receive()]
                except trio.EndOfChannel:
                    return
                size = len(batch[0].payload)
                while len(batch) < 512 and size < batch_bytes:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    size += len(batch[-1].payload)
                if wait_room is not None:
                    await wait_room(sum(len(f.payload) for f in batch if f.type == RECORD))
                before, applied, snapshotted = await trio.to_thread.run_sync(
                    _apply_batch, replica, batch)
                in_flight -= size
                drained.set()
                drained = trio.Event()
                if snapshotted and on_snapshot is not None:
                    on_snapshot()
                if on_applied is not None:
                    on_applied(before, applied)
                stats.head = max(stats.head, replica.applied)
                await send_ack(b"")

    sending = trio.Lock()  # the applier and the reporter share the stream

    async def send_ack(payload: bytes) -> None:
        async with sending:
            await stream.send_all(encode_frame(Frame(ACK, replica.applied, payload), key))

    async def reporter() -> None:
        """The subtree report, when it changed: not with every ACK (it grows with the tree),
        and also when idle (a node that joined below must show up upstream)."""
        last: list[tuple[str, int]] = []
        while True:
            await trio.sleep(REPORT_INTERVAL)
            now = report()
            if now != last:
                await send_ack(encode_report(now))
                last = now

    async def syncer() -> None:
        while True:
            await trio.sleep(2.0)
            await trio.to_thread.run_sync(_locked, replica, replica.sync)

    try:
        async with open_nursery() as nursery:
            nursery.start_soon(syncer)
            nursery.start_soon(reporter)
            async with open_nursery() as inner:
                inner.start_soon(applier)
                await reader()
            nursery.cancel_scope.cancel()
    except ProtocolError as exc:
        log.error("replica %s of %s: rejected: %s", node, user, exc)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(encode_frame(Frame(ERROR, replica.applied,
                                                     str(exc).encode()[:4096]), key))
        raise
    finally:
        stats.connected = False
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_locked, replica, replica.sync)


def _locked(replica: Replica, fn: Callable[..., object], *args: object) -> object:
    with replica.lock:
        return fn(*args)


def _apply_batch(replica: Replica, batch: list[Frame]) -> tuple[int, list[Frame], bool]:
    """Apply frames in order (a worker thread).  Returns the applied seq before the first
    RECORD frame returned, those frames (for relaying), and whether a snapshot replaced the
    copy (then what was relayed before no longer leads here)."""
    applied: list[Frame] = []
    before, snapshotted = replica.applied, False
    with replica.lock:
        for frame in batch:
            if frame.type == RECORD:
                if not applied:
                    before = replica.applied
                replica.accept(frame)
                applied.append(frame)
            elif frame.type == SNAPSHOT:
                if replica._staging is None or replica._staging_seq != frame.seq:
                    replica.begin_snapshot(frame.seq)
                replica.accept_snapshot(frame)
            elif frame.type == SNAPSHOT_END:
                if replica._staging is None:
                    replica.begin_snapshot(frame.seq)  # an empty upper has no records
                replica.finish_snapshot(frame.seq, frame.payload)
                applied, snapshotted = [], True
            else:
                raise ProtocolError(f"unexpected frame type {frame.type} from upstream")
    return before, applied, snapshotted


# -- the upstream end of a link -----------------------------------------------------------------


@attrs.define(eq=False)
class Follower:
    """What an upstream knows of one replica following a user through it."""

    node: str
    user: str
    acked: int = 0
    sent_seq: int = 0
    bytes_sent: int = 0
    connected_at: float = attrs.field(factory=time.time)
    report: list[tuple[str, int]] = attrs.field(factory=list)


async def answer_hello(stream: trio.abc.Stream, shared_key: bytes,
                       hello_frame: Frame, head: int, journal_id: bytes) -> tuple[Hello, bytes]:
    """Decode the replica's HELLO, answer it; return (hello, session key)."""
    hello = decode_hello(hello_frame)
    nonce = secrets.token_bytes(NONCE_SIZE)
    await stream.send_all(encode_frame(Frame(HELLO, head, nonce + journal_id), shared_key))
    return hello, session_key(shared_key, hello.nonce, nonce)


async def receive_acks(stream: trio.abc.ReceiveStream, key: bytes, follower: Follower) -> None:
    """Record the follower's ACKs until it closes; an ERROR or a bad frame ends the link."""
    while True:
        try:
            frame = await receive_frame(stream, key)
        except EOFError:
            return
        if frame.type == ERROR:
            raise ProtocolError(f"replica {follower.node} refused: "
                                + frame.payload.decode(errors="replace"))
        if frame.type != ACK or frame.seq > follower.sent_seq:
            raise ProtocolError(f"replica {follower.node} sent a bad ACK")
        follower.acked = max(follower.acked, frame.seq)
        if frame.payload:
            follower.report = decode_report(frame.payload)


