"""The sdeefs journal: an append-only, checksummed log of every mutation of the upper.

Log model
=========

The journal describes changes to a *layer root*: a directory holding ``upper/``
(the user's layer, in kernel overlayfs format) and ``work/`` (overlayfs' work
directory, where copy-ups are staged).  Every record names paths relative to the
layer root, so ``upper/etc/profile`` or ``work/#1f``.  A record is an operation
*on the upper directory* (create a whiteout, set ``trusted.overlay.opaque``,
rename a staged copy-up into place), never a user-level overlay operation: a
replica that applies the records in order to an empty layer root ends with the
same tree, whatever engine (pure FUSE overlay, or kernel overlayfs over the
passthrough upper) produced them.

Files on disk
-------------
``STATE/journal/id``: 16 random bytes naming this journal's history.  Replicas keep
it with their position: a user whose state was deleted and recreated starts a new
history (seq 1 again), and a replica holding the old one must be rebuilt, not resumed.

``STATE/journal/seg-<first seq, 16 hex digits>.log``: segments, each starting
with a header, followed by records.  A new segment starts when the current one
exceeds ``segment_bytes``; trimming deletes whole segments whose records every
replica has acknowledged.

Segment header (``SEGMENT_HEADER``, 24 bytes, little endian)::

    magic      8s   b"SDEEFSJ\\0"
    version    u16  3 (1, 2: segments written before version 3, still read)
    reserved   u16  0
    first_seq  u64  sequence number of the first record in this segment
    crc32      u32  of the 20 bytes before it

Record frame (``FRAME_HEADER``, 20 bytes, then ``length`` payload bytes)::

    crc32      u32  of everything after this field: length, seq, type, flags, payload
    length     u32  payload bytes (at most MAX_PAYLOAD)
    seq        u64  strictly increasing by one across all segments, starting at 1
    type       u16  record type (see ``sdeefs.records``)
    flags      u16  0 (reserved)

Payload encodings are pinned per record type in ``sdeefs.records``; the segment's
version is the encoding of its records.  Version 3 is version 2 plus record type 21
(``Create``: a new file whole, its data by value); version 2 carries path fields with
a u32 length (at most ``records.MAX_PATH``, 64 KiB: trees deeper than PATH_MAX),
version 1 with a u16 length (at most 4096 bytes).  Frames are the same in all.  Old
journals need no conversion: a segment is read with its own version's encoding (a
Create in a version-1 or -2 segment is refused: BadRecord), and opening a journal
whose last segment is older starts a new segment (version 3) for what is appended
next, so no segment mixes encodings.
What is appended must pass ``records.check_record`` (ENAMETOOLONG or EINVAL
otherwise): the journal never holds a record its readers refuse.

Data by reference
-----------------
``Write`` records carry no data (a ``Create``, the capture's new small file, is the one
record that carries its data by value): they name the file (path and a persistent
kernel file handle) and the byte range.  The shipper reads the bytes from the
live upper when it sends the record.  Reading later data than the record saw
is harmless: every later change to those bytes has its own later record, so a
replica applying records in order converges to the byte-identical file.

Durability and ordering
-----------------------
* A metadata record is written (``write(2)`` into the page cache) *before* the
  operation it describes is performed on the upper, with no await in between,
  so at most one metadata record can be "in flight" when the daemon is killed:
  the last one.  On the next mount, recovery re-applies that record
  idempotently (``sdeefs.apply``), so the upper and the journal agree.
  If an operation fails after its record was written, an ``Abort`` record
  naming its sequence number follows it; replay skips aborted records.
* ``Write`` records are appended *before* the ``pwrite`` too.  If the daemon
  dies in between, the record names a range the file does not (fully) hold
  yet; the shipper reads whatever the file holds there (possibly nothing), so
  the journal still covers every byte of the upper.
* ``kill -9`` of the daemon loses nothing written: the page cache survives
  the process.  Power loss loses at most what was not yet ``fdatasync``-ed:
  every flush is followed by a ``Sync`` record certifying that all records
  before it are on disk.  The journal is synced by a background task every
  ``sync_interval`` seconds, and synchronously (group commit) whenever the user
  calls ``fsync``/``fdatasync`` on a file or directory of the view.
* On open, the last segment is scanned; a torn or checksum-failing tail is
  truncated away (that record was never acknowledged durably).  A bad record
  followed by an intact ``Sync`` record is corruption of durable data: it is
  reported (``JournalCorrupt``), never silently dropped.

A full disk
-----------
The journal lives on the upper's filesystem, so it shares its space with the user's
data.  A record that finds no room is refused like the operation it describes:
``OSError`` ENOSPC (or EDQUOT), nothing of it left in the segment (a short write is
cut back), the journal still writable; the operation is not performed, so the user
gets the error the filesystem would have given, and nothing else changes.  What
settles an operation already performed or frees space (``Done``, ``Abort``,
``Unlink``, ``Rmdir``) must never be refused for space: behind the tail of
the open segment the journal keeps ``RESERVE_BYTES`` preallocated (``fallocate``
with ``FALLOC_FL_KEEP_SIZE``: blocks past the end of the file, invisible to
readers), and any other record is written only while at least ``RESERVE_LOW`` of
that remains or can be preallocated again.  So on a full disk ``rm`` still journals
and frees space, and writing resumes.  Only an error other than lack of space, or
no space even in the reserve, turns the filesystem read-only (``FailsafeError``).
A new segment releases the reserve of the old one (a truncate to its own size).  A
``Sync`` record that finds no room is left out (it is informational).

Captured batches (the ``kernel`` engine)
----------------------------------------
With the kernel engine no sdeefs process is in the write path: kernel overlayfs
writes the upper directly and a capture daemon (``sdeefs.fs.capture``) turns
fanotify's change notifications into the same records, *after* the fact.  The
guarantee is then "captured before the barrier" instead of write-ahead: every
change whose syscall returned before a drain request is in the journal when the
drain answers (fanotify queues events inside the syscall).  Records come in
batches, ``Begin`` … ``Commit(begin)``, that take effect only as a whole; a batch
a crash left open is closed by ``Void(begin, end)`` at the next start, and
replay, check and replicas skip it.  Applying a batch to the tree the journal
described before it yields the upper as the capture saw it; whatever the capture
did not see yet (it died, the event queue overflowed) it finds by a full scan
of the upper against its model of the journal's tree, so the journal converges
to the upper after any crash.  What the user's fsync acknowledged is on the
upper's own filesystem, whatever happens to the capture.

Guarantees, side by side:

=================================  ===========================  ============================
                                   write-ahead (fuse, hybrid)   captured before the barrier
                                                                (kernel)
=================================  ===========================  ============================
record vs. change                  record first                 change first, record after
                                                                (≤ ``max_delay``, 0.25 s,
                                                                while the capture runs)
a job's barrier sees               everything before it         everything before it (the
                                                                login replicad drains the
                                                                capture before the head)
kill -9 of the journaling process  loses nothing; recovery      sessions go on; restarted,
                                   re-applies the last record   the capture scans and
                                                                converges
what fsync acknowledged            on the upper and journaled   on the upper (image);
                                                                journaled by the next scan
replicas                           byte-identical at the head   byte-identical at the head
``sdeefs check``                   replay == upper              replay == upper, after a
                                                                drain (it drains first)
writes through a shared mmap       journaled as they happen     journaled at close or at
                                                                the next full scan
=================================  ===========================  ============================

Readers of a kernel-engine journal (the origin's sender, ``sdeefs.replication.origin``)
hold every record from a ``Begin`` until its ``Commit`` or ``Void``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import NoReturn

import attrs

from .errors import BadRecord, FailsafeError, JournalCorrupt, PathTooLong
from .records import (
    MAX_PATH,
    MAX_XATTR_NAME,
    MAX_XATTR_VALUE,
    RECORD_VERSION,
    VERSIONS,
    Abort,
    Done,
    Record,
    Rmdir,
    Sync,
    Unlink,
    check_record,
    decode_record,
    encode_record,
    peek,
)
from .sysio import FALLOC_FL_KEEP_SIZE, fallocate, fsync_dir, start_writeback

log = logging.getLogger(__name__)

SEGMENT_MAGIC = b"SDEEFSJ\0"
SEGMENT_VERSION = RECORD_VERSION  # a segment's version is its records' encoding
SEGMENT_HEADER = struct.Struct("<8sHHQI")
assert SEGMENT_HEADER.size == 24
FRAME_HEADER = struct.Struct("<IIQHH")
assert FRAME_HEADER.size == 20
MAX_PAYLOAD = 1 << 20  # no record needs more: two paths (Rename), or a path and an xattr value
assert 2 * (4 + MAX_PATH) + 12 <= MAX_PAYLOAD
assert 4 + MAX_PATH + 2 + MAX_XATTR_NAME + 4 + MAX_XATTR_VALUE <= MAX_PAYLOAD
SYNC_FLUSHED = 1  # Sync.reason: every record before this one was fdatasync'ed
RESERVE_BYTES = 1 << 20  # preallocated behind a segment's tail (see "A full disk")
RESERVE_LOW = 256 << 10  # a record that is not settling is written only above this reserve
_IOV_MAX = 1024  # iovecs of one writev(2) (Linux UIO_MAXIOV)
# Records written into the reserve: they settle what was performed, or free space.
SETTLING = frozenset(cls.TYPE for cls in (Done, Abort, Unlink, Rmdir))
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_SEGMENT_NAME = re.compile(r"^seg-([0-9a-f]{16})\.log$")


def journal_id(directory: str) -> bytes:
    """The journal's history id (``directory/id``), created on first use."""
    path = os.path.join(directory, "id")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, os.urandom(16))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(directory)
    for _ in range(1000):  # another process may have created it and not yet written it
        with open(path, "rb") as f:
            data = f.read()
        if data:
            break
        time.sleep(0.001)
    if len(data) != 16:
        raise JournalCorrupt(f"{path}: a journal id is 16 bytes, not {len(data)}")
    return data


