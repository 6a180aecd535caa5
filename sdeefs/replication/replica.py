"""The compute end: a replica of one user's layer root, and the link that feeds it.

A :class:`Replica` applies RECORD frames in seq order into ``REPLICA_DIR/USER``
(``sdeefs.statedir.ReplicaDirs``); a :class:`Follower` pulls them from an upstream over
one connection (the login node's ``sdeefs-replicad``, or a relay) and acknowledges
what was applied.  Both raise ProtocolError for a frame that must not be applied (the
link's problem: nothing was changed, and the caller, ``daemon``, reconnects).

A record that arrived intact but that this copy must not or cannot carry out (it does
not decode, ``sdeefs.replicable`` refuses it, applying it fails in a way that will not
pass: ``wire.Refused``) is the user's problem, not the link's: it is *skipped*, the
skip is recorded (``skipped`` below, ``sdeefs replica status``, the job's one-line
error) and the stream goes on past it, so replication never wedges on one record.  A
copy that skipped a record differs from the user's upper: the SLURM prolog fails the
user's jobs on it (never the node) until ``sdeefs replica resync USER`` swaps a
verified snapshot in, which clears the list.

Replica rules (every byte from a peer is hostile): besides what the wire checks
(``wire``: frames, strict records, :func:`wire.sanitize`), a RECORD whose seq is
neither applied + 1 nor a MORE continuation (nor, with SKIP, beyond it) is rejected
("out of sequence"), and so is a record of a run (``wire.RUN``), except that a run's
records at or below applied are passed over (this copy holds them already).  Paths
resolve under the replica's layer root with ``openat2(RESOLVE_BENEATH|
RESOLVE_NO_SYMLINKS)`` (``sdeefs.layers``).  A rejected frame
changes nothing, is logged, and ends the connection with ERROR.

State on disk (``REPLICA_DIR/USER/``)
=====================================

``upper/`` and ``work/`` (the copy), ``position``, ``durable`` and ``skipped``:

``skipped`` (JSON, replaced atomically with fsync; absent: nothing skipped): the records
skipped since the copy was last faithful (a snapshot swapped in or a reset removes it)::

    {"journal": "<hex journal id>", "count": N, "last": <the last seq skipped>,
     "records": [[seq, unix time, "reason"], ...]}    # the first MAX_SKIPPED of them

``position`` (POSITION, 68 bytes, rewritten in place after every record, never
fsynced: it survives a ``kill -9`` of the daemon, not a power loss)::

    magic     8s   b"SDRPPOS1"
    journal   16s  the history this copy follows (zero: none yet)
    boot      16s  the kernel's boot id when it was written
    applied   u64  the last seq fully applied
    inflight  u64  the seq being applied (0: none; all ones: a snapshot being swapped in)
    ino       u64  for an in-flight rename: the source's inode number on this node
    crc32     u32  of the fields before

``durable`` (DURABLE, 29 bytes, replaced atomically with fsync:
``sysio.write_file_atomic``)::

    journal   16s  as above
    synced    u64  the last seq known to be on stable storage
    clean     u8   1: the copy is exactly at ``synced``; 0: records after it may be half there
    crc32     u32  of the fields before

Before the first record after a sync point ``durable`` says *dirty*; every few seconds
the filesystem is ``syncfs``-ed and ``durable`` says *clean at seq N* (every 30 s only
while the copy is far behind its upstream: a cold stream, ``Follower._sync_periodically``).
On start: the same boot → trust ``position`` (re-apply the in-flight record, idempotently: renames
compare the replica's own inode number, saved in ``position`` before the rename);
another boot → trust ``durable`` if clean, otherwise start over (a full, verified
resync).  A snapshot is staged in ``incoming/`` and swapped in only once verified
(``snapshot``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from .. import records as rec
from ..layers import LayerRoot, open_layer_root
from ..offload import Offload
from ..replicable import NOBODY, UserIds
from ..statedir import ReplicaDirs
from ..sysio import RENAME_EXCHANGE, boot_id, renameat2, syncfs, write_file_atomic
from ..trees import rmtree
from .applier import MAX_DIRS, REPLAYABLE, BatchApplier, DirFds
from .auth import HelloAuth
from .receiver import ThreadReader
from .snapshot import Staging, apply_from_peer
from .wire import (
    ACK,
    ERROR,
    FRAME_HEADER,
    HEAD,
    MAC_SIZE,
    MORE,
    NO_ID,
    NONCE_SIZE,
    RECORD,
    REPORT_INTERVAL,
    RESYNC,
    RUN,
    SKIP,
    SNAPSHOT,
    SNAPSHOT_END,
    UP,
    Frame,
    FrameReader,
    Hello,
    LinkKey,
    ProtocolError,
    Refused,
    decode_error,
    decode_record_payload,
    encode_error,
    encode_report,
    open_link_tasks,
    send_hello,
    split_run,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

POSITION = struct.Struct("<8s16s16sQQQI")
assert POSITION.size == 68
POSITION_MAGIC = b"SDRPPOS1"
DURABLE = struct.Struct("<16sQBI")
assert DURABLE.size == 29
CRC = struct.Struct("<I")  # the last field of POSITION and DURABLE
SNAPSHOT_MARK = (1 << 64) - 1  # in-flight "seq": a snapshot was being swapped in
IN_FLIGHT_BYTES = 8 << 20  # payload received and not yet applied (a replica's memory bound)
SYNC_INTERVAL = 2.0  # seconds between syncs of a replica being fed (then ``durable`` is clean)
SYNC_LAG = 4096  # records behind its upstream: a copy this far behind syncs less often
SYNC_INTERVAL_BEHIND = 30.0  # seconds between its syncs then (``Follower._sync_periodically``)
APPLY_BATCH_FRAMES = 512  # frames applied in one worker-thread call at most
MAX_SKIPPED = 16  # skipped records kept in ``skipped`` (the first ones: the count goes on)


def _with_crc(body: bytes) -> bytes:
    """``body`` (a record whose last field is its crc32) with the crc filled in."""
    body = body[:-CRC.size]
    return body + CRC.pack(zlib.crc32(body))


def _open_layers(dirs: ReplicaDirs) -> LayerRoot:
    return open_layer_root(dirs.upper, dirs.work)


@attrs.frozen
class SkippedRecord:
    """A record a replica skipped (``wire.Refused``): the user's error, by seq."""

    seq: int
    reason: str
    time: float

    def as_json(self) -> dict[str, object]:
        return {"seq": self.seq, "reason": self.reason, "time": self.time}


