"""Reconciliation: the model of the journaled tree and the live upper -> ordered records.

The capture (``sdeefs.fs.capture``) learns from fanotify *where* the upper changed
(directories whose entries changed, inodes whose data or attributes changed) but not
reliably *what* changed: names in events can be stale and many changes are
coalesced.  So every batch looks at the upper itself, only where the events point:

1. **Observe.**  List every dirty directory (opened by its file handle, so wherever
   it moved) and examine the entries whose name is new, whose inode differs from the
   model's, or which an event named (``lstat``, file handle, xattrs, symlink target);
   directories the model does not know are walked whole.  Dirty inodes outside
   those directories are examined by handle.  A full scan (start, overflow) lists
   every directory and examines every entry.
2. **Decide the new tree.**  The listed directories' entries replace the model's;
   everything else stays.  A directory found in two listings (it moved while we
   listed) keeps the last one; a directory no longer reachable from ``upper/`` is
   gone with whatever is not bound elsewhere.  Identity is the inode number plus the
   handle's generation: a reused number is a new inode.
3. **Emit**, applying each record to the model as it goes (the model is the
   replica's tree at every step, so every record is valid where it lands):

   a. moves whose destination is free (or holds an entry that is going away and can
      be replaced) and whose directory exists, as plain renames, repeatedly;
   b. the other moves to a staging directory ``work/sdeefs-capture`` (swaps,
      cycles, destinations below a directory that moves too);
   c. removals, children first;
   d. directories, staged entries, new entries and new hard links, by their depth in
      the new tree, so a parent always exists first; a new regular file whose contents
      were read whole and fit ``records.MAX_INLINE`` is one ``Create`` record (its
      attributes, xattrs and data: step e has nothing left to say about it);
   e. per inode: xattrs, data (``Extent`` records for the 64 KiB blocks whose sums
      differ from the model's; a new file's zero blocks come from its size), then one
      ``Setattr`` (size, owner, mode, mtime: applied in that order);
   f. the staging directory is removed.

The records are those of ``sdeefs.records``; ``Rename`` carries ``src_ino`` 0 (this
filesystem's inode numbers mean nothing where records are applied).  Access times
are not journaled (reads change them without events); mtimes are, and every
directory whose entries the batch changed gets its mtime restored after them.

Step 1's syscalls per entry (``_examine_entries``) go through
``sdeefs.fs._capturec.examine`` when it is built: one call per directory that
returns what ``_examine_entry`` would have found, and the contents of the regular
files whose lstat differs from the model (``needs_read``'s test, made in C on what
the listing's inode number has in the model); ``_judge`` then decides as before, and
reads a file itself if the C call could not (over 1 MiB, replaced meanwhile).

Everything here is synchronous and may block for as long as reading changed files
takes: the capture runs it in a worker thread (docs/threading.md).  Nothing in the
upper is trusted: names are bytes of any value, symlinks are never followed (every
lookup is ``*at`` below a directory fd or by file handle), FIFOs are never opened,
and only regular files are read.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator

import attrs

from .. import blocksums
from .. import records as rec
from ..errors import BadRecord
from ..sysio import fd_path, name_to_handle, open_by_handle, openat2_beneath
from .fanotify import handle_buffer, handle_ino, handle_of
from .model import UPPER, WORK, Model, Node

try:  # the hot path in C (sdeefs/fs/_capturec.c); optional: the same in Python below
    import sdeefs.fs._capturec as capturec
except ImportError:  # pragma: no cover (an install that could not compile it)
    capturec = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

BLOCK = rec.EXTENT_BLOCK
SUM = rec.SUM_SIZE
MAX_EXTENT_BLOCKS = 256  # blocks per Extent record (16 MiB, 4 KiB of sums)
INLINE_BYTES = 64 << 20  # data a batch keeps for its Create records, at most
STAGE = b"sdeefs-capture"  # work/sdeefs-capture: where moved entries wait within a batch
READ_CHUNK = 1 << 20
# A change this recent may be followed by another within the same timestamp tick
# (kernels without fine-grained ctime): the model then keeps ctime 0, so that a full
# scan reads the file again instead of trusting an unchanged ctime.
UNSURE_NS = 50_000_000
# The clock the kernel stamps file times with (CLOCK_REALTIME_COARSE, which the time
# module does not name) and its tick: a file time a tick older than a reading of it was
# set before the reading, and any change after it gets a later one (kernels with
# fine-grained ctime give a later one also within the tick, once the ctime was looked at).
CLOCK_FILE_TIMES = 5
DEFER_NS = 3_000_000_000  # a file read while changing waits this long at most (reconcile)
# A file over READ_CHUNK whose ctime is this recent when a batch that may defer comes to
# read it is being written now: reading it would find it changing (no witness) and leave
# it for the next batch anyway, so it is left unread (``Contents.unread``), within the
# same DEFER_NS.  (An install writing a 397 MiB file was read again and again as it grew:
# the capture's largest cost under load, bench/RESULTS.md, branch colddrain.)
WRITING_NS = 50_000_000
FILE_TIME_TICK = round(time.clock_getres(CLOCK_FILE_TIMES) * 1e9)
OPEN_DATA = os.O_RDONLY | os.O_NOATIME | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC

Emit = Callable[[rec.Record], None]
# The capture's block sums: BLAKE3's, in Extent3/StableExtent3 records and the model
# (``sdeefs.blocksums``; the checkpoint's version says so, ``sdeefs.fs.model``).
SUMS = blocksums.BLAKE3


def block_sum(data: bytes | memoryview) -> bytes:
    return blocksums.block_sum(data, SUMS)


ZERO_SUM = block_sum(bytes(BLOCK))


def zero_sum(length: int) -> bytes:
    """The sum of ``length`` zero bytes (cached)."""
    return ZERO_SUM if length == BLOCK else blocksums.zero_sum(length, SUMS)


class CaptureError(Exception):
    """The capture cannot journal what it found (a record the journal would refuse)."""


@attrs.define(eq=False)
class Dirty:
    """Where to look: what the events of one batch pointed at.

    Attributes:
        full: scan the whole upper (start, event queue overflow).
        dirs: inode -> handle of directories whose entries changed.
        objects: inode -> handle of inodes whose attributes or data changed.
        data: inodes whose data changed (read them even if size and times look the same).
        names: (directory inode, name) pairs events named: examined even if unchanged.
    """

    full: bool = False
    dirs: dict[int, bytes] = attrs.field(factory=dict)
    objects: dict[int, bytes] = attrs.field(factory=dict)
    data: set[int] = attrs.field(factory=set)
    names: set[tuple[int, bytes]] = attrs.field(factory=set)

    def __bool__(self) -> bool:
        return self.full or bool(self.dirs or self.objects)

    def merge(self, other: Dirty) -> None:
        self.full |= other.full
        self.dirs.update(other.dirs)
        self.objects.update(other.objects)
        self.data |= other.data
        self.names |= other.names


@attrs.frozen
class Contents:
    """What reading a regular file found."""

    sums: bytes
    size: int
    mtime: int
    ctime: int  # 0: the file changed while it was read
    data: bytes | None = None  # the bytes read, if at most rec.MAX_INLINE (for a Create)
    # not read: being written as the batch came to it (WRITING_NS); ``sums`` are empty
    # and the file waits for the next batch (``Reconciler._defer``)
    unread: bool = False


@attrs.frozen
class Seen:
    """One examined inode as the upper has it now (what records need of its lstat)."""

    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    ctime: int
    ino: int
    rdev: int
    handle: bytes
    xattrs: tuple[tuple[bytes, bytes], ...]
    target: bytes  # symlinks
    contents: Contents | None = None  # regular files that had to be read

    @classmethod
    def of(cls, st: os.stat_result, handle: bytes, xattrs: tuple[tuple[bytes, bytes], ...],
           target: bytes = b"", contents: Contents | None = None) -> Seen:
        return cls(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                   st.st_ctime_ns, st.st_ino, st.st_rdev, handle, xattrs, target, contents)

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    @property
    def perm(self) -> int:
        return 0 if self.whiteout else stat.S_IMODE(self.mode)

    @property
    def whiteout(self) -> bool:
        return self.kind == stat.S_IFCHR and self.rdev == 0

    @property
    def device(self) -> bool:
        """A character or block device (not a whiteout): journaled as ``records.Mkdev``."""
        return self.kind == stat.S_IFBLK or self.kind == stat.S_IFCHR and self.rdev != 0


@attrs.frozen
class Stats:
    records: int = 0
    listed: int = 0
    examined: int = 0
    read_bytes: int = 0
    carry: dict[int, bytes] = attrs.field(factory=dict)  # directories to list again
    # inode -> handle of files whose data were changing as they were read: the next
    # batch reads them again (``Reconciler.reconcile``'s ``final``)
    carry_data: dict[int, bytes] = attrs.field(factory=dict)
    # inode -> handle of files whose data changed and were not looked at: the batch had
    # read ``read_budget`` bytes already (the next batch looks at them, at once)
    carry_objects: dict[int, bytes] = attrs.field(factory=dict)
    # where the batch's time went (``status``, bench/deploy/colddrain.py): observing (all
    # of step 1), of it summing data read whole by C and reading+summing bigger files;
    # deciding and emitting (steps 2-3, with the emit callback's journal writes)
    observe_ns: int = 0
    sum_ns: int = 0
    read_ns: int = 0
    emit_ns: int = 0


@attrs.define(eq=False)
class Upper:
    """The live upper directory: opened once, everything below reached by fd or handle.

    Attributes:
        fd: ``upper/`` (O_RDONLY|O_DIRECTORY); also the mount fd for open_by_handle_at.
        ino: its inode number.
    """

    fd: int
    ino: int

    @classmethod
    def open(cls, path: str | bytes) -> Upper:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        return cls(fd, os.fstat(fd).st_ino)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open_handle(self, handle: bytes, flags: int) -> int | None:
        """open_by_handle_at, or None if the inode is gone (or the handle is not one)."""
        if not handle:
            return None
        try:
            return open_by_handle(self.fd, handle, flags)
        except OSError as exc:
            if exc.errno in (errno.ESTALE, errno.ENOENT, errno.EINVAL, errno.ELOOP,
                             errno.ENXIO, errno.ENODEV):
                return None
            raise


def _xattrs(path: bytes, follow: bool) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT):
            return ()
        raise
    if not names:
        return ()
    out = []
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOENT):
                continue
            raise
        out.append((os.fsencode(name), value))
    return tuple(sorted(out))


def same_kind(node: Node, seen: Seen) -> bool:
    """Can ``seen`` be the inode ``node`` describes: the same type, and what that type
    cannot change in place the same too (a device's number: the model keeps a device's
    ``rdev`` in ``size``, a whiteout has 0; a symlink's target: ``data``).  Records
    cannot change either, so a node that differs there is another inode (a reused
    number, a name adopted after a restart), made anew."""
    if stat.S_IFMT(node.mode) != seen.kind:
        return False
    if seen.kind == stat.S_IFLNK:
        return node.data == seen.target
    return seen.kind not in (stat.S_IFCHR, stat.S_IFBLK) or node.size == seen.rdev


def needs_read(node: Node | None, st: os.stat_result | Seen, data_dirty: bool,
               full: bool) -> bool:
    """Must a regular file's data be read (sums compared with the model's)?

    Always after a data event (timestamps may be too coarse to show a change), when the
    model does not know it, or its size or mtime moved.  In a full scan (events were
    lost) also when its ctime moved: a change of attributes alone (chmod) is no reason
    to read a file when events say its data did not change.
    """
    if isinstance(st, Seen):
        size, mtime, ctime = st.size, st.mtime, st.ctime
    else:
        size, mtime, ctime = st.st_size, st.st_mtime_ns, st.st_ctime_ns
    return node is None or data_dirty or node.data is None or node.size != size \
        or node.mtime != mtime or full and (not node.ctime or node.ctime != ctime)


def same_attributes(node: Node, seen: Seen) -> bool:
    return (node.uid, node.gid, node.mtime, node.xattrs) == \
        (seen.uid, seen.gid, seen.mtime, seen.xattrs) \
        and (seen.kind == stat.S_IFLNK or stat.S_IMODE(node.mode) == seen.perm)


@attrs.define(eq=False)
class _Batch:
    """What one reconciliation observed and decided (ids are model ids)."""

    want: dict[int, dict[bytes, int]] = attrs.field(factory=dict)  # listed dir -> entries
    # listed dir -> the entries of ``want`` that were examined (the others are as the
    # model has them: same name, same inode): what the plan's loops need to look at
    fresh: dict[int, dict[bytes, int]] = attrs.field(factory=dict)
    order: list[int] = attrs.field(factory=list)  # listed dirs, in listing order
    seen: dict[int, Seen] = attrs.field(factory=dict)  # examined and not as the model has it
    looked: set[int] = attrs.field(factory=set)  # examined
    full: bool = False  # a full scan
    new: set[int] = attrs.field(factory=set)  # ids the model does not hold yet
    reborn: dict[int, int] = attrs.field(factory=dict)  # temporary id -> its inode number
    adopted: dict[int, int] = attrs.field(factory=dict)  # synthetic id -> the inode it became
    data: set[int] = attrs.field(factory=set)  # ids whose data must be read
    touched: set[int] = attrs.field(factory=set)  # dirs whose entries records changed
    whole: set[int] = attrs.field(factory=set)  # new files journaled whole (Create)
    stage: int = 0  # id of work/sdeefs-capture once made
    staged: dict[tuple[int, bytes], bytes] = attrs.field(factory=dict)  # dest -> stage name
    records: int = 0
    examined: int = 0
    read_bytes: int = 0
    budget: int = 0  # new entries to examine at most (0: no bound)
    inline_left: int = INLINE_BYTES  # bytes new files may still keep for their Create
    carry: dict[int, bytes] = attrs.field(factory=dict)  # inode -> handle: list it again
    # (the kernel's clock for file times) before anything of the batch was read: a ctime
    # a tick older than this is a StableExtent's witness (``sdeefs.records``)
    started_ns: int = attrs.field(factory=lambda: time.clock_gettime_ns(CLOCK_FILE_TIMES))
    may_defer: bool = False  # files read while changing may wait for the next batch
    carry_data: dict[int, bytes] = attrs.field(factory=dict)  # (Stats.carry_data)
    carry_objects: dict[int, bytes] = attrs.field(factory=dict)  # (Stats.carry_objects)
    # bytes of file data one batch reads at most before it leaves new files and changed
    # data for the next one (0: no bound); see ``Reconciler.reconcile``
    read_budget: int = 0
    cut: bool = False  # ``_judge`` left a new file of the directory listed for later
    sum_ns: int = 0  # (Stats)
    read_ns: int = 0

    def inline(self, data: bytes) -> bytes | None:
        """``data`` if a Create may carry it (at most MAX_INLINE, and the batch has not
        kept INLINE_BYTES yet: that bounds what a batch holds; past it, a new file takes
        the records of old, its data by reference)."""
        if len(data) > rec.MAX_INLINE or len(data) > self.inline_left:
            return None
        self.inline_left -= len(data)
        return data

    @property
    def read_enough(self) -> bool:
        """Has the batch read its ``read_budget``?  Then new files and changed data wait
        for the next batch (what is read already is journaled)."""
        return bool(self.read_budget) and self.read_bytes >= self.read_budget


@attrs.define(eq=False)
class Reconciler:
    """Turns a Dirty set into records, keeping ``model`` equal to what they describe.

    Attributes:
        model: the journaled tree (changed by every call).
        upper: the live upper.
    """

    model: Model
    upper: Upper
    native: bool = capturec is not None  # entries examined by sdeefs.fs._capturec
    inline_bytes: int = INLINE_BYTES  # data one batch keeps for Create records, at most
    _buf: bytearray = attrs.field(factory=lambda: bytearray(READ_CHUNK))
    _hbuf: object = attrs.field(factory=handle_buffer)
    # inode -> (time.monotonic_ns) when its data were first left for a later batch
    _deferred: dict[int, int] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.model.root_ino and self.model.root_ino != self.upper.ino:
            # Another filesystem (the upper was copied or recreated): inode numbers
            # mean nothing; a full scan finds every node again by its name.
            log.warning("capture: the upper is not the inode the model knew; "
                        "matching the model by names")
            self.forget_inodes()
        self.model.root_ino = self.upper.ino

    def forget_inodes(self) -> None:
        for id in [i for i in self.model.nodes if i > 0]:
            new = self.model.new_id()
            self.model.rekey(id, new)
            node = self.model.nodes[new]
            node.handle, node.ctime = b"", 0

    # -- the one entry point ------------------------------------------------------------------

    def reconcile(self, dirty: Dirty, emit: Emit, budget: int = 0, final: bool = True,
                  read_budget: int = 0) -> Stats:
        """Journal (through ``emit``) what changed where ``dirty`` points.

        ``budget`` bounds the new entries one call examines (and so its memory): the
        directories that hold more come back in ``Stats.carry``, to be listed again by
        the next call; every call leaves a complete tree (with fewer new entries).

        Not ``final`` (a batch no drain waits for): a file whose data changed and were
        still changing as they were read (no witness: ``sdeefs.records``,
        StableExtent) is left as the model has it, for DEFER_NS at most, and comes
        back in ``Stats.carry_data`` for the next call to read again: a file an
        install is still writing is journaled once it is written, with the witness
        that spares a shipper hashing it, instead of as it grows.

        ``read_budget`` bounds the file data one call reads (0: no bound): once it has
        read that many bytes, new files (a directory's new entries, a file over
        READ_CHUNK) and files whose data changed are left for the next call
        (``Stats.carry``, ``Stats.carry_objects``), as for ``budget``: a backlog (an
        install the capture is behind on) is journaled in batches of about that much
        data, each committed as it is done, so a follower streams the first while the
        next is read, instead of waiting for one batch of everything.  Each call reads
        at least one file, so a backlog always shrinks.
        """
        b = _Batch(budget=budget, inline_left=self.inline_bytes,
                   may_defer=not final and not dirty.full, read_budget=read_budget)
        if self._deferred:  # (files deleted while they waited are not seen again)
            now = time.monotonic_ns()
            self._deferred = {ino: since for ino, since in self._deferred.items()
                              if now - since < 2 * DEFER_NS}

        def out(record: rec.Record) -> None:
            try:  # the journal's door, checked before the batch is written
                rec.check_record(record)
            except BadRecord as exc:
                shown = repr(record)  # (a record can hold paths of 64 KiB: one line)
                shown = shown if len(shown) <= 300 else shown[:300] + "..."
                raise CaptureError(f"cannot journal {shown}: {str(exc)[:300]}") from None
            b.records += 1
            emit(record)

        started = time.perf_counter_ns()
        self._observe(dirty, b)
        observed = time.perf_counter_ns()
        self._plan_and_emit(b, out)
        return Stats(b.records, len(b.want), b.examined, b.read_bytes, b.carry, b.carry_data,
                     b.carry_objects, observed - started, b.sum_ns, b.read_ns,
                     time.perf_counter_ns() - observed)

    # -- 1. observe ---------------------------------------------------------------------------

    def _observe(self, dirty: Dirty, b: _Batch) -> None:
        m = self.model
        b.full = dirty.full
        hints: set[tuple[int, bytes]] = {(m.id_of_ino(i), n) for i, n in dirty.names}
        b.data = {m.id_of_ino(i) for i in dirty.data}
        todo: list[tuple[int, bytes | None]] = []  # (id, handle; None: the upper itself)
        if dirty.full:
            todo.append((UPPER, None))
        else:
            for ino, handle in dirty.dirs.items():
                id = m.id_of_ino(ino)
                node = m.nodes.get(id)
                if node is None or not node.is_dir:
                    continue  # not in the journaled tree (work/, or new: its parent walks it)
                if id != UPPER and node.handle and node.handle != handle:
                    continue  # the model's directory is gone; this is another inode
                todo.append((id, None if id == UPPER else handle))
        listed: set[int] = set()
        while todo:
            id, dir_handle = todo.pop()
            if id in listed:
                continue
            listed.add(id)
            for child in self._list(id, dir_handle, dirty.full, hints, b):
                todo.append(child)
        if not dirty.full:
            for ino, handle in dirty.objects.items():
                id = m.id_of_ino(ino)
                if id in b.looked or id not in m.nodes:
                    continue
                node = m.nodes[id]
                if node.handle and node.handle != handle:
                    continue  # the model's inode is gone (its directory says how)
                if id in b.data and b.read_enough:
                    b.carry_objects[ino] = handle  # its data: the next batch's
                    continue
                seen = self._examine_handle(id, handle, node, id in b.data, b)
                b.looked.add(id)
                if seen is not None and seen.ino == ino and same_kind(node, seen):
                    b.seen[id] = seen
                    b.examined += 1

    def _list(self, id: int, handle: bytes | None, full: bool, hints: set[tuple[int, bytes]],
              b: _Batch) -> Iterator[tuple[int, bytes]]:
        """List one directory into ``b.want``; yield the directories to list after it."""
        m = self.model
        opened = self._open_dir(id, handle)
        if opened is None:
            if id in m.nodes:
                b.want[id] = {}
                b.fresh[id] = {}
                b.order.append(id)
            return
        fd = opened
        try:
            st = os.fstat(fd)
            if not stat.S_ISDIR(st.st_mode):
                return
            b.seen[id] = Seen.of(st, handle or b"", _xattrs(fd_path(fd), True))
            b.looked.add(id)
            node = m.nodes.get(id)
            children = node.children if node is not None and node.children is not None else {}
            entries: dict[bytes, int] = {}
            with os.scandir(fd) as it:
                listing = [(os.fsencode(e.name), e.inode()) for e in it]
            # what to do with each entry: keep the model's id, examine, or leave it for
            # the next batch (None)
            plan: list[tuple[bytes, int | None, bool]] = []
            todo: list[tuple[bytes, int | None, int]] = []
            new = 0
            for name, ino in listing:
                cur = children.get(name)
                if not full and cur is not None and cur == ino and (id, name) not in hints:
                    plan.append((name, cur, False))  # same inode, same name: nothing to do
                    continue
                if cur is None and (b.budget and len(b.seen) + new >= b.budget
                                    or b.read_enough):
                    b.carry[st.st_ino] = handle or b""  # the next batch takes the rest
                    continue
                new += cur is None
                plan.append((name, cur, True))
                todo.append((name, cur, ino))
            got_ids = iter(self._examine_entries(fd, todo, b))
            if b.cut:  # a new file left for the next batch (``_judge``): list it again
                b.carry[st.st_ino] = handle or b""
                b.cut = False
            fresh: dict[bytes, int] = {}
            for name, cur, examine in plan:
                got = next(got_ids) if examine else cur
                if got is None:
                    continue
                entries[name] = got
                if not examine:
                    continue
                fresh[name] = got
                child = b.seen.get(got)  # (directories are always kept)
                if child is not None and child.kind == stat.S_IFDIR and (full or got in b.new):
                    yield got, child.handle
            b.want[id] = entries
            b.fresh[id] = fresh
            b.order.append(id)
        finally:
            os.close(fd)

    def _open_dir(self, id: int, handle: bytes | None) -> int | None:
        """The directory ``id`` (None: it is gone), by handle, else by the model's path."""
        if handle is None:
            return os.open(fd_path(self.upper.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        flags = os.O_RDONLY | os.O_DIRECTORY
        try:
            fd = self.upper.open_handle(handle, flags)
        except OSError as exc:
            # Seen here (6.18) for a directory removed a moment before: the kernel could
            # not reconnect it.  The model's path tells whether it is still there.
            if exc.errno != errno.ENOMEM:
                raise
            fd = None
        if fd is not None:
            return fd
        return self._open_by_path(id, handle, flags)

    def _open_by_path(self, id: int, handle: bytes, flags: int) -> int | None:
        """The inode ``id`` at the model's path, if that still holds the inode of
        ``handle`` (None otherwise): for a handle the kernel could not open."""
        node = self.model.nodes.get(id)
        if node is None or not node.parent:
            return None
        path = self.model.path(id)
        if not path.startswith(b"upper/"):
            return None
        try:
            fd = openat2_beneath(self.upper.fd, path[6:], flags)
        except OSError:
            return None
        try:
            if name_to_handle(fd) == handle:
                return fd
        except OSError:
            pass
        os.close(fd)
        return None

    def _examine_entry(self, dir_fd: int, name: bytes, cur: int | None, b: _Batch) -> int | None:
        """Examine one entry; return the id it has in the new tree (None: skip it).

        What differs from the model (or is a directory) goes to ``b.seen``; a regular
        file that must be read is read now, while its directory is open.
        """
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            handle = handle_of(dir_fd, name, self._hbuf)
            xattrs = _xattrs(fd_path(dir_fd, name), False)
            target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else b""
        except FileNotFoundError:
            return None  # gone meanwhile: its event is queued, the next batch looks again
        return self._judge(dir_fd, name, cur, Seen.of(st, handle, xattrs, target), None, b)

    def _examine_entries(self, dir_fd: int, todo: list[tuple[bytes, int | None, int]],
                         b: _Batch) -> list[int | None]:
        """``_examine_entry`` for each (name, model id, listed inode) of one directory:
        one call into ``_capturec.examine`` for all of them, which also reads the
        regular files the model's expectation says changed (``needs_read``, given
        what the listing's inode number has in the model)."""
        if not (self.native and capturec is not None) or not todo:
            return [self._examine_entry(dir_fd, name, cur, b) for name, cur, _ in todo]
        m = self.model
        ask = []
        for name, _, ino in todo:
            node = m.nodes.get(ino)
            if node is None or node.data is None or m.id_of_ino(ino) in b.data \
                    or b.full and not node.ctime:
                ask.append((name, 0, 0, 0, -1, True))
            else:
                ask.append((name, ino, node.size, node.mtime, node.ctime if b.full else -1,
                            False))
        out: list[int | None] = []
        nodes, new, seen_of = m.nodes, b.new, b.seen
        for (name, cur, _), got in zip(todo, capturec.examine(dir_fd, ask), strict=True):
            if got is None:
                out.append(None)  # gone meanwhile (as above)
                continue
            (mode, uid, gid, size, mtime, ctime, ino, rdev, handle, xattrs, target,
             contents) = got
            if cur is None and ino not in nodes and ino not in new and \
                    stat.S_ISREG(mode) and type(contents) is tuple and \
                    contents[2] == ino and stat.S_ISREG(contents[1]):
                # The install's case, what _judge decides for it in short: a new name, an
                # inode the model does not know, a regular file C read whole.
                data, _, _, before_ctime, after_mtime, after_ctime = contents
                b.examined += 1
                b.read_bytes += len(data)
                new.add(ino)
                b.looked.add(ino)
                summing = time.perf_counter_ns()
                sums = data_sums(data)
                b.sum_ns += time.perf_counter_ns() - summing
                seen_of[ino] = Seen(
                    mode, uid, gid, size, mtime, ctime, ino, rdev, handle, xattrs, target,
                    Contents(sums, len(data), after_mtime,
                             after_ctime if after_ctime == before_ctime else 0,
                             b.inline(data)))
                out.append(ino)
                continue
            seen = Seen(mode, uid, gid, size, mtime, ctime, ino, rdev, handle, xattrs, target)
            out.append(self._judge(dir_fd, name, cur, seen, contents, b))
        return out

    def _judge(self, dir_fd: int, name: bytes, cur: int | None, seen: Seen,
               read_ahead: tuple[bytes, int, int, int, int, int] | bool | None,
               b: _Batch) -> int | None:
        """The rest of ``_examine_entry``, given what the entry is (``seen``).
        ``read_ahead``: the file's contents as ``_capturec.examine`` read them, if it
        did (used only if the file must be read)."""
        m = self.model
        ino = seen.ino
        if cur is None and b.read_enough and seen.kind == stat.S_IFREG \
                and not isinstance(read_ahead, tuple) and seen.size > READ_CHUNK \
                and ino not in m.nodes and ino not in b.new:
            b.cut = True  # a new file that needs a read of its own: the next batch's
            return None
        b.examined += 1
        node = m.nodes.get(ino)
        if cur is not None and cur < 0 and cur not in m.nodes:
            # Adopted meanwhile through another of its names (a hard link the journal
            # made, listed before this one): the listing's id is stale, the node is
            # the inode it became.
            cur = b.adopted[cur]
        if node is None and cur is not None and cur < 0:
            # A node journaled while nobody watched, at this name: adopt it if it can be it.
            cnode = m.nodes[cur]
            if same_kind(cnode, seen) and cnode.handle in (b"", seen.handle):
                m.rekey(cur, ino)
                b.adopted[cur] = ino
                m.nodes[ino].handle = seen.handle
                m.nodes[ino].ctime = 0
                node = m.nodes[ino]
        if node is None:
            id = ino
            if id in b.new and id in b.seen and b.seen[id].handle != seen.handle:
                return None  # two inodes of one number in one batch: a race, look again later
            b.new.add(id)
        elif same_kind(node, seen) and (not node.handle or not seen.handle
                                        or node.handle == seen.handle):
            id = ino
        else:
            # The number was reused: the model's node is another (dead) inode.
            prior = [k for k, v in b.reborn.items() if v == ino]
            if prior:
                id = prior[0]
            else:
                id = m.new_id()
                b.reborn[id] = ino
            b.new.add(id)
            node = None
        b.looked.add(id)
        regular = seen.kind == stat.S_IFREG
        read = regular and needs_read(node, seen, id in b.data, b.full)
        if node is not None and cur == id and not read and seen.kind != stat.S_IFDIR \
                and same_attributes(node, seen):
            return id  # as the model has it: nothing to keep
        if read and isinstance(read_ahead, tuple):
            data, before_mode, before_ino, before_ctime, after_mtime, after_ctime = read_ahead
            if stat.S_ISREG(before_mode) and before_ino == ino:
                b.read_bytes += len(data)
                seen = Seen(seen.mode, seen.uid, seen.gid, seen.size, seen.mtime, seen.ctime,
                            seen.ino, seen.rdev, seen.handle, seen.xattrs, seen.target,
                            Contents(data_sums(data), len(data), after_mtime,
                                     after_ctime if after_ctime == before_ctime else 0,
                                     b.inline(data) if node is None else None))
            # (else replaced meanwhile, as _read says: its events are queued)
        elif read:
            try:
                fd = os.open(name, OPEN_DATA, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EACCES):
                    raise
            else:
                try:
                    seen = attrs.evolve(seen, contents=self._read(fd, ino, b,
                                                                  keep=node is None,
                                                                  may_wait=bool(seen.handle)))
                finally:
                    os.close(fd)
        b.seen[id] = seen
        return id

    def _examine_handle(self, id: int, handle: bytes, node: Node, data_dirty: bool,
                        b: _Batch | None = None) -> Seen | None:
        try:
            fd = self.upper.open_handle(handle, os.O_PATH)
        except OSError as exc:
            if exc.errno != errno.ENOMEM:
                raise
            # A directory the kernel could not reconnect (removed a moment before, as
            # in _open_dir): seen now and then by a fuzz run.  Its model path decides.
            fd = self._open_by_path(id, handle, os.O_PATH | os.O_NOFOLLOW)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            # (the /proc link of an O_PATH fd leads to the inode itself, a symlink too)
            target = os.readlink(b"", dir_fd=fd) if stat.S_ISLNK(st.st_mode) else b""
            seen = Seen.of(st, handle, _xattrs(fd_path(fd), True), target)
        except FileNotFoundError:
            return None
        finally:
            os.close(fd)
        if stat.S_ISREG(st.st_mode) and needs_read(node, st, data_dirty, False):
            fd = self.upper.open_handle(handle, OPEN_DATA)
            if fd is not None:
                try:
                    seen = attrs.evolve(seen, contents=self._read(fd, st.st_ino, b,
                                                                  may_wait=bool(handle)))
                finally:
                    os.close(fd)
        return seen

    def _read(self, fd: int, ino: int, b: _Batch | None, keep: bool = False,
              may_wait: bool = False) -> Contents | None:
        """What reading the file finds; with its bytes if ``keep`` (a new file: its
        Create carries them) and the batch's ``inline`` allows.  ``may_wait``: the file
        may be left for the next batch (it has a handle): a big file being written now
        is then not read (``WRITING_NS``; ``Contents.unread``)."""
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode) or before.st_ino != ino:
            return None  # replaced meanwhile: its events are queued
        if may_wait and b is not None and b.may_defer and before.st_size > READ_CHUNK \
                and time.clock_gettime_ns(CLOCK_FILE_TIMES) - before.st_ctime_ns < WRITING_NS:
            now = time.monotonic_ns()
            if now - self._deferred.setdefault(ino, now) < DEFER_NS:
                return Contents(b"", before.st_size, before.st_mtime_ns, 0, unread=True)
        reading = time.perf_counter_ns()
        sums, size = read_sums(fd, self._buf)
        after = os.fstat(fd)
        if b is not None:
            b.read_bytes += size
            b.read_ns += time.perf_counter_ns() - reading
        ctime = after.st_ctime_ns if after.st_ctime_ns == before.st_ctime_ns else 0
        # (a file this small was read in one chunk: the buffer holds it)
        data = b.inline(bytes(self._buf[:size])) \
            if keep and b is not None and size <= rec.MAX_INLINE else None
        return Contents(sums, size, after.st_mtime_ns, ctime, data)

    # -- 2. decide the new tree ---------------------------------------------------------------

    def _plan_and_emit(self, b: _Batch, emit: Emit) -> None:
        m = self.model
        # a directory bound in two listings keeps the last one
        bound: dict[int, tuple[int, bytes]] = {}
        for p in b.order:
            for name, id in b.want[p].items():
                if self._is_dir(id, b):
                    prev = bound.get(id)
                    if prev is not None:
                        b.want[prev[0]].pop(prev[1], None)
                    bound[id] = (p, name)

        loc_memo: dict[int, bool] = {UPPER: True}

        def final_loc(d: int) -> tuple[int, bytes] | None:
            if d in bound:
                return bound[d]
            node = m.nodes.get(d)
            if node is None or not node.parent:
                return None
            p, n = node.parent, node.name
            if p in b.want and b.want[p].get(n) != d:
                return None
            return p, n

        def alive(d: int) -> bool:
            path = []
            cur = d
            while cur not in loc_memo:
                if cur in path or cur == WORK:
                    break
                path.append(cur)
                loc = final_loc(cur)
                if loc is None:
                    break
                cur = loc[0]
            result = loc_memo.get(cur, False) if cur not in path else False
            for x in path:
                loc_memo[x] = result
            return result

        depth_memo: dict[int, int] = {UPPER: 0}

        def final_depth(d: int) -> int:
            chain = []
            while d not in depth_memo:
                chain.append(d)
                loc = final_loc(d)
                assert loc is not None
                d = loc[0]
            base = depth_memo[d]
            for x in reversed(chain):
                base += 1
                depth_memo[x] = base
            return base

        # drops: model bindings that are not in the new tree
        drops: dict[tuple[int, bytes], int] = {}
        for p in b.order:
            node = m.nodes.get(p)
            if node is None or node.children is None:
                continue
            children, want = node.children, b.want[p]
            if not alive(p):
                for name, old in children.items():
                    drops[p, name] = old
                continue
            # (an entry listed unchanged is bound as in the model: only names gone and
            # examined entries can differ; the loops cost per entry of the directories
            # listed, each batch, so they stay in comprehensions)
            for name in [n for n in children if n not in want]:
                drops[p, name] = children[name]
            for name in b.fresh[p]:
                had = children.get(name)
                if had is not None and name in want and want[name] != had:
                    drops[p, name] = had
        for d, (p, name) in bound.items():  # a directory's old place in an unlisted directory
            node = m.nodes.get(d)
            if node is not None and node.parent and (node.parent, node.name) != (p, name) \
                    and node.parent not in b.want:
                drops[node.parent, node.name] = d
        # the contents of directories that are gone
        stack = [old for old in drops.values() if m.nodes[old].is_dir and not alive(old)]
        while stack:
            d = stack.pop()
            for name, child in (m.nodes[d].children or {}).items():
                if (d, name) not in drops:
                    drops[d, name] = child
                    if m.nodes[child].is_dir and not alive(child):
                        stack.append(child)
        # adds: entries of the new tree the model does not have there
        adds: list[tuple[int, bytes, int]] = []
        for p in b.order:
            if not alive(p):
                continue
            want = b.want[p]
            for name, id in b.fresh[p].items():  # (unchanged entries are bound already)
                if want.get(name) == id and m.lookup(p, name) != id:
                    adds.append((p, name, id))

        # moves: an existing inode leaves one name for another
        sources: dict[int, list[tuple[int, bytes]]] = {}
        for (p, name), old in drops.items():
            if old in m.nodes:
                sources.setdefault(old, []).append((p, name))
        moves: list[tuple[int, tuple[int, bytes], tuple[int, bytes]]] = []
        rest: list[tuple[int, bytes, int]] = []
        for p, name, id in adds:
            if id in m.nodes and sources.get(id):
                src = sources[id].pop()
                del drops[src]
                moves.append((id, src, (p, name)))
            else:
                rest.append((p, name, id))

        self._emit_moves(moves, drops, b, emit)
        self._emit_removals(drops, b, emit)
        self._emit_places(rest + [(p, n, id) for id, _, (p, n) in moves
                                  if (p, n) in b.staged], final_depth, b, emit)
        self._emit_attributes(b, alive, emit)
        if b.stage:
            self._unstage(b, emit)
        for tmp, ino in b.reborn.items():
            if tmp in m.nodes and ino not in m.nodes:
                m.rekey(tmp, ino)

    def _is_dir(self, id: int, b: _Batch) -> bool:
        seen = b.seen.get(id)
        if seen is not None:
            return seen.kind == stat.S_IFDIR
        node = self.model.nodes.get(id)
        return node is not None and node.is_dir

    # -- 3. emit ------------------------------------------------------------------------------

    def _attached(self, d: int) -> bool:
        """Is directory ``d`` (in the model, as records left it so far) below upper/?"""
        m = self.model
        while d not in (UPPER, WORK, 0):
            d = m.nodes[d].parent
        return d == UPPER

    def _emit_moves(self, moves: list[tuple[int, tuple[int, bytes], tuple[int, bytes]]],
                    drops: dict[tuple[int, bytes], int], b: _Batch, emit: Emit) -> None:
        pending = list(moves)
        while pending:
            self._direct_moves(pending, drops, b, emit)
            if pending:  # stage one (a swap or cycle frees the others' destinations)
                self._stage(pending.pop(0), b, emit)

    def _direct_moves(self, pending: list[tuple[int, tuple[int, bytes], tuple[int, bytes]]],
                      drops: dict[tuple[int, bytes], int], b: _Batch, emit: Emit) -> None:
        m = self.model
        progress = True
        while pending and progress:
            progress = False
            for move in list(pending):
                id, (p0, n0), (p1, n1) = move
                node = m.nodes[id]
                if p1 not in m.nodes or not m.nodes[p1].is_dir or not self._attached(p1):
                    continue
                if node.is_dir and m.is_within(p1, id):
                    continue
                occ = m.lookup(p1, n1)
                if occ is not None:
                    onode = m.nodes[occ]
                    if drops.get((p1, n1)) != occ or onode.is_dir != node.is_dir \
                            or onode.children:
                        continue
                    del drops[p1, n1]  # replaced by the rename
                dst = m.entry_path(p1, n1)
                if self._prune_too_deep(p0, n0, len(dst), emit):
                    b.touched.add(p0)  # it left the journal's tree whole (and the occupant
                    pending.remove(move)  # stays: "replaced" no more)
                    if occ is not None:
                        drops[p1, n1] = occ
                    progress = True
                    continue
                emit(rec.Rename(m.entry_path(p0, n0), dst, 0, 0))
                if occ is not None:
                    m.unbind(occ, p1, n1)
                    if not m.nodes[occ].parent:
                        m.discard(occ)
                m.unbind(id, p0, n0)
                m.bind(id, p1, n1)
                b.touched.update((p0, p1))
                pending.remove(move)
                progress = True

    def _prune_too_deep(self, parent: int, name: bytes, new_length: int, emit: Emit) -> bool:
        """Before the entry ``name`` of ``parent`` moves to a path of ``new_length`` bytes:
        remove, as records at their present paths, the entries below it that the move puts
        deeper than a record's path holds (``records.MAX_PATH``: kernel overlayfs lets a
        user do it, the journal cannot say it).  Entries that deep leave the journal's tree,
        as new ones that deep never enter it (``_emit_places``); moved back within reach,
        they are new entries again.  True if the entry itself is too deep: removed whole."""
        m = self.model
        if new_length > rec.MAX_PATH:
            log.warning("capture: %r... moved deeper than a journaled path can be; its "
                        "replicas lose it", m.entry_path(parent, name)[:200])
            self._remove(parent, name, emit)
            return True
        id = m.lookup(parent, name)
        if id is None or not m.nodes[id].children \
                or new_length <= len(m.entry_path(parent, name)):
            return False  # nothing below it gets deeper than it already is
        too_deep: list[tuple[int, bytes]] = []
        stack = [(id, new_length)]
        while stack:
            d, length = stack.pop()
            for child_name, child in (m.nodes[d].children or {}).items():
                child_length = length + 1 + len(child_name)
                if child_length > rec.MAX_PATH:
                    too_deep.append((d, child_name))
                elif m.nodes[child].children:
                    stack.append((child, child_length))
        for d, child_name in too_deep:
            log.warning("capture: %r... moved deeper than a journaled path can be; its "
                        "replicas lose it", m.entry_path(d, child_name)[:200])
            self._remove(d, child_name, emit)
        return False

    def _stage(self, move: tuple[int, tuple[int, bytes], tuple[int, bytes]], b: _Batch,
               emit: Emit) -> None:
        m = self.model
        id, (p0, n0), dst = move
        stage = self._stage_dir(b, emit)
        name = b"%d" % (len(b.staged) + 1)
        while m.lookup(stage, name) is not None:
            name += b"_"
        emit(rec.Rename(m.entry_path(p0, n0), m.entry_path(stage, name), 0, 0))
        m.unbind(id, p0, n0)
        m.bind(id, stage, name)
        b.staged[dst] = name
        b.touched.add(p0)

    def _stage_dir(self, b: _Batch, emit: Emit) -> int:
        m = self.model
        if not b.stage:
            found = m.lookup(WORK, STAGE)
            if found is None:
                emit(rec.Mkdir(b"work/" + STAGE, 0o700, 0, 0))
                found = m.new_id()
                m.add(found, Node(stat.S_IFDIR | 0o700, children={}))
                m.bind(found, WORK, STAGE)
            b.stage = found
        return b.stage

    def _unstage(self, b: _Batch, emit: Emit) -> None:
        m = self.model
        stage_node = m.nodes[b.stage]
        for name in list(stage_node.children or {}):  # left over: could not be placed
            self._remove(b.stage, name, emit)
        emit(rec.Rmdir(b"work/" + STAGE))
        m.unbind(b.stage, WORK, STAGE)
        m.discard(b.stage)

    def _remove(self, parent: int, name: bytes, emit: Emit) -> None:
        """Remove an entry as records: a directory's contents first."""
        m = self.model
        for p, n in m.entries_below(parent, name):
            id = m.lookup(p, n)
            assert id is not None
            is_dir = m.nodes[id].is_dir
            emit((rec.Rmdir if is_dir else rec.Unlink)(m.entry_path(p, n)))
            m.unbind(id, p, n)
            if not m.nodes[id].parent:
                m.discard(id)

    def _emit_removals(self, drops: dict[tuple[int, bytes], int], b: _Batch,
                       emit: Emit) -> None:
        m = self.model
        for (p, name), old in sorted(drops.items(), key=lambda kv: -self._depth_or(kv[0][0])):
            if m.lookup(p, name) != old:
                continue  # went with its directory
            self._remove(p, name, emit)
            b.touched.add(p)

    def _depth_or(self, id: int) -> int:
        try:
            return self.model.depth(id)
        except KeyError:
            return 0

    def _emit_places(self, places: list[tuple[int, bytes, int]],
                     final_depth: Callable[[int], int], b: _Batch, emit: Emit) -> None:
        m = self.model
        # a directory's path, once per directory: places come parents first, and only a
        # rename (a staged entry put back) can move a directory whose path is known
        dir_paths: dict[int, bytes] = {}
        for p, name, id in sorted(places, key=lambda x: final_depth(x[0])):
            if p not in m.nodes:
                continue  # its directory could not be made (a refused or too long path)
            ppath = dir_paths.get(p)
            if ppath is None:
                ppath = dir_paths[p] = m.path(p)
            path = ppath + b"/" + name
            if len(path) > rec.MAX_PATH:
                log.warning("capture: %r... is too long a path to journal", path[:200])
                continue
            if (p, name) in b.staged:
                staged = b.staged.pop((p, name))
                self._prune_too_deep(b.stage, staged, len(path), emit)
                emit(rec.Rename(m.entry_path(b.stage, staged), path, 0, 0))
                m.unbind(id, b.stage, staged)
                m.bind(id, p, name)
                dir_paths.clear()
            elif id in m.nodes and m.nodes[id].parent and not m.nodes[id].is_dir:
                emit(rec.Link(m.path(id), path))
                m.bind(id, p, name)
            elif id not in m.nodes:
                seen = b.seen[id]
                node = self._create_whole(path, seen, emit)
                if node is not None:
                    b.whole.add(id)  # attributes and data journaled with it
                else:
                    node = self._create(path, seen, emit)
                    b.data.add(id)
                m.add(id, node)
                m.bind(id, p, name)
            else:
                continue
            b.touched.add(p)

    def _create_whole(self, path: bytes, seen: Seen, emit: Emit) -> Node | None:
        """A new regular file whose contents were read whole as one ``Create`` record
        (``sdeefs.records``); its node as the record leaves it.  None if it is not one
        (another kind, too big, not read, too many xattrs): then the records of old."""
        got = seen.contents
        if seen.kind != stat.S_IFREG or got is None or got.data is None:
            return None
        xattrs = rec.encode_xattr_list(seen.xattrs) if seen.xattrs else b""
        if len(xattrs) > rec.MAX_XATTR_LIST:
            return None
        mode = stat.S_IFREG | seen.perm
        emit(rec.Create(path, mode, seen.uid, seen.gid, got.mtime, seen.handle, xattrs,
                        got.data))
        ctime = 0 if time.time_ns() - got.ctime < UNSURE_NS else got.ctime
        return Node(mode, seen.uid, seen.gid, got.mtime, ctime, got.size, seen.handle,
                    xattrs=seen.xattrs, data=got.sums)

    def _create(self, path: bytes, seen: Seen, emit: Emit) -> Node:
        perm, kind, uid, gid = seen.perm, seen.kind, seen.uid, seen.gid
        if kind == stat.S_IFDIR:
            emit(rec.Mkdir(path, perm, uid, gid))
            return Node(stat.S_IFDIR | perm, uid, gid, children={})
        if kind == stat.S_IFLNK:
            emit(rec.Symlink(path, seen.target, uid, gid))
            return Node(seen.mode, uid, gid, size=len(seen.target), data=seen.target)
        if seen.device:  # host root's (a user namespace cannot make one); inert: nodev
            emit(rec.Mkdev(path, kind | perm, seen.rdev, uid, gid))
            return Node(kind | perm, uid, gid, size=seen.rdev)
        emit(rec.Mknod(path, kind | perm, uid, gid))  # files, FIFOs, sockets, whiteouts
        return Node(kind | perm, uid, gid)

    # -- attributes and data ------------------------------------------------------------------

    def _emit_attributes(self, b: _Batch, alive: Callable[[int], bool], emit: Emit) -> None:
        m = self.model
        now = time.time_ns()
        whole = b.whole
        for id, seen in b.seen.items():
            if id in whole:
                continue  # made whole by its Create
            node = m.nodes.get(id)
            if node is None or not node.parent and id != UPPER:
                continue
            if self._defer(b, node, seen):
                continue
            path = m.path(id)
            if seen.xattrs != node.xattrs:
                have = dict(node.xattrs)
                want = dict(seen.xattrs)
                for name in sorted(set(have) - set(want)):
                    emit(rec.Removexattr(path, name))
                for name, value in seen.xattrs:
                    if have.get(name) != value:
                        emit(rec.Setxattr(path, name, value))
                node.xattrs = seen.xattrs
            mask = 0
            mtime, ctime = seen.mtime, seen.ctime
            mode, uid, gid, old_mtime, old_ctime, size, handle, data = node.unpacked()
            got = seen.contents
            if got is not None:
                mtime, ctime = got.mtime, got.ctime
                if data != got.sums or size != got.size:
                    witness = got.ctime if got.ctime and \
                        got.ctime + FILE_TIME_TICK <= b.started_ns else 0
                    for extent in extents(path, seen.handle, data, size, got.sums, got.size,
                                          witness):
                        emit(extent)
                    mask |= rec.SET_MTIME
                    if size != got.size or data is None:
                        mask |= rec.SET_SIZE
                data, size = got.sums, got.size
            perm = seen.perm
            if perm != stat.S_IMODE(mode) and seen.kind != stat.S_IFLNK:
                mask |= rec.SET_MODE
                mode = stat.S_IFMT(mode) | perm
            if (seen.uid, seen.gid) != (uid, gid):
                mask |= rec.SET_OWNER
            if mtime != old_mtime or id in b.touched:
                mask |= rec.SET_MTIME
            if got is not None or seen.kind != stat.S_IFREG:
                old_ctime = 0 if now - ctime < UNSURE_NS else ctime
            node.set(mode=mode, uid=seen.uid, gid=seen.gid, mtime=mtime, ctime=old_ctime,
                     size=size, handle=seen.handle or handle, data=data)
            if mask:
                emit(rec.Setattr(path, mask, perm, seen.uid, seen.gid, size, 0, mtime))


    def _defer(self, b: _Batch, node: Node, seen: Seen) -> bool:
        """Leave ``seen`` (all of it) for the next batch?  Its data changed, they were
        changing as they were read (no witness), the batch may defer and it was not
        deferred for DEFER_NS already (``reconcile``)."""
        got = seen.contents
        if got is not None and got.unread:  # (``_read`` checked DEFER_NS)
            b.carry_data[seen.ino] = seen.handle
            return True
        if got is None or not got.size or got.sums == node.data and got.size == node.size:
            self._deferred.pop(seen.ino, None)
            return False
        if got.ctime and got.ctime + FILE_TIME_TICK <= b.started_ns or not b.may_defer \
                or not seen.handle:
            self._deferred.pop(seen.ino, None)
            return False
        now = time.monotonic_ns()
        if now - self._deferred.setdefault(seen.ino, now) >= DEFER_NS:
            self._deferred.pop(seen.ino, None)
            return False
        b.carry_data[seen.ino] = seen.handle
        return True


def data_sums(data: bytes | bytearray | memoryview) -> bytes:
    """The sums ``read_sums`` gives for a file holding ``data`` (a call per block, the
    GIL released: ``sdeefs.blocksums``)."""
    return blocksums.data_sums(data, SUMS)


def read_sums(fd: int, buf: bytearray | None = None) -> tuple[bytes, int]:
    """(the sum of every BLOCK of the file, bytes read); ``buf``: READ_CHUNK bytes."""
    view = memoryview(buf if buf is not None else bytearray(READ_CHUNK))
    sums = bytearray()
    size = 0
    while True:
        filled = 0
        while filled < READ_CHUNK:
            n = os.preadv(fd, [view[filled:]], size + filled)
            if n == 0:
                break
            filled += n
        if filled:
            sums += data_sums(view[:filled])
        size += filled
        if filled < READ_CHUNK:
            return bytes(sums), size


def extents(path: bytes, handle: bytes, old: bytes | None, old_size: int, new: bytes,
            new_size: int, witness: int = 0) -> Iterator[rec.Extent]:
    """Extent records that turn a file with sums ``old`` (None: unknown) into one with
    sums ``new`` (both SUMS: BLAKE3's, so the records are Extent3s).  Blocks past the old
    end that are all zeros are left to the size change; at least one Extent (maybe of
    length 0) comes out.  ``witness``: the ctime the file kept while read, old enough to
    prove it (``sdeefs.records``): the Extents with data are StableExtent3s that carry it
    (0: plain Extent3s)."""
    count = len(new) // SUM
    changed = []
    for i in range(count):
        s = new[i * SUM:(i + 1) * SUM]
        if old is not None:
            if old[i * SUM:(i + 1) * SUM] == s:
                continue
            if i * BLOCK >= old_size:
                length = min(BLOCK, new_size - i * BLOCK)
                if s == zero_sum(length):
                    continue
        changed.append(i)
    out = 0
    start = 0
    while start < len(changed):
        end = start
        while end + 1 < len(changed) and changed[end + 1] == changed[end] + 1 \
                and end + 1 - start < MAX_EXTENT_BLOCKS:
            end += 1
        first, last = changed[start], changed[end]
        offset = first * BLOCK
        length = min((last + 1) * BLOCK, new_size) - offset
        sums = new[first * SUM:(last + 1) * SUM]
        yield rec.StableExtent3(path, handle, offset, length, new_size, sums, witness) \
            if witness else rec.Extent3(path, handle, offset, length, new_size, sums)
        out += 1
        start = end + 1
    if not out:
        yield rec.Extent3(path, handle, 0, 0, new_size, b"")


def handle_id(model: Model, handle: bytes, upper: Upper) -> int | None:
    """The inode number a handle names (decoded for ext4, otherwise by opening it)."""
    ino = handle_ino(handle)
    if ino is not None:
        return ino
    fd = upper.open_handle(handle, os.O_PATH)
    if fd is None:
        return None
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)
