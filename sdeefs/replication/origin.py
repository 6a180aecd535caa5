"""The login end: every user's journal as a source for the replicas following it.

The login node's daemon (``--origin ROOT``) serves each user's journal from
``ROOT/USER/state/journal`` (``sdeefs.statedir.UserDirs``), reading the data of Write
records from the live upper ``ROOT/USER/upper`` by file handle (``sdeefs.writeahead``:
under the byte-range read lock the journaling daemon holds until its ``pwrite`` landed).
Each follower has its own reader of the journal (a :class:`JournalSender`), so a slow
replica never stalls the user (the journal is the buffer) nor another replica.  A
follower that asks for records the journal no longer holds gets a snapshot of the live
upper, valid only if the journal did not move while it was read.

What travels is what a replica must do: markers (Done/Sync/Abort) stay off the wire
when a later frame carries SKIP, a trailing metadata record waits HOLD_BACK for a
possible Abort (:func:`settled`), an aborted record travels as a marker, a file's
consecutive setattr records go as one (:func:`merge_setattr`), and small records and
writes share frames (runs, ``wire.RUN``: one MAC for many records).

The kernel engine's capture (``sdeefs.fs.capture``) writes batches, ``Begin`` ...
``Commit``: nothing from a Begin on is shipped until its Commit or Void is in the
journal (:func:`settled`), and the records a Void names travel as markers, as aborted
ones do (:func:`without_aborted`).  Its ``Extent`` records are checked against what
the capture read (the rule in ``sdeefs.records``, :func:`extent_blocks_ok`; each record
type's sums with its own function, ``sdeefs.blocksums``: BLAKE3 now, BLAKE2b in journals
written before): a block that changed since is shipped only if a later committed Extent
rewrites it; otherwise the sender waits for the capture's next batch and reads again.
A ``StableExtent`` (an Extent with the capture's witness) is shipped without hashing its
data when the witness holds (:func:`no_writer`, :func:`unchanged_since_read`).  Every
Extent goes to a replica as a type-18 ``Extent`` (``Extent.shipped``: the witness never
leaves the login node, nor do BLAKE3 sums, which type 18 cannot say).  A head query drains
the capture first (:meth:`OriginUser.drain_capture`): the head it answers holds every
change the user made before the query; when no capture answers although one is
expected, the query fails and the barrier asks again.  The layer root is the user's
image (``UserDirs.live``) once they have one; it is read only while mounted (the
empty mountpoint is another filesystem: its handles would name other files).

The journal is trimmed below what every follower acknowledged (:meth:`Origin.trim`,
whose bookkeeping is ``STATE/replicas.json``); a follower gone longer than ``expire``
no longer holds it back and gets a snapshot when it returns.  Shippers wait for a
journal to grow through inotify (:meth:`OriginUser.watch_journal`), so an idle login
node costs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import stat
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

import attrs
import trio

from .. import blocksums
from .. import records as rec
from ..control import ControlError
from ..errors import JournalCorrupt, QuietError
from ..fs import capture, image, kernel
from ..fs.fanotify import handle_ino
from ..journal import Entry, Journal, JournalTail, RawEntry, Trimmed, journal_id
from ..layers import LayerRoot, open_layer_root
from ..offload import Offload
from ..replicable import NOBODY, UserIds, ids_of_user, refusal
from ..statedir import UserDirs
from ..sysio import (
    IN_CREATE,
    IN_DELETE,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVED_TO,
    inotify_drain,
    inotify_watch,
    write_file_atomic,
)
from ..writeahead import open_write_data
from .relay import IDLE_HEAD, Downstream, DownstreamLink, Downstreams
from .wire import (
    FRAME_HEADER,
    HEAD,
    MAC_SIZE,
    NO_ID,
    POOL_BUFFER,
    RECORD_HEAD,
    RESYNC,
    RUN_WRITE,
    SKIP,
    BufferPool,
    Encoded,
    Frame,
    FrameReader,
    Hello,
    HistoryDiverged,
    ProtocolError,
    RunEncoder,
    answer_hello,
    encode_record_payload,
    encode_write_frames,
    open_link_tasks,
    seal_frame,
)

log = logging.getLogger(__name__)

HOLD_BACK = 0.05  # seconds a trailing metadata record waits for a possible Abort
POLL = 0.01  # seconds between looks at a journal for new records, where inotify fails
JOURNAL_EVENTS = IN_MODIFY | IN_CREATE | IN_MOVED_TO | IN_DELETE  # a segment grew or came
BATCH_BYTES = 8 << 20  # data read from the upper per batch sent
MAX_PENDING = 4096  # journal entries read ahead of what was sent
POLL_BYTES = 256 << 10  # journal bytes read per look (some 2,500 records)
# journal bytes read per step while learning the head (into the head tail's buffer, which
# it keeps: 2 MiB, a record of MAX_PAYLOAD fits)
HEAD_READ_BYTES = 2 << 20
SNAPSHOT_ATTEMPTS = 5
MAX_REFUSED = 16  # refused records an origin remembers per user
MARKERS = (rec.Done, rec.Sync, rec.Abort, rec.Begin, rec.Commit, rec.Void)
DRAIN_TIMEOUT = 60.0  # seconds a head query waits for the capture's drain
EXTENT_RETRY = 0.05  # seconds between reads of an Extent whose data changed since captured


@attrs.define(eq=False)
class OriginUser:
    """One user's journal on the login node and the replicas following it directly.

    Attributes:
        head: the last seq known to be in the journal.
        queries: head queries answered (barriers of the nodes below).
        grew: set (and replaced) each time the journal directory changes.
        refused: records shipped that every replica will skip (``sdeefs.replicable``:
            the daemon's door refuses them, so only a journal written by something else
            holds one), the first MAX_REFUSED; ``sdeefs status`` shows them until a
            snapshot past them was sent (a resync).
    """

    name: str
    dirs: UserDirs  # ROOT/USER
    downstreams: Downstreams
    head: int = 0
    queries: int = 0
    grew: trio.Event = attrs.field(factory=trio.Event)
    ids: UserIds = NOBODY  # the user's (``sdeefs.replicable``), looked up when first served
    refused: dict[int, str] = attrs.field(factory=dict)  # seq -> why replicas skip it
    _head_tail: JournalTail | None = None
    _head_lock: threading.Lock = attrs.field(factory=threading.Lock)

    @property
    def journal_dir(self) -> str:
        return str(self.dirs.state.journal)

    def refresh_head(self) -> int:
        """Read new records' seqs (a worker thread; several may call it: one at a time)."""
        with self._head_lock:
            if self._head_tail is None:
                self._head_tail = JournalTail(self.journal_dir, max(1, self.head + 1))
            try:  # seqs only: a cold follower's first query reads the whole journal
                while self._head_tail.skip(HEAD_READ_BYTES):
                    self.head = self._head_tail.next_seq - 1
            except Trimmed:
                self._head_tail.close()
                self._head_tail = None
            return self.head

    def source(self) -> LayerRoot:
        """The user's layer root, where Write records' data is read (a worker thread).

        A layer image is mounted first if it is not (a logged-out user's replica catching
        up); the mount stays (the launcher's stop leaves a busy layer mounted, and the
        next start finds it so).  The open layer root keeps it busy meanwhile.
        """
        upper, work = self.dirs.live()
        if os.path.exists(self.dirs.image):
            try:
                image.mount_image(self.dirs.image, self.dirs.layer)
            except image.ImageError as exc:
                raise ProtocolError(f"the layer of {self.name} cannot be read: {exc}") from None
        source = open_layer_root(upper, work)
        if os.path.exists(self.dirs.image) and \
                os.fstat(source.upper_fd).st_dev == os.stat(self.dirs.path).st_dev:
            source.close()  # unmounted between the mount and the open
            raise ProtocolError(f"the layer of {self.name} is not mounted; retry")
        return source

    @property
    def live_upper(self) -> str:
        return self.dirs.live()[0]

    def drain_capture(self) -> None:
        """Make the journal hold everything the user did before now (a worker thread):
        ask the kernel engine's capture for a barrier, if one runs.  ProtocolError if none
        answers while one is expected (the head could lack changes: the barrier retries)."""
        state = self.dirs.state.path
        try:
            capture.drain(state, DRAIN_TIMEOUT)
        except (QuietError, ControlError) as exc:
            if kernel.capture_expected(state):
                raise ProtocolError(f"the capture of {self.name} does not answer ({exc}); "
                                    "retry") from None

    def journal_grew(self) -> None:
        self.grew.set()
        self.grew = trio.Event()

    async def watch_journal(self) -> None:
        """Wake the user's shippers whenever the journal directory changes (inotify), so an
        idle login node costs nothing; polling at POLL where inotify cannot watch it."""
        while True:
            try:
                fd = inotify_watch(self.journal_dir, JOURNAL_EVENTS)
            except OSError as exc:
                log.warning("%s: cannot watch %s (%s); polling it", self.name,
                            self.journal_dir, exc.strerror)
                with trio.move_on_after(IDLE_HEAD * 10):
                    while True:
                        await trio.sleep(POLL)
                        self.journal_grew()
                continue
            try:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    # Non-blocking reads of a few bytes: on the loop, no thread needed.
                    mask = inotify_drain(fd)
                    self.journal_grew()
                    if mask & IN_IGNORED:  # the directory went (a new history): watch anew
                        break
            finally:
                os.close(fd)


