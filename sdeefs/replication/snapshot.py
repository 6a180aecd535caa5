"""Snapshots: a whole upper as records, and the digest that verifies the copy they build.

When an upstream no longer holds the records a replica needs (the login node's journal
was trimmed below it, a relay's buffer moved on, the history is new), it sends the
tree instead: SNAPSHOT frames whose records (Mkdir, Mknod, Symlink, Link, Write,
Setxattr, Setattr) rebuild it in an empty layer root, all with the seq of the state they
show, then SNAPSHOT_END with the digest of what was read.  The replica applies them into
a staging directory beside its copy (:class:`Staging`), compares the digest of what it
built with the one it was sent, and only then swaps the staged tree in
(``replica.Replica.finish_snapshot``).  A snapshot that does not match changes nothing.

The digest (:func:`tree_digest`) covers what a replica must reproduce: every entry's
type, mode (set-ID bits aside: replicas strip them), owner, size, link count, content,
symlink target and replicated xattrs; not times nor inode numbers.  Trees are walked by
directory fds (``sdeefs.trees``), so a tree deeper than PATH_MAX is read whole and a
symlink planted in it is never followed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import stat
import struct
from collections.abc import Iterator

import attrs

from .. import records as rec
from ..apply import apply_record
from ..layers import LayerRoot, open_layer_root
from ..replicable import CAPABILITY, CARRIED_XATTR_PREFIXES, UserIds, refusal
from ..trees import rmtree, walk
from .wire import (
    CHUNK,
    SNAPSHOT,
    Frame,
    ProtocolError,
    Refused,
    decode_record_payload,
    encode_record_payload,
    record_frames,
)

log = logging.getLogger(__name__)

KEY_LENGTH = struct.Struct("<I")  # before each entry's key in the digest
# What a snapshot may hold: records that build a tree, none that change one.
SNAPSHOT_RECORDS = (rec.Mkdir, rec.Mknod, rec.Mkdev, rec.Symlink, rec.Link, rec.Setattr,
                    rec.Setxattr, rec.Write)


def _allowed_xattrs(dir_fd: int, name: str, ids: UserIds | None
                    ) -> list[tuple[bytes, bytes]]:
    """The xattrs a replica carries (``sdeefs.replicable``) for the user of ``ids``
    (None: every file capability, whatever its rootid: a digest of a tree as it is)."""
    path = f"/proc/self/fd/{dir_fd}/{name}" if name else f"/proc/self/fd/{dir_fd}"
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    found = []
    for xname in sorted(names):
        raw = xname.encode()
        if not raw.startswith(CARRIED_XATTR_PREFIXES) and raw != CAPABILITY:
            continue
        with contextlib.suppress(OSError):
            value = os.getxattr(path, xname, follow_symlinks=False)
            if ids is None or refusal(rec.Setxattr(b"upper", raw, value), ids) is None:
                found.append((raw, value))
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

    def root_key(self) -> bytes:
        """The tree root's key: its xattrs only.  Its mode and owner are set by whoever
        made it (the launcher at login, the replica daemon)."""
        return repr((b"", self.xattrs)).encode()


def walk_tree(root_fd: int, ids: UserIds | None = None
              ) -> Iterator[tuple[TreeEntry, int, str]]:
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
        xattrs = tuple(_allowed_xattrs(visit.dir_fd, name, ids)) \
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


def _content_hash(dir_fd: int, name: str) -> bytes:
    h = hashlib.sha256()
    for chunk in _read_regular(dir_fd, name):
        h.update(chunk)
    return h.digest()


def _digest_of(keys: list[bytes]) -> bytes:
    h = hashlib.sha256()
    for key in sorted(keys):
        h.update(KEY_LENGTH.pack(len(key)) + key)
    return h.digest()


def tree_digest(root: str) -> bytes:
    """SHA-256 over every entry below a tree's root (see the module docstring).  Equal
    digests: equal trees."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        keys = []
        for entry, dir_fd, name in walk_tree(root_fd):
            if not entry.path:
                keys.append(entry.root_key())
                continue
            content = _content_hash(dir_fd, name) if stat.S_ISREG(entry.st.st_mode) else b""
            keys.append(entry.key(content))
    finally:
        os.close(root_fd)
    return _digest_of(keys)


