"""Journal record types and their pinned binary payloads.

Every record is an operation on a *layer root* (``upper/`` + ``work/``; see
``sdeefs.journal``).  Payloads are a fixed sequence of fields per type, encoded
little endian with no padding.  The encoding has a version: the journal segment
(``sdeefs.journal``) or the replication frame (``sdeefs.replication.wire``) that holds
a record says which one.  Version 3 is written; versions 1 and 2 are still read.

===========  ==============================================================
field kind   encoding (versions 2 and 3)
===========  ==============================================================
``path``     u32 length + bytes: relative, no NUL, no empty/``.``/``..``
             component, no component over 255 bytes, first component
             ``upper`` or ``work``, at most MAX_PATH (65536) bytes
``name``     u16 length + bytes (xattr names; ≤ 255 bytes, no NUL)
``blob``     u32 length + bytes (symlink targets ≤ 4096, xattr values ≤ 64 KiB,
             file handles ≤ 136, a Create's xattr list and data ≤ 64 KiB)
``u32``      4 bytes unsigned
``u64``      8 bytes unsigned
``i64``      8 bytes signed
===========  ==============================================================

Version 3 is version 2 plus record type 21 (``Create``); a payload of type 21 in a
version-1 or version-2 segment or frame is refused (BadRecord), and a Create cannot be
encoded in them.  So a reader of version 2 (an older sdeefs) refuses a newer journal
by its segment version, with one clear error, instead of stopping at the first
Create as an unknown record type.

Version 1 (journals written before long paths were carried) differs only in
``path``: a u16 length and at most 4096 bytes.  That cap was below what the
daemon accepted (a view path of 4094 bytes is ``upper/`` + 4094 in a record),
so a legal rename bricked the journal; and a tree is deeper than PATH_MAX
wherever kernel overlayfs allows it.  A record names a whole layer path because
replicas and replay resolve it from the layer root, so the cap bounds the depth
of a tree: MAX_PATH is 16 × PATH_MAX, room for 256 levels of 255-byte names or
32768 of 1-byte ones.  It is not larger because (a) two paths plus fixed fields
and an xattr value plus a path must fit a journal frame (``journal.MAX_PAYLOAD``,
1 MiB) and a path plus a data chunk a replication frame, and (b) the daemon's
node table keeps a full path per inode the kernel holds, which grows with the
square of the depth (a chain of 1-byte names at the cap costs about 1 GiB).
The daemon refuses, with ENAMETOOLONG and before anything is journaled, every
operation whose records would exceed it: a new name too deep, or a directory
moved where its subtree would be (``cow.CowFS.check_rename``); and the journal
appends only records that ``check_record`` passes, the same checks as decoding.
So whatever the daemon accepted, its journal, replay and every replica accept too.

Decoding is strict because records also arrive from replica peers: any
trailing byte, out-of-range length, unsafe path or forbidden file type raises
:class:`~sdeefs.errors.BadRecord` and nothing is applied.

=====  ==============  ==========================================================
type   record          fields
=====  ==============  ==========================================================
1      Mkdir           path, mode u32, uid u32, gid u32
2      Mknod           path, mode u32 (S_IFREG/S_IFIFO/S_IFSOCK, or S_IFCHR
                       with rdev 0 = whiteout), uid u32, gid u32
3      Symlink         path, target blob, uid u32, gid u32
4      Link            src path, dst path
5      Unlink          path
6      Rmdir           path
7      Rename          src path, dst path, flags u32 (renameat2), src_ino u64
8      Setattr         path, mask u32, mode u32, uid u32, gid u32, size u64,
                       atime_ns i64, mtime_ns i64 (size < 2^63 with SET_SIZE)
9      Setxattr        path, name, value blob
10     Removexattr     path, name
11     Write           path, handle blob, offset u64, length u64
12     Abort           seq u64 (the record that did not take effect)
13     Sync            reason u32 (a durable commit point; informational)
14     Done            seq u64 (the metadata record that took effect)
15     Begin           scan u32 (1: the batch is a full scan of the upper)
16     Commit          begin u64 (the seq of the Begin whose batch took effect)
17     Void            begin u64, end u64 (the batch from ``begin`` up to ``end`` did
                       not take effect: replay and replicas skip those seqs)
18     Extent          path, handle blob, offset u64, length u64, size u64,
                       sums blob (a Write that says what the capture read, below)
19     Fallocate       path, mode u32 (fallocate(2) flags), offset u64, length u64
20     Mkdev           path, mode u32 (S_IFCHR or S_IFBLK), rdev u64, uid u32, gid u32
21     Create          path, mode u32 (S_IFREG | permission bits), uid u32, gid u32,
                       mtime_ns i64, handle blob, xattrs blob (the list below),
                       data blob (the whole file, ≤ ``MAX_INLINE``); version 3 only
22     StableExtent    path, handle blob, offset u64, length u64, size u64,
                       sums blob, ctime_ns i64 (an Extent with a witness, below);
                       version 3 only
23     Extent3         the fields of Extent; its sums are BLAKE3's (below);
                       version 3 only
24     StableExtent3   the fields of StableExtent; its sums are BLAKE3's (below);
                       version 3 only
=====  ==============  ==========================================================

``Create`` (type 21, encoding version 3) is a new regular file made whole in one
record: what the capture journaled before as ``Mknod``, a ``Setxattr`` per xattr, the
data (an ``Extent``) and ``Setattr(SET_SIZE|SET_MTIME)``, for a file whose name is
new and whose contents fit ``MAX_INLINE`` (64 KiB: one ``EXTENT_BLOCK``), which is
most files an install makes.  It *means* exactly those records in that order
(:meth:`Create.expand`): ``Mknod(path, mode, uid, gid)``; ``Setxattr(path, name,
value)`` for each xattr; ``Write(path, handle, 0, len(data))`` carrying ``data``;
``Setattr(path, SET_SIZE|SET_MTIME, mode & 0o7777, uid, gid, len(data), 0,
mtime_ns)``; every reader (replay and ``sdeefs check``, the capture's model, replicas
and their door, ``sdeefs.replicable``) applies or judges it as those records, so
it cannot mean anything they did not already accept.  Unlike an ``Extent`` its data
is *by value*: the bytes the capture read (not the live upper's when shipped), so no
shipper waits on it and a replica holds what the capture saw; a later change of the
file has its own later records, as ever.  The xattrs blob::

    repeated: name (u16 length + bytes, 1-255, no NUL), value (u32 length + bytes)
    names strictly increasing (sorted bytewise, no duplicate); the whole blob ≤ 64 KiB

Decoding checks all of it (and ``mode``, ``handle`` ≤ MAX_HANDLE, ``data`` ≤
MAX_INLINE) once, at the door (``decode_record``, ``check_record``); what is decoded
is never checked again.

``Fallocate`` (type 19, added with fallocate support; journals without it read as
before, a reader that predates it refuses it as an unknown type) is fallocate(2) of
the named regular file: ``mode`` is 0 (allocate, the size grows to cover the range),
``KEEP_SIZE`` (allocate past the end, the size stays), ``PUNCH_HOLE|KEEP_SIZE``
(the range reads as zeros, its blocks are freed) or ``ZERO_RANGE`` with or without
``KEEP_SIZE`` (the range reads as zeros).  It is a metadata record, not a Write:
journaled first, performed, then Done (or Abort), and re-applied by recovery like
any other, because replaying it is not harmless the way shipping a Write's live
bytes is (a punch the upper never got would zero the replica's data).  The daemon
holds the range's write lock from the record to the Done (``sdeefs.writeahead``), so
no Write record of that range can come between them and re-applying it never undoes
a later write.  Applying it where the filesystem lacks the mode writes the zeros or
extends the size instead: the same bytes, only not sparse.  It carries no data: a
1 GiB preallocation ships as one small record.

``Mkdev`` (type 20, added with device nodes; read as Fallocate is above) is a device
node: what host root may make in a view it mounted by hand (a user environment cannot:
the kernel refuses mknod of a device in a user namespace, EPERM, before the daemon
sees it).  A character device 0/0 is a whiteout and stays a ``Mknod``, so ``Mkdev``
refuses it.  Device nodes are inert wherever sdeefs shows them: every view is mounted
``nodev`` (or by a user namespace, which the kernel makes nodev), and a replica's
layer root is root's 0700 directory, read only through such mounts.

Types 15-18 come from the kernel engine's capture daemon (``sdeefs.fs.capture``),
which does not journal operations ahead of them but reconciles what the kernel
already did into *batches*: ``Begin``, records, ``Commit(begin)``.  A batch takes
effect as a whole: a reader ships or applies its records only once the Commit is
in the journal.  A batch cut off by a crash is closed at the next start by
``Void(begin, end)`` (the journal is never truncated: a reader may hold those
records), and every reader skips the seqs it names, as it skips Aborted records.
Any writer that starts on a journal first voids a dangling batch
(``sdeefs.fs.capture.void_dangling``).

``Extent`` is a ``Write`` (data by reference: the bytes are read from the live
upper when shipped, and applying it is applying a Write) that also says what the
capture read: ``size``, the file's size then, and ``sums``, the block sums
(``sdeefs.blocksums``; BLAKE2b-128 in types 18 and 22, BLAKE3-128 in 23 and 24) of each
``EXTENT_BLOCK`` block of the range (the last one ends at the range's end).
An Extent of length 0 says only "the file's data changed; its size was ``size``".
Why the sums: the capture compares blocks with what it read before and journals
only those that differ, so a block that changed after the capture read it and
changed back before the next scan has no later record.  A shipper that read the
block in between would leave the replica holding bytes the upper no longer has.
So a shipper that finds a block whose hash differs from its sum must not let a
replica settle on those bytes unless a later committed Extent of the same handle
covers that block (or has a ``size`` at or below its start), or the handle no
longer opens; otherwise it waits for the capture's next Commit and reads again.

``StableExtent`` (type 22; added with it, as ``Fallocate`` was: journals without it
read as before, and only the login node's journal holds one: a shipper sends it as
the ``Extent`` it also is) is an ``Extent`` plus a *witness*, ``ctime_ns``: the
file's ctime when the capture read the range, the same before and after the read
and at least a tick of the kernel's file-time clock older than that clock when the
capture's batch began (``sdeefs.fs.reconcile.FILE_TIME_TICK``), so older than the
read: any change made since the read began has given the file a later ctime.  It
proves, without hashing a byte, that the bytes a shipper reads now are those the
sums were made of, if both hold:

1. when the shipper starts reading, nobody has the file open for writing: a read
   lease can be taken on it (``fcntl(F_SETLEASE, F_RDLCK)``, released at once), so
   no writable mapping exists either, and a mapping made later changes the ctime at
   its first write fault, as ``write(2)``, ``truncate`` and ``fallocate`` do;
2. after reading, ``fstat`` of the same open file gives ``ctime_ns`` unchanged, the
   inode is the handle's and the read was whole.

Otherwise (a writer, a changed ctime, no lease) the sums decide, as for an Extent.
The capture trusts an unchanged ctime the same way for its full scans
(``sdeefs.fs.reconcile``); the witness saves a shipper hashing every byte it sends
(a cold stream of a 1 GiB install: about a GiB of hashing).  ``ctime_ns`` is never
0 (an Extent without a witness is an ``Extent``).

``Extent3`` and ``StableExtent3`` (types 23 and 24; added with BLAKE3 sums, as
``StableExtent`` was: journals without them read as before) are ``Extent`` and
``StableExtent`` with sums made by BLAKE3 (``sdeefs.blocksums.BLAKE3``) instead of
BLAKE2b (``BLAKE2B``), about five times cheaper for the capture, which sums every byte
a user writes.  The capture writes only them now; types 18 and 22 are still read, and
their sums checked with BLAKE2b, from journals written before.  Every record type says
which function made its sums (``Extent.SUMS``): a sum checked with another function
would differ for every block, and a shipper would wait forever for a later Extent that
never comes.  The rule and the witness are the same for all four types.

What a replica is sent of any of them is a type-18 ``Extent`` (``Extent.shipped``): no
replica, relay or replay reads sums (applying an Extent is applying a Write), a
StableExtent's witness stays on the login node, and a BLAKE3 type's sums are left off
(b""): type 18's sums are BLAKE2b's, so a record on the wire never says what it does
not hold, and nodes of the same replication protocol (``sdeefs.replication.wire``)
need not know types 23 and 24.
"""