# -- what travels --------------------------------------------------------------------------


SendEntry = Entry | RawEntry  # a sender's pending entry: read raw, or made (a marker)
MARKER_TYPES = frozenset(cls.TYPE for cls in MARKERS)
METADATA_TYPES = frozenset(t for t, cls in rec.RECORD_TYPES.items() if cls.METADATA)


def open_batch(pending: Sequence[SendEntry]) -> int | None:
    """The index in ``pending`` of a capture batch's Begin whose Commit or Void is not
    there yet (None: every batch in it is closed)."""
    begins: dict[int, int] = {}
    for index, entry in enumerate(pending):
        rtype = entry.rtype
        if rtype == rec.Begin.TYPE:
            begins[entry.seq] = index
        elif rtype == rec.Commit.TYPE:
            begins.pop(cast(rec.Commit, entry.record).begin, None)
        elif rtype == rec.Void.TYPE:
            first = cast(rec.Void, entry.record).begin
            begins = {seq: i for seq, i in begins.items() if seq < first}
    return min(begins.values()) if begins else None


def settled(pending: Sequence[SendEntry], first_seen: float, batches: bool = True) -> int:
    """How many of ``pending`` may be sent now.

    A metadata record is written just before its operation; if the operation fails an
    Abort follows at once.  So the last metadata record waits until anything follows
    it, or HOLD_BACK has passed.  A capture batch waits, from its Begin on, for its
    Commit or Void (``sdeefs.records``): it takes effect as a whole or not at all
    (``batches`` False: ``pending`` holds no Begin, nothing to look for).
    """
    held = open_batch(pending) if batches else None
    if held is not None:
        pending = pending[:held]
    if not pending:
        return 0
    last = pending[-1].rtype
    if last in METADATA_TYPES and last not in MARKER_TYPES \
            and time.monotonic() - first_seen < HOLD_BACK:
        return len(pending) - 1
    return len(pending)


