"""Applying a run of records on a replica off the per-record path (a cold stream's bulk).

A node that starts following late receives the user's whole history: for an install,
some ten records per file (``Mknod``, ``Write`` chunks, ``Setattr``; their markers stay
off the wire).  Applied one by one (``sdeefs.apply.apply_record``) each record resolves
its path from the layer root again (``openat2`` of the parent, an ``lstat``, an
``open`` of the file) and the replica rewrites its ``position`` after each: some 15
syscalls a record.  A :class:`BatchApplier` (one per replica, used by each batch of frames:
``replica._apply_batch``) applies the records that build a tree with what it already
resolved:

* directories it resolved (``LayerRoot.open_dir``: ``openat2`` beneath the layer root,
  no symlink followed) are kept open by path (at most MAX_DIRS; every user's appliers
  of a daemon together within one bound, :class:`DirFds`), so a file's parent is
  resolved once, not once per record, until a record it does not take comes;
* a regular file it created (``Mknod``, ``O_CREAT|O_EXCL``) or opened for a ``Write``
  stays open while the next records are about the same path: its data goes with
  ``pwrite`` on that fd, its ``Setattr`` with ``ftruncate``/``fchown``/``fchmod``/
  ``futimens``; the fd is the file's inode, so nothing is looked up again;
* the replica's ``position`` is written once per batch instead of once per record
  (:attr:`deferred`).

What may be applied so (:data:`REPLAYABLE`) is what re-applying from any earlier
point of the run leaves as applying once did: records that create an entry when it is
missing (and give one of their kind already there their owner and mode: a kill may have
come between the create and the chown, ``sdeefs.apply.settle_existing``) or set a file's
data or attributes, never one that removes or moves an entry.  So a ``kill -9`` in the
middle of a batch, whose position still says where the batch began, re-applies the run
and converges (``tests/replication``).  Before any other record (Rename, Unlink, Rmdir,
Link ...) the batch writes the position it has reached, the applier forgets every fd it
holds (a rename may move what a cached path names; so does replacing the layer root: a
snapshot, a reset) and the record goes the per-record way
(``snapshot.apply_from_peer``), position and in-flight rename rules included.

The commonest of them (a regular file's ``Mknod``, ``Write``, ``Setattr`` of a file held;
the kernel engine's ``Create`` of a new file without xattrs and its ``Extent``, a Write
with the capture's sums) are applied in C when the
extension is built (``_applyc``, :meth:`BatchApplier.take`): straight from the RECORD
payload, without a Python object per record.  It only *takes*
a record it is certain the Python path would accept and carry (its comment lists the
conditions), and applies it with the same syscalls in the same order, resolving
directories through the same Python method; everything else, doubtful or hostile,
is left to the Python path below, which alone refuses (tests/replication/
test_applyc.py compares both on hostile inputs).

Nothing is trusted more than before: every record was decoded strictly and sanitized
at the door (``wire.decode_record_payload``) and is judged by ``sdeefs.replicable``
exactly as on the per-record path; the same errors become the same ``Refused`` (skip)
or ``ProtocolError`` (retry).  Directory fds come only from ``openat2`` with
RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS; names inside them are opened with O_NOFOLLOW.
A cached directory cannot be replaced by a symlink while cached: only REPLAYABLE
records run meanwhile, none of them removes or renames an entry, and nothing else
writes a replica's tree (jobs see it as a read-only lower layer).
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import threading

import attrs

from .. import records as rec
from ..apply import settle_existing
from ..layers import LayerRoot, split
from ..replicable import NOBODY, UserIds, refusal
from ..sysio import chmod_at, fd_path, open_regular_at
from .snapshot import TRANSIENT_ERRNOS, apply_from_peer
from .wire import Payload, ProtocolError, Refused

try:  # the common records in C (sdeefs/replication/_applyc.c); optional: Python does the same
    from . import _applyc
except ImportError:  # pragma: no cover
    _applyc = None  # type: ignore[assignment]

# Records whose re-application from an earlier point of a run converges (module docstring).
REPLAYABLE = (rec.Mkdir, rec.Mknod, rec.Symlink, rec.Write, rec.Setattr, rec.Setxattr,
              rec.Removexattr, rec.Create, rec.Done, rec.Sync, rec.Abort, rec.Begin,
              rec.Commit, rec.Void)
MAX_DIRS = 256  # directory fds one applier keeps open at most
DIR_FDS_SHARE = 4  # DirFds.from_rlimit: a daemon's cached directories get 1/4 of its fds
MIN_DIR_FDS = 16
MAX_FILES = 16  # files a batch keeps open at most
# Bytes per pwrite of a record's data, as ``_applyc.c`` writes it (its WRITE_PIECE says why:
# ext4 sizes page-cache folios by the write, and big ones cost a VM's replica twice the CPU)
WRITE_PIECE = 64 << 10
Ranges = tuple[tuple[int, int], ...] | None  # ids as ``_applyc.apply`` takes them


def owner_ranges(ids: UserIds) -> tuple[Ranges, Ranges] | None:
    """``ids`` as ``_applyc.apply`` takes them: (None, None) for NOBODY (owners are not
    checked), otherwise (start, stop) pairs; None if it cannot judge them (a range with
    a step: then nothing goes through C)."""
    if ids is NOBODY:
        return None, None
    if any(r.step != 1 for r in (*ids.uids, *ids.gids)):
        return None
    return (tuple((r.start, r.stop) for r in ids.uids),
            tuple((r.start, r.stop) for r in ids.gids))


@attrs.define(eq=False)
class DirFds:
    """The directory fds the batch appliers of one daemon keep open, every user's together.

    An applier keeps the directories it resolved open across batches (the module
    docstring), up to MAX_DIRS.  One per user, a few hundred users would hold the
    daemon's whole RLIMIT_NOFILE, and then every user's next ``open`` fails (EMFILE):
    one user's traffic failing another's apply.  So they share one bound, ``limit``
    (:meth:`from_rlimit`): an applier that needs one more fd when ``held`` is at it
    first closes the caches of appliers between batches, least recently active first,
    then its own; only when every fd is held by appliers inside a batch does it take
    one beyond (it holds no other then).  So ``held`` <= ``limit`` + the appliers inside
    a batch at once (at most the daemon's worker threads), whatever the users do.

    Threads: users apply in different worker threads.  An applier's ``dirs`` change in
    its own thread while it is inside a batch (:meth:`begin` .. :meth:`end`; nobody
    else touches them then, C included), otherwise only under ``_lock`` (another's
    eviction, its ``close``): so no fd is closed while another thread may use it.

    Attributes:
        limit: the bound (see above).
        held: directory fds the appliers sharing it hold.
        _idle: appliers between batches that hold fds, least recently active first.
    """

    limit: int
    held: int = 0
    _idle: dict[BatchApplier, None] = attrs.field(init=False, factory=dict)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    @classmethod
    def from_rlimit(cls) -> DirFds:
        """The bound for this process: a quarter of its RLIMIT_NOFILE (soft), the rest
        for what every user needs whatever its traffic (sockets, layer roots, files
        held in a batch, relays' reads)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        return cls(max(MIN_DIR_FDS, soft // DIR_FDS_SHARE))

    def begin(self, applier: BatchApplier) -> None:
        """``applier`` starts a batch: nobody closes its fds until :meth:`end`."""
        with self._lock:
            self._idle.pop(applier, None)

    def end(self, applier: BatchApplier) -> None:
        """``applier``'s batch ended: its fds may be closed for another's from now on."""
        with self._lock:
            if applier.dirs:
                self._idle.pop(applier, None)
                self._idle[applier] = None  # the most recently active

    def acquire(self, applier: BatchApplier) -> None:
        """Count one more fd for ``applier`` (inside a batch), making room (see above)."""
        with self._lock:
            while self.held >= self.limit and self._idle:
                other = next(iter(self._idle))
                del self._idle[other]
                self.held -= other.close_dirs()
            if self.held >= self.limit:
                self.held -= applier.close_dirs()
            self.held += 1

    def release(self, count: int) -> None:
        """``count`` fds counted were not opened after all."""
        with self._lock:
            self.held -= count

    def drop(self, applier: BatchApplier) -> None:
        """Close every fd of ``applier`` (its ``close``)."""
        with self._lock:
            self._idle.pop(applier, None)
            self.held -= applier.close_dirs()


@attrs.define(eq=False)
class BatchApplier:
    """Applies one batch's REPLAYABLE records into ``layers`` (see the module docstring).

    Attributes:
        dirs: layer path of a directory -> an O_PATH fd of it, resolved before.
        files: layer path -> O_WRONLY fd of the regular files the last records were about
            (at most MAX_FILES, oldest first: a tool writes a file while it sets the
            times of its directory, so records of several paths interleave).
        deferred: records were applied whose position is not written yet.
        native: the common records go through ``_applyc`` (:meth:`take`).
        fds: the bound on directory fds it shares with the other users' appliers (a
            daemon's; by itself: its own MAX_DIRS).
    """

    layers: LayerRoot
    ids: UserIds
    dirs: dict[bytes, int] = attrs.field(factory=dict)
    files: dict[bytes, int] = attrs.field(factory=dict)
    deferred: bool = False
    native: bool = _applyc is not None
    fds: DirFds = attrs.field(factory=lambda: DirFds(MAX_DIRS))
    _owners: tuple[Ranges, Ranges] | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._owners = owner_ranges(self.ids)

    def take(self, payload: Payload, seq: int) -> bool:
        """Apply the RECORD payload of record ``seq`` in C if it is one of the common
        records ``_applyc`` takes (the module docstring); False: not taken, nothing was
        done (decode it and :meth:`apply` it).  The same errors as :meth:`apply`."""
        if not self.native or self._owners is None or _applyc is None:
            return False
        try:
            taken = _applyc.apply(payload, self.dirs, self.files, self, *self._owners)
        except OSError as exc:
            self.deferred = True
            raise self._failed(exc, f"record {seq}") from None
        if taken:
            self.deferred = True
        return taken

    def take_run(self, entries: list[tuple[int, int, memoryview]], index: int, applied: int
                 ) -> tuple[int, int, OSError | None]:
        """Apply the records of a run (``wire.split_run``'s entries) from ``entries[index]``
        in C while ``_applyc`` takes them, as :meth:`take` would one by one, with no
        Python call per record; those at or below ``applied`` are passed over.  Returns
        the index of the first record not applied (nothing was done for it; len(entries):
        all were), the applied seq reached, and the OSError that record's application
        failed with (None: it was not taken; :meth:`native_failure` says what it is)."""
        if not self.native or self._owners is None or _applyc is None:
            return index, applied, None
        reached, at, failed = _applyc.apply_run(entries, index, applied, self.dirs,
                                                self.files, self, *self._owners)
        if at != applied:
            self.deferred = True
        return reached, at, failed

    def native_failure(self, exc: OSError, seq: int) -> ProtocolError:
        """What the failed application in C of record ``seq`` is (:meth:`take_run`): the
        skip or retry :meth:`take` raises for it."""
        self.deferred = True
        return self._failed(exc, f"record {seq}")

    def close_file(self) -> None:
        """Close the files held (a batch ended: the next may be long in coming, and a
        file held open for writing cannot be executed by a job: ETXTBSY)."""
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()

    def begin(self) -> None:
        """A batch starts (``Replica.batch_applier``): what it resolves is its own until
        :meth:`end`."""
        self.fds.begin(self)

    def end(self) -> None:
        """The batch ended: close its files; the directories stay open, for the next
        batch, unless another user's applier needs their fds first (``DirFds``)."""
        self.close_file()
        self.fds.end(self)

    def close(self) -> None:
        """Close every fd held (a record that moves or removes entries comes, or the
        layer root is replaced)."""
        self.close_file()
        self.fds.drop(self)

    def close_dirs(self) -> int:
        """Close the directories held (``DirFds``, under its lock); how many there were."""
        count = len(self.dirs)
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()
        return count

    def apply(self, record: rec.Record, data: bytes | memoryview, what: str) -> None:
        """Apply a REPLAYABLE record a peer sent, as ``apply_from_peer`` would."""
        if not isinstance(record, rec.Mknod | rec.Mkdir | rec.Write | rec.Setattr) \
                or b"/" not in record.path:  # (the layer directories themselves)
            apply_from_peer(self.layers, record, data, what, self.ids)
            return
        reason = refusal(record, self.ids)
        if reason is not None:
            raise Refused(f"{what} refused: {reason}")
        try:
            match record:
                case rec.Mknod(path=p, mode=mode, uid=uid, gid=gid) \
                        if stat.S_ISREG(mode):
                    self._mknod(p, mode, uid, gid)
                case rec.Mkdir(path=p, mode=mode, uid=uid, gid=gid):
                    self._mkdir(p, mode, uid, gid)
                case rec.Write(path=p, offset=offset):
                    fd = self._file(p)
                    if fd is not None:
                        _write_pieces(fd, data, offset)
                case rec.Setattr(path=p) if p in self.files:
                    _setattr_fd(self.files[p], record)
                case rec.Setattr(path=p) if p in self.dirs and not record.mask & rec.SET_SIZE:
                    _setattr_dir(self.dirs[p], record)
                case _:
                    apply_from_peer(self.layers, record, data, what, self.ids)
        except OSError as exc:
            raise self._failed(exc, what) from None

    def _failed(self, exc: OSError, what: str) -> ProtocolError:
        """What a failed application is: a retry for a passing error, a skip otherwise."""
        self.close_file()
        if exc.errno in TRANSIENT_ERRNOS:
            return ProtocolError(f"{what} cannot be applied now: {exc}")
        return Refused(f"{what} cannot be applied: {exc}")

    # -- the cached resolution -------------------------------------------------------------

    def _dir(self, path: bytes) -> int:
        """An O_PATH fd of the directory ``path`` (resolved beneath the layer root)."""
        fd = self.dirs.get(path)
        if fd is None:
            if len(self.dirs) >= MAX_DIRS:
                self.fds.drop(self)
            self.fds.acquire(self)  # (may close this applier's own: none is in use here)
            try:
                fd = self.layers.open_dir(path)
            except BaseException:
                self.fds.release(1)
                raise
            self.dirs[path] = fd
        return fd

    def _parent(self, path: bytes) -> tuple[int, bytes]:
        """(fd of the parent, name); OSError if the parent cannot be resolved (creating an
        entry there fails, as on the per-record path)."""
        head, name = split(path)
        return self._dir(head), name

    def _hold(self, path: bytes, fd: int) -> None:
        if len(self.files) >= MAX_FILES:
            oldest = next(iter(self.files))
            os.close(self.files.pop(oldest))
        self.files[path] = fd

    def _file(self, path: bytes) -> int | None:
        """The open fd of the regular file ``path``: the one held, or opened now.  None if
        there is no such file (a Write then has nothing to do, as ``apply_record`` says)."""
        held = self.files.get(path)
        if held is not None:
            return held
        try:
            dir_fd, name = self._parent(path)
        except (FileNotFoundError, NotADirectoryError):
            return None  # as apply_record: its file is gone, a later record says why
        try:
            # Looked at before it is opened: a device node a peer's Mkdev made there must
            # not be opened at all (sysio.open_regular_at), a FIFO not waited on.
            fd = open_regular_at(dir_fd, name, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.EISDIR,
                             errno.ENOTDIR):
                return None
            raise
        self._hold(path, fd)
        return fd

    # -- the records -----------------------------------------------------------------------

    def _mknod(self, path: bytes, mode: int, uid: int, gid: int) -> None:
        """``Mknod`` of a regular file (``layers.mknod``): created if missing, then held."""
        dir_fd, name = self._parent(path)
        perm = mode & 0o7777
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, perm, dir_fd=dir_fd)
        except FileExistsError:
            # already there (a crash may have come before its chown): as apply_record
            settle_existing(dir_fd, name, stat.S_IFREG | perm, uid, gid)
            return
        self._hold(path, fd)
        os.fchown(fd, uid, gid)
        os.fchmod(fd, perm)  # after chown (which clears set-ID bits), as layers.mknod

    def _mkdir(self, path: bytes, mode: int, uid: int, gid: int) -> None:
        dir_fd, name = self._parent(path)
        try:
            os.mkdir(name, mode & 0o7777, dir_fd=dir_fd)
        except FileExistsError:
            settle_existing(dir_fd, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)
            return
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        chmod_at(dir_fd, name, mode & 0o7777)


def _write_pieces(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``data`` at ``offset``, WRITE_PIECE bytes per pwrite (one pwrite if there is none);
    a short write is continued, as ``_applyc``'s ``write_all`` does: the rest of a record
    is written or the error is raised (EFBIG past the file size limit), never dropped."""
    view = memoryview(data)
    done = 0
    while True:
        written = os.pwrite(fd, view[done:done + WRITE_PIECE], offset + done)
        done += written
        if done >= len(view):
            return
        if written == 0:
            raise OSError(errno.EIO, "a write of a record's data made no progress")


def _setattr_fd(fd: int, r: rec.Setattr) -> None:
    """``layers.apply_setattr`` on an open regular file: size, owner, mode, times."""
    if r.mask & rec.SET_SIZE:
        os.ftruncate(fd, r.size)
    if r.mask & rec.SET_OWNER:
        os.fchown(fd, r.uid, r.gid)
    if r.mask & rec.SET_MODE:
        os.fchmod(fd, r.mode)
    if r.mask & (rec.SET_ATIME | rec.SET_MTIME):
        if r.mask & rec.SET_ATIME and r.mask & rec.SET_MTIME:
            times = (r.atime_ns, r.mtime_ns)
        else:
            st = os.fstat(fd)
            times = (r.atime_ns if r.mask & rec.SET_ATIME else st.st_atime_ns,
                     r.mtime_ns if r.mask & rec.SET_MTIME else st.st_mtime_ns)
        os.utime(fd, ns=times)


def _setattr_dir(fd: int, r: rec.Setattr) -> None:
    """``layers.apply_setattr`` on a directory held by an O_PATH fd (its /proc link: the
    directory itself, never a symlink): owner, mode, times."""
    target = fd_path(fd)
    if r.mask & rec.SET_OWNER:
        os.chown(target, r.uid, r.gid)
    if r.mask & rec.SET_MODE:
        os.chmod(target, r.mode)
    if r.mask & (rec.SET_ATIME | rec.SET_MTIME):
        if r.mask & rec.SET_ATIME and r.mask & rec.SET_MTIME:
            times = (r.atime_ns, r.mtime_ns)
        else:
            st = os.stat(target)
            times = (r.atime_ns if r.mask & rec.SET_ATIME else st.st_atime_ns,
                     r.mtime_ns if r.mask & rec.SET_MTIME else st.st_mtime_ns)
        os.utime(target, ns=times)