from __future__ import annotations

import re
import stat
import struct
from collections.abc import Callable
from typing import ClassVar

import attrs

from . import blocksums
from .errors import BadRecord, PathTooLong

RECORD_VERSION = 3  # the encoding written (journal segments and replication frames)
VERSIONS = (1, 2, 3)  # the encodings read
MAX_PATH = 1 << 16  # bytes of a path field (version 2); see the docstring for the choice
MAX_PATH_V1 = 4096  # bytes of a path field in version 1
MAX_TARGET = 4096  # bytes of a symlink target (the kernel's PATH_MAX)
MAX_NAME = 255
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 65536
MAX_HANDLE = 136
LAYER_DIRS = (b"upper", b"work")

# Setattr.mask bits
SET_MODE = 1
SET_OWNER = 2
SET_SIZE = 4
SET_ATIME = 8
SET_MTIME = 16
SET_ALL = SET_MODE | SET_OWNER | SET_SIZE | SET_ATIME | SET_MTIME

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")
_PATH_LENGTH = {1: _U16, 2: _U32, 3: _U32}  # the length prefix of a path field, per version
_PATH_LIMIT = {1: MAX_PATH_V1, 2: MAX_PATH, 3: MAX_PATH}
CREATE_VERSION = 3  # the first encoding with record type 21 (Create)
# A safe layer path in one C-speed match (checked on every append, Write records included):
# a layer directory, then components of 1-255 bytes without "/" or NUL that are not . or ..
_SAFE_PATH = re.compile(rb"(?:upper|work)(?:/(?!\.\.?(?:/|\Z))[^/\x00]{1,255})*")