def merge_setattr(first: rec.Setattr, then: rec.Setattr) -> rec.Setattr | None:
    """One Setattr with the effect of ``first`` followed by ``then`` on a replica, or None.

    rsync, tar and pip set mode, owner and times of a file in separate calls: three
    records where one does.  The merged record is applied in apply_setattr's order (size,
    owner, mode, times), which differs from the two in sequence only where the order
    matters: a truncate after a time change (the truncate would move the time: not
    merged) and set-ID bits cleared by chown (replicas strip set-ID bits anyway).
    """
    if first.path != then.path:
        return None
    times = rec.SET_ATIME | rec.SET_MTIME
    if then.mask & rec.SET_SIZE and first.mask & times:
        return None

    def pick(bit: int, name: str) -> int:
        return int(getattr(then if then.mask & bit else first, name))

    return rec.Setattr(first.path, first.mask | then.mask, pick(rec.SET_MODE, "mode"),
                       pick(rec.SET_OWNER, "uid"), pick(rec.SET_OWNER, "gid"),
                       pick(rec.SET_SIZE, "size"), pick(rec.SET_ATIME, "atime_ns"),
                       pick(rec.SET_MTIME, "mtime_ns"))


def without_aborted(entries: Sequence[SendEntry], new: Sequence[SendEntry] | None = None
                    ) -> list[SendEntry]:
    """``entries`` (then ``new``) with every aborted record, and every record of a voided
    capture batch, replaced by a marker (nothing to apply).

    With ``new`` only the Aborts and Voids in ``new`` are looked for: those in ``entries``
    were applied when they were new (an Abort or a Void always follows what it names), so
    a sender reading a long history costs the records it reads, not the square of them."""
    fresh = entries if new is None else new
    joined = list(entries) if new is None else [*entries, *new]
    aborted = {cast(rec.Abort, e.record).seq for e in fresh if e.rtype == rec.Abort.TYPE}
    void = [(v.begin, v.end) for e in fresh if e.rtype == rec.Void.TYPE
            for v in [cast(rec.Void, e.record)]]
    if not aborted and not void:
        return joined
    return [Entry(e.seq, rec.Sync(0))
            if e.seq in aborted or any(b <= e.seq <= end for b, end in void)
            and e.rtype != rec.Void.TYPE else e for e in joined]


def extent_blocks_ok(record: rec.Extent, data: bytes | bytearray | memoryview,
                     later: list[rec.Record]) -> bool:
    """May ``data``, read now for ``record``, reach a replica (the Extent rule of
    ``sdeefs.records``)?  Every block whose hash differs from the capture's sum must be
    rewritten by a later committed Extent of the same handle (``later``: the committed
    records after it), or lie at or beyond the size such an Extent says.  Each block is
    hashed with the function of ``record``'s type (``Extent.SUMS``)."""
    if all_blocks_match(record, [data]):
        return True
    count = len(record.sums) // rec.SUM_SIZE
    for index in range(count):
        start = index * rec.EXTENT_BLOCK
        if start >= record.length:
            break
        end = min(start + rec.EXTENT_BLOCK, record.length)
        block = data[start:end]
        if len(block) == end - start and blocksums.block_sum(block, record.SUMS) == \
                record.sums[index * rec.SUM_SIZE:(index + 1) * rec.SUM_SIZE]:
            continue
        offset = record.offset + start
        if not any(isinstance(r, rec.Extent) and r.handle == record.handle and (
                r.size <= offset or r.offset <= offset
                and offset + (end - start) <= r.offset + r.length) for r in later):
            return False
    return True