@attrs.frozen
class Skipped:
    """The records a copy skipped since it was last faithful (``skipped`` on disk)."""

    count: int = 0
    records: tuple[SkippedRecord, ...] = ()
    last: int = 0  # the last seq skipped

    def plus(self, record: SkippedRecord) -> Skipped:
        if self.count and record.seq <= self.last:  # delivered again after a crash
            return self
        kept = self.records if len(self.records) >= MAX_SKIPPED else (*self.records, record)
        return Skipped(self.count + 1, kept, record.seq)

    def summary(self) -> str:
        """One line: the first skipped record and how many more."""
        if not self.records:
            return ""
        first = self.records[0]
        more = f" (and {self.count - 1} more)" if self.count > 1 else ""
        return f"record {first.seq} was skipped: {first.reason}{more}"

    def encode(self, journal_id: bytes) -> bytes:
        return json.dumps({"journal": journal_id.hex(), "count": self.count,
                           "last": self.last, "records": [
                               [r.seq, r.time, r.reason] for r in self.records]}).encode()

    @classmethod
    def decode(cls, data: bytes, journal_id: bytes) -> Skipped:
        """What ``data`` says for ``journal_id`` (another history's list means nothing here;
        a damaged file says one record was skipped: the copy is not to be trusted)."""
        try:
            obj = json.loads(data)
            if obj["journal"] != journal_id.hex():
                return cls()
            records = tuple(SkippedRecord(int(seq), str(reason), float(when))
                            for seq, when, reason in obj["records"])
            return cls(max(int(obj["count"]), len(records)), records, int(obj["last"]))
        except (ValueError, KeyError, TypeError):
            return cls(1, (SkippedRecord(0, "the list of skipped records is damaged", 0.0),))