def check_path(path: bytes, limit: int = MAX_PATH) -> bytes:
    """Validate a layer-root-relative path; return it or raise BadRecord.

    PathTooLong (a BadRecord) if it is longer than ``limit`` bytes.
    """
    if len(path) > limit:
        raise PathTooLong(f"path of {len(path)} bytes (at most {limit}): {path[:64]!r}...")
    if _SAFE_PATH.fullmatch(path):
        return path
    if not path or b"\0" in path:
        raise BadRecord(f"empty path or NUL byte in {path[:64]!r}")
    if path.split(b"/")[0] not in LAYER_DIRS:
        raise BadRecord(f"path {path[:64]!r} is outside the layer root")
    raise BadRecord(f"unsafe component in path {path[:64]!r}")


class Record:
    """Base of all record types; subclasses are frozen attrs classes with FIELDS."""

    TYPE: ClassVar[int]
    FIELDS: ClassVar[tuple[tuple[str, str], ...]]
    METADATA: ClassVar[bool] = True  # changes the namespace or inode metadata

    def validate(self) -> None:
        """Type-specific checks beyond field encoding (hook for subclasses)."""


@attrs.frozen
class Mkdir(Record):
    TYPE = 1
    FIELDS = (("path", "path"), ("mode", "u32"), ("uid", "u32"), ("gid", "u32"))
    path: bytes
    mode: int
    uid: int
    gid: int


