"""Applying journal records to a layer root, idempotently.

Used in two places: crash recovery (re-apply the one metadata record that may
have been in flight when the daemon died, see ``sdeefs.journal``) and replicas
(apply a stream of records to a copy of the user's layer root).  Every rule
here is written so that applying a record twice leaves the same tree as
applying it once (a record that creates an entry finds it there the second time:
it gives it its owner and mode, :func:`settle_existing`); every path goes through
:class:`~sdeefs.layers.LayerRoot`'s ``openat2`` resolution, so a record can never
reach outside the layer root.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import attrs

from . import records as rec
from .journal import Entry, Journal
from .layers import LayerRoot, apply_fallocate, apply_setattr, open_layer_root
from .sysio import fd_path, renameat2
from .writeahead import read_write_data

log = logging.getLogger(__name__)


def apply_record(layers: LayerRoot, record: rec.Record,
                 data: bytes | memoryview | None = None) -> None:
    """Make the effect of ``record`` true in ``layers`` (whose journal should be a NullJournal)."""
    match record:
        case rec.Mkdir(path=p, mode=mode, uid=uid, gid=gid):
            if layers.lstat(p) is None:
                layers.mkdir(p, mode, uid, gid)
            else:
                _settle(layers, p, stat.S_IFDIR | (mode & 0o7777), uid, gid)
        case rec.Mknod(path=p, mode=mode, uid=uid, gid=gid):
            if layers.lstat(p) is None:
                layers.mknod(p, mode, uid, gid)
            elif stat.S_IFMT(mode) in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
                _settle(layers, p, mode, uid, gid)
            elif stat.S_IFMT(mode) == stat.S_IFCHR:  # a whiteout: 0/0, its mode left as made
                _settle(layers, p, stat.S_IFCHR, uid, gid, chmod=False)
        case rec.Mkdev(path=p, mode=mode, rdev=rdev, uid=uid, gid=gid):
            if layers.lstat(p) is None:
                layers.mkdev(p, mode, rdev, uid, gid)
            else:
                _settle(layers, p, mode, uid, gid, rdev)
        case rec.Symlink(path=p, target=target, uid=uid, gid=gid):
            if layers.lstat(p) is None:
                layers.symlink(p, target, uid, gid)
            else:
                _settle(layers, p, stat.S_IFLNK, uid, gid, chmod=False)
        case rec.Link(src=src, dst=dst):
            if layers.lstat(dst) is None and layers.lstat(src) is not None:
                layers.link(src, dst)
        case rec.Unlink(path=p):
            st = layers.lstat(p)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                layers.unlink(p)
        case rec.Rmdir(path=p):
            st = layers.lstat(p)
            if st is not None and stat.S_ISDIR(st.st_mode):
                layers.rmdir(p)
        case rec.Rename(src=src, dst=dst, flags=flags, src_ino=src_ino):
            _apply_rename(layers, src, dst, flags, src_ino)
        case rec.Setattr(path=p):
            if layers.lstat(p) is not None:
                apply_setattr(layers, record)
        case rec.Setxattr(path=p, name=name, value=value):
            if layers.lstat(p) is not None:
                layers.setxattr(p, name, value)
        case rec.Removexattr(path=p, name=name):
            if layers.lstat(p) is not None:
                try:
                    layers.removexattr(p, name)
                except OSError as exc:
                    if exc.errno != errno.ENODATA:
                        raise
        case rec.Fallocate(path=p):
            st = layers.lstat(p)
            if st is not None and stat.S_ISREG(st.st_mode):
                fd = layers.open(p, os.O_WRONLY)
                try:
                    apply_fallocate(fd, record)
                finally:
                    os.close(fd)
        case rec.Write(path=p, offset=offset):
            if data is not None:
                _apply_write(layers, p, offset, data)
        case rec.Create():
            for part, part_data in record.expand():  # what it means (sdeefs.records)
                apply_record(layers, part, part_data)
        case rec.Abort() | rec.Sync() | rec.Done() | rec.Begin() | rec.Commit() | rec.Void():
            pass
        case _:
            raise TypeError(f"no rule to apply {record!r}")


def settle_existing(dir_fd: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
                    chmod: bool = True) -> bool:
    """A record that creates ``name`` in ``dir_fd`` finds an entry there: if it is of the
    record's kind (file type of ``mode``; a device's also its ``rdev``), give it the
    record's owner and (with ``chmod``) permission bits, and return True; another kind
    is left as it is (False), as it always was.

    Why: creating an entry and setting its owner and mode are separate syscalls (as root,
    the entry is made root's, with the mode less the umask).  A crash between them leaves
    the entry, and the record comes again (a replica's replay from its position, the
    login node's recovery of the record in flight): skipping it because the entry exists
    would leave, say, a 0600 file the job cannot read.  The rest of what the first
    attempt may have missed is the following records' (a ``Create``'s data, size and
    times: its expansion), which come again with it.  What is looked at is what is
    changed: the entry is held by an O_PATH fd (opens nothing, follows no symlink) and
    changed through its /proc link, a symlink by name (lchown); chmod after chown, which
    clears set-ID bits."""
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        kind = stat.S_IFMT(mode)
        if stat.S_IFMT(st.st_mode) != kind \
                or kind in (stat.S_IFCHR, stat.S_IFBLK) and st.st_rdev != rdev:
            return False
        if kind == stat.S_IFLNK:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            return True
        target = fd_path(fd)
        os.chown(target, uid, gid)
        if chmod:
            os.chmod(target, mode & 0o7777)
        return True
    finally:
        os.close(fd)


def _settle(layers: LayerRoot, path: bytes, mode: int, uid: int, gid: int, rdev: int = 0,
            chmod: bool = True) -> None:
    """:func:`settle_existing` of the entry ``path`` (not the layer directories
    themselves: no record creates them)."""
    fd, name = layers.parent_fd(path)
    try:
        if name:
            settle_existing(fd, name, mode, uid, gid, rdev, chmod)
    finally:
        os.close(fd)


def _apply_rename(layers: LayerRoot, src: bytes, dst: bytes, flags: int, src_ino: int) -> None:
    dst_st = layers.lstat(dst)
    if src_ino and dst_st is not None and dst_st.st_ino == src_ino:
        return  # already done (inode numbers are those of this layer root's filesystem)
    src_st = layers.lstat(src)
    if src_st is None:
        return
    sfd, sname = layers.parent_fd(src)
    try:
        dfd, dname = layers.parent_fd(dst)
        try:
            renameat2(sfd, sname, dfd, dname, flags)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _apply_write(layers: LayerRoot, path: bytes, offset: int, data: bytes | memoryview) -> None:
    st = layers.lstat(path)
    if st is None or not stat.S_ISREG(st.st_mode):
        return  # the file is gone by now; a later record removes or replaces it
    fd = layers.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _last_metadata(journal: Journal) -> tuple[int, rec.Record | None, list[rec.Record]]:
    """(seq, record) of the last metadata record, and every record after it.

    Segments are read from the newest backwards until one holds a metadata record
    (worker threads may have started a new segment with Write records after it).
    """
    segments = journal.segments()
    for first, _ in reversed(segments):
        entries = list(journal.read(first))
        for index in range(len(entries) - 1, -1, -1):
            if entries[index].record.METADATA:
                later = [e.record for e in entries[index + 1:]]
                return entries[index].seq, entries[index].record, later
    return 0, None, []


def recover(journal: Journal, upper: bytes, work: bytes) -> int | None:
    """Settle the one metadata record that may have been in flight when the daemon died.

    A record followed by its Done or Abort is settled.  Otherwise it is re-applied
    idempotently and marked Done; a Setattr that later Write records to the same
    file prove done is only marked (re-applying a truncation would cut off those
    writes); a record that cannot be re-applied is marked Abort.  Returns its seq.
    """
    seq, last, later = _last_metadata(journal)
    if last is None or any(isinstance(r, rec.Done | rec.Abort) and r.seq == seq for r in later):
        return None
    if any(isinstance(r, rec.Commit | rec.Void) for r in later):
        return None  # a capture batch (sdeefs.fs.capture): settled by its Commit or Void
    path = getattr(last, "path", None)
    if isinstance(last, rec.Setattr) and any(
            isinstance(r, rec.Write) and r.path == path for r in later):
        journal.append(rec.Done(seq))
        journal.sync()
        return seq
    layers = open_layer_root(upper, work)
    try:
        apply_record(layers, last)
    except OSError as exc:
        # The operation cannot be completed now (it would have failed): record that.
        log.warning("recovery: record %d could not be re-applied (%s); aborting it", seq, exc)
        journal.append(rec.Abort(seq))
    else:
        journal.append(rec.Done(seq))
    finally:
        layers.close()
    journal.sync()
    return seq


def voided(entries: list[Entry]) -> list[tuple[int, int]]:
    """The (begin, end) seq ranges of capture batches that did not take effect."""
    return [(e.record.begin, e.record.end) for e in entries if isinstance(e.record, rec.Void)]


def replay(journal: Journal, source: LayerRoot, target: LayerRoot, from_seq: int = 1) -> int:
    """Apply every record from ``from_seq`` that took effect to ``target``; return the last seq.

    Skipped: records an Abort names and the batches a Void names (``sdeefs.records``).
    A batch still open at the head (no Commit yet) is applied: the upper holds its
    effect already, and ``sdeefs check`` runs after a drain.
    """
    entries = list(journal.read(from_seq))
    aborted = {e.record.seq for e in entries if isinstance(e.record, rec.Abort)}
    void = voided(entries)
    last = from_seq - 1
    for entry in entries:
        last = entry.seq
        if entry.seq in aborted or any(b <= entry.seq <= e for b, e in void):
            continue
        record = entry.record
        data = read_write_data(source, record) if isinstance(record, rec.Write) else None
        if isinstance(record, rec.Rename):
            # src_ino is an inode number of the source's filesystem: in the target, an
            # entry at dst with that number is a coincidence (``sdeefs check`` replays
            # next to the upper, where freed numbers come back), not a rename already done.
            record = attrs.evolve(record, src_ino=0)
        apply_record(target, record, data)
    return last