@attrs.define(eq=False)
class Replica:
    """One user's copy of the layer root on a compute node (see "State on disk" above).

    Not thread-safe by itself: the daemon applies under ``lock`` (also held while a
    relay reads the tree for a snapshot, so it reads one consistent state).

    Attributes:
        dirs: ``<replica dir>/<user>``.
        journal_id: the history this copy follows (NO_ID: none yet).
        applied: the last journal seq fully applied.
        pending: the seq whose chunks are being applied (0 if none).
        synced: the last seq known to be on stable storage.
        ids: the user's host ids (``sdeefs.replicable``: what is carried).
        skipped: the records skipped since this copy was last faithful.
    """

    dirs: ReplicaDirs
    ids: UserIds = NOBODY
    skipped: Skipped = Skipped()
    journal_id: bytes = NO_ID
    applied: int = 0
    pending: int = 0
    synced: int = 0
    dirty: bool = False
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    boot: bytes = attrs.field(factory=lambda: boot_id())  # looked up per instance
    _layers: LayerRoot | None = None
    _pos_fd: int = -1
    _staging: Staging | None = None
    _batch: BatchApplier | None = None  # see ``batch_applier``
    # the bound on the directory fds its applier keeps (a daemon's is every user's)
    dir_fds: DirFds = attrs.field(factory=lambda: DirFds(MAX_DIRS))
    _skipping: bool = False  # the record being applied (MORE chunks) was skipped

    root = property(lambda self: self.dirs.path)
    upper = property(lambda self: self.dirs.upper)

    @classmethod
    def open(cls, root: str, ids: UserIds = NOBODY, dir_fds: DirFds | None = None
             ) -> Replica:
        """The copy at ``root``; ``dir_fds``: the bound it shares with the daemon's other
        replicas (``applier.DirFds``; None: one of its own)."""
        dirs = ReplicaDirs(root)
        os.makedirs(root, mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)
        for sub in (dirs.upper, dirs.work):
            os.makedirs(sub, mode=0o755, exist_ok=True)
        replica = cls(dirs, ids) if dir_fds is None else cls(dirs, ids, dir_fds=dir_fds)
        replica._pos_fd = os.open(dirs.position, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        replica._load()
        replica._load_skipped()
        replica._layers = _open_layers(dirs)
        rmtree(dirs.incoming)
        return replica

    def close(self) -> None:
        self._forget_batch()
        if self._layers is not None:
            self._layers.close()
        if self._staging is not None:
            self._staging.close()
        self._layers = self._staging = None
        if self._pos_fd >= 0:
            os.close(self._pos_fd)
            self._pos_fd = -1

    def locked(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` under ``lock`` (for a worker thread)."""
        with self.lock:
            return fn(*args)

    # -- persistence -----------------------------------------------------------------------

    def _load(self) -> None:
        data = os.pread(self._pos_fd, POSITION.size, 0)
        durable = self._read_durable()
        if len(data) == POSITION.size:
            magic, jid, boot, applied, inflight, _ino, crc = POSITION.unpack(data)
            if magic == POSITION_MAGIC and zlib.crc32(data[:-CRC.size]) == crc \
                    and boot == self.boot:
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

    def _load_skipped(self) -> None:
        try:
            with open(self.dirs.skipped, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self.skipped = Skipped()
            return
        self.skipped = Skipped.decode(data, self.journal_id)

    def _skip(self, seq: int, reason: str) -> None:
        """Record that ``seq`` was skipped (before the position moves past it)."""
        log.error("replica %s: skipping %s", self.root, reason)
        skipped = self.skipped.plus(SkippedRecord(seq, reason, time.time()))
        if skipped != self.skipped:
            write_file_atomic(self.dirs.skipped, skipped.encode(self.journal_id))
            self.skipped = skipped

    def _clear_skipped(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dirs.skipped)
        self.skipped = Skipped()

    def _read_durable(self) -> tuple[bytes, int, bool] | None:
        try:
            with open(self.dirs.durable, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if len(data) != DURABLE.size:
            return None
        jid, synced, clean, crc = DURABLE.unpack(data)
        if zlib.crc32(data[:-CRC.size]) != crc:
            return None
        return jid, synced, bool(clean)

    def _write_durable(self, clean: bool) -> None:
        write_file_atomic(self.dirs.durable,
                          _with_crc(DURABLE.pack(self.journal_id, self.synced, clean, 0)))

    def _write_position(self, inflight: int = 0, inflight_ino: int = 0) -> None:
        os.pwrite(self._pos_fd, _with_crc(POSITION.pack(
            POSITION_MAGIC, self.journal_id, self.boot, self.applied, inflight, inflight_ino,
            0)), 0)

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
        for path in (self.dirs.upper, self.dirs.work):
            if os.path.lexists(path):
                sub = os.path.basename(path)
                trash = os.path.join(self.root, f".trash-{sub}-{time.monotonic_ns()}")
                os.rename(path, trash)
                with contextlib.suppress(OSError):
                    rmtree(trash)
            os.mkdir(path, 0o755)
        self._forget_batch()
        if self._layers is not None:
            self._layers.close()
            self._layers = _open_layers(self.dirs)
        self.journal_id, self.applied, self.pending, self.synced = NO_ID, 0, 0, 0
        self._skipping = False
        self._write_position()
        self._write_durable(clean=True)
        self._clear_skipped()
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

    def accept(self, frame: Frame, batch: BatchApplier | None = None) -> bool:
        """Apply one RECORD frame; True when its seq is complete (then ACK it).

        With ``batch`` (``_apply_batch``): a REPLAYABLE record goes through it and the
        position is written by :meth:`end_batch`; any other record first ends what the
        batch deferred, then goes the per-record way (``sdeefs.replication.applier``).
        A RUN frame (``wire``) is checked whole first, then its records are applied in
        order as if each had come alone; those this copy already holds are passed over
        (a relay's frames may be cut elsewhere than the frames that brought them here),
        but a run holding nothing new is out of sequence (a replay, as for a plain frame)."""
        if frame.type != RECORD:
            raise ProtocolError(f"unexpected frame type {frame.type}")
        if not frame.flags & RUN:
            return self._accept_record(frame.seq, frame.flags, frame.payload, batch)
        entries = split_run(frame.payload, frame.seq)  # before any of it is applied
        if self.pending:
            raise ProtocolError(f"out of sequence: a run of records while {self.pending} "
                                "is incomplete")
        if frame.seq <= self.applied:  # nothing new: a replay, as a plain frame's would be
            raise ProtocolError(f"out of sequence: a run up to seq {frame.seq} after "
                                f"{self.applied}")
        at = self.applied  # the sequence of the whole run, before any of it is applied
        for seq, flags, _ in entries:
            if seq > at:
                if seq != at + 1 and not flags & SKIP:
                    raise ProtocolError(f"out of sequence: seq {seq} after {at}")
                at = seq
        index = 0
        while index < len(entries):
            seq, flags, payload = entries[index]
            failed = None
            if seq > self.applied and batch is not None:
                # the records C takes, in one call; it stops before the first it does not
                self._mark_dirty()
                index, self.applied, failed = batch.take_run(entries, index, self.applied)
                if index == len(entries):
                    break
                seq, flags, payload = entries[index]
            if seq > self.applied:
                self._accept_record(seq, flags, payload, batch, failed)
            index += 1
        return True

    def _accept_record(self, seq: int, flags: int, payload: bytes | memoryview,
                       batch: BatchApplier | None, failed: OSError | None = None) -> bool:
        """Apply the record ``seq`` (a frame's, or one of a run's); see :meth:`accept`.
        ``failed``: its application in C failed so (``BatchApplier.take_run``)."""
        if self.pending:
            if seq != self.pending:
                raise ProtocolError(f"out of sequence: seq {seq} while {self.pending} "
                                    "is incomplete")
        elif seq != self.applied + 1 and not (flags & SKIP and seq > self.applied):
            raise ProtocolError(f"out of sequence: seq {seq} after {self.applied}")
        assert self._layers is not None
        self._mark_dirty()
        skipping = self._skipping and self.pending == seq  # a later chunk of a skip
        if not skipping:
            try:
                if failed is not None:
                    assert batch is not None
                    raise batch.native_failure(failed, seq)
                if batch is None or not batch.take(payload, seq):
                    record, data = decode_record_payload(payload)
                    if batch is not None and isinstance(record, REPLAYABLE):
                        batch.deferred = True
                        batch.apply(record, data, f"record {seq}")
                    else:
                        if batch is not None:
                            self.end_batch(batch, forget=True)
                        else:
                            self._forget_batch()  # what it resolved may move now
                        if record.METADATA:
                            record = self._local_rename(seq, record)
                        apply_from_peer(self._layers, record, data, f"record {seq}",
                                        self.ids)
            except Refused as exc:  # the user's problem: skip it, say so, go on
                self._skip(seq, str(exc))
                skipping = True
        if flags & MORE:
            self.pending, self._skipping = seq, skipping
            return False
        self.pending, self._skipping = 0, False
        self.applied = seq
        if batch is None or not batch.deferred:
            self._write_position()
        return True

    def batch_applier(self) -> BatchApplier:
        """The applier batches share (its directory fds outlive a batch, within the
        bound ``dir_fds`` keeps), begun for a batch that :meth:`end_batch` ends."""
        if self._batch is None:
            assert self._layers is not None
            self._batch = BatchApplier(self._layers, self.ids, fds=self.dir_fds)
        self._batch.begin()
        return self._batch

    def _forget_batch(self) -> None:
        if self._batch is not None:
            self._batch.close()
            self._batch = None

    def end_batch(self, batch: BatchApplier, forget: bool = False) -> None:
        """Close the file ``batch`` holds (with ``forget``: every fd) and write the
        position it deferred."""
        if forget:
            batch.close()
        else:
            batch.end()
        if batch.deferred:
            self._write_position()
            batch.deferred = False

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

    @property
    def snapshot_seq(self) -> int | None:
        """The seq of the snapshot being received (None: none is)."""
        return self._staging.seq if self._staging is not None else None

    def begin_snapshot(self, seq: int) -> None:
        if self._staging is not None:
            self._staging.close()
            self._staging = None
        self._staging = Staging.begin(self.dirs.incoming, seq, self.ids)

    def accept_snapshot(self, frame: Frame) -> None:
        if self._staging is None or frame.seq != self._staging.seq:
            raise ProtocolError("snapshot frame outside a snapshot")
        self._staging.apply(frame)

    def finish_snapshot(self, seq: int, digest: bytes) -> None:
        """Verify the staged tree against ``digest``, then swap it in as the copy at ``seq``."""
        if self._staging is None or seq != self._staging.seq:
            raise ProtocolError("snapshot end outside a snapshot")
        staging, self._staging = self._staging, None
        staging.verify(digest)
        self.applied = 0
        self._write_position(SNAPSHOT_MARK)
        self._write_durable(clean=False)
        root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        in_fd = os.open(staging.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for sub in (b"upper", b"work"):
                renameat2(in_fd, sub, root_fd, sub, RENAME_EXCHANGE)
        finally:
            os.close(in_fd)
            os.close(root_fd)
        assert self._layers is not None
        self._forget_batch()
        self._layers.close()
        self._layers = _open_layers(self.dirs)
        self.applied, self.pending, self._skipping = seq, 0, False
        self._write_position()
        self._clear_skipped()  # a faithful copy again
        self.dirty = True
        self.sync()
        with contextlib.suppress(OSError):
            rmtree(staging.path)


def _apply_batch(replica: Replica, batch: list[Frame]) -> tuple[int, list[Frame], bool]:
    """Apply frames in order (a worker thread).  Returns the applied seq before the first
    RECORD frame returned, those frames (for relaying), and whether a snapshot replaced the
    copy (then what was relayed before no longer leads here)."""
    applied: list[Frame] = []
    before, snapshotted = replica.applied, False
    with replica.lock:
        records = replica.batch_applier()
        try:
            for frame in batch:
                if frame.type != RECORD:
                    break
                if not applied:
                    before = replica.applied
                replica.accept(frame, records)
                applied.append(frame)
        except BaseException:
            replica.end_batch(records, forget=True)
            raise
        replica.end_batch(records)
        if len(applied) == len(batch):
            return before, applied, snapshotted
        for frame in batch[len(applied):]:
            if frame.type == RECORD:
                if not applied:
                    before = replica.applied
                replica.accept(frame)
                applied.append(frame)
            elif frame.type == SNAPSHOT:
                if replica.snapshot_seq != frame.seq:
                    replica.begin_snapshot(frame.seq)
                replica.accept_snapshot(frame)
            elif frame.type == SNAPSHOT_END:
                if replica.snapshot_seq is None:
                    replica.begin_snapshot(frame.seq)  # an empty upper has no records
                replica.finish_snapshot(frame.seq, frame.body)
                applied, snapshotted = [], True
            else:
                raise ProtocolError(f"unexpected frame type {frame.type} from upstream")
    return before, applied, snapshotted


# -- the link ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class LinkStats:
    """One user's link upstream as ``sdeefs replica status`` shows it (and the deploy
    benchmark reads it); the barrier rounds read where it goes."""

    upstream: str = ""  # "host:port" of the upstream being followed (or being connected to)
    head: int = 0  # upstream's head as last reported
    bytes_received: int = 0
    frames: int = 0
    snapshots: int = 0
    connected: bool = False
    last_error: str = ""


@attrs.define(eq=False)
class Follower:
    """Pulls ``user``'s records over ``stream`` into ``replica`` until the upstream closes.

    Blocking work (applying, syncing) runs in worker threads (``offload``) under
    ``replica.lock``; on a socket, frames are read and checked in a thread of the link's
    own (``receiver.ThreadReader``, handed over in batches), otherwise on the trio loop
    (``wire.FrameReader``); the trio loop moves checked frames to the applier.  At most
    IN_FLIGHT_BYTES are read ahead of what is applied (TCP holds the upstream back), and
    ``wait_room(bytes)``, when given, is awaited before a batch of RECORD frames of that
    size (at most about ``batch_bytes``) is applied (a relay's buffer waiting for its
    followers).  An upstream silent for ``silence_timeout`` (it sends HEAD every second
    when idle) is taken for a lost link.  :meth:`run` raises Redirected, ProtocolError
    (the upstream's refusals as their types: ``wire.decode_error``), ConnectionError or
    the stream's own errors; the caller reconnects.

    Four tasks share the link: the reader (frames into a channel), the applier (batches
    of them into the replica, then an ACK), the reporter (the subtree report, when it
    changed) and the syncer.

    Attributes:
        report: the nodes below this one and their applied seqs (the subtree report).
        on_applied: called with the applied seq before a batch and its RECORD frames.
        on_snapshot: called when a snapshot replaced the copy.
        relay_port: where this node serves followers of the user (0: it does not).
    """

    stream: trio.abc.Stream
    replica: Replica
    auth: HelloAuth
    user: str
    node: str
    stats: LinkStats = attrs.field(factory=LinkStats)
    report: Callable[[], list[tuple[str, int]]] = list
    on_applied: Callable[[int, list[Frame]], None] | None = None
    on_snapshot: Callable[[], None] | None = None
    silence_timeout: float = 10.0
    relay_port: int = 0
    wait_room: Callable[[int], Awaitable[None]] | None = None
    batch_bytes: int = IN_FLIGHT_BYTES
    offload: Offload = attrs.field(factory=Offload)
    resync: bool = False  # ask for a snapshot first (HELLO flag RESYNC)
    # the session's, once greeted (until then a placeholder nothing is sealed with)
    _key: LinkKey = attrs.field(init=False, factory=lambda: LinkKey(b"", UP))
    # payload bytes in the channel and in the batch being applied:
    _in_flight: int = attrs.field(init=False, default=0)
    _drained: trio.Event = attrs.field(init=False, factory=trio.Event)  # _in_flight shrank
    _sending: trio.Lock = attrs.field(init=False, factory=trio.Lock)  # applier and reporter
    # the upstream's head when the link was made, or the last one it announced since
    # (HEAD): below it the copy is catching up (a cold stream), and syncs only every
    # SYNC_INTERVAL_BEHIND (``_sync_periodically``)
    catching_up_to: int = attrs.field(init=False, default=0)
    # the link's reading thread (``receiver.ThreadReader``): one, never the daemon's pool
    _reading: Offload = attrs.field(init=False,
                                    factory=lambda: Offload(trio.CapacityLimiter(1)))

    async def run(self) -> None:
        replica = self.replica
        reader = FrameReader(self.stream)
        hello = Hello(secrets.token_bytes(NONCE_SIZE), replica.journal_id, self.user,
                      self.node, replica.applied + 1, RESYNC if self.resync else 0,
                      self.relay_port)
        session = await send_hello(self.stream, reader, self.auth, hello)
        self._key = session.key
        self.stats.head, self.stats.connected = session.head, True
        self.catching_up_to = max(self.catching_up_to, session.head)
        if replica.journal_id != session.journal_id:
            had_history = replica.journal_id != NO_ID
            await self.offload.run(replica.locked, replica.adopt, session.journal_id)
            if had_history:
                return  # reconnect asking from seq 1 of the new history
        send, receive = trio.open_memory_channel[Frame](256)
        try:
            async with open_link_tasks() as nursery:
                nursery.start_soon(self._sync_periodically)
                nursery.start_soon(self._report_changes)
                async with open_link_tasks() as inner:
                    inner.start_soon(self._apply, receive)
                    await self._read(reader, send)
                nursery.cancel_scope.cancel()
        except ProtocolError as exc:
            log.error("replica %s of %s: rejected: %s", self.node, self.user, exc)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.send_all(encode_error(exc, self._key, replica.applied))
            raise
        finally:
            self.stats.connected = False
            with trio.CancelScope(shield=True):
                await self.offload.run(replica.locked, replica.sync)

    async def _read(self, reader: FrameReader, send: trio.MemorySendChannel[Frame]) -> None:
        # One cancel scope whose deadline moves (not a new one per frame: a cold stream
        # is tens of thousands of frames); it counts only while a frame is awaited.
        with trio.CancelScope() as silence:
            await self._read_frames(reader, send, silence)
        if silence.cancelled_caught:
            raise ConnectionError(f"upstream silent for {self.silence_timeout:.0f} s")

    async def _read_frames(self, reader: FrameReader, send: trio.MemorySendChannel[Frame],
                           silence: trio.CancelScope) -> None:
        threaded = ThreadReader.take_over(reader)
        async with send:
            while True:
                silence.deadline = trio.current_time() + self.silence_timeout
                try:
                    if threaded is None:
                        frames = [await reader.frame(self._key)]
                    else:  # (its own thread: never one the applier waits for)
                        while self._in_flight >= IN_FLIGHT_BYTES:
                            await self._drained.wait()
                        frames = await self._reading.run(
                            threaded.frames, self._key, IN_FLIGHT_BYTES - self._in_flight)
                except EOFError:
                    return
                silence.deadline = math.inf
                for frame in frames:
                    await self._hand_over(frame, send)

    async def _hand_over(self, frame: Frame, send: trio.MemorySendChannel[Frame]) -> None:
        """A checked frame to the applier (or, HEAD and ERROR, taken in here)."""
        self.stats.bytes_received += FRAME_HEADER.size + len(frame.payload) + MAC_SIZE
        self.stats.frames += 1
        if frame.type == ERROR:
            raise decode_error(frame, "upstream: ")
        if frame.type == HEAD:
            self.stats.head = max(self.stats.head, frame.seq)
            # a head announced during the stream (the login node's, once a job's barrier
            # drained its capture: the origin's sender passes it on) is caught up to as
            # the connect's is: no syncfs of a cold stream's gigabyte mid-way
            self.catching_up_to = max(self.catching_up_to, frame.seq)
            return
        while self._in_flight >= IN_FLIGHT_BYTES:
            await self._drained.wait()
        self._in_flight += len(frame.payload)
        try:
            # Without a checkpoint: every frame already read is handed over
            # before the applier runs, so it takes them as one batch (a file's
            # records together), not one or two frames per thread call.
            send.send_nowait(frame)
        except trio.WouldBlock:
            await send.send(frame)

    async def _apply(self, receive: trio.MemoryReceiveChannel[Frame]) -> None:
        async with receive:
            while True:
                try:
                    batch = [await receive.receive()]
                except trio.EndOfChannel:
                    return
                size = len(batch[0].payload)
                while len(batch) < APPLY_BATCH_FRAMES and size < self.batch_bytes:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    size += len(batch[-1].payload)
                if self.wait_room is not None:
                    await self.wait_room(sum(len(f.payload) for f in batch if f.type == RECORD))
                before, applied, snapshotted = await self.offload.run(
                    _apply_batch, self.replica, batch)
                self._in_flight -= size
                self._drained.set()
                self._drained = trio.Event()
                if snapshotted:
                    self.stats.snapshots += 1
                    if self.on_snapshot is not None:
                        self.on_snapshot()
                if self.on_applied is not None:
                    self.on_applied(before, applied)
                self.stats.head = max(self.stats.head, self.replica.applied)
                await self._ack(b"")

    async def _ack(self, payload: bytes) -> None:
        async with self._sending:
            await self.stream.send_all(Frame(ACK, self.replica.applied, payload)
                                       .encode(self._key))

    async def _report_changes(self) -> None:
        """The subtree report, when it changed: not with every ACK (it grows with the tree),
        and also when idle (a node that joined below must show up upstream)."""
        last: list[tuple[str, int]] = []
        while True:
            await trio.sleep(REPORT_INTERVAL)
            now = self.report()
            if now != last:
                await self._ack(encode_report(now))
                last = now

    async def _sync_periodically(self) -> None:
        """Sync every SYNC_INTERVAL; a copy more than SYNC_LAG records behind its upstream,
        or not yet at the head its upstream had when it connected (a cold stream: a
        default-engine journal holds few records for much data, so a record count alone
        does not tell), only every SYNC_INTERVAL_BEHIND: each ``syncfs`` waits for the
        writeback of everything written since, under the lock the applier needs (a
        gigabyte of it stalled a cold stream ~2.5 s: bench/RESULTS.md), and a copy that
        far behind gains little from being clean at a point no job waits for (after a
        power loss it starts over, as a copy that was never synced does)."""
        last = trio.current_time()
        while True:
            await trio.sleep(SYNC_INTERVAL)
            applied = self.replica.applied
            behind = self.stats.head - applied > SYNC_LAG or applied < self.catching_up_to
            if behind and trio.current_time() - last < SYNC_INTERVAL_BEHIND:
                continue
            await self.offload.run(self.replica.locked, self.replica.sync)
            last = trio.current_time()
