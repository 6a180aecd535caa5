"""The capture daemon of the ``kernel`` engine: fanotify events -> reconciled, committed
batches in the user's journal.

Kernel overlayfs writes the user's upper directly (no sdeefs process in the write
path); this daemon (root, one per running environment, not in the I/O path: if it
dies, the user's sessions do not notice) watches the layer's filesystem
(``sdeefs.fs.image``: one ext4 image per user, so a filesystem mark sees exactly
this user's changes) and journals what changed.

Loop
====
Events are read as they come (a worker thread parses them into a ``Dirty`` set:
directories whose entries changed, inodes whose data or attributes changed, names
events mentioned).  When the queue has been quiet for ``quiet`` seconds, or
``max_delay`` after the first event of a batch, or when a drain is requested, the
set is reconciled against the live upper (``sdeefs.fs.reconcile``) and the records
go to the journal as one batch: ``Begin``, records, ``Commit`` (``sdeefs.records``).
The first event of a batch is as old as the moment the queue was last seen empty:
what queued while the previous batch ran is batched as soon as it ends if that batch
took longer than ``max_delay`` (an install on a busy machine: no idle gathering while
the writer runs ahead).  The journal is fdatasync'ed every ``sync_interval`` seconds
and on every drain; after other batches the kernel only starts writing them back
(``sync_file_range``), so the drain's fdatasync finds little left to write and no
batch waits for the disk.

A batch reads about ``batch_bytes`` (64 MiB) of file data at most: past it, new files
and changed data wait for the next batch, which starts at once (``Reconciler.reconcile``'s
``read_budget``).  So a backlog (an install the capture is behind on when a job is
submitted) is journaled in committed batches of about that much, and a follower (the
login replicad's sender ships committed batches only) streams each while the capture
reads the next, instead of waiting for one batch of everything; a drain answers once
the last of them is committed and synced.

A file whose data are still changing as a batch reads them (an install writing a big
file while batches run every ``max_delay``) is left for the next batch, up to
``reconcile.DEFER_NS`` (3 s), unless a drain waits for the batch: it is journaled once
written, read while it does not change, so its Extents carry the witness that spares
the login replicad hashing them when it ships them (``records.StableExtent3``), instead
of as it grows, in Extents read while it changed.  A follower that streams all along
sees such a file up to DEFER_NS later; a barrier sees it all.
A big file whose ctime says it is being written right now is not even read by such a
batch (``reconcile.WRITING_NS``): reading it would only find it changing.

Barrier: fanotify queues an event inside the syscall that caused it, so every change
whose syscall returned before a drain request is in the queue when the request
arrives.  A drain reads the queue until it is empty *after* the request, reconciles,
commits, syncs the journal and answers the head seq: everything the user did before
asking is in the journal up to that seq ("captured before the barrier").

Overflow (``FAN_Q_OVERFLOW``: the queue was full, or its memory could not be
allocated) makes the next batch a full scan of the upper.

Hot path
========
A small file created costs the capture an event, an examination (lstat, handle,
xattrs, its contents read and summed) and one record: ``Create`` (``sdeefs.records``,
the file whole: attributes, xattrs and contents up to 64 KiB; a bigger one still takes
``Mknod``, ``Extent``, ``Setattr``).  Decoding events and examining entries are
syscalls and bytes, done in C by ``sdeefs.fs._capturec`` (an optional extension:
``setup.py``); every decision stays in Python, and a new file that C read whole takes
the short way through it (``Reconciler._examine_entries``).  Without the extension (or
with ``--python-only``) the same code paths run in Python and journal the same
records: 61 against 32 µs of CPU per small file created, 72 and 49 µs with the three
records of before (``bench/install/capture_cpu.py``; bench/RESULTS.md).  Bigger files
cost their block sums: BLAKE3, one call per 64 KiB block with the GIL released
(``sdeefs.blocksums``), about 0.2 s of CPU per GiB where libsodium's BLAKE2b took 1.0
(a third of the capture's CPU in an untar before).

Start
=====
1. the lock (``STATE/capture/lock``: one capture per state directory);
2. the fanotify group and its filesystem mark (before looking at anything, so that
   nothing changing during the start is missed);
3. a batch a crash left open is voided (``void_dangling``);
4. the model: the checkpoint (``STATE/capture/model``, ``sdeefs.fs.model``) and the
   journal's records after its seq applied to it; without a checkpoint, the journal's
   records from seq 1; a journal that no capture ever wrote (another engine's, which
   journals ahead of every change) is trusted to equal the upper: the model is then a
   scan of the upper and nothing is journaled for it;
5. a full scan (the loop's first batch, so that drains asked meanwhile wait for it),
   then a checkpoint.

Checkpoints are written after start, every ``checkpoint_interval`` seconds when the
model changed, and at a clean stop (SIGTERM/SIGINT: the queue is drained first).

Control socket (``STATE/capture.sock``, root only)
===================================================
One JSON object per line in, one per line out, then the connection closes::

    {"op": "drain"}   -> {"ok": true, "head": SEQ}   everything before the request is in
                                                     the journal up to SEQ, fdatasync'ed
    {"op": "status"}  -> {"ok": true, "head": ..., "batches": ..., "full_scans": ...,
                          "overflows": ..., "events": ..., "records": ..., "nodes": ...,
                          "read_bytes": ..., "seconds": {"events": ..., "observe": ...,
                          "sum": ..., "read": ..., "emit": ..., "append": ..., "sync": ...}}
                                                     (``Counters``: where the time went)
    anything else     -> {"ok": false, "error": "..."}

Limits: mmap writes cause no events; a file written through a shared mapping is
captured when it is closed (``FAN_CLOSE_WRITE``) or at the next full scan.  Access
times are not journaled.  Device nodes (host root's, mounting by hand: a user namespace
cannot make one) are journaled as ``records.Mkdev``; every mount of the upper is nodev.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import functools
import logging
import os
import select
import signal
import struct
import sys
import time

import attrs
import trio

from .. import control
from .. import records as rec
from ..errors import ExitCode, FailsafeError, JournalCorrupt, QuietError
from ..journal import Journal, journal_id
from ..offload import Offload
from . import fanotify as fan
from .model import CheckpointError, Model
from .reconcile import CaptureError, Dirty, Reconciler, Upper, capturec, handle_id

log = logging.getLogger(__name__)

MASK = (fan.FAN_CREATE | fan.FAN_DELETE | fan.FAN_RENAME | fan.FAN_MODIFY | fan.FAN_ATTRIB
        | fan.FAN_CLOSE_WRITE | fan.FAN_ONDIR)
# Not DELETE_SELF / MOVE_SELF: the directory events (DELETE, RENAME of the entry) say the
# same and also say where to look; every event costs ~10 µs of parsing.
ENTRY_EVENTS = fan.FAN_CREATE | fan.FAN_DELETE | fan.FAN_RENAME
OBJECT_EVENTS = fan.FAN_MODIFY | fan.FAN_ATTRIB | fan.FAN_CLOSE_WRITE
DATA_EVENTS = fan.FAN_MODIFY | fan.FAN_CLOSE_WRITE
MAX_REQUEST = 4096
APPEND_CHUNK = 512  # records per write(2) of a batch
_UCRED = struct.Struct("3i")


@attrs.frozen
class Config:
    """What one capture watches and how it batches.

    ``layer``: the mounted layer (holding ``upper/`` and ``work/``); ``state``: the
    user's state directory (``journal/`` is there).
    """

    layer: str
    state: str
    unlimited_queue: bool = True
    quiet: float = 0.02
    max_delay: float = 0.25
    max_batch_events: int = 20_000
    batch_entries: int = 20_000  # new entries examined per batch (bounds its memory)
    # file data read per batch, about (a file is read whole): a backlog is journaled in
    # batches of this much, each committed as it is done (``Reconciler.reconcile``), so a
    # follower streams the first while the capture reads the next (0: no bound)
    batch_bytes: int = 64 << 20
    sync_interval: float = 5.0
    checkpoint_interval: float = 300.0
    fault_stall_after: int = 0  # tests: stop for good after this many records of a batch
    native: bool = True  # the C hot path (sdeefs.fs._capturec) where it is built

    @property
    def upper(self) -> str:
        return os.path.join(self.layer, "upper")

    @property
    def directory(self) -> str:
        return os.path.join(self.state, "capture")

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.directory, "model")

    @property
    def socket(self) -> str:
        return os.path.join(self.state, "capture.sock")


@attrs.define(eq=False)
class Counters:
    events: int = 0
    batches: int = 0
    records: int = 0
    full_scans: int = 0
    overflows: int = 0
    last_batch_seconds: float = 0.0
    # where the capture's time went (seconds; ``status``; bench/deploy/colddrain.py takes
    # the difference over a drain): reading events, observing the upper (reconcile's step
    # 1), of it summing what C read and reading+summing bigger files, deciding and
    # emitting (with the journal writes, of which ``append``), fdatasyncs
    events_s: float = 0.0
    observe_s: float = 0.0
    sum_s: float = 0.0
    read_s: float = 0.0
    emit_s: float = 0.0
    append_s: float = 0.0
    sync_s: float = 0.0
    read_bytes: int = 0


# -- journal helpers (also for other writers of a journal) -------------------------------------


def dangling_batch(journal: Journal) -> int | None:
    """The seq of a Begin that no Commit or Void closed, if the journal ends in one."""
    segments = journal.segments()
    for index in range(len(segments) - 1, -1, -1):
        first = segments[index][0]
        stop = segments[index + 1][0] if index + 1 < len(segments) else None
        last: rec.Record | None = None
        last_seq = 0
        for entry in journal.read(first):
            if stop is not None and entry.seq >= stop:
                break
            if isinstance(entry.record, rec.Begin | rec.Commit | rec.Void):
                last, last_seq = entry.record, entry.seq
        if last is not None:
            return last_seq if isinstance(last, rec.Begin) else None
    return None


def void_dangling(journal: Journal) -> int | None:
    """Close a batch a crash left open with a Void (and sync); return its Begin's seq.

    Every writer that starts on a journal calls this first: records after a dangling
    Begin would otherwise be taken for part of that batch.
    """
    begin = dangling_batch(journal)
    if begin is None:
        return None
    log.warning("capture: the batch from seq %d to %d was cut off; voiding it",
                begin, journal.head)
    journal.append(rec.Void(begin, journal.head))
    journal.sync()
    return begin


def load_model(journal: Journal, checkpoint: str) -> tuple[Model, bool]:
    """(model of what the journal says, trust) — ``trust``: no capture ever wrote this
    journal, so the upper is taken as its state (build the model by a silent scan)."""
    jid = journal_id(journal.directory)
    model: Model | None = None
    try:
        model = Model.load(checkpoint)
    except FileNotFoundError:
        pass
    except (CheckpointError, OSError) as exc:
        log.warning("capture: ignoring the checkpoint %s: %s", checkpoint, exc)
    if model is not None and (model.journal_id != jid or model.seq > journal.head
                              or model.seq + 1 < journal.first_seq()):
        log.warning("capture: the checkpoint (seq %d) does not belong to this journal "
                    "(head %d); rebuilding the model", model.seq, journal.head)
        model = None
    if model is None:
        if journal.head == 0:
            return Model.empty(jid), False
        if journal.first_seq() != 1:
            raise CaptureError("no usable model checkpoint and the journal is trimmed: "
                               "what the replicas hold is unknown (start a new journal)")
        if not any(isinstance(e.record, rec.Begin) for e in journal.read(1)):
            model = Model.empty(jid)
            model.seq = journal.head
            return model, True
        model = Model.empty(jid)
    entries = list(journal.read(model.seq + 1))
    aborted = {e.record.seq for e in entries if isinstance(e.record, rec.Abort)}
    void = [(e.record.begin, e.record.end) for e in entries if isinstance(e.record, rec.Void)]
    for entry in entries:
        if entry.seq in aborted or any(b <= entry.seq <= e for b, e in void):
            continue
        model.apply(entry.record)
    if entries:
        log.info("capture: model at seq %d plus %d journal records", model.seq, len(entries))
    model.seq = journal.head
    return model, False


# -- the daemon --------------------------------------------------------------------------------


@attrs.define(eq=False)
class Capture:
    """One running capture.  Model, journal and reconciler are used from one worker thread
    at a time (the loop awaits each call); the trio loop only schedules.

    Attributes:
        config: what it watches.
        journal, model, upper, reconciler, group: its parts.
        dirty: what the events read so far point at (the next batch).
        counters: statistics for ``status``.
    """

    config: Config
    journal: Journal
    model: Model
    upper: Upper
    reconciler: Reconciler
    group: fan.Group
    lock_fd: int
    offload: Offload = attrs.field(factory=lambda: Offload(trio.CapacityLimiter(1)))
    dirty: Dirty = attrs.field(factory=Dirty)
    counters: Counters = attrs.field(factory=Counters)
    pending_events: int = 0
    stopping: bool = False
    _waiters: list[trio.Event] = attrs.field(factory=list)
    _wakeup: trio.Event = attrs.field(factory=trio.Event)
    _last_checkpoint: float = 0.0
    _checkpoint_seq: int = 0
    _starting: bool = False  # the start's full scan is not done yet
    # (time.monotonic) when the event queue was last seen empty; events read after it
    # arrived after it.  Not updated while a batch runs: what queues meanwhile is as old
    # as the batch, so the next one starts without waiting for more (``_gather``).
    _queue_empty_at: float = attrs.field(factory=time.monotonic)
    _first_event: float = 0.0  # (monotonic) the oldest event ``dirty`` holds arrived after this
    _last_sync: float = attrs.field(factory=time.monotonic)  # the capture's last journal sync
    native: bool = capturec is not None  # events decoded by sdeefs.fs._capturec

    # -- start and stop (synchronous) -----------------------------------------------------

    @classmethod
    def open(cls, config: Config) -> Capture:
        os.makedirs(config.directory, mode=0o700, exist_ok=True)
        lock_fd = os.open(os.path.join(config.directory, "lock"),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise QuietError(f"a capture runs for {config.state} already", ExitCode.BUSY) from None
        os.ftruncate(lock_fd, 0)
        os.write(lock_fd, b"%d\n" % os.getpid())
        group = upper = journal = None
        try:
            journal = Journal.open(os.path.join(config.state, "journal"))
            group = fan.Group.open(config.unlimited_queue)
            group.mark_filesystem(config.upper, MASK)
            void_dangling(journal)
            model, trust = load_model(journal, config.checkpoint)
            upper = Upper.open(config.upper)
            native = config.native and capturec is not None
            capture = cls(config, journal, model, upper,
                          Reconciler(model, upper, native=native), group, lock_fd,
                          native=native)
            capture._start(trust)
            return capture
        except BaseException:
            for part in (group, upper, journal):
                if part is not None:
                    part.close()
            os.close(lock_fd)
            raise

    def _start(self, trust: bool) -> None:
        if trust:
            log.info("capture: no capture wrote this journal; taking the upper as its state")
            dirty = Dirty(full=True)
            while dirty:
                stats = self.reconciler.reconcile(dirty, lambda record: None,
                                                  self.config.batch_entries)
                dirty = Dirty(dirs=stats.carry)
        # The full scan is the loop's first batch: drains asked meanwhile wait for it.
        self.dirty.full = True
        self._starting = True

    def close(self) -> None:
        self.group.close()
        self.upper.close()
        self.journal.close()
        os.close(self.lock_fd)

    # -- batches (worker thread) --------------------------------------------------------------

    def _read_events(self) -> int:
        """Read what is queued (up to a batch's worth) into ``dirty``; how many events."""
        started = time.perf_counter()
        try:
            return self._read_events_timed()
        finally:
            self.counters.events_s += time.perf_counter() - started

    def _read_events_timed(self) -> int:
        total = 0
        fast = self.native and capturec is not None and not log.isEnabledFor(logging.DEBUG)
        empty_before, had = self._queue_empty_at, bool(self.dirty)
        while total < self.config.max_batch_events:
            if not fast:
                events = self.group.read()
                if not events:
                    self._queue_empty_at = time.monotonic()
                    break
                total += len(events)
                self._note(events)
                continue
            data = self.group.read_raw()
            if not data:
                self._queue_empty_at = time.monotonic()
                break
            d = self.dirty
            try:
                count, overflows, unresolved = capturec.note_events(data, d.dirs, d.objects,
                                                                    d.data, d.names)
            except ValueError as exc:
                raise fan.BadEvent(str(exc)) from None
            total += count
            if overflows:
                self._note([fan.Event(fan.FAN_Q_OVERFLOW, 0, None, ())] * overflows)
            if unresolved:  # handles without an inode number in them: the Python path
                self._note([fan.Event(mask, pid, handle, dirs)
                            for mask, pid, handle, dirs in unresolved])
        self.counters.events += total
        self.pending_events += total
        if not had and self.dirty:
            self._first_event = empty_before
        return total

    def _note(self, events: list[fan.Event]) -> None:
        dirty = self.dirty
        trace = log.isEnabledFor(logging.DEBUG)
        for event in events:
            mask = event.mask
            if trace:
                log.debug("event %#x pid %d %s %s", mask, event.pid,
                          event.handle and self._ino(event.handle),
                          [(t, self._ino(h), n) for t, h, n in event.dirs])
            if mask & fan.FAN_Q_OVERFLOW:
                log.warning("capture: the event queue overflowed; the next batch is a full scan")
                self.counters.overflows += 1
                dirty.full = True
                continue
            if mask & ENTRY_EVENTS:
                for _, dir_handle, name in event.dirs:
                    ino = self._ino(dir_handle)
                    if ino is not None:
                        dirty.dirs[ino] = dir_handle
                        if name:
                            dirty.names.add((ino, name))
            if mask & OBJECT_EVENTS:
                handle = event.handle
                if handle is None:  # an event on a directory itself: reported as "dir/."
                    handle = next((h for _, h, n in event.dirs if n == b"."), None)
                ino = self._ino(handle) if handle is not None else None
                if ino is not None and handle is not None:
                    dirty.objects[ino] = handle
                    if mask & DATA_EVENTS:
                        dirty.data.add(ino)

    def _ino(self, handle: bytes) -> int | None:
        ino = fan.handle_ino(handle)
        return ino if ino is not None else handle_id(self.model, handle, self.upper)

    def _batch(self, final: bool = True) -> None:
        """Reconcile what ``dirty`` points at and journal it as one committed batch
        (``final``: a drain waits for it; otherwise a file still being written may wait
        for the next batch, ``Reconciler.reconcile``)."""
        dirty, self.dirty = self.dirty, Dirty()
        self.pending_events = 0
        if not dirty:
            return
        started = time.monotonic()
        journal = self.journal
        begin = 0
        count = 0
        stall = self.config.fault_stall_after
        pending: list[rec.Record] = []

        counters = self.counters

        def emit(record: rec.Record) -> None:
            nonlocal begin, count
            if not begin:
                begin = journal.append(rec.Begin(1 if dirty.full else 0))
            pending.append(record)
            count += 1
            if len(pending) >= APPEND_CHUNK:
                appending = time.perf_counter()
                journal.append_many(pending, admitted=True)  # (reconcile checked them)
                counters.append_s += time.perf_counter() - appending
                pending.clear()
            if stall and count == stall:
                journal.append_many(pending, admitted=True)
                log.warning("capture: fault injection: stalled in a batch after %d records",
                            count)
                time.sleep(3600)

        stats = self.reconciler.reconcile(dirty, emit, self.config.batch_entries, final,
                                          self.config.batch_bytes)
        if stats.carry:  # (left for the next batch by a budget: it starts at once)
            self.dirty.merge(Dirty(dirs=stats.carry))
        if stats.carry_objects:
            self.dirty.merge(Dirty(objects=dict(stats.carry_objects),
                                   data=set(stats.carry_objects)))
        if stats.carry_data:  # read again once the queue is quiet or max_delay passed
            if not self.dirty:
                self._first_event = time.monotonic()
            self.dirty.merge(Dirty(objects=dict(stats.carry_data), data=set(stats.carry_data)))
        appending = time.perf_counter()
        if pending:
            journal.append_many(pending, admitted=True)
        if begin:
            journal.append(rec.Commit(begin))
        counters.append_s += time.perf_counter() - appending
        counters.observe_s += stats.observe_ns / 1e9
        counters.sum_s += stats.sum_ns / 1e9
        counters.read_s += stats.read_ns / 1e9
        counters.emit_s += stats.emit_ns / 1e9
        counters.read_bytes += stats.read_bytes
        self.model.seq = journal.head
        self.counters.batches += 1
        self.counters.records += count
        self.counters.full_scans += dirty.full
        self.counters.last_batch_seconds = time.monotonic() - started
        log.debug("capture: batch of %d records in %.3f s", count,
                  self.counters.last_batch_seconds)

    def _sync(self) -> None:
        started = time.perf_counter()
        self.journal.sync()
        self._last_sync = time.monotonic()
        self.counters.sync_s += self._last_sync - started

    def _checkpoint(self) -> None:
        """Save the model (its seq must be durable in the journal first)."""
        self._sync()
        self.model.seq = min(self.model.seq, self.journal.synced)
        self.model.save(self.config.checkpoint)
        self._checkpoint_seq = self.model.seq
        self._last_checkpoint = time.monotonic()

    # -- the loop --------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(control.serve, self.config.socket,
                                                  self._handle))
            nursery.start_soon(self._signals)
            task_status.started()
            await self._loop()
            nursery.cancel_scope.cancel()

    async def _loop(self) -> None:
        while True:
            with trio.move_on_after(self.config.sync_interval):
                await self._wait_for_work()
            await self.offload.run(self._read_events)
            if self.dirty or self._waiters or self.stopping:
                await self._gather()
                waiters, self._waiters = self._waiters, []
                await self.offload.run(self._read_events)  # all queued before the requests
                await self.offload.run(self._batch, bool(waiters) or self.stopping)
                while (waiters or self.stopping) and self.dirty:  # what the batch left over
                    await self.offload.run(self._batch)
                if waiters or self.stopping:
                    await self.offload.run(self._sync)
                for waiter in waiters:
                    waiter.set()
            if self.stopping:
                await self.offload.run(self._checkpoint)
                return
            await self._maintain()

    async def _wait_for_work(self) -> None:
        """Until events are queued, a drain is asked or the capture stops."""
        if self._wakeup.is_set():
            self._wakeup = trio.Event()
        if self._waiters or self.stopping or self.dirty:
            return
        queued = select.poll()  # (not select(): no FD_SETSIZE limit on the fd)
        queued.register(self.group.fd, select.POLLIN)
        if queued.poll(0):
            return  # queued while a batch ran (as old as it: see _gather)
        async with trio.open_nursery() as nursery:
            async def readable() -> None:
                await trio.lowlevel.wait_readable(self.group.fd)
                nursery.cancel_scope.cancel()

            async def woken() -> None:
                await self._wakeup.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(readable)
            nursery.start_soon(woken)
        self._queue_empty_at = time.monotonic()  # empty until the wait ended

    async def _gather(self) -> None:
        """Read events until the queue is quiet, the batch old or big enough, or asked.

        Old: ``max_delay`` after its first event arrived, as far as the capture can
        tell (``_first_event``): events that queued while the previous batch ran are as
        old as that batch, so when batches take longer than ``max_delay`` (a big
        install, a busy machine) the next one starts at once instead of idling for
        ``max_delay`` while the writer goes on.
        """
        while not self._waiters and not self.stopping:
            await self.offload.run(self._read_events)
            if self.pending_events >= self.config.max_batch_events \
                    or time.monotonic() >= self._first_event + self.config.max_delay:
                return
            with trio.move_on_after(self.config.quiet) as scope:
                await trio.lowlevel.wait_readable(self.group.fd)
            if scope.cancelled_caught:
                return

    async def _maintain(self) -> None:
        if self._starting and not self.dirty:
            self._starting = False
            await self.offload.run(self._checkpoint)  # what the start's scan found
        if self.journal.head > self.journal.synced:
            if time.monotonic() - self._last_sync >= self.config.sync_interval:
                await self.offload.run(self._sync)
            else:
                # Not an fdatasync after every batch (its wait stalls the next batch, and
                # the one of a drain or of sync_interval comes soon): the kernel starts
                # writing the batch back now, so that the fdatasync has little left to do.
                await self.offload.run(self.journal.start_writeback)
        if self.model.seq != self._checkpoint_seq and \
                time.monotonic() - self._last_checkpoint >= self.config.checkpoint_interval:
            await self.offload.run(self._checkpoint)

    async def drain(self) -> int:
        """Wait until everything changed before this call is journaled and synced."""
        done = trio.Event()
        self._waiters.append(done)
        self._wakeup.set()
        await done.wait()
        return self.journal.head

    def stop(self) -> None:
        self.stopping = True
        self._wakeup.set()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                log.info("capture: stopping")
                self.stop()

    # -- control socket -------------------------------------------------------------------

    async def _handle(self, peer: control.Peer, request: control.Request) -> control.Reply:
        """The control socket's requests: root only (the socket file is 0600, and this)."""
        if peer.uid != 0:
            raise control.ControlError("root only", ExitCode.UNAVAILABLE, "forbidden")
        op = request.get("op")
        if op == "drain":
            return {"ok": True, "head": await self.drain()}
        if op == "status":
            c = self.counters
            return {"ok": True, "head": self.journal.head, "synced": self.journal.synced,
                    "batches": c.batches, "full_scans": c.full_scans,
                    "overflows": c.overflows, "events": c.events, "records": c.records,
                    "nodes": len(self.model.nodes),
                    "last_batch_seconds": round(c.last_batch_seconds, 6),
                    "read_bytes": c.read_bytes,
                    "seconds": {name: round(getattr(c, f"{name}_s"), 6) for name in (
                        "events", "observe", "sum", "read", "emit", "append", "sync")}}
        raise control.BadRequest(f"unknown op {op!r}")