@attrs.frozen
class Mknod(Record):
    TYPE = 2
    FIELDS = (("path", "path"), ("mode", "u32"), ("uid", "u32"), ("gid", "u32"))
    path: bytes
    mode: int
    uid: int
    gid: int

    def validate(self) -> None:
        kind = stat.S_IFMT(self.mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR):
            raise BadRecord(f"mknod of file type {kind:o} is refused (device nodes are)")

    @property
    def is_whiteout(self) -> bool:
        return stat.S_ISCHR(self.mode)


@attrs.frozen
class Symlink(Record):
    TYPE = 3
    FIELDS = (("path", "path"), ("target", "blob"), ("uid", "u32"), ("gid", "u32"))
    path: bytes
    target: bytes
    uid: int
    gid: int

    def validate(self) -> None:
        if not self.target or len(self.target) > MAX_TARGET or b"\0" in self.target:
            raise BadRecord("bad symlink target")


@attrs.frozen
class Link(Record):
    TYPE = 4
    FIELDS = (("src", "path"), ("dst", "path"))
    src: bytes
    dst: bytes


@attrs.frozen
class Unlink(Record):
    TYPE = 5
    FIELDS = (("path", "path"),)
    path: bytes


@attrs.frozen
class Rmdir(Record):
    TYPE = 6
    FIELDS = (("path", "path"),)
    path: bytes


@attrs.frozen
class Rename(Record):
    TYPE = 7
    FIELDS = (("src", "path"), ("dst", "path"), ("flags", "u32"), ("src_ino", "u64"))
    src: bytes
    dst: bytes
    flags: int
    src_ino: int

    def validate(self) -> None:
        noreplace, exchange, whiteout = self.flags & 1, self.flags & 2, self.flags & 4
        if self.flags & ~7 or (exchange and (noreplace or whiteout)):
            raise BadRecord(f"invalid rename flags {self.flags:#x}")


@attrs.frozen
class Setattr(Record):
    TYPE = 8
    FIELDS = (
        ("path", "path"), ("mask", "u32"), ("mode", "u32"), ("uid", "u32"), ("gid", "u32"),
        ("size", "u64"), ("atime_ns", "i64"), ("mtime_ns", "i64"),
    )
    path: bytes
    mask: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0

    def validate(self) -> None:
        if self.mask & ~SET_ALL or self.mode & ~0o7777:
            raise BadRecord("invalid setattr mask or mode")
        if self.mask & SET_SIZE and self.size >= 1 << 63:  # past off_t: no file is that long
            raise BadRecord("setattr size past 2^63 - 1")


@attrs.frozen
class Setxattr(Record):
    TYPE = 9
    FIELDS = (("path", "path"), ("name", "name"), ("value", "blob"))
    path: bytes
    name: bytes
    value: bytes

    def validate(self) -> None:
        if len(self.value) > MAX_XATTR_VALUE:
            raise BadRecord("xattr value too long")


