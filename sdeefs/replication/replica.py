"""The compute end: a replica of one user's layer root, and the link that feeds it.

A :class:`Replica` applies RECORD frames in seq order into ``REPLICA_DIR/USER``
(``sdeefs.statedir.ReplicaDirs``); a :class:`Follower` pulls them from an upstream over
one connection (the login node's ``sdeefs-replicad``, or a relay) and acknowledges
what was applied.  Both raise ProtocolError for anything that must not be applied;
nothing was changed then, and the caller (``daemon``) reconnects.

Replica rules (every byte from a peer is hostile): besides what the wire checks
(``wire``: frames, strict records, :func:`wire.sanitize`), a RECORD whose seq is
neither applied + 1 nor a MORE continuation (nor, with SKIP, beyond it) is rejected
("out of sequence").  Paths resolve under the replica's layer root with
``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)`` (``sdeefs.layers``).  A rejected frame
changes nothing, is logged, and ends the connection with ERROR.

State on disk (``REPLICA_DIR/USER/``)
=====================================

``upper/`` and ``work/`` (the copy), ``position`` and ``durable``:

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
the filesystem is ``syncfs``-ed and ``durable`` says *clean at seq N*.  On start: the
same boot → trust ``position`` (re-apply the in-flight record, idempotently: renames
compare the replica's own inode number, saved in ``position`` before the rename);
another boot → trust ``durable`` if clean, otherwise start over (a full, verified
resync).  A snapshot is staged in ``incoming/`` and swapped in only once verified
(``snapshot``).
"""

from __future__ import annotations

import contextlib
import logging
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
from ..identity import Identity
from ..layers import LayerRoot, open_layer_root
from ..offload import Offload
from ..statedir import ReplicaDirs
from ..sysio import RENAME_EXCHANGE, boot_id, renameat2, syncfs, write_file_atomic
from ..trees import rmtree
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
    SKIP,
    SNAPSHOT,
    SNAPSHOT_END,
    Frame,
    FrameReader,
    Hello,
    ProtocolError,
    decode_error,
    decode_record_payload,
    encode_error,
    encode_report,
    open_link_tasks,
    send_hello,
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
APPLY_BATCH_FRAMES = 512  # frames applied in one worker-thread call at most


def _with_crc(body: bytes) -> bytes:
    """``body`` (a record whose last field is its crc32) with the crc filled in."""
    body = body[:-CRC.size]
    return body + CRC.pack(zlib.crc32(body))


def _open_layers(dirs: ReplicaDirs) -> LayerRoot:
    return open_layer_root(dirs.upper, dirs.work)


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
    """

    dirs: ReplicaDirs
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
    # the user's ids (sdeefs.identity, from this node's passwd and /etc/subuid|subgid):
    # the only owners a record may carry; None for a name without a passwd entry here
    ids: Identity | None = None

    root = property(lambda self: self.dirs.path)
    upper = property(lambda self: self.dirs.upper)

    @classmethod
    def open(cls, root: str, ids: Identity | None = None) -> Replica:
        dirs = ReplicaDirs(root)
        os.makedirs(root, mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)
        for sub in (dirs.upper, dirs.work):
            os.makedirs(sub, mode=0o755, exist_ok=True)
        replica = cls(dirs, ids=ids)
        replica._pos_fd = os.open(dirs.position, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        replica._load()
        replica._layers = _open_layers(dirs)
        rmtree(dirs.incoming)
        return replica

    def close(self) -> None:
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
        if self._layers is not None:
            self._layers.close()
            self._layers = _open_layers(self.dirs)
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
        apply_from_peer(self._layers, record, data, f"record {frame.seq}", self.ids)
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
        self._layers.close()
        self._layers = _open_layers(self.dirs)
        self.applied, self.pending = seq, 0
        self._write_position()
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
        for frame in batch:
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
                replica.finish_snapshot(frame.seq, frame.payload)
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
    ``replica.lock``; the trio loop only moves bytes and checks frames.  At most
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
    shared_key: bytes
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
    _key: bytes = attrs.field(init=False, default=b"")  # the session's, once greeted
    # payload bytes in the channel and in the batch being applied:
    _in_flight: int = attrs.field(init=False, default=0)
    _drained: trio.Event = attrs.field(init=False, factory=trio.Event)  # _in_flight shrank
    _sending: trio.Lock = attrs.field(init=False, factory=trio.Lock)  # applier and reporter

    async def run(self) -> None:
        replica = self.replica
        reader = FrameReader(self.stream)
        hello = Hello(secrets.token_bytes(NONCE_SIZE), replica.journal_id, self.user,
                      self.node, replica.applied + 1, 0, self.relay_port)
        session = await send_hello(self.stream, reader, self.shared_key, hello)
        self._key = session.key
        self.stats.head, self.stats.connected = session.head, True
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
        async with send:
            while True:
                try:
                    with trio.fail_after(self.silence_timeout):
                        frame = await reader.frame(self._key)
                except EOFError:
                    return
                except trio.TooSlowError:
                    raise ConnectionError(f"upstream silent for {self.silence_timeout:.0f} s") \
                        from None
                self.stats.bytes_received += FRAME_HEADER.size + len(frame.payload) + MAC_SIZE
                self.stats.frames += 1
                if frame.type == ERROR:
                    raise decode_error(frame, "upstream: ")
                if frame.type == HEAD:
                    self.stats.head = max(self.stats.head, frame.seq)
                    continue
                while self._in_flight >= IN_FLIGHT_BYTES:
                    await self._drained.wait()
                self._in_flight += len(frame.payload)
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
                if snapshotted and self.on_snapshot is not None:
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
        while True:
            await trio.sleep(SYNC_INTERVAL)
            await self.offload.run(self.replica.locked, self.replica.sync)
