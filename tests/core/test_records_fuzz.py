"""Property tests of the record codec (``sdeefs.records``): round trips, and hostile input.

Records also arrive from replica peers, so ``decode_record`` must turn every
malformed or unsafe payload into :class:`BadRecord` and nothing else.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sdeefs import records as rec
from sdeefs.errors import BadRecord, PathTooLong
from sdeefs.journal import MAX_PAYLOAD, SEGMENT_HEADER, Journal, encode_frame, scan_frames

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=100, deadline=None)

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)

# -- valid field values -------------------------------------------------------------------

_component = st.binary(min_size=1, max_size=40).filter(
    lambda c: b"/" not in c and b"\0" not in c and c not in (b".", b".."))
_long_component = st.integers(200, 255).map(lambda n: b"n" * n)
shallow_paths = st.builds(
    lambda top, parts: b"/".join([top, *parts]),
    st.sampled_from(rec.LAYER_DIRS),
    st.lists(st.one_of(_component, _component, _long_component), max_size=6),
)
# deeper than PATH_MAX, up to the cap (encoding version 2 only)
deep_paths = st.builds(lambda top, n, tail: b"/".join([top, *[b"d" * 255] * n, tail])[:rec.MAX_PATH]
                       .rstrip(b"/"),
                       st.sampled_from(rec.LAYER_DIRS), st.integers(16, 256), _component)
paths = st.one_of(shallow_paths, shallow_paths, shallow_paths, deep_paths)
xattr_names = st.binary(min_size=1, max_size=255).filter(lambda n: b"\0" not in n)
targets = st.binary(min_size=1, max_size=300).filter(lambda t: b"\0" not in t)
handles = st.binary(max_size=rec.MAX_HANDLE)
xattr_values = st.one_of(st.binary(max_size=200), st.just(b"v" * rec.MAX_XATTR_VALUE))
allowed_kinds = st.sampled_from([stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR])
file_modes = st.builds(lambda k, p: k | p, allowed_kinds, st.integers(0, 0o7777))
rename_flags = st.sampled_from([0, 1, 2, 4, 1 | 4])

# one strategy per record type: a new type in RECORD_TYPES must be added here
RECORD_STRATEGIES: dict[type[rec.Record], st.SearchStrategy[rec.Record]] = {
    rec.Mkdir: st.builds(rec.Mkdir, paths, U32, U32, U32),
    rec.Mknod: st.builds(rec.Mknod, paths, file_modes, U32, U32),
    rec.Symlink: st.builds(rec.Symlink, paths, targets, U32, U32),
    rec.Link: st.builds(rec.Link, paths, paths),
    rec.Unlink: st.builds(rec.Unlink, paths),
    rec.Rmdir: st.builds(rec.Rmdir, paths),
    rec.Rename: st.builds(rec.Rename, paths, paths, rename_flags, U64),
    rec.Setattr: st.builds(rec.Setattr, paths, st.integers(0, rec.SET_ALL),
                           st.integers(0, 0o7777), U32, U32, st.integers(0, 2**63 - 1),
                           I64, I64),
    rec.Setxattr: st.builds(rec.Setxattr, paths, xattr_names, xattr_values),
    rec.Removexattr: st.builds(rec.Removexattr, paths, xattr_names),
    rec.Write: st.builds(rec.Write, paths, handles, st.integers(0, 2**61 - 1),
                         st.integers(0, 2**61 - 1)),
    rec.Abort: st.builds(rec.Abort, U64),
    rec.Sync: st.builds(rec.Sync, U32),
}
if hasattr(rec, "Done"):  # recovery's "this record took effect" marker
    RECORD_STRATEGIES[rec.Done] = st.builds(rec.Done, U64)
# the capture's batches and extents (sdeefs.fs.capture)
RECORD_STRATEGIES[rec.Begin] = st.builds(rec.Begin, U32)
RECORD_STRATEGIES[rec.Commit] = st.builds(rec.Commit, U64)
RECORD_STRATEGIES[rec.Void] = st.integers(1, 2**64 - 1).flatmap(
    lambda b: st.builds(rec.Void, st.just(b), st.integers(b, 2**64 - 1)))
RECORD_STRATEGIES[rec.Extent] = st.builds(
    rec.Extent, paths, handles, st.integers(0, 2**40).map(lambda n: n * rec.EXTENT_BLOCK),
    st.integers(0, 2**40), U64,
    st.integers(0, 64).map(lambda n: bytes(range(16)) * n))
RECORD_STRATEGIES[rec.Fallocate] = st.builds(
    rec.Fallocate, paths, st.sampled_from(rec.FALLOCATE_MODES), st.integers(0, 2**60),
    st.integers(1, 2**60))
RECORD_STRATEGIES[rec.Mkdev] = st.builds(
    rec.Mkdev, paths, st.builds(lambda k, p: k | p, st.sampled_from([stat.S_IFCHR, stat.S_IFBLK]),
                                st.integers(0, 0o7777)), st.integers(1, 2**64 - 1), U32, U32)
# a new file made whole (encoding 3): sorted, distinct xattr names
_xattr_lists = st.dictionaries(xattr_names, st.binary(max_size=100), max_size=4).map(
    lambda d: rec.encode_xattr_list(tuple(d.items())))
RECORD_STRATEGIES[rec.Create] = st.builds(
    rec.Create, paths, st.integers(0, 0o7777).map(lambda p: stat.S_IFREG | p), U32, U32, I64,
    handles, _xattr_lists,
    st.one_of(st.binary(max_size=400), st.just(b"d" * rec.MAX_INLINE)))
# an Extent with the capture's witness (encoding 3): a ctime > 0
RECORD_STRATEGIES[rec.StableExtent] = st.builds(
    rec.StableExtent, paths, handles,
    st.integers(0, 2**40).map(lambda n: n * rec.EXTENT_BLOCK), st.integers(0, 2**40), U64,
    st.integers(0, 64).map(lambda n: bytes(range(16)) * n), st.integers(1, 2**63 - 1))
# the same two with BLAKE3 sums (encoding 3)
RECORD_STRATEGIES[rec.Extent3] = st.builds(
    rec.Extent3, paths, handles, st.integers(0, 2**40).map(lambda n: n * rec.EXTENT_BLOCK),
    st.integers(0, 2**40), U64,
    st.integers(0, 64).map(lambda n: bytes(range(16)) * n))
RECORD_STRATEGIES[rec.StableExtent3] = st.builds(
    rec.StableExtent3, paths, handles,
    st.integers(0, 2**40).map(lambda n: n * rec.EXTENT_BLOCK), st.integers(0, 2**40), U64,
    st.integers(0, 64).map(lambda n: bytes(range(16)) * n), st.integers(1, 2**63 - 1))
valid_records = st.one_of(*RECORD_STRATEGIES.values())
KNOWN_TYPES = sorted(rec.RECORD_TYPES)


def test_every_record_type_is_generated() -> None:
    assert set(RECORD_STRATEGIES) == set(rec.RECORD_TYPES.values())
    assert all(t == cls.TYPE for t, cls in rec.RECORD_TYPES.items())


@FUZZ
@given(valid_records)
def test_round_trip(record: rec.Record) -> None:
    rec.check_record(record)  # what the journal takes (the door) ...
    rtype, payload = rec.encode_record(record)
    assert rtype == record.TYPE
    decoded = rec.decode_record(rtype, payload)  # ... its readers take
    assert decoded == record
    assert type(decoded) is type(record)
    assert rec.encode_record(decoded) == (rtype, payload)
    # encoding version 1 (old journals) where its paths fit it and it has the type
    if all(len(getattr(record, n)) <= rec.MAX_PATH_V1 for n, k in record.FIELDS if k == "path") \
            and rec.in_version(record.TYPE, 1):
        assert rec.decode_record(*rec.encode_record(record, 1), 1) == record
    for version in (1, 2):  # a Create is in encoding 3 only, both ways
        if not rec.in_version(record.TYPE, version):
            with pytest.raises(BadRecord, match="not in encoding version"):
                rec.encode_record(record, version)
            with pytest.raises(BadRecord, match="not in encoding version"):
                rec.decode_record(rtype, payload, version)
    # and through a journal frame
    frame = encode_frame(7, record)
    ((end, seq, ftype, fpayload),) = list(scan_frames(frame, 0, 7))
    assert (end, seq, ftype, fpayload) == (len(frame), 7, rtype, payload)


def _decode_only_badrecord(rtype: int, payload: bytes, version: int = rec.RECORD_VERSION
                           ) -> rec.Record | None:
    try:
        record = rec.decode_record(rtype, payload, version)
    except BadRecord:
        return None
    # accepted: then it is canonical and safe
    assert rec.encode_record(record, version) == (rtype, payload)
    rec.check_record(record)
    for name, kind in record.FIELDS:
        if kind == "path":
            assert rec.check_path(getattr(record, name))
    if isinstance(record, rec.Mknod):
        assert stat.S_IFMT(record.mode) in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK,
                                            stat.S_IFCHR)
    return record


@FUZZ
@given(st.integers(-5, 70000), st.binary(max_size=300))
@example(1, b"")
@example(0, b"")
@example(14, b"")
@example(12, b"\0" * 7)
@example(5, struct.pack("<H", 0xFFFF) + b"upper")
@example(3, struct.pack("<H", 5) + b"upper" + struct.pack("<I", 0xFFFFFFFF))
def test_random_payload_raises_only_badrecord(rtype: int, payload: bytes) -> None:
    for version in rec.VERSIONS:
        _decode_only_badrecord(rtype, payload, version)


@FUZZ
@given(st.sampled_from(KNOWN_TYPES), st.binary(max_size=200))
def test_random_payload_of_a_known_type(rtype: int, payload: bytes) -> None:
    for version in rec.VERSIONS:
        _decode_only_badrecord(rtype, payload, version)


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("u16"), st.integers(0, 10**6), st.integers(0, 0xFFFF)),
    st.tuples(st.just("u32"), st.integers(0, 10**6), U32),
)


def _mutate(payload: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    data = bytearray(payload)
    for kind, pos, arg in mutations:
        pos = pos % (len(data) + 1)
        if kind == "flip" and data:
            data[pos % len(data)] ^= arg  # type: ignore[operator]
        elif kind == "insert":
            data[pos:pos] = arg  # type: ignore[call-overload]
        elif kind == "delete":
            del data[pos : pos + arg]  # type: ignore[operator]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "u16":
            data[pos : pos + 2] = struct.pack("<H", arg)
        elif kind == "u32":
            data[pos : pos + 4] = struct.pack("<I", arg)
    return bytes(data)


@FUZZ
@given(valid_records, st.lists(_mutation, min_size=1, max_size=4),
       st.sampled_from([None, *KNOWN_TYPES]))
def test_mutated_payload_raises_only_badrecord(record: rec.Record,
                                               mutations: list[tuple[str, int, object]],
                                               other_type: int | None) -> None:
    rtype, payload = rec.encode_record(record)
    _decode_only_badrecord(other_type or rtype, _mutate(payload, mutations))
    if len(payload) < 20000 and rec.in_version(other_type or rtype, 1):
        _decode_only_badrecord(other_type or rtype, _mutate(payload, mutations), 1)


def test_trailing_bytes_and_truncation_are_rejected() -> None:
    for record in (rec.Unlink(b"upper/a"), rec.Abort(1), rec.Setattr(b"upper", rec.SET_MODE, 1)):
        rtype, payload = rec.encode_record(record)
        with pytest.raises(BadRecord):
            rec.decode_record(rtype, payload + b"\0")
        for cut in range(len(payload)):
            with pytest.raises(BadRecord):
                rec.decode_record(rtype, payload[:cut])


# -- unsafe paths -------------------------------------------------------------------------

UNSAFE_PATHS = [
    b"",
    b"/",
    b"/upper/a",
    b"/etc/passwd",
    b"upper/../etc/passwd",
    b"upper/a/../../etc",
    b"upper/..",
    b"work/..",
    b"..",
    b"../upper/a",
    b".",
    b"./upper/a",
    b"upper/./a",
    b"upper/.",
    b"upper//a",
    b"upper/a/",
    b"upper/",
    b"upper\0/a",
    b"upper/a\0b",
    b"upper/\0",
    b"lower/a",
    b"uppe/a",
    b"upperx/a",
    b"Upper/a",
    b"etc/passwd",
    b"work2",
    b"state/journal",
    b"upper/" + b"x" * 256,
    b"upper/" + b"/".join([b"d" * 255] * 257),  # > MAX_PATH (65536) bytes
]


@pytest.mark.parametrize("path", UNSAFE_PATHS, ids=lambda p: repr(p[:30]))
def test_unsafe_paths_are_rejected(path: bytes) -> None:
    with pytest.raises(BadRecord):
        rec.check_path(path)
    with pytest.raises(BadRecord):
        rec.check_record(rec.Rename(b"upper/a", path, 0, 0))
    for version, length, most in ((2, "<I", len(path)), (1, "<H", 0xFFFF)):
        path_field = struct.pack(length, min(len(path), most)) + path[:most]
        good_field = struct.pack(length, 7) + b"upper/a"
        _unsafe_path_fields_are_rejected(version, path_field, good_field)


def _unsafe_path_fields_are_rejected(version: int, path_field: bytes, good_field: bytes) -> None:
    payloads = {
        rec.Unlink.TYPE: path_field,
        rec.Rmdir.TYPE: path_field,
        rec.Mkdir.TYPE: path_field + struct.pack("<III", 0o755, 0, 0),
        rec.Link.TYPE: good_field + path_field,
        rec.Rename.TYPE: path_field + good_field + struct.pack("<IQ", 0, 0),
        rec.Setxattr.TYPE: path_field + struct.pack("<H", 6) + b"user.x" + struct.pack("<I", 0),
    }
    for rtype, payload in payloads.items():
        with pytest.raises(BadRecord):
            rec.decode_record(rtype, payload, version)
    # also as the first path of a Link / Rename
    with pytest.raises(BadRecord):
        rec.decode_record(rec.Link.TYPE, path_field + good_field, version)


@FEW
@given(st.lists(st.sampled_from([b"a", b"..", b".", b"", b"upper", b"work", b"x\0y"]),
                min_size=1, max_size=6))
def test_paths_with_dot_components_are_rejected(parts: list[bytes]) -> None:
    path = b"/".join(parts)
    safe = (parts[0] in rec.LAYER_DIRS
            and all(p not in (b"", b".", b"..") and b"\0" not in p for p in parts[1:]))
    if safe:
        assert rec.check_path(path) == path
    else:
        with pytest.raises(BadRecord):
            rec.check_path(path)
        rtype, payload = rec.encode_record(rec.Unlink(path))
        with pytest.raises(BadRecord):
            rec.decode_record(rtype, payload)


def test_safe_paths_are_accepted() -> None:
    for path in (b"upper", b"work", b"upper/a", b"work/sdeefs/#1f-0", b"upper/..a/.b/...",
                 b"upper/" + b"x" * 255, b"upper/ sp ace/\xff\xfe"):
        assert rec.check_path(path) == path
        assert rec.decode_record(*rec.encode_record(rec.Unlink(path))) == rec.Unlink(path)


# -- forbidden content --------------------------------------------------------------------


@pytest.mark.parametrize("mode", [
    stat.S_IFBLK | 0o644, stat.S_IFBLK, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777,
    0o644, 0o170000, stat.S_IFBLK | stat.S_IFREG,
])
def test_device_and_other_mknod_kinds_are_rejected(mode: int) -> None:
    rtype, payload = rec.encode_record(rec.Mknod(b"upper/dev", mode, 0, 0))
    with pytest.raises(BadRecord):
        rec.decode_record(rtype, payload)


@FEW
@given(st.integers(0, 2**32 - 1))
def test_mknod_accepts_only_regular_fifo_socket_and_whiteout(mode: int) -> None:
    rtype, payload = rec.encode_record(rec.Mknod(b"upper/n", mode, 0, 0))
    ok = stat.S_IFMT(mode) in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR)
    if ok:
        assert rec.decode_record(rtype, payload).mode == mode  # type: ignore[attr-defined]
    else:
        with pytest.raises(BadRecord):
            rec.decode_record(rtype, payload)


@pytest.mark.parametrize("record", [
    rec.Symlink(b"upper/l", b"", 0, 0),
    rec.Symlink(b"upper/l", b"a\0b", 0, 0),
    rec.Symlink(b"upper/l", b"x" * (rec.MAX_TARGET + 1), 0, 0),
    rec.Setxattr(b"upper/a", b"", b"v"),
    rec.Setxattr(b"upper/a", b"user.\0", b"v"),
    rec.Setxattr(b"upper/a", b"u" * 256, b"v"),
    rec.Setxattr(b"upper/a", b"user.x", b"v" * (rec.MAX_XATTR_VALUE + 1)),
    rec.Removexattr(b"upper/a", b""),
    rec.Write(b"upper/a", b"h" * (rec.MAX_HANDLE + 1), 0, 1),
    rec.Write(b"upper/a", b"", 2**62, 0),
    rec.Write(b"upper/a", b"", 2**64 - 1, 2**64 - 1),
    rec.Rename(b"upper/a", b"upper/b", 3, 0),  # NOREPLACE | EXCHANGE
    rec.Rename(b"upper/a", b"upper/b", 6, 0),  # EXCHANGE | WHITEOUT
    rec.Rename(b"upper/a", b"upper/b", 8, 0),
    rec.Setattr(b"upper/a", 32, 0),
    rec.Setattr(b"upper/a", rec.SET_MODE, stat.S_IFREG | 0o644),
    rec.Setattr(b"upper/a", rec.SET_SIZE, size=2**63),  # past off_t (branch applyreview)
    rec.Setattr(b"upper/a", rec.SET_ALL, size=2**64 - 1),
], ids=repr)
def test_invalid_field_values_are_rejected(record: rec.Record) -> None:
    with pytest.raises(BadRecord):
        rec.check_record(record)
    rtype, payload = rec.encode_record(record)
    with pytest.raises(BadRecord):
        rec.decode_record(rtype, payload)


# -- path lengths: version 2 carries deep trees, version 1 what it always did ---------------


def _chain(total: int) -> bytes:
    """A layer path of exactly ``total`` bytes (components of at most 255)."""
    path = b"upper"
    while len(path) < total:
        path += b"/" + b"p" * min(255, total - len(path) - 1)
    assert len(path) == total
    return path


@pytest.mark.parametrize("length", [4096, 4097, 20000, rec.MAX_PATH])
def test_deep_paths_up_to_the_cap_round_trip(length: int) -> None:
    path = _chain(length)
    for record in (rec.Rename(path, path + b"x"[: rec.MAX_PATH - length], 0, 1),
                   rec.Write(path, b"h", 0, 1), rec.Setxattr(path, b"user.x", b"v" * 65536)):
        rec.check_record(record)
        assert rec.decode_record(*rec.encode_record(record)) == record
    if rec.MAX_PATH_V1 < length < 0x10000:
        with pytest.raises(PathTooLong):  # version 1 never carried it
            rec.decode_record(*rec.encode_record(rec.Unlink(path), 1), 1)


def test_a_path_over_the_cap_is_refused_as_too_long() -> None:
    path = _chain(rec.MAX_PATH + 1)
    with pytest.raises(PathTooLong):
        rec.check_record(rec.Link(b"upper/a", path))
    with pytest.raises(PathTooLong):
        rec.decode_record(*rec.encode_record(rec.Unlink(path)))
    # a hostile length is refused before anything is sliced
    with pytest.raises(PathTooLong):
        rec.decode_record(rec.Unlink.TYPE, struct.pack("<I", 0xFFFFFFFF) + b"upper")


def test_journal_refuses_what_it_cannot_carry(tmp_path: Path) -> None:
    """The door: ENAMETOOLONG (EINVAL for other bad records), nothing written."""
    journal = Journal.open(str(tmp_path))
    try:
        journal.append(rec.Mkdir(b"upper/a", 0o755, 0, 0))
        size = journal.size_bytes()
        for record, code in ((rec.Rename(b"upper/a", _chain(rec.MAX_PATH + 1), 0, 0),
                              errno.ENAMETOOLONG),
                             (rec.Unlink(b"upper/../x"), errno.EINVAL),
                             (rec.Mknod(b"upper/b", stat.S_IFBLK, 0, 0), errno.EINVAL)):
            with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is checked
                journal.append(record)
            assert info.value.errno == code
        assert (journal.head, journal.size_bytes(), journal.failed) == (1, size, None)
        assert journal.append(rec.Rename(b"upper/a", _chain(rec.MAX_PATH), 0, 0)) == 2
        assert [e.seq for e in journal.read()] == [1, 2]
    finally:
        journal.close()


# -- journal framing over random bytes ----------------------------------------------------


@FEW
@given(st.binary(max_size=400), st.integers(1, 100))
def test_scan_frames_never_raises(data: bytes, first: int) -> None:
    blob = SEGMENT_HEADER.pack(b"SDEEFSJ\0", 1, 0, first, 0) + data
    expect = first
    for end, seq, _rtype, payload in scan_frames(blob, SEGMENT_HEADER.size, first):
        assert end <= len(blob)
        assert seq == expect
        assert len(payload) <= MAX_PAYLOAD
        expect += 1


@pytest.mark.expect_log("sdeefs.journal")
@FEW
@given(st.lists(valid_records, min_size=1, max_size=5), st.binary(min_size=1, max_size=300))
def test_journal_open_survives_any_tail(records: list[rec.Record], garbage: bytes) -> None:
    """Random bytes after the last good frame are a torn tail: truncated, never an error."""
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal.open(tmp)
        for r in records:
            journal.append(r)
        journal.close()
        path = journal.segments()[-1][1]
        size = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(garbage)
        reopened = Journal.open(tmp)
        try:
            assert reopened.head == len(records)
            assert os.path.getsize(path) == size
            assert [e.record for e in reopened.read()] == records
        finally:
            reopened.close()


def test_fallocate_records_refuse_modes_that_shift_data() -> None:
    """COLLAPSE_RANGE (8) and INSERT_RANGE (0x20) move bytes, which Write records' data by
    reference cannot follow: a record never carries them, nor an empty range."""
    for mode in (0x8 | 0x1, 0x20, 0x40, 0x2):
        with pytest.raises(BadRecord):
            rec.Fallocate(b"upper/f", mode, 0, 4096).validate()
    with pytest.raises(BadRecord):
        rec.Fallocate(b"upper/f", 0, 0, 0).validate()