@attrs.frozen
class Removexattr(Record):
    TYPE = 10
    FIELDS = (("path", "path"), ("name", "name"))
    path: bytes
    name: bytes


@attrs.frozen
class Write(Record):
    TYPE = 11
    FIELDS = (("path", "path"), ("handle", "blob"), ("offset", "u64"), ("length", "u64"))
    METADATA = False
    path: bytes
    handle: bytes
    offset: int
    length: int

    def validate(self) -> None:
        if len(self.handle) > MAX_HANDLE or self.offset + self.length >= 1 << 62:
            raise BadRecord("bad write handle or range")


@attrs.frozen
class Abort(Record):
    TYPE = 12
    FIELDS = (("seq", "u64"),)
    METADATA = False
    seq: int


@attrs.frozen
class Sync(Record):
    TYPE = 13
    FIELDS = (("reason", "u32"),)
    METADATA = False
    reason: int


@attrs.frozen
class Done(Record):
    TYPE = 14
    FIELDS = (("seq", "u64"),)
    METADATA = False
    seq: int


@attrs.frozen
class Begin(Record):
    TYPE = 15
    FIELDS = (("scan", "u32"),)
    METADATA = False
    scan: int


@attrs.frozen
class Commit(Record):
    TYPE = 16
    FIELDS = (("begin", "u64"),)
    METADATA = False
    begin: int


@attrs.frozen
class Void(Record):
    TYPE = 17
    FIELDS = (("begin", "u64"), ("end", "u64"))
    METADATA = False
    begin: int
    end: int

    def validate(self) -> None:
        if not 0 < self.begin <= self.end:
            raise BadRecord("a void names an empty range")


# fallocate(2) flags (linux/falloc.h) and the modes a Fallocate record may carry
FALLOC_KEEP_SIZE = 0x01
FALLOC_PUNCH_HOLE = 0x02
FALLOC_ZERO_RANGE = 0x10
FALLOCATE_MODES = (0, FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE,
                   FALLOC_ZERO_RANGE, FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE)


@attrs.frozen
class Fallocate(Record):
    TYPE = 19
    FIELDS = (("path", "path"), ("mode", "u32"), ("offset", "u64"), ("length", "u64"))
    path: bytes
    mode: int
    offset: int
    length: int

    def validate(self) -> None:
        if self.mode not in FALLOCATE_MODES or not self.length or \
                self.offset + self.length >= 1 << 62:
            raise BadRecord(f"bad fallocate mode {self.mode:#x} or range")


@attrs.frozen
class Mkdev(Record):
    TYPE = 20
    FIELDS = (("path", "path"), ("mode", "u32"), ("rdev", "u64"), ("uid", "u32"),
              ("gid", "u32"))
    path: bytes
    mode: int
    rdev: int
    uid: int
    gid: int

    def validate(self) -> None:
        kind = stat.S_IFMT(self.mode)
        if kind not in (stat.S_IFCHR, stat.S_IFBLK) or self.mode & ~(kind | 0o7777):
            raise BadRecord(f"mkdev of file type {kind:o}")
        if kind == stat.S_IFCHR and self.rdev == 0:
            raise BadRecord("a character device 0/0 is a whiteout (Mknod)")


EXTENT_BLOCK = 1 << 16  # bytes per sum of an Extent
SUM_SIZE = 16  # bytes of a block sum (``sdeefs.blocksums``)
assert (EXTENT_BLOCK, SUM_SIZE) == (blocksums.BLOCK, blocksums.SUM_SIZE)
MAX_SUMS = 4096  # sums in one Extent (its blob stays within MAX_XATTR_VALUE)


@attrs.frozen
class Extent(Write):
    TYPE = 18
    # (mypy took Write's FIELDS for a tuple of exactly four pairs)
    FIELDS = Write.FIELDS + (("size", "u64"), ("sums", "blob"))  # type: ignore[assignment]
    SUMS: ClassVar[blocksums.Algorithm] = blocksums.BLAKE2B  # the function of ``sums``
    size: int
    sums: bytes

    def validate(self) -> None:
        super().validate()
        # The sums are not tied to ``length``: replication cuts a record's data into
        # chunks of one seq, each carrying the record with a narrower range.
        if len(self.sums) % SUM_SIZE or len(self.sums) > SUM_SIZE * MAX_SUMS \
                or self.offset % EXTENT_BLOCK:
            raise BadRecord("bad extent sums or offset")

    def shipped(self) -> Extent:
        """What a replica is sent of this record (the docstring says why): a type-18
        Extent, with this one's sums only if they are BLAKE2b's."""
        if type(self) is Extent:
            return self
        sums = self.sums if self.SUMS == blocksums.BLAKE2B else b""
        return Extent(self.path, self.handle, self.offset, self.length, self.size, sums)