def list_segments(directory: str) -> list[tuple[int, str]]:
    """(first seq, path) of every segment in ``directory``, oldest first."""
    found = []
    for name in os.listdir(directory):
        m = _SEGMENT_NAME.match(name)
        if m:
            found.append((int(m.group(1), 16), os.path.join(directory, name)))
    return sorted(found)


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:016x}.log"


_FRAME_BODY = struct.Struct("<IQHH")
_FRAME_CRC = struct.Struct("<I")


def encode_frame(seq: int, record: Record, version: int = SEGMENT_VERSION) -> bytes:
    rtype, payload = encode_record(record, version)
    body = _FRAME_BODY.pack(len(payload), seq, rtype, 0) + payload
    return _FRAME_CRC.pack(zlib.crc32(body)) + body


def encode_segment_header(first_seq: int, version: int = SEGMENT_VERSION) -> bytes:
    head = struct.pack("<8sHHQ", SEGMENT_MAGIC, version, 0, first_seq)
    return head + struct.pack("<I", zlib.crc32(head))


def read_segment_header(data: bytes) -> tuple[int, int]:
    """(first sequence number, version) of a segment; JournalCorrupt if the header is bad."""
    if len(data) < SEGMENT_HEADER.size:
        raise JournalCorrupt("segment header truncated")
    magic, version, _, first_seq, crc = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC or zlib.crc32(data[:20]) != crc:
        raise JournalCorrupt("segment header has a bad magic or checksum")
    if version not in VERSIONS:
        raise JournalCorrupt(f"segment version {version} is not supported")
    return int(first_seq), int(version)