def request(state: str, op: str, timeout: float = 60.0) -> control.Reply:
    """Ask the capture of ``state`` (blocking); QuietError if none answers."""
    return control.request(os.path.join(state, "capture.sock"), {"op": op}, timeout,
                           what="the capture daemon")


def drain(state: str, timeout: float = 60.0) -> int:
    """Ask the capture for a barrier; the journal head that holds everything before it."""
    head = request(state, "drain", timeout)["head"]
    if not isinstance(head, int):
        raise QuietError("the capture daemon gave a malformed answer", ExitCode.FAILURE)
    return head


# -- command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sdeefs-capture",
                                     description="journal a kernel overlay's upper from fanotify")
    parser.add_argument("--layer", required=True, help="the mounted layer (upper/, work/)")
    parser.add_argument("--state", required=True, help="the state directory (journal/)")
    parser.add_argument("--bounded-queue", action="store_true",
                        help="the kernel's default event queue limit (overflow: full scan)")
    parser.add_argument("--log", help="log file (default: stderr)")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--fault-stall-after", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--python-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quiet", type=float, default=Config("", "").quiet, help=argparse.SUPPRESS)
    parser.add_argument("--max-delay", type=float, default=Config("", "").max_delay,
                        help=argparse.SUPPRESS)
    parser.add_argument("--batch-bytes", type=int, default=Config("", "").batch_bytes,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(filename=args.log, level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = Config(os.path.abspath(args.layer), os.path.abspath(args.state),
                    unlimited_queue=not args.bounded_queue,
                    fault_stall_after=args.fault_stall_after, quiet=args.quiet,
                    max_delay=args.max_delay, batch_bytes=args.batch_bytes,
                    native=not args.python_only)
    try:
        _main(config)
    except QuietError as exc:
        print(f"sdeefs-capture: {exc}", file=sys.stderr)
        sys.exit(exc.exitcode)
    except (CaptureError, JournalCorrupt, FailsafeError) as exc:
        print(f"sdeefs-capture: {exc}", file=sys.stderr)
        sys.exit(1)


def _main(config: Config) -> None:
    if os.geteuid() != 0:
        raise QuietError("the capture needs root (fanotify filesystem marks)", ExitCode.UNAVAILABLE)
    if not os.path.isdir(config.upper):
        raise QuietError(f"{config.upper} is not a directory", ExitCode.USAGE)
    try:
        capture = Capture.open(config)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.EXDEV):
            raise QuietError(f"cannot watch {config.layer}: {exc}", ExitCode.UNAVAILABLE) from None
        raise
    try:
        log.info("capture: watching %s, journal head %d (%s)", config.layer,
                 capture.journal.head, "C hot path" if capture.native else "Python only")
        trio.run(capture.run)
    finally:
        capture.close()


if __name__ == "__main__":
    main()