@attrs.frozen
class StableExtent(Extent):
    """An Extent with the capture's witness (type 22; the docstring says what it proves)."""

    TYPE = 22
    FIELDS = Extent.FIELDS + (("ctime_ns", "i64"),)  # type: ignore[assignment]
    ctime_ns: int  # the file's ctime while the capture read it; > 0

    def validate(self) -> None:
        super().validate()
        if self.ctime_ns <= 0:
            raise BadRecord("bad extent witness")


@attrs.frozen
class Extent3(Extent):
    """An Extent whose sums are BLAKE3's (type 23; the docstring says why)."""

    TYPE = 23
    SUMS = blocksums.BLAKE3


@attrs.frozen
class StableExtent3(StableExtent):
    """A StableExtent whose sums are BLAKE3's (type 24)."""

    TYPE = 24
    SUMS = blocksums.BLAKE3


MAX_INLINE = EXTENT_BLOCK  # bytes of data a Create carries (its data blob)
MAX_XATTR_LIST = MAX_XATTR_VALUE  # bytes of a Create's xattr list (its xattrs blob)
_NAME_LENGTH = _U16
_VALUE_LENGTH = _U32


def encode_xattr_list(pairs: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """A Create's xattrs blob (the docstring's list) of ``pairs``, sorted by name."""
    return b"".join(_NAME_LENGTH.pack(len(n)) + n + _VALUE_LENGTH.pack(len(v)) + v
                    for n, v in sorted(pairs))


def decode_xattr_list(blob: bytes) -> tuple[tuple[bytes, bytes], ...]:
    """The (name, value) pairs of a Create's xattrs blob; BadRecord unless it is exactly
    what ``encode_xattr_list`` gives for valid pairs."""
    if len(blob) > MAX_XATTR_LIST:
        raise BadRecord("xattr list too long")
    pairs: list[tuple[bytes, bytes]] = []
    pos = 0
    try:
        while pos < len(blob):
            (n,) = _NAME_LENGTH.unpack_from(blob, pos)
            name = _take(blob, pos + 2, n)
            _check_name(name)
            pos += 2 + n
            (n,) = _VALUE_LENGTH.unpack_from(blob, pos)
            if n > MAX_XATTR_VALUE:
                raise BadRecord("xattr value too long")
            value = _take(blob, pos + 4, n)
            pos += 4 + n
            if pairs and pairs[-1][0] >= name:
                raise BadRecord("xattr names out of order or repeated")
            pairs.append((name, value))
    except struct.error:
        raise BadRecord("xattr list truncated") from None
    return tuple(pairs)


@attrs.frozen
class Create(Record):
    """A new regular file made whole (type 21, encoding 3; the docstring says what it
    means: :meth:`expand`)."""

    TYPE = 21
    FIELDS = (("path", "path"), ("mode", "u32"), ("uid", "u32"), ("gid", "u32"),
              ("mtime_ns", "i64"), ("handle", "blob"), ("xattrs", "blob"), ("data", "blob"))
    path: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    handle: bytes
    xattrs: bytes  # encode_xattr_list
    data: bytes

    def validate(self) -> None:
        if stat.S_IFMT(self.mode) != stat.S_IFREG or self.mode & ~(stat.S_IFREG | 0o7777):
            raise BadRecord(f"create of mode {self.mode:o} (a regular file only)")
        if len(self.handle) > MAX_HANDLE or len(self.data) > MAX_INLINE:
            raise BadRecord("bad create handle or data")
        decode_xattr_list(self.xattrs)

    def xattr_pairs(self) -> tuple[tuple[bytes, bytes], ...]:
        return decode_xattr_list(self.xattrs)

    def expand(self) -> list[tuple[Record, bytes | None]]:
        """The records this one means, in order, each with its data (a Write's)."""
        p = self.path
        out: list[tuple[Record, bytes | None]] = [(Mknod(p, self.mode, self.uid, self.gid),
                                                   None)]
        out += [(Setxattr(p, n, v), None) for n, v in self.xattr_pairs()]
        out.append((Write(p, self.handle, 0, len(self.data)), self.data))
        out.append((Setattr(p, SET_SIZE | SET_MTIME, self.mode & 0o7777, self.uid, self.gid,
                            len(self.data), 0, self.mtime_ns), None))
        return out


RECORD_TYPES: dict[int, type[Record]] = {
    cls.TYPE: cls
    for cls in (Mkdir, Mknod, Symlink, Link, Unlink, Rmdir, Rename, Setattr, Setxattr,
                Removexattr, Write, Abort, Sync, Done, Begin, Commit, Void, Extent,
                Fallocate, Mkdev, Create, StableExtent, Extent3, StableExtent3)
}
EXTENT_TYPES = frozenset((Extent.TYPE, StableExtent.TYPE, Extent3.TYPE, StableExtent3.TYPE))
_VERSION_3_TYPES = (Create.TYPE, StableExtent.TYPE, Extent3.TYPE, StableExtent3.TYPE)


def in_version(rtype: int, version: int) -> bool:
    """Does encoding ``version`` have record type ``rtype``?"""
    return rtype not in _VERSION_3_TYPES or version >= CREATE_VERSION


# per record type: the fields that need more than their struct to be valid
_CHECKED = {rtype: tuple((n, k) for n, k in cls.FIELDS if k in ("path", "name", "blob"))
            for rtype, cls in RECORD_TYPES.items()}


_FIXED = {"u32": "I", "u64": "Q", "i64": "q"}
Encoder = Callable[["Record"], bytes]


def _encoder(cls: type[Record], version: int) -> Encoder:
    """A function that gives ``cls``'s payload in encoding ``version``: the bytes the
    table above describes, made by straight-line code (one struct call per run of fixed
    fields; the capture encodes ~3 records per file, so this is a hot path).  Built
    from the FIELDS table only: no value of a record ever reaches the generated code."""
    structs: dict[str, struct.Struct] = {}
    parts: list[str] = []
    lines: list[str] = []
    fmt, names = "<", list[str]()

    def flush() -> None:
        nonlocal fmt, names
        if names:
            key = f"_s{len(structs)}"
            structs[key] = struct.Struct(fmt)
            parts.append(f"{key}.pack({', '.join('r.' + n for n in names)})")
            fmt, names = "<", []

    for name, kind in cls.FIELDS:
        if kind in _FIXED:
            fmt += _FIXED[kind]
            names.append(name)
            continue
        flush()
        key = f"_s{len(structs)}"
        structs[key] = _PATH_LENGTH[version] if kind == "path" else \
            _U16 if kind == "name" else _U32
        lines.append(f"    v_{name} = r.{name}")
        parts += [f"{key}.pack(len(v_{name}))", f"v_{name}"]
    flush()
    source = "def encode(r):\n" + "\n".join(lines) + \
        f"\n    return b''.join(({', '.join(parts)},))\n"
    scope: dict[str, object] = dict(structs)
    exec(compile(source, f"<encoder {cls.__name__} v{version}>", "exec"), scope)  # noqa: S102
    return scope["encode"]  # type: ignore[return-value]


_ENCODERS = {(rtype, version): _encoder(cls, version)
             for rtype, cls in RECORD_TYPES.items() for version in VERSIONS
             if in_version(rtype, version)}


def encode_record(record: Record, version: int = RECORD_VERSION) -> tuple[int, bytes]:
    """(type, payload) of a record, without checks (``check_record`` is the door).
    BadRecord for a type that encoding ``version`` does not have."""
    encoder = _ENCODERS.get((record.TYPE, version))
    if encoder is None:
        raise BadRecord(f"record type {record.TYPE} is not in encoding version {version}")
    return record.TYPE, encoder(record)


def _check_name(data: bytes) -> None:
    if not data or len(data) > MAX_XATTR_NAME or b"\0" in data:
        raise BadRecord("bad xattr name")


def check_record(record: Record) -> None:
    """Raise BadRecord (PathTooLong for a long path) unless ``decode_record`` would accept
    the record as written now: what the journal takes, replay and every replica take too.

    Runs on every append (a Write record per write(2)): under a microsecond."""
    for name, kind in _CHECKED[record.TYPE]:
        value = getattr(record, name)
        if kind == "path":
            if len(value) > MAX_PATH or not _SAFE_PATH.fullmatch(value):
                check_path(value)  # raises, saying why
        elif kind == "name":
            _check_name(value)
        elif len(value) > MAX_XATTR_VALUE:
            raise BadRecord("blob too long")
    record.validate()


def _take(payload: bytes, pos: int, length: int) -> bytes:
    value = payload[pos : pos + length]
    if len(value) != length:
        raise BadRecord("field runs past the end of the record")
    return value


def decode_record(rtype: int, payload: bytes, version: int = RECORD_VERSION) -> Record:
    """Decode and validate one payload of encoding ``version``; raise BadRecord on
    anything unexpected."""
    if rtype == Done.TYPE and len(payload) == _U64.size:  # 4 records in 10: no loop
        return Done(_U64.unpack(payload)[0])  # what the loop below gives for it
    cls = RECORD_TYPES.get(rtype)
    if cls is None:
        raise BadRecord(f"unknown record type {rtype}")
    if not in_version(rtype, version):
        raise BadRecord(f"record type {rtype} is not in encoding version {version}")
    path_length, path_limit = _PATH_LENGTH[version], _PATH_LIMIT[version]
    values: dict[str, bytes | int] = {}
    pos = 0
    try:
        for name, kind in cls.FIELDS:
            if kind in ("path", "name"):
                codec = path_length if kind == "path" else _U16
                (n,) = codec.unpack_from(payload, pos)
                if kind == "path" and n > path_limit:  # before slicing a hostile length
                    raise PathTooLong(f"path field of {n} bytes (at most {path_limit})")
                data = _take(payload, pos + codec.size, n)
                pos += codec.size + n
                if kind == "path":
                    check_path(data, path_limit)
                else:
                    _check_name(data)
                values[name] = data
            elif kind == "blob":
                (n,) = _U32.unpack_from(payload, pos)
                if n > MAX_XATTR_VALUE:
                    raise BadRecord("blob too long")
                values[name] = _take(payload, pos + 4, n)
                pos += 4 + n
            else:
                codec = {"u32": _U32, "u64": _U64, "i64": _I64}[kind]
                (values[name],) = codec.unpack_from(payload, pos)
                pos += codec.size
    except struct.error:
        raise BadRecord(f"record type {rtype} truncated") from None
    if pos != len(payload):
        raise BadRecord(f"record type {rtype} has {len(payload) - pos} trailing bytes")
    record = cls(**values)
    record.validate()
    return record


# -- a look at a payload without decoding it (the login node's sender) ------------------------

_PEEK_FIXED = {Mkdir.TYPE: struct.Struct("<III"), Mknod.TYPE: struct.Struct("<III"),
               Unlink.TYPE: struct.Struct("<"), Rmdir.TYPE: struct.Struct("<"),
               Setattr.TYPE: struct.Struct("<IIIIQqq")}
_PEEK_WRITE = struct.Struct("<QQ")  # a Write's offset and length, after its handle blob
_PEEK_MARKERS = {Done.TYPE: _U64, Sync.TYPE: _U32}
_MKNOD_KINDS = (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR)


def peek(rtype: int, payload: bytes, version: int = RECORD_VERSION) -> tuple[int, ...] | None:
    """The fields of a payload of one of the commonest types, without a Record: only if
    ``decode_record(rtype, payload, version)`` certainly accepts it (None: decode it to
    know, and to learn why not).  What a cold stream's sender needs of ~90 % of a journal
    (``sdeefs.replication.origin``), at a fraction of a decode's cost.

    ==============================  ===============================================
    type                            fields
    ==============================  ===============================================
    Done, Sync                      (its u64 / u32)
    Mkdir, Mknod                    (end of the path, mode, uid, gid)
    Unlink, Rmdir                   (end of the path,)
    Setattr                         (end of the path, mask, mode, uid, gid, size,
                                    atime_ns, mtime_ns)
    Write                           (end of the path, end of the handle, offset, length)
    ==============================  ===============================================

    The path is ``payload[4:end]`` (versions 2 and 3; version 1 is always decoded).  The
    checks are ``decode_record``'s and each type's ``validate``, field for field
    (tests/replication compare the two over hostile payloads)."""
    marker = _PEEK_MARKERS.get(rtype)
    if marker is not None:
        return marker.unpack(payload) if len(payload) == marker.size else None
    if version < 2 or len(payload) < 4:
        return None
    (n,) = _U32.unpack_from(payload)
    end = 4 + n
    if n > MAX_PATH or end > len(payload) or not _SAFE_PATH.fullmatch(payload, 4, end):
        return None
    fixed = _PEEK_FIXED.get(rtype)
    if fixed is not None:
        if len(payload) != end + fixed.size:
            return None
        values = fixed.unpack_from(payload, end)
        if rtype == Setattr.TYPE:
            mask, mode, size = values[0], values[1], values[4]
            if mask & ~SET_ALL or mode & ~0o7777 or mask & SET_SIZE and size >= 1 << 63:
                return None
        elif rtype == Mknod.TYPE and stat.S_IFMT(values[0]) not in _MKNOD_KINDS:
            return None
        return (end, *values)
    if rtype == Write.TYPE:
        if end + 4 > len(payload):
            return None
        (h,) = _U32.unpack_from(payload, end)
        handle_end = end + 4 + h
        if h > MAX_HANDLE or len(payload) != handle_end + _PEEK_WRITE.size:
            return None
        offset, length = _PEEK_WRITE.unpack_from(payload, handle_end)
        if offset + length >= 1 << 62:
            return None
        return (end, handle_end, offset, length)
    return None