def decode_segment_header(data: bytes) -> int:
    """The segment's first sequence number; raise JournalCorrupt if the header is bad."""
    return read_segment_header(data)[0]


@attrs.frozen
class Entry:
    """One decoded journal record with its position."""

    seq: int
    record: Record

    @property
    def rtype(self) -> int:
        return self.record.TYPE

    @property
    def payload(self) -> bytes:
        """The record's payload in the encoding written now (``RECORD_VERSION``)."""
        return encode_record(self.record)[1]


@attrs.define(eq=False)
class RawEntry:
    """One journal record with its position, not decoded unless asked (``record``): what
    a sender copies into frames as it is (``JournalTail.poll_raw``).

    Attributes:
        payload: the record's payload in the encoding written now (``RECORD_VERSION``:
            a record of an older segment is decoded and encoded again when read).
        fields: ``records.peek`` of it (None: it was decoded when read, ``record``).
    """

    seq: int
    rtype: int
    payload: bytes
    fields: tuple[int, ...] | None
    _record: Record | None = None

    @property
    def record(self) -> Record:
        """The record decoded (once; it was checked when read: this cannot fail)."""
        if self._record is None:
            self._record = decode_record(self.rtype, self.payload)
        return self._record


def frame_spans(data: bytes | bytearray | memoryview, offset: int, expect_seq: int
                ) -> Iterator[tuple[int, int, int, int]]:
    """Yield (start, end_offset, seq, type) for each good frame from ``offset``: the
    frame is ``data[start:end]``, its payload after FRAME_HEADER.

    Stops at the first frame that is truncated, fails its checksum or breaks
    the sequence; the caller compares the stop offset with ``len(data)``.  The CRC is
    taken over a view of ``data`` (no copy of the record: bench/RESULTS.md, branch
    originlean).
    """
    view = memoryview(data)
    size = len(view)
    while offset + FRAME_HEADER.size <= size:
        crc, length, seq, rtype, _flags = FRAME_HEADER.unpack_from(view, offset)
        end = offset + FRAME_HEADER.size + length
        if length > MAX_PAYLOAD or end > size:
            return
        if zlib.crc32(view[offset + 4 : end]) != crc or seq != expect_seq:
            return
        yield offset, end, seq, rtype
        offset = end
        expect_seq += 1