def all_blocks_match(record: rec.Extent,
                     parts: Sequence[bytes | bytearray | memoryview]) -> bool:
    """Is the data ``parts`` hold (one after the other) the ``record.length`` bytes whose
    every block the capture summed (``record.sums``, made by ``record.SUMS``) as they
    are?  The common case of :func:`extent_blocks_ok`, with one ``blocksums.data_sums``
    per part (the GIL released block by block).  Every part but the last must hold
    whole blocks.  False where it cannot tell (a short read, a block that differs): the
    rule block by block decides."""
    if sum(len(p) for p in parts) != record.length:
        return False
    need = min(-(-record.length // rec.EXTENT_BLOCK), len(record.sums) // rec.SUM_SIZE)
    sums = []
    for part in parts:
        if len(part) % rec.EXTENT_BLOCK and part is not parts[-1]:
            return False
        sums.append(blocksums.data_sums(part, record.SUMS))
    return b"".join(sums)[:need * rec.SUM_SIZE] == record.sums[:need * rec.SUM_SIZE]


def no_writer(fd: int) -> bool:
    """Has nobody the file at ``fd`` (open read-only) open for writing, a writable
    mapping included?  A read lease taken and released at once (condition 1 of a
    StableExtent's witness, ``sdeefs.records``); False where a lease cannot be had."""
    try:
        # A writer opening the file between the two calls breaks the lease: the kernel
        # signals its holder, SIGIO by default, which would end this daemon.  SIGWINCH's
        # default is to ignore it, and nothing here handles it.
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGWINCH)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # EAGAIN: open for writing (or being executed); others: no leases
        return False
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def unchanged_since_read(fd: int, record: rec.StableExtent,
                         frames: Sequence[bytearray | memoryview]) -> bool:
    """Are the data ``frames`` hold, just read from ``fd``, the bytes the capture summed
    for ``record``?  Condition 2 of its witness (``sdeefs.records``): the read was whole
    and the open file is the handle's inode with its ctime as the capture saw it."""
    st = os.fstat(fd)
    if st.st_ctime_ns != record.ctime_ns or handle_ino(record.handle) != st.st_ino:
        return False
    got = 0
    for frame in frames:
        with write_frame_data(frame) as data:
            got += len(data)
    return got == record.length


def write_frame_data(frame: bytearray | memoryview) -> memoryview:
    """The data of a RECORD frame ``wire.encode_write_frames`` made: after the header, the
    record head and the record, before the MAC."""
    _, length = RECORD_HEAD.unpack_from(frame, FRAME_HEADER.size)
    return memoryview(frame)[FRAME_HEADER.size + RECORD_HEAD.size + length:-MAC_SIZE]


@attrs.define(eq=False)
class JournalSender:
    """Ships one user's journal to one follower from ``tail`` on, as it is written.

    Batches of about BATCH_BYTES are read and encoded in a worker thread (Write data
    goes from the upper straight into the frame buffers), so reading, sending and
    applying overlap and a big history never sits in memory at once.  Idle, it sends
    HEAD every IDLE_HEAD and sleeps until the journal grows.

    Attributes:
        pending: entries read and not sent yet.
        first_seen: when the oldest of them was read (``settled``).
        skipped: markers were left out since the last frame sent (the next says SKIP).
    """

    link: DownstreamLink
    user: OriginUser
    tail: JournalTail
    source: LayerRoot
    offload: Offload
    pending: list[SendEntry] = attrs.field(factory=list)
    first_seen: float = 0.0
    skipped: bool = False
    waiting: bool = False  # an Extent's data changed since the capture read it
    # A capture batch (Begin) was read: look for open ones (a passthrough journal, which
    # has none, skips it).
    batches: bool = False
    # the seqs of the Begins read whose Commit or Void was not read yet: ``open_batch``
    # kept as entries are read, not a scan of ``pending`` per look (a cold stream's
    # thousands of looks at a window of thousands of entries)
    open_begins: set[int] = attrs.field(factory=set)
    frames: BufferPool = attrs.field(  # 3 batches
        factory=lambda: BufferPool(keep=3 * 32, size=POOL_BUFFER))

    async def run(self) -> None:
        """Read and encode the next batch (a worker thread) while the one before it is
        sent: a cold follower's stream is bound by the slower of the two, not their sum."""
        send, receive = trio.open_memory_channel[tuple[list[Encoded], int]](1)
        async with open_link_tasks() as nursery:
            nursery.start_soon(self._send, receive)
            await self._produce(send)

    async def _send(self, receive: trio.MemoryReceiveChannel[
            tuple[list[Encoded], int]]) -> None:
        sending = Offload(trio.CapacityLimiter(1))  # its own thread: never the pool's
        async with receive:
            async for buffers, last in receive:
                await self.link.send_encoded_offloaded(buffers, last, sending)
                self.user.head = max(self.user.head, last)

    async def _produce(self, send: trio.MemorySendChannel[
            tuple[list[Encoded], int]]) -> None:
        user, downstream = self.user, self.link.downstream
        last_send = trio.current_time()
        announced = user.head  # (about what the hello said)
        async with send:
            while True:
                if user.head > announced:  # a head query (a barrier) drained the capture
                    announced = user.head
                    head = Frame(HEAD, announced)
                    await send.send(([head.encode(self.link.key)], head.seq))
                grew = user.grew  # taken before reading: a record written meanwhile sets it
                try:
                    buffers, last = await self.offload.run(self.next_batch)
                except Trimmed:
                    raise ProtocolError("the journal was trimmed below this replica; "
                                        "reconnect for a snapshot") from None
                except JournalCorrupt as exc:
                    raise ProtocolError(f"journal of {user.name}: {exc}") from None
                if buffers:
                    await send.send((buffers, last))
                    last_send = trio.current_time()
                    announced = max(announced, last)  # (what is sent is no news)
                    continue
                if trio.current_time() - last_send >= IDLE_HEAD:
                    # idle for a while: no buffers kept.  Not at every look that finds
                    # nothing: a follower of a capture still journaling an install finds
                    # nothing between its committed batches, every few hundred ms, and
                    # each batch then faulted in new buffers (bench/RESULTS.md, branch
                    # coldcpu)
                    self.frames.clear()
                    head = Frame(HEAD, max(user.head, downstream.sent_seq))
                    await send.send(([head.encode(self.link.key)], head.seq))
                    last_send = trio.current_time()
                    announced = max(announced, head.seq)
                # A held-back record goes after HOLD_BACK; otherwise sleep until the
                # journal grows or the next HEAD is due.
                idle = IDLE_HEAD - (trio.current_time() - last_send)
                with trio.move_on_after(HOLD_BACK if self.pending and not self.waiting
                                        else EXTENT_RETRY if self.waiting else max(idle, 0.0)):
                    await grew.wait()

    def next_batch(self) -> tuple[list[Encoded], int]:
        """The next frames to send, encoded, and the last seq they carry (a worker thread).

        Records travel as the journal holds them (``JournalTail.poll_raw``: a record's
        payload is its bytes on the wire): only what the sender must know is decoded
        (Extents, batch markers, a Write's range, a setattr merged, a record that a
        cheap look at its owner cannot clear of a refusal), so a cold stream costs a
        copy per record, not a decode and an encode (bench/RESULTS.md, issue 16,
        branch coldorigin)."""
        # At most about MAX_PENDING entries are held (each batch looks at all of them),
        # but an open capture batch is read to its end whatever its size: nothing of it
        # can go before its Commit (the capture bounds a batch: Config.batch_entries).
        if len(self.pending) < MAX_PENDING:
            self._take(self.tail.poll_raw(POLL_BYTES))
        while self.batches and self._open_batch() is not None \
                and self._take(self.tail.poll_raw(POLL_BYTES)):
            pass
        pending = self.pending
        open_at = self._open_batch() if self.batches else None
        ready = settled(pending if open_at is None else pending[:open_at], self.first_seen,
                        False)
        out: list[Encoded] = []
        run = RunEncoder(self.link.key)  # small records share frames (``wire.RUN``)
        size = taken = 0
        held: HeldSetattr | None = None
        self.waiting = False
        while taken < ready and size < BATCH_BYTES:
            entry = pending[taken]
            rtype = entry.rtype
            frames: list[bytearray | memoryview] | None = None
            if rtype in rec.EXTENT_TYPES:
                if size and size + cast(rec.Extent, entry.record).length > BATCH_BYTES:
                    # a big Extent (up to 16 MiB) starts the next batch: a batch is then
                    # at most one such Extent, not 8 MiB and one, so the frames in
                    # flight (three batches) and the pool's buffers are fewer, and the
                    # buffers warmer (bench/RESULTS.md, branch originlean)
                    break
                frames = self._extent_frames(entry.seq, cast(rec.Extent, entry.record),
                                             pending[taken + 1:ready],
                                             SKIP if self.skipped else 0)
                if frames is None:  # read again after the capture's next batch
                    self.waiting = True
                    break
            taken += 1
            last_of_batch = taken == ready  # the batch may end on a marker: send it
            if frames is not None:
                if held is not None:
                    size += self._encode_setattr(held, out, run)
                    held = None
                run.flush(out)
                self.skipped = False  # the first frame says SKIP (_extent_frames)
                for frame in frames:  # sealed in send order (wire v9)
                    seal_frame(frame, self.link.key)
                out.extend(frames)
                size += sum(len(frame) for frame in frames)
                continue
            if rtype in MARKER_TYPES and not last_of_batch:
                self.skipped = True  # nothing to apply; the next frame says SKIP
                continue
            if held is not None and rtype == rec.Setattr.TYPE:
                merged = merge_setattr_fields(held.fields, setattr_fields(entry))
                if merged is not None:  # the earlier seq is left out: SKIP
                    held, self.skipped = HeldSetattr(entry.seq, merged, None, SKIP), False
                    continue
            if held is not None:
                size += self._encode_setattr(held, out, run)
                held = None
            flags = SKIP if self.skipped else 0
            self.skipped = False
            if rtype == rec.Setattr.TYPE:
                held = HeldSetattr(entry.seq, setattr_fields(entry), entry.payload, flags)
                if not last_of_batch:
                    continue  # the next setattr may join it
                size += self._encode_setattr(held, out, run)
                held = None
                continue
            size += self._encode(entry, flags, out, run)
        if held is not None:
            size += self._encode_setattr(held, out, run)
        run.flush(out)
        last = pending[taken - 1].seq if taken else 0
        self.pending = pending[taken:]
        if self.pending and taken:
            self.first_seen = time.monotonic()
        return out, last

    def _take(self, new: list[RawEntry]) -> bool:
        """Add entries just read to ``pending``; False if there were none."""
        if new and not self.pending:
            self.first_seen = time.monotonic()
        if not self.batches:
            self.batches = any(e.rtype == rec.Begin.TYPE for e in new)
        if self.batches:
            begins = self.open_begins
            for entry in new:  # what ``open_batch`` looks for, entry by entry
                rtype = entry.rtype
                if rtype == rec.Begin.TYPE:
                    begins.add(entry.seq)
                elif rtype == rec.Commit.TYPE:
                    begins.discard(cast(rec.Commit, entry.record).begin)
                elif rtype == rec.Void.TYPE:
                    first = cast(rec.Void, entry.record).begin
                    self.open_begins = begins = {seq for seq in begins if seq < first}
        self.pending = without_aborted(self.pending, new)
        return bool(new)

    def _open_batch(self) -> int | None:
        """``open_batch(self.pending)``, from ``open_begins``: ``pending`` holds consecutive
        seqs (a stretch of the journal), so the oldest open Begin's index is its seq's
        distance from the first; scanned where that does not hold."""
        if not self.open_begins:
            return None
        pending = self.pending
        first = min(self.open_begins)
        index = first - pending[0].seq if pending else -1
        if 0 <= index < len(pending) and pending[index].seq == first \
                and pending[index].rtype == rec.Begin.TYPE:
            return index
        return open_batch(pending)

    def _extent_frames(self, seq: int, record: rec.Extent, after: Sequence[SendEntry],
                       flags: int) -> list[bytearray | memoryview] | None:
        """The encoded frames of an Extent (``flags``, SKIP, on the first), its data read
        from the upper now straight into the frame buffers (``wire.encode_write_frames``,
        as a Write's: no copy of the data); None: not yet, a block changed since the
        capture read it (``extent_blocks_ok``: what is shipped is what was checked).  A
        file gone gives one frame without data, as before.  The frames are views of the
        sender's ``frames`` pool, as a Write's: a new zeroed ``bytearray`` per MiB was
        a fifth of a cold stream's origin CPU (memset, page faults, unmap: bench/RESULTS.md,
        branch coldcpu); a frame held back is dropped and its buffer free again.  The
        frames come unsealed:
        under wire v9 sealing takes a place on the link, so the caller seals them
        (``seal_frame``) where they go into the batch, after what goes before them; a
        frame sealed and then held back, or out of order, is a gap the follower refuses."""
        fd = open_write_data(self.source, record)
        witnessed = False
        try:
            # what a replica is sent: a type-18 Extent (``Extent.shipped``: no witness,
            # sums only if they are BLAKE2b's, the function type 18 says)
            if isinstance(record, rec.StableExtent):
                stable = fd is not None and no_writer(fd)
                frames = encode_write_frames(seq, record.shipped(), fd, None, flags,
                                             self.frames)
                witnessed = stable and fd is not None and unchanged_since_read(
                    fd, record, frames)
            else:
                frames = encode_write_frames(seq, record.shipped(), fd, None, flags,
                                             self.frames)
        finally:
            if fd is not None:
                os.close(fd)
        if fd is not None and not witnessed:
            parts = [write_frame_data(frame) for frame in frames]
            try:
                if not (all_blocks_match(record, parts) or extent_blocks_ok(
                        record, b"".join(parts), [e.record for e in after])):
                    return None
            finally:
                for part in parts:
                    part.release()
        return frames

    def _note_refusal(self, seq: int, reason: str | None) -> None:
        """A record ``sdeefs.replicable`` refuses still travels (each replica decides, and
        records the skip itself); the login node notes it for ``sdeefs status``."""
        if reason is not None and seq not in self.user.refused \
                and len(self.user.refused) < MAX_REFUSED:
            log.error("%s: record %d of the journal is refused by every replica: %s",
                      self.user.name, seq, reason)
            self.user.refused[seq] = reason

    def _owner_ok(self, uid: int, gid: int) -> bool:
        """Do the owner rules of ``sdeefs.replicable`` certainly pass an entry owned so?"""
        ids = self.user.ids
        return ids is NOBODY or ids.has_uid(uid) and ids.has_gid(gid)

    def _refusal(self, entry: SendEntry) -> str | None:
        """``refusal`` of the entry's record, decoding it only where a look at its type
        and owner cannot clear it (most records are the user's own files)."""
        rtype = entry.rtype
        if rtype not in MAY_BE_REFUSED:
            return None
        fields = entry.fields if isinstance(entry, RawEntry) else None
        if fields is not None:  # Mkdir, Mknod: (path end, mode, uid, gid)
            _, mode, uid, gid = fields
            if not (rtype == rec.Mknod.TYPE and stat.S_ISCHR(mode) and mode & 0o7777) \
                    and self._owner_ok(uid, gid):
                return None
        record = entry.record
        if rtype == rec.Create.TYPE:
            # a new file of the user's own, without xattrs: the records it means (Mknod
            # of a regular file, a Write, a Setattr of size and mtime) all pass, as
            # ``refusal`` of each would say, without making them (most of a cold
            # stream's records are Creates)
            create = cast(rec.Create, record)
            if not create.xattrs and self._owner_ok(create.uid, create.gid):
                return None
        return refusal(record, self.user.ids)

    def _encode_setattr(self, held: HeldSetattr, out: list[Encoded],
                        run: RunEncoder) -> int:
        """Add a (merged) setattr to ``run``; the bytes it counts for a batch."""
        fields = held.fields
        if fields[1] & rec.SET_OWNER and not self._owner_ok(fields[3], fields[4]):
            self._note_refusal(held.seq, refusal(rec.Setattr(*fields), self.user.ids))
        body = held.payload
        if body is None:  # merged: the record's encoding (``sdeefs.records``)
            body = PATH_LENGTH.pack(len(fields[0])) + fields[0] + SETATTR_FIXED.pack(
                *fields[1:])
        return run.add_record(held.seq, held.flags, rec.Setattr.TYPE, body, out)

    def _encode(self, entry: SendEntry, flags: int, out: list[Encoded],
                run: RunEncoder) -> int:
        """Add one record to ``run`` (a Write of more than RUN_WRITE bytes: its own
        frames to ``out``, after the run so far); the bytes it counts for a batch."""
        seq, rtype = entry.seq, entry.rtype
        self._note_refusal(seq, self._refusal(entry))
        if rtype != rec.Write.TYPE:
            return run.add_record(seq, flags, rtype, entry.payload, out)
        fields = entry.fields if isinstance(entry, RawEntry) else None
        if fields is not None:  # (path end, handle end, offset, length): no decode
            raw = entry.payload
            path_end, handle_end, offset, length = fields
            record = rec.Write(raw[4:path_end], raw[path_end + 4:handle_end], offset, length)
        else:
            record = cast(rec.Write, entry.record)
        fd = open_write_data(self.source, record)
        try:
            if record.length <= RUN_WRITE:
                data = os.pread(fd, record.length, record.offset) \
                    if fd is not None and record.length else b""
                if len(data) == record.length:  # as journaled: its bytes as they are
                    return run.add_record(seq, flags, rtype, entry.payload, out, data)
                # the file is shorter now: a shorter write (``write_record_payload``)
                payload = encode_record_payload(attrs.evolve(record, length=len(data)), data)
                run.add(seq, flags, payload, out)
                return 64 + len(payload)
            run.flush(out)
            encoded = encode_write_frames(seq, record, fd, self.link.key, flags, self.frames)
        finally:
            if fd is not None:
                os.close(fd)
        out.extend(encoded)
        return sum(len(b) for b in encoded)


@attrs.frozen
class HeldSetattr:
    """A setattr a sender holds for the next to join (``merge_setattr_fields``): its seq,
    fields (``setattr_fields``), payload (None: merged, encoded when sent) and flags."""

    seq: int
    fields: tuple[Any, ...]
    payload: bytes | None
    flags: int


MAY_BE_REFUSED = frozenset(cls.TYPE for cls in (
    rec.Mkdir, rec.Mknod, rec.Symlink, rec.Setattr, rec.Setxattr, rec.Removexattr,
    rec.Create))  # ``refusal`` passes every other type
PATH_LENGTH = struct.Struct("<I")  # a path field of ``sdeefs.records`` (version 3)
SETATTR_FIXED = struct.Struct("<IIIIQqq")  # a Setattr's fields after its path
assert SETATTR_FIXED.size == 40


def setattr_fields(entry: SendEntry) -> tuple[Any, ...]:
    """(path, mask, mode, uid, gid, size, atime_ns, mtime_ns) of a Setattr entry."""
    fields = entry.fields if isinstance(entry, RawEntry) else None
    if fields is not None:
        return (entry.payload[4:fields[0]], *fields[1:])
    r = cast(rec.Setattr, entry.record)
    return (r.path, r.mask, r.mode, r.uid, r.gid, r.size, r.atime_ns, r.mtime_ns)


def merge_setattr_fields(first: tuple[Any, ...], then: tuple[Any, ...]
                         ) -> tuple[Any, ...] | None:
    """``merge_setattr`` of two setattrs' fields (``setattr_fields``), without records:
    the fields of the merged one, or None."""
    if first[0] != then[0]:
        return None
    fmask, tmask = first[1], then[1]
    if tmask & rec.SET_SIZE and fmask & (rec.SET_ATIME | rec.SET_MTIME):
        return None
    mode = then if tmask & rec.SET_MODE else first
    owner = then if tmask & rec.SET_OWNER else first
    size = then if tmask & rec.SET_SIZE else first
    atime = then if tmask & rec.SET_ATIME else first
    mtime = then if tmask & rec.SET_MTIME else first
    return (first[0], fmask | tmask, mode[2], owner[3], owner[4], size[5], atime[6],
            mtime[7])


# -- the login role ----------------------------------------------------------------------------


@attrs.define(eq=False)
class Origin:
    """The login node's role in ``sdeefs-replicad``: every user's journal under ``root``
    served to the replicas that ask (see the module docstring).

    Attributes:
        users: the users asked for so far (their journal existed then).
    """

    root: str
    fanout: int
    expire: float
    offload: Offload
    users: dict[str, OriginUser] = attrs.field(factory=dict)
    _nursery: trio.Nursery | None = None

    async def run(self, trim_interval: float,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch the users' journals and trim them, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._trim_periodically, trim_interval)
            task_status.started()

    def user(self, name: str) -> OriginUser | None:
        """``name``'s journal (None: the user has none)."""
        user = self.users.get(name)
        if user is None:
            dirs = UserDirs.of(self.root, name)
            if not os.path.isdir(dirs.state.journal):  # one stat: on the loop
                return None
            user = self.users[name] = OriginUser(name, dirs, Downstreams(self.fanout))
            assert self._nursery is not None
            self._nursery.start_soon(user.watch_journal)
        return user

    async def head(self, user: OriginUser) -> tuple[int, bytes]:
        """The user's head now, and its journal id (a head query's answer): everything
        the user did before the query (the capture drained first)."""
        await self.offload.run(user.drain_capture)
        head = await self.offload.run(user.refresh_head)
        return head, await self.offload.run(journal_id, user.journal_dir)

    async def serve(self, stream: trio.abc.Stream, reader: FrameReader, hello: Hello,
                    hello_key: bytes, user: OriginUser, downstream: Downstream) -> None:
        """Answer ``hello`` (authenticated with ``hello_key``) and stream the user's journal
        to its node until the link ends.

        The answer's head is the journal's as it is, the capture not drained: a follower
        starts on the batches committed so far while the capture journals the rest (an
        install it is behind on: each batch committed as it is done), and a job's barrier
        is a head query of its own, which drains (:meth:`head`).  The sender announces
        that head once it is known (HEAD), so the follower knows it is catching up."""
        head = await self.offload.run(user.refresh_head)
        jid = await self.offload.run(journal_id, user.journal_dir)
        user.ids = await self.offload.run(ids_of_user, user.name)
        key = await answer_hello(stream, hello_key, hello, head, jid)
        link = DownstreamLink(stream, reader, key, downstream, self.offload)
        source = await self.offload.run(user.source)
        try:
            await link.run(lambda: self._produce(link, hello, user, source))
        finally:
            source.close()

    async def _produce(self, link: DownstreamLink, hello: Hello, user: OriginUser,
                       source: LayerRoot) -> None:
        want = hello.want
        if hello.journal_id != NO_ID and \
                hello.journal_id != await self.offload.run(journal_id, user.journal_dir):
            return  # another history: the replica resets itself and asks again
        tail = JournalTail(user.journal_dir, want)
        try:
            if hello.flags & RESYNC:  # `sdeefs replica resync`: a snapshot, whatever it holds
                tail.close()
                seq = await self._snapshot(link, user)
                tail = JournalTail(user.journal_dir, seq + 1)
            elif want > user.head + 1:
                await self.offload.run(user.refresh_head)
            if want > user.head + 1:
                raise HistoryDiverged(f"history diverged: replica wants seq {want} but the "
                                      f"journal ends at {user.head}")
            try:
                await self.offload.run(tail.poll, 0)
            except Trimmed:
                tail.close()
                seq = await self._snapshot(link, user)
                tail = JournalTail(user.journal_dir, seq + 1)
            await JournalSender(link, user, tail, source, self.offload).run()
        finally:
            tail.close()

    async def _snapshot(self, link: DownstreamLink, user: OriginUser) -> int:
        """A snapshot of the live upper, valid only if the journal did not move meanwhile."""
        journal = Journal(directory=user.journal_dir)
        for attempt in range(SNAPSHOT_ATTEMPTS):
            before = await self.offload.run(journal.size_bytes)
            seq = await self.offload.run(user.refresh_head)
            await trio.sleep(HOLD_BACK)
            if await self.offload.run(journal.size_bytes) != before:
                continue
            await link.send_snapshot(user.live_upper, seq, user.ids)
            if await self.offload.run(journal.size_bytes) == before:
                # a replica made faithful past them (``sdeefs replica resync``): no longer
                # shown as errors
                for refused in [k for k in user.refused if k <= seq]:
                    del user.refused[refused]
                return seq
            log.warning("snapshot of %s for %s: the upper changed while read (attempt %d)",
                        user.name, link.downstream.node, attempt + 1)
            raise ProtocolError("the upper changed during the snapshot; reconnect and retry")
        raise ProtocolError(f"{user.name}'s environment is too busy for a snapshot; retrying")

    # -- trimming -----------------------------------------------------------------------------

    async def _trim_periodically(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            for user in list(self.users.values()):
                with contextlib.suppress(OSError, JournalCorrupt):
                    await self.offload.run(self.trim, user)

    def trim(self, user: OriginUser) -> int:
        """Delete journal segments every follower (seen within ``expire``) acknowledged.

        ``STATE/replicas.json`` keeps, per node, the last seq it acknowledged and when
        (a JSON object: node -> [seq, unix time]), so a follower that is away holds the
        journal back until it expires, across restarts of this daemon."""
        path = user.dirs.state.replicas
        try:
            with open(path) as f:
                seen = {k: (int(v[0]), float(v[1])) for k, v in json.load(f).items()}
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            seen = {}
        now = time.time()
        for node, follower in user.downstreams.followers.items():
            seen[node] = (follower.acked, now)
        seen = {k: v for k, v in seen.items() if now - v[1] < self.expire}
        write_file_atomic(path, json.dumps(seen).encode())
        if not seen:
            return 0
        below = min(acked for acked, _ in seen.values()) + 1
        return Journal(directory=user.journal_dir).trim(below)

    # -- status -------------------------------------------------------------------------------

    async def status(self) -> dict[str, object]:
        """Every user's head and followers (direct, and below them as reported)."""
        origin: dict[str, object] = {}
        for user in list(self.users.values()):
            with contextlib.suppress(OSError, JournalCorrupt):
                await self.offload.run(user.refresh_head)
            followers: dict[str, dict[str, object]] = {}
            for f in user.downstreams.followers.values():
                followers[f.node] = {"acked": f.acked, "lag": user.head - f.acked,
                                     "bytes_sent": f.bytes_sent, "direct": True}
                for node, seq in f.report:
                    followers.setdefault(node, {"acked": seq, "lag": user.head - seq,
                                                "direct": False, "via": f.node})
            origin[user.name] = {"head": user.head, "followers": followers,
                                 "queries": user.queries,
                                 "refused": [{"seq": seq, "reason": reason} for seq, reason
                                             in sorted(dict(user.refused).items())]}
        return origin