def snapshot_frames(upper: str, seq: int, digest_out: list[bytes],
                    ids: UserIds | None = None) -> Iterator[Frame]:
    """The upper as SNAPSHOT frames (records that rebuild it in an empty layer root).

    ``ids``: the user's (``sdeefs.replicable``): a file capability no replica carries
    is left out of the snapshot and of its digest (None: all are sent).

    The digest of what was sent (the same function as ``tree_digest``) is appended
    to ``digest_out`` when the walk ends, for the SNAPSHOT_END frame.
    """
    root_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    keys: list[bytes] = []
    first_link: dict[tuple[int, int], bytes] = {}
    dirs: list[TreeEntry] = []
    try:
        for entry, dir_fd, name in walk_tree(root_fd, ids):
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
                content = _content_hash(dir_fd, name)
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
            else:  # a device node (records.Mkdev; inert: replicas are read through nodev)
                yield from record_frames(seq, rec.Mkdev(path, kind | perm, st.st_rdev,
                                                        st.st_uid, st.st_gid), None, SNAPSHOT)
            if kind not in (stat.S_IFDIR, stat.S_IFLNK):
                yield from record_frames(seq, _times(path, st, rec.SET_MODE | rec.SET_OWNER),
                                         None, SNAPSHOT)
            # after the owner: a chown removes a file capability (as the kernel does)
            for xname, value in entry.xattrs:
                yield from record_frames(seq, rec.Setxattr(path, xname, value), None, SNAPSHOT)
            keys.append(entry.key(content) if entry.path else entry.root_key())
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


# What applying a record can fail with that may pass by itself (a full disk, a file a job
# is executing): the link retries it.  Any other error will be the same next time (the
# record does not fit this copy): the record is refused (Refused), never retried forever.
TRANSIENT_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENOMEM,
                              errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.EINTR,
                              errno.EBUSY, errno.ETXTBSY, errno.EROFS))


def apply_from_peer(layers: LayerRoot, record: rec.Record, data: bytes | memoryview, what: str,
                    ids: UserIds) -> None:
    """Apply a record a peer sent (decoded and sanitized) if ``sdeefs.replicable`` carries
    it for the user of ``ids``.  Refused (naming it as ``what``) for a record refused or
    that this copy cannot apply; ProtocolError for a failure that may pass (retry).

    A ``Create`` is applied as the records it means (``records.Create.expand``), each
    judged by itself as if it had come alone: the parts that are carried are applied,
    and the record is Refused (the replica notes the skip) if any part was not."""
    if isinstance(record, rec.Create):
        reasons = []
        for part, part_data in record.expand():
            try:
                apply_from_peer(layers, part, part_data or b"", what, ids)
            except Refused as exc:
                reasons.append(str(exc))
        if reasons:
            raise Refused("; ".join(reasons))
        return
    reason = refusal(record, ids)
    if reason is not None:
        raise Refused(f"{what} refused: {reason}")
    try:
        apply_record(layers, record, data if isinstance(record, rec.Write) else None)
    except OSError as exc:
        if exc.errno in TRANSIENT_ERRNOS:
            raise ProtocolError(f"{what} cannot be applied now: {exc}") from None
        raise Refused(f"{what} cannot be applied: {exc}") from None


@attrs.define(eq=False)
class Staging:
    """A snapshot being received: an empty layer root (``path``: ``upper/``, ``work/``)
    the SNAPSHOT frames of ``seq`` are applied into, until it is verified."""

    path: str
    seq: int
    layers: LayerRoot
    ids: UserIds

    @classmethod
    def begin(cls, path: str, seq: int, ids: UserIds) -> Staging:
        """An empty staging tree at ``path`` (whatever an earlier attempt left is removed)."""
        rmtree(path)
        os.mkdir(path, 0o700)
        for sub in ("upper", "work"):
            os.mkdir(os.path.join(path, sub), 0o755)
        layers = open_layer_root(os.path.join(path, "upper"), os.path.join(path, "work"))
        return cls(path, seq, layers, ids)

    def apply(self, frame: Frame) -> None:
        """Apply one SNAPSHOT frame; ProtocolError for a record no snapshot holds."""
        record, data = decode_record_payload(frame.payload)
        if not isinstance(record, SNAPSHOT_RECORDS):
            raise ProtocolError(f"{type(record).__name__} has no place in a snapshot")
        apply_from_peer(self.layers, record, data, "snapshot record", self.ids)

    def close(self) -> None:
        self.layers.close()

    def verify(self, digest: bytes) -> None:
        """Close the staged tree and compare it with ``digest``: if it differs, remove it
        and raise ProtocolError."""
        self.close()
        if not hmac.compare_digest(tree_digest(os.path.join(self.path, "upper")), digest):
            with contextlib.suppress(OSError):
                rmtree(self.path)
            raise ProtocolError("snapshot does not match its digest; discarded")