def scan_frames(data: bytes | bytearray | memoryview, offset: int, expect_seq: int
                ) -> Iterator[tuple[int, int, int, bytes]]:
    """Yield (end_offset, seq, type, payload) for each good frame from ``offset``
    (:func:`frame_spans`; the payload a copy of its own, checked before it is made)."""
    view = memoryview(data)
    for start, end, seq, rtype in frame_spans(view, offset, expect_seq):
        yield end, seq, rtype, bytes(view[start + FRAME_HEADER.size : end])


def last_good_frame(data: bytes, first_seq: int) -> tuple[int, int]:
    """(offset just past the last good frame, its seq) of a segment's bytes."""
    end, last = SEGMENT_HEADER.size, first_seq - 1
    for _, frame_end, seq, _ in frame_spans(data, SEGMENT_HEADER.size, first_seq):
        end, last = frame_end, seq
    return end, last


def good_frame_after(data: bytes, offset: int, last_seq: int) -> bool:
    """Does an intact Sync record with a later seq start anywhere after ``offset``?

    Tells damage from a torn tail.  After a power loss, unsynced pages may reach
    the disk out of order (a hole, then intact records): those records were never
    durable, so that is a torn tail.  But a Sync record is written only after an
    fdatasync covered everything before it, so bad bytes before an intact Sync
    record are damage to durable data.  Only called on the bytes after the last
    good frame.
    """
    for start in range(offset + 1, len(data) - FRAME_HEADER.size + 1):
        crc, length, seq, rtype, _ = FRAME_HEADER.unpack_from(data, start)
        if rtype != Sync.TYPE or not last_seq < seq <= last_seq + (1 << 20) \
                or length > MAX_PAYLOAD:
            continue
        end = start + FRAME_HEADER.size + length
        if end <= len(data) and zlib.crc32(data[start + 4 : end]) == crc:
            return True
    return False


def _admit(record: Record) -> None:
    """The door: refuse (OSError, nothing written) a record its readers would refuse:
    ENAMETOOLONG for a path over ``records.MAX_PATH``, EINVAL for anything else."""
    try:
        check_record(record)
    except PathTooLong as exc:
        raise OSError(errno.ENAMETOOLONG, f"too long to journal: {exc}") from None
    except BadRecord as exc:
        raise OSError(errno.EINVAL, f"cannot be journaled: {exc}") from None


@attrs.define(eq=False)
class Journal:
    """An open journal directory.  Thread-safe: appends may come from worker threads.

    Attributes:
        directory: the journal directory (``STATE/journal``).
        segment_bytes: start a new segment beyond this size.
        head: sequence number of the last record appended (0 if none).
        synced: every record up to this sequence number is on stable storage.
        failed: set to the reason once an append failed; all later appends are refused.
    """

    directory: str
    segment_bytes: int = 64 << 20
    head: int = 0
    synced: int = 0
    failed: str | None = None
    _fd: int = -1
    _segment_first: int = 1
    _segment_size: int = 0
    _reserved_end: int = 0  # the segment's blocks are preallocated up to this offset
    _reserving: bool = True  # False where the filesystem cannot preallocate
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _sync_lock: threading.Lock = attrs.field(factory=threading.Lock)

    # -- opening and recovery ---------------------------------------------------------------

    @classmethod
    def open(cls, directory: str, segment_bytes: int = 64 << 20) -> Journal:
        """Open (creating if needed) the journal, truncating a torn tail."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        journal = cls(directory=directory, segment_bytes=segment_bytes)
        journal_id(directory)
        segments = journal.segments()
        if not segments:
            journal._start_segment(1)
            return journal
        first, path = segments[-1]
        with open(path, "rb") as f:
            data = f.read()
        version = SEGMENT_VERSION
        try:
            found, version = read_segment_header(data)
            if found != first:
                raise JournalCorrupt(f"{path}: header does not match the file name")
        except JournalCorrupt:
            if len(data) > SEGMENT_HEADER.size:
                raise
            # Killed while starting this segment: its header never fully reached the
            # disk, so no record did either.  Start it again with the same first seq.
            os.unlink(path)
            journal._start_segment(first)
            journal.head = journal.synced = first - 1
            return journal
        end, last = last_good_frame(data, first)
        if end < len(data) and good_frame_after(data, end, last):
            raise JournalCorrupt(f"{path}: damaged record after seq {last}, with intact "
                                 "records behind it")
        if end < len(data):
            log.warning(
                "journal %s: truncating a torn tail of %d bytes after seq %d",
                path, len(data) - end, last,
            )
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        journal.head = journal.synced = last
        if version != SEGMENT_VERSION:
            # Written by an older sdeefs: appending would mix encodings in one segment.
            if last < first:  # nothing in it: start it again in the current version
                os.unlink(path)
                fsync_dir(directory)
            journal._start_segment(last + 1)
            return journal
        journal._segment_first = first
        journal._segment_size = end
        journal._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return journal

    def segments(self) -> list[tuple[int, str]]:
        return list_segments(self.directory)

    def _start_segment(self, first_seq: int) -> None:
        """Start the segment of ``first_seq``; on failure (a full disk) nothing of it is
        left and the open segment stays the one appended to."""
        path = os.path.join(self.directory, segment_name(first_seq))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            header = encode_segment_header(first_seq)
            if os.write(fd, header) != len(header):
                raise OSError(errno.ENOSPC, "short write of a segment header")
            os.fsync(fd)
            fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        if self._fd >= 0:
            self._release_reserve()
            os.fsync(self._fd)
            os.close(self._fd)
        self._fd = fd
        self._segment_first = first_seq
        self._segment_size = SEGMENT_HEADER.size
        self._reserved_end = 0

    def _keep_reserve(self, length: int) -> None:
        """Make sure ``RESERVE_LOW`` stays preallocated after ``length`` more bytes;
        ENOSPC/EDQUOT if the disk has no room for that."""
        need = self._segment_size + length + RESERVE_LOW
        if not self._reserving or need <= self._reserved_end:
            return
        for size in (length + RESERVE_BYTES, length + RESERVE_LOW):
            try:
                fallocate(self._fd, FALLOC_FL_KEEP_SIZE, self._segment_size, size)
            except OSError as exc:
                if exc.errno in NO_SPACE:
                    continue
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                    self._reserving = False  # no preallocation here: no reserve either
                    return
                raise
            self._reserved_end = self._segment_size + size
            return
        raise OSError(errno.ENOSPC, "no space left for the journal")

    def _release_reserve(self) -> None:
        """Give the preallocated blocks behind the tail back (a closed or old segment)."""
        if self._reserved_end:
            os.ftruncate(self._fd, self._segment_size)
            self._reserved_end = 0

    def _cut_back(self) -> bool:
        """Remove whatever a failed append left behind the last whole record (a short
        write); True if the segment ends with a whole record again."""
        try:
            if os.fstat(self._fd).st_size != self._segment_size:
                os.ftruncate(self._fd, self._segment_size)
                self._reserved_end = 0  # the truncate released the reserve too
        except OSError:
            return False
        return True

    # -- appending ----------------------------------------------------------------------------

    def append(self, record: Record) -> int:
        """Write one record into the page cache; return its sequence number.

        A record its readers would refuse is not written: OSError ENAMETOOLONG for a
        path over ``records.MAX_PATH``, EINVAL for anything else (nothing changes).
        """
        _admit(record)
        with self._lock:
            return self._append_locked(record)

    def _append_locked(self, record: Record) -> int:
        if self.failed is not None:
            raise FailsafeError(self.failed)
        seq = self.head + 1
        frame = encode_frame(seq, record)
        settling = record.TYPE in SETTLING
        try:
            end = self._segment_size + len(frame)
            # (inline: this runs for every write(2) of the view)
            if not settling and (end + RESERVE_LOW > self._reserved_end
                                 or end > self.segment_bytes):
                self._make_room(len(frame))
            written = os.write(self._fd, frame)
            if written != len(frame):
                raise OSError(errno.ENOSPC, f"short journal write ({written} of {len(frame)} "
                                            "bytes)")
        except OSError as exc:
            self._refuse(exc, settling)
        self._segment_size += len(frame)
        self.head = seq
        return seq

    def _make_room(self, length: int) -> None:
        """For a record that is not settling: a new segment if this one is full, and the
        reserve kept; ENOSPC when there is no room for both.  (A settling record goes into
        the reserve of the open segment, never into a new one.)"""
        if self._segment_size + length > self.segment_bytes and \
                self.head >= self._segment_first:
            self._start_segment(self.head + 1)
        self._keep_reserve(length)

    def _refuse(self, exc: OSError, settling: bool) -> NoReturn:
        """An append failed: ENOSPC/EDQUOT for a record that was not settling, with the
        segment cut back to its last whole record; otherwise read-only for good."""
        if exc.errno in NO_SPACE and not settling and self._cut_back():
            raise OSError(exc.errno, f"no space left for the journal: {exc.strerror}") from exc
        self.failed = f"journal append failed: {exc}"
        log.error("%s; refusing further mutations", self.failed)
        raise FailsafeError(self.failed) from exc

    def append_many(self, records: list[Record], admitted: bool = False) -> int:
        """Append ``records`` with one write(2) (the capture's batches); the last seq.

        Consecutive seqs, like appending them one by one; a batch that would cross the
        segment size goes one by one (it may start a segment).  Every record is admitted
        (as by :meth:`append`) before any is written, unless ``admitted``: the caller
        ran ``check_record`` on each already (the capture's reconciler does, to stop
        before a batch is written) and nothing changed them since (records are frozen)."""
        if not admitted:
            for record in records:
                _admit(record)
        with self._lock:
            if self.failed is not None:
                raise FailsafeError(self.failed)
            # one writev(2) of the frames (not joined first: a batch of Create records is
            # megabytes, and a join copies them once more into freshly faulted pages)
            frames = [encode_frame(self.head + 1 + i, r) for i, r in enumerate(records)]
            length = sum(map(len, frames))
            if self._segment_size + length > self.segment_bytes or len(frames) > _IOV_MAX:
                for record in records:
                    self._append_locked(record)
                return self.head
            try:
                self._keep_reserve(length)
                written = os.writev(self._fd, frames)
                if written != length:
                    raise OSError(errno.ENOSPC, f"short journal write ({written} of "
                                                f"{length} bytes)")
            except OSError as exc:
                self._refuse(exc, settling=False)
            self._segment_size += length
            self.head += len(records)
            return self.head

    def sync(self, upto: int | None = None) -> None:
        """Make every record up to ``upto`` (default: the head) durable (group commit).

        After the flush, a Sync record is appended if nothing else was meanwhile:
        it certifies that every record before it is on disk, which is how opening
        tells damage (bad bytes before an intact Sync) from a torn tail.
        """
        target = self.head if upto is None else upto
        if self.synced >= target:
            return
        with self._sync_lock:
            if self.synced >= target:  # another thread's fdatasync covered us
                return
            with self._lock:
                fd, head = self._fd, self.head
            os.fdatasync(fd)
            with self._lock:
                if self.head == head and self.failed is None:
                    try:
                        head = self._append_locked(Sync(SYNC_FLUSHED))  # need not be durable
                    except FailsafeError:
                        raise
                    except OSError as exc:
                        if exc.errno not in NO_SPACE:
                            raise
                self.synced = max(self.synced, head)

    def start_writeback(self) -> None:
        """Have the kernel start writing the unsynced tail to disk, without waiting: a
        later :meth:`sync` then has less to write (durable is only what ``sync`` says)."""
        with self._lock:
            if self._fd < 0 or self.failed is not None:
                return
            try:
                start_writeback(self._fd)
            except OSError as exc:  # advisory: only sync() decides what is durable
                log.debug("journal: sync_file_range: %s", exc)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    with contextlib.suppress(OSError):
                        self._release_reserve()
                    os.fsync(self._fd)
                    self.synced = self.head
                finally:
                    os.close(self._fd)
                    self._fd = -1

    # -- reading and trimming -----------------------------------------------------------------

    def read(self, from_seq: int = 1) -> Iterator[Entry]:
        """Yield committed entries with seq >= from_seq, oldest first."""
        segments = self.segments()
        for index, (first, path) in enumerate(segments):
            next_first = segments[index + 1][0] if index + 1 < len(segments) else None
            if next_first is not None and next_first <= from_seq:
                continue
            with open(path, "rb") as f:
                data = f.read()
            found, version = read_segment_header(data)
            if found != first:
                raise JournalCorrupt(f"{path}: header does not match the file name")
            end, last = SEGMENT_HEADER.size, first - 1
            for frame_end, seq, rtype, payload in scan_frames(data, SEGMENT_HEADER.size, first):
                end, last = frame_end, seq
                if seq >= from_seq:
                    yield Entry(seq, decode_record(rtype, payload, version))
            complete = end == len(data)
            if next_first is not None and (not complete or last + 1 != next_first):
                raise JournalCorrupt(f"{path}: damaged before seq {next_first}")
            if not complete and good_frame_after(data, end, last):
                # The last segment may end in a record being written right now (a torn
                # tail is normal there), but not in damage with good records behind it.
                raise JournalCorrupt(f"{path}: damaged record after seq {last}")

    def first_seq(self) -> int:
        segments = self.segments()
        return segments[0][0] if segments else 1

    def trim(self, below: int) -> int:
        """Delete whole segments whose records all have seq < ``below``; return how many."""
        segments = self.segments()
        removed = 0
        for (_first, path), (next_first, _) in zip(segments, segments[1:], strict=False):
            if next_first <= below:
                os.unlink(path)
                removed += 1
        if removed:
            fsync_dir(self.directory)
        return removed

    def size_bytes(self) -> int:
        return sum(os.path.getsize(path) for _, path in self.segments())


@attrs.define(eq=False)
class NullJournal:
    """``--no-journal``: the same interface, recording nothing (benchmarks, emergencies)."""

    head: int = 0
    synced: int = 0
    failed: str | None = None

    def append(self, record: Record) -> int:
        return 0

    def sync(self, upto: int | None = None) -> None:
        return None

    def close(self) -> None:
        return None


class Trimmed(Exception):
    """The records asked for were trimmed from the journal: a snapshot must replace them."""


@attrs.define(eq=False)
class JournalTail:
    """Reads a journal that another process is appending to, from ``next_seq`` on.

    Keeps its place (segment, offset), so following a live journal costs only the new
    bytes.  A frame still being written (torn) is simply not returned yet.
    """

    directory: str
    next_seq: int
    _fd: int = -1
    _first: int = 0
    _offset: int = 0
    _version: int = RECORD_VERSION  # the open segment's record encoding
    # what each look reads into, kept: a new ``bytes`` per look was faulted in page by
    # page (glibc growing and trimming a thread's heap: a page fault per 4 KiB of the
    # journal, bench/RESULTS.md, branch originlean); records are copied out of it
    _buffer: bytearray = attrs.field(factory=bytearray)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _segments(self) -> list[int]:
        return [first for first, _ in list_segments(self.directory)]

    def _open_segment(self, first: int) -> None:
        self.close()
        self._fd = os.open(os.path.join(self.directory, segment_name(first)),
                           os.O_RDONLY | os.O_CLOEXEC)
        header = os.pread(self._fd, SEGMENT_HEADER.size, 0)
        found, self._version = read_segment_header(header)
        if found != first:
            raise JournalCorrupt(f"segment {first}: header does not match its name")
        self._first, self._offset = first, SEGMENT_HEADER.size

    def _locate(self) -> None:
        firsts = self._segments()
        candidates = [f for f in firsts if f <= self.next_seq]
        if not candidates:
            raise Trimmed(f"seq {self.next_seq} is no longer in the journal")
        self._open_segment(candidates[-1])
        # Skip the frames before next_seq (only when starting in the middle of a segment).
        while True:
            header = os.pread(self._fd, FRAME_HEADER.size, self._offset)
            if len(header) < FRAME_HEADER.size:
                return
            _, length, seq, _, _ = FRAME_HEADER.unpack(header)
            if seq >= self.next_seq:
                return
            self._offset += FRAME_HEADER.size + length

    def poll(self, max_bytes: int = 4 << 20) -> list[Entry]:
        """The complete records appended since the last call (at most about max_bytes)."""
        entries: list[Entry] = []
        self._scan(max_bytes, entries)
        return entries

    def poll_raw(self, max_bytes: int = 4 << 20) -> list[RawEntry]:
        """``poll``, each record left as its payload (``RawEntry``): checked as ``poll``
        checks it (BadRecord where ``poll`` raises it), decoded only where
        ``records.peek`` cannot vouch for it."""
        entries: list[RawEntry] = []
        self._scan(max_bytes, entries, raw=True)
        return entries

    def skip(self, max_bytes: int = 4 << 20) -> int:
        """Pass the complete records appended since the last call (at most about
        max_bytes) without decoding them (``next_seq`` says how far): how many.  Learning
        the head of a long journal costs a checksum per record, not a decode."""
        return self._scan(max_bytes, None)

    def _scan(self, max_bytes: int, entries: list[Entry] | list[RawEntry] | None,
              raw: bool = False) -> int:
        """Read on (``poll``, ``skip``, ``poll_raw``): the records passed, into ``entries``
        (decoded, or raw if ``raw``)."""
        if self._fd < 0:
            self._locate()
            if self._fd < 0:
                return 0
        data = self._read(max_bytes)
        count = consumed = 0
        version = self._version
        if entries is None:  # skip: the checksums only, no record copied out
            for _, end, seq, _ in frame_spans(data, 0, self.next_seq):
                count += 1
                consumed = end
                self.next_seq = seq + 1
        else:
            for end, seq, rtype, payload in scan_frames(data, 0, self.next_seq):
                if raw:
                    fields = peek(rtype, payload, version)
                    record = None
                    if fields is None:
                        record = decode_record(rtype, payload, version)
                        if version != RECORD_VERSION:
                            payload = encode_record(record)[1]
                    entries.append(RawEntry(seq, rtype, payload, fields, record))  # type: ignore[arg-type]
                else:
                    entries.append(Entry(seq, decode_record(rtype, payload, version)))  # type: ignore[arg-type]
                count += 1
                consumed = end
                self.next_seq = seq + 1
        if not count and len(data) < max_bytes:
            self._offset += consumed
            # Nothing new here: has the journal moved on to a next segment?
            later = [f for f in self._segments() if f > self._first]
            if later:
                if later[0] != self.next_seq:
                    raise JournalCorrupt(f"journal damaged before seq {later[0]}")
                if len(data) == 0 or not self._growing():
                    self._open_segment(later[0])
                    return self._scan(max_bytes, entries, raw)
            elif not os.path.exists(os.path.join(self.directory,
                                                 segment_name(self._first))):
                raise Trimmed(f"segment {self._first} was trimmed while read")
        self._offset += consumed
        return count

    def _read(self, max_bytes: int) -> memoryview:
        """Up to ``max_bytes`` of the open segment from the place reached, read into the
        tail's buffer (valid until the next read).  The buffer grows to what the segment
        holds there, not to ``max_bytes``: a look asked for much more than a journal
        holds (a gigabyte) neither zeroes nor keeps that much."""
        want = max(0, min(max_bytes, os.fstat(self._fd).st_size - self._offset))
        if len(self._buffer) < want:
            self._buffer = bytearray(want)
        with memoryview(self._buffer) as whole:
            got = os.preadv(self._fd, [whole[:want]], self._offset) if want else 0
        return memoryview(self._buffer)[:got]

    def _growing(self) -> bool:
        return os.fstat(self._fd).st_size > self._offset
