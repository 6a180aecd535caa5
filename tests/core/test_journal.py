"""The journal (``sdeefs.journal``), crash recovery and replay (``sdeefs.apply``).

Recovery tests simulate a daemon killed between writing a metadata record and
performing it: the record is appended to the journal directly, the upper is
left as it was, and ``recover`` must make the two agree.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from sdeefs import records as rec
from sdeefs.apply import apply_record, recover, replay
from sdeefs.check import run_checks
from sdeefs.errors import BadRecord, FailsafeError, JournalCorrupt
from sdeefs.fs.cow import AttrChange, CowFS, ViewConfig
from sdeefs.fs.inodes import ROOT_INO
from sdeefs.journal import (
    _FRAME_BODY,
    FRAME_HEADER,
    SEGMENT_HEADER,
    SEGMENT_VERSION,
    SYNC_FLUSHED,
    Journal,
    JournalTail,
    NullJournal,
    encode_frame,
    encode_segment_header,
    read_segment_header,
    segment_name,
)
from sdeefs.layers import LayerRoot
from sdeefs.sysio import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    is_whiteout,
    name_to_handle,
)
from sdeefs.writeahead import read_write_data

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, trusted.* xattrs)")


def sample_records() -> list[rec.Record]:
    """One record of every type."""
    return [
        rec.Mkdir(b"upper/d", 0o755, 1, 2),
        rec.Mknod(b"upper/d/f", stat.S_IFREG | 0o644, 3, 4),
        rec.Mknod(b"upper/wh", stat.S_IFCHR, 0, 0),
        rec.Symlink(b"upper/l", b"../some/target", 0, 0),
        rec.Link(b"upper/d/f", b"upper/g"),
        rec.Unlink(b"upper/g"),
        rec.Rmdir(b"work/x"),
        rec.Rename(b"work/sdeefs/#1", b"upper/d/f", RENAME_NOREPLACE, 1234567),
        rec.Setattr(b"upper/d/f", rec.SET_ALL, 0o4755, 1000, 1000, 77, -5, 1 << 62),
        rec.Setxattr(b"upper/d", b"trusted.overlay.opaque", b"y"),
        rec.Removexattr(b"upper/d", b"user.x"),
        rec.Write(b"upper/d/f", b"\x08\x00\x00\x00\x01\x00\x00\x00handle..", 4096, 1 << 20),
        rec.Abort(3),
        rec.Sync(1),
    ]


def frame_offsets(path: str) -> list[int]:
    """Byte offset of every frame in a segment file, then the file size."""
    with open(path, "rb") as f:
        data = f.read()
    offsets = []
    pos = SEGMENT_HEADER.size
    while pos < len(data):
        offsets.append(pos)
        _, length, _, _, _ = FRAME_HEADER.unpack_from(data, pos)
        pos += FRAME_HEADER.size + length
    offsets.append(len(data))
    return offsets


def fill(journal: Journal, n: int, start: int = 0) -> list[rec.Record]:
    records: list[rec.Record] = [rec.Mkdir(b"upper/d%d" % i, 0o755, i, i)
                                 for i in range(start, start + n)]
    for r in records:
        journal.append(r)
    return records


# --------------------------------------------------------------------------
# appending and reading


def test_append_read_round_trip(tmp_path: Path) -> None:
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir)
    assert journal.head == 0
    records = sample_records()
    seqs = [journal.append(r) for r in records]
    assert seqs == list(range(1, len(records) + 1))
    assert journal.head == len(records)
    entries = list(journal.read())
    assert [e.seq for e in entries] == seqs
    assert [e.record for e in entries] == records
    assert [e.record for e in journal.read(5)] == records[4:]
    assert list(journal.read(len(records) + 1)) == []
    journal.sync()
    assert journal.synced == journal.head
    # the flush is certified by a Sync record after it
    assert journal.head == len(records) + 1
    assert list(journal.read())[-1].record == rec.Sync(SYNC_FLUSHED)
    journal.close()

    reopened = Journal.open(jdir)
    assert reopened.head == len(records) + 1
    assert reopened.append(rec.Sync(7)) == len(records) + 2
    assert [e.record for e in reopened.read()] == [*records, rec.Sync(SYNC_FLUSHED),
                                                   rec.Sync(7)]
    reopened.close()
    # a reader that never opened the journal for appending (sdeefs log / check)
    assert [e.seq for e in Journal(directory=jdir).read()] == list(range(1, len(records) + 3))


def test_append_many_writes_what_append_would(tmp_path: Path) -> None:
    """One writev(2) of a batch's frames (more than an iovec list holds: one by one),
    the same bytes as appending the records one at a time; start_writeback makes
    nothing durable by itself (only sync does)."""
    records: list[rec.Record] = [
        rec.Create(b"upper/f%d" % i, stat.S_IFREG | 0o644, 0, 0, i, b"", b"",
                   os.urandom(i * 37 % 5000)) for i in range(2100)]
    one = Journal.open(str(tmp_path / "one"))
    for record in records:
        one.append(record)
    many = Journal.open(str(tmp_path / "many"))
    assert many.append_many(records[:700]) == 700
    assert many.append_many(records[700:]) == 2100  # past 1024 iovecs
    many.start_writeback()
    assert many.synced == 0
    assert [e.record for e in many.read()] == records
    for journal in (one, many):
        journal.close()
    segments = sorted(os.listdir(tmp_path / "one"))
    assert segments == sorted(os.listdir(tmp_path / "many"))
    for name in segments:
        assert (tmp_path / "one" / name).read_bytes()[SEGMENT_HEADER.size:] == \
            (tmp_path / "many" / name).read_bytes()[SEGMENT_HEADER.size:]  # (ids differ)


@pytest.mark.expect_log("sdeefs.journal")
def test_append_after_failure_is_refused(tmp_path: Path) -> None:
    journal = Journal.open(str(tmp_path / "journal"))
    journal.append(rec.Sync(0))
    journal.close()  # the fd is gone: the next write fails
    with pytest.raises(FailsafeError) as e:
        journal.append(rec.Sync(1))
    assert e.value.errno == errno.EROFS
    with pytest.raises(FailsafeError):
        journal.append(rec.Sync(2))
    assert journal.head == 1
    assert [x.seq for x in Journal(directory=str(tmp_path / "journal")).read()] == [1]


def test_null_journal_accepts_appends(tmp_path: Path) -> None:
    null = NullJournal()
    for r in sample_records():
        assert null.append(r) == 0
    null.sync()
    null.sync(5)
    null.close()
    assert null.head == 0
    assert null.failed is None
    # a whole view on it: no journal, no Abort records for failing operations
    for d in ("lower", "upper", "state/work"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "lower" / "a").write_bytes(b"A")
    fs = CowFS.open(ViewConfig(upper=bytes(tmp_path / "upper"), work=bytes(tmp_path / "state/work"),
                           lower=bytes(tmp_path / "lower")), null)
    try:
        fs.unlink(ROOT_INO, b"a")
        fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
        with pytest.raises(FileExistsError):
            fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
        assert is_whiteout(os.lstat(tmp_path / "upper" / "a"))
    finally:
        fs.close()


# --------------------------------------------------------------------------
# torn tails


@pytest.mark.expect_log("sdeefs.journal")
@pytest.mark.parametrize("rotated", [False, True], ids=["one-segment", "last-of-several"])
def test_torn_tail_is_truncated_at_every_offset(tmp_path: Path, rotated: bool) -> None:
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir, segment_bytes=300 if rotated else 1 << 20)
    records = fill(journal, 12)
    last = rec.Setxattr(b"upper/d0", b"user.last", b"v" * 20)
    journal.append(last)
    journal.close()
    n = len(records) + 1
    segments = journal.segments()
    assert (len(segments) > 1) == rotated
    path = segments[-1][1]
    with open(path, "rb") as f:
        good = f.read()
    offsets = frame_offsets(path)
    start, end = offsets[-2], offsets[-1]
    assert end == len(good)

    for cut in range(start, end):
        with open(path, "wb") as f:
            f.write(good[:cut])
        reopened = Journal.open(jdir)
        assert reopened.head == n - 1, cut
        assert os.path.getsize(path) == start, cut
        assert [e.record for e in reopened.read()] == records, cut
        assert reopened.append(last) == n, cut
        reopened.close()
        assert [e.seq for e in Journal(directory=jdir).read()] == list(range(1, n + 1))


GARBAGE = [
    b"\0",
    b"\0" * 19,
    b"\0" * 20,
    b"\0" * 64,
    b"\xff" * 20,  # a frame header claiming a 4 GiB payload
    os.urandom(7),
    os.urandom(20),
    os.urandom(4096),
    FRAME_HEADER.pack(0, 5, 14, 13, 0) + b"short",  # a frame with a wrong checksum
]


@pytest.mark.expect_log("sdeefs.journal")
@pytest.mark.parametrize("garbage", GARBAGE, ids=lambda g: f"{len(g)}B")
def test_garbage_after_last_record_is_truncated(tmp_path: Path, garbage: bytes) -> None:
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir)
    records = fill(journal, 5)
    journal.close()
    path = journal.segments()[-1][1]
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(garbage)
    reopened = Journal.open(jdir)
    assert os.path.getsize(path) == size
    assert reopened.head == 5
    assert reopened.append(rec.Sync(0)) == 6
    reopened.close()
    assert [e.record for e in Journal(directory=jdir).read()] == [*records, rec.Sync(0)]


@pytest.mark.expect_log("sdeefs.journal")
def test_frames_that_break_the_sequence_are_a_torn_tail(tmp_path: Path) -> None:
    """A well-formed frame that repeats an earlier seq (a stale or duplicated write) ends the log.

    (A good frame with a *later* seq behind damage is corruption, tested below.)
    """
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir)
    records = fill(journal, 3)
    journal.close()
    path = journal.segments()[-1][1]
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(encode_frame(3, rec.Sync(0)))  # duplicate seq
        f.write(encode_frame(1, rec.Sync(0)))  # stale seq
    reopened = Journal.open(jdir)
    assert reopened.head == 3
    assert os.path.getsize(path) == size
    reopened.close()
    assert [e.record for e in Journal(directory=jdir).read()] == records


@pytest.mark.parametrize("length", [0, 1, 10, SEGMENT_HEADER.size - 1, SEGMENT_HEADER.size])
def test_torn_header_of_a_new_segment(tmp_path: Path, length: int) -> None:
    """Killed while starting a segment: the segment is redone, nothing before it lost."""
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir)
    records = fill(journal, 4)
    journal.close()
    with open(os.path.join(jdir, segment_name(5)), "wb") as f:
        f.write(encode_segment_header(5)[:length])
    reopened = Journal.open(jdir)
    assert reopened.head == 4
    assert reopened.append(rec.Sync(0)) == 5
    reopened.close()
    assert [e.record for e in Journal(directory=jdir).read()] == [*records, rec.Sync(0)]


# Regression (was a bug): Journal.open raises JournalCorrupt forever when the only segment (seg-1,
# no records) has a torn header: a kill during the very first Journal.open (between O_CREAT and
# the header write) bricks the state dir
def test_torn_header_of_the_first_segment(tmp_path: Path) -> None:
    jdir = tmp_path / "journal"
    jdir.mkdir()
    (jdir / segment_name(1)).write_bytes(b"")
    journal = Journal.open(str(jdir))
    assert journal.head == 0
    assert journal.append(rec.Sync(0)) == 1
    journal.close()


# --------------------------------------------------------------------------
# corruption before the tail


def _flip_payload_byte(path: str, frame_index: int) -> None:
    offsets = frame_offsets(path)
    pos = offsets[frame_index] + FRAME_HEADER.size + 2  # inside the payload: checksum fails
    with open(path, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x55]))


def test_corruption_in_an_earlier_segment_is_reported(tmp_path: Path) -> None:
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir, segment_bytes=200)
    fill(journal, 20)
    journal.close()
    segments = journal.segments()
    assert len(segments) >= 3
    _flip_payload_byte(segments[1][1], 0)
    with pytest.raises(JournalCorrupt):
        list(Journal(directory=jdir).read())
    _ = Journal.open(jdir)  # only the last segment is scanned on open; it is fine


# Regression (was a bug): a bad record followed by good ones in the LAST segment is silently
# treated as the end of the log by Journal.read()
def test_corruption_in_the_middle_of_the_last_segment_is_reported_by_read(
        tmp_path: Path) -> None:
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir)
    fill(journal, 5)
    journal.sync()  # records 1-5 are durable: the Sync record (6) certifies it
    journal.close()
    path = journal.segments()[-1][1]
    _flip_payload_byte(path, 1)  # record 2 of 5
    with pytest.raises(JournalCorrupt):
        list(Journal(directory=jdir).read())


@pytest.mark.expect_log("sdeefs.journal")
def test_damage_before_unsynced_records_is_a_torn_tail(tmp_path: Path) -> None:
    """After a power loss, unsynced pages land out of order: a hole, then intact records.

    Those records were never durable (no Sync record after them), so opening
    truncates at the hole instead of refusing the journal.
    """
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir)
    records = fill(journal, 2)
    journal.sync()
    fill(journal, 3)  # never synced
    journal.close()
    path = journal.segments()[-1][1]
    _flip_payload_byte(path, 3)  # the first unsynced record
    reopened = Journal.open(jdir)
    assert [e.record for e in reopened.read()] == [*records, rec.Sync(SYNC_FLUSHED)]
    reopened.close()


# Regression (was a bug): Journal.open treats a bad record followed by good ones as a torn tail
# and truncates the good records away (silent data loss)
def test_corruption_in_the_middle_of_the_last_segment_is_not_truncated(tmp_path: Path) -> None:
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir)
    fill(journal, 5)
    journal.sync()
    journal.close()
    path = journal.segments()[-1][1]
    _flip_payload_byte(path, 1)
    with open(path, "rb") as f:
        damaged = f.read()
    try:
        with pytest.raises(JournalCorrupt):
            Journal.open(jdir)
    finally:
        with open(path, "rb") as f:
            after = f.read()
    assert after == damaged, "Journal.open dropped the good records after the damage"


# --------------------------------------------------------------------------
# segments and trimming


def test_segment_rotation_and_trim(tmp_path: Path) -> None:
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir, segment_bytes=256)
    records = fill(journal, 40)
    big = rec.Setxattr(b"upper/d0", b"user.big", b"x" * 1000)  # larger than a segment
    journal.append(big)
    records.append(big)
    records += fill(journal, 5, start=100)
    segments = journal.segments()
    assert len(segments) > 5
    firsts = [first for first, _ in segments]
    assert firsts[0] == 1
    assert firsts == sorted(firsts)
    for first, path in segments:
        assert os.path.basename(path) == segment_name(first)
        assert os.path.getsize(path) <= 256 or len(frame_offsets(path)) == 2  # one record
    assert [e.record for e in journal.read()] == records
    for from_seq in (1, 2, firsts[2], firsts[2] + 1, len(records)):
        assert [e.seq for e in journal.read(from_seq)] == list(range(from_seq,
                                                                     len(records) + 1))

    # trim deletes exactly the segments whose every record is below the bound
    below = firsts[3] + 1  # inside segment 3: segments 0..2 go, 3 stays (it holds seq below)
    assert firsts[4] > below
    assert journal.trim(below) == 3
    assert [f for f, _ in journal.segments()] == firsts[3:]
    assert journal.first_seq() == firsts[3]
    assert [e.seq for e in journal.read(journal.first_seq())][0] == firsts[3]
    assert journal.trim(below) == 0
    assert journal.trim(firsts[4] - 1) == 0  # the last record of segment 3 is not below
    assert journal.trim(firsts[4]) == 1
    # never the last segment, even past the head
    journal.trim(len(records) + 100)
    assert [f for f, _ in journal.segments()] == [firsts[-1]]
    assert journal.append(rec.Sync(0)) == len(records) + 1
    journal.close()
    reopened = Journal.open(jdir, segment_bytes=256)
    assert reopened.head == len(records) + 1
    assert [e.seq for e in reopened.read(firsts[-1])] == list(range(firsts[-1],
                                                                    len(records) + 2))
    reopened.close()


def test_reading_a_gap_between_segments_is_corruption(tmp_path: Path) -> None:
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir, segment_bytes=200)
    fill(journal, 30)
    journal.close()
    segments = journal.segments()
    os.unlink(segments[2][1])  # a hole, not a trim
    with pytest.raises(JournalCorrupt):
        list(Journal(directory=jdir).read())


# --------------------------------------------------------------------------
# recovery


@attrs.define
class State:
    """upper/ and state/{journal,work}/ with a journaled LayerRoot over them."""

    tmp: Path
    upper: Path
    state: Path
    work: Path
    journal: Journal
    layers: LayerRoot

    def reopen(self) -> None:
        """The daemon died: close everything, reopen the journal as the next mount does."""
        self.close()
        self.journal = Journal.open(str(self.state / "journal"))
        self.layers = self._layers(self.journal)

    def _layers(self, journal: Journal) -> LayerRoot:
        return LayerRoot(os.open(self.upper, os.O_PATH | os.O_DIRECTORY),
                         os.open(self.work, os.O_PATH | os.O_DIRECTORY), journal)

    def close(self) -> None:
        if self.layers.upper_fd >= 0:
            os.close(self.layers.upper_fd)
            os.close(self.layers.work_fd)
            self.layers.upper_fd = self.layers.work_fd = -1
        self.journal.close()

    def recover(self) -> int | None:
        return recover(self.journal, bytes(self.upper), bytes(self.work))

    def write(self, path: bytes, data: bytes) -> None:
        fd = self.layers.open(path, os.O_WRONLY)
        try:
            self.journal.append(rec.Write(path, name_to_handle(fd), 0, len(data)))
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)

    def check(self) -> None:
        self.close()
        assert run_checks(str(self.upper), str(self.state)) == []


@pytest.fixture
def crash(tmp_path: Path) -> Iterator[State]:
    upper, state = tmp_path / "upper", tmp_path / "state"
    work = state / "work"
    upper.mkdir()
    work.mkdir(parents=True)
    journal = Journal.open(str(state / "journal"))
    s = State(tmp_path, upper, state, work, journal, LayerRoot(-1, -1, journal))
    s.layers = s._layers(journal)
    yield s
    if s.layers.upper_fd >= 0:
        s.close()


def _file(path: Path) -> bytes:
    return path.read_bytes()


Setup = Callable[[State], None]
Verify = Callable[[State], bool]


def _mkfile(s: State, path: bytes, data: bytes = b"") -> None:
    s.layers.mknod(path, stat.S_IFREG | 0o644, 0, 0)
    if data:
        s.write(path, data)


def _mkdir_with_xattr(s: State, path: bytes, name: bytes) -> None:
    s.layers.mkdir(path, 0o755, 0, 0)
    s.layers.setxattr(path, name, b"1")


RECOVERY_CASES: dict[str, tuple[Setup, rec.Record, Verify]] = {
    "mkdir": (lambda s: None, rec.Mkdir(b"upper/d", 0o750, 1234, 5678),
              lambda s: (stat.S_IMODE(os.lstat(s.upper / "d").st_mode) == 0o750
                         and os.lstat(s.upper / "d").st_uid == 1234)),
    "mknod": (lambda s: None, rec.Mknod(b"upper/f", stat.S_IFREG | 0o600, 0, 0),
              lambda s: stat.S_ISREG(os.lstat(s.upper / "f").st_mode)),
    "whiteout": (lambda s: None, rec.Mknod(b"upper/w", stat.S_IFCHR, 0, 0),
                 lambda s: is_whiteout(os.lstat(s.upper / "w"))),
    "symlink": (lambda s: None, rec.Symlink(b"upper/l", b"/etc/hostname", 0, 0),
                lambda s: os.readlink(s.upper / "l") == "/etc/hostname"),
    "link": (lambda s: _mkfile(s, b"upper/a", b"A"), rec.Link(b"upper/a", b"upper/b"),
             lambda s: os.lstat(s.upper / "b").st_ino == os.lstat(s.upper / "a").st_ino),
    "unlink": (lambda s: _mkfile(s, b"upper/a", b"A"), rec.Unlink(b"upper/a"),
               lambda s: not os.path.lexists(s.upper / "a")),
    "rmdir": (lambda s: s.layers.mkdir(b"upper/d", 0o755, 0, 0), rec.Rmdir(b"upper/d"),
              lambda s: not os.path.lexists(s.upper / "d")),
    "rename": (lambda s: _mkfile(s, b"work/stage", b"S"),
               rec.Rename(b"work/stage", b"upper/f", RENAME_NOREPLACE, 0),
               lambda s: _file(s.upper / "f") == b"S" and not os.path.lexists(s.work / "stage")),
    "rename-whiteout": (lambda s: _mkfile(s, b"upper/a", b"A"),
                        rec.Rename(b"upper/a", b"upper/b", RENAME_WHITEOUT, 0),
                        lambda s: is_whiteout(os.lstat(s.upper / "a"))
                        and _file(s.upper / "b") == b"A"),
    "setattr": (lambda s: _mkfile(s, b"upper/f", b"0123456789"),
                rec.Setattr(b"upper/f", rec.SET_MODE | rec.SET_SIZE | rec.SET_MTIME, 0o640,
                            size=4, mtime_ns=123_456_789_012),
                lambda s: _file(s.upper / "f") == b"0123"
                and stat.S_IMODE(os.lstat(s.upper / "f").st_mode) == 0o640
                and os.lstat(s.upper / "f").st_mtime_ns == 123_456_789_012),
    "setxattr": (lambda s: s.layers.mkdir(b"upper/d", 0o755, 0, 0),
                 rec.Setxattr(b"upper/d", b"trusted.overlay.opaque", b"y"),
                 lambda s: os.getxattr(s.upper / "d", b"trusted.overlay.opaque") == b"y"),
    "removexattr": (lambda s: _mkdir_with_xattr(s, b"upper/d", b"user.x"),
                    rec.Removexattr(b"upper/d", b"user.x"),
                    lambda s: os.listxattr(s.upper / "d") == []),
}


def _aborted(journal: Journal, seq: int) -> bool:
    return any(e.record == rec.Abort(seq) for e in journal.read())


def _fill_rename_ino(s: State, record: rec.Record) -> rec.Record:
    if isinstance(record, rec.Rename):
        st = s.layers.lstat(record.src)
        return attrs.evolve(record, src_ino=st.st_ino if st else 0)
    return record


@needs_root
@pytest.mark.parametrize("case", sorted(RECOVERY_CASES))
def test_recover_redoes_the_record_in_flight(crash: State, case: str) -> None:
    setup, record, verify = RECOVERY_CASES[case]
    setup(crash)
    record = _fill_rename_ino(crash, record)
    seq = crash.journal.append(record)  # ... and the daemon was killed before the syscall
    crash.reopen()
    assert crash.recover() == seq
    assert verify(crash), case
    assert not _aborted(crash.journal, seq)
    # a second recovery (killed during the first, or mounted again) changes nothing more
    crash.reopen()
    assert crash.recover() in (seq, None)
    assert verify(crash), case
    assert not _aborted(crash.journal, seq)
    crash.check()


@needs_root
@pytest.mark.parametrize("case", sorted(RECOVERY_CASES))
def test_recover_after_the_record_took_effect_changes_nothing(crash: State, case: str) -> None:
    setup, record, verify = RECOVERY_CASES[case]
    setup(crash)
    record = _fill_rename_ino(crash, record)
    crash.journal.append(record)
    apply_record(LayerRoot(crash.layers.upper_fd, crash.layers.work_fd, NullJournal()), record)
    assert verify(crash)
    crash.reopen()
    crash.recover()
    assert verify(crash), case
    crash.check()


# The state a kill between creating an entry and its chown leaves: made (root's, the
# mode less a 077 umask), never owned.  Each: the record, how the entry was made, and
# the st_mode recovery must leave.
HALF_DONE: dict[str, tuple[rec.Record, Callable[[Path], None], int]] = {
    "mkdir": (rec.Mkdir(b"upper/d", 0o755, 1234, 5678), lambda p: p.mkdir(mode=0o700),
              stat.S_IFDIR | 0o755),
    "mknod": (rec.Mknod(b"upper/d", stat.S_IFREG | 0o644, 1234, 5678),
              lambda p: p.touch(mode=0o600), stat.S_IFREG | 0o644),
    "fifo": (rec.Mknod(b"upper/d", stat.S_IFIFO | 0o640, 1234, 5678),
             lambda p: os.mkfifo(p, 0o600), stat.S_IFIFO | 0o640),
    "symlink": (rec.Symlink(b"upper/d", b"t", 1234, 5678), lambda p: p.symlink_to("t"),
                stat.S_IFLNK | 0o777),
    "whiteout": (rec.Mknod(b"upper/d", stat.S_IFCHR, 1234, 5678),
                 lambda p: os.mknod(p, stat.S_IFCHR, 0), stat.S_IFCHR),
    "mkdev": (rec.Mkdev(b"upper/d", stat.S_IFCHR | 0o620, os.makedev(1, 3), 1234, 5678),
              lambda p: os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3)),
              stat.S_IFCHR | 0o620),
}


@needs_root
@pytest.mark.parametrize("case", sorted(HALF_DONE))
def test_recover_owns_an_entry_made_before_the_kill(crash: State, case: str) -> None:
    """Killed between the create and the chown: recovery finds the entry and gives it
    the record's owner and mode (it once left it root's: a 0600 file no job could read)."""
    record, make, mode = HALF_DONE[case]
    seq = crash.journal.append(record)
    make(crash.upper / "d")
    crash.reopen()
    assert crash.recover() == seq
    st = os.lstat(crash.upper / "d")
    assert (st.st_mode, st.st_uid, st.st_gid) == (mode, 1234, 5678)
    assert not _aborted(crash.journal, seq)


@needs_root
@pytest.mark.parametrize("case", ["mkdir", "mknod", "whiteout", "mkdev"])
def test_recover_leaves_an_entry_of_another_kind_as_it_is(crash: State, case: str) -> None:
    """A different kind at the path (a different device number too) stays as it is."""
    record, _, _ = HALF_DONE[case]
    if case in ("mkdir", "mknod"):
        os.symlink("/etc", crash.upper / "d")
    else:
        os.mknod(crash.upper / "d", stat.S_IFCHR | 0o600, os.makedev(1, 5))
    before = os.lstat(crash.upper / "d")
    etc = os.stat("/etc")
    seq = crash.journal.append(record)
    crash.reopen()
    assert crash.recover() == seq
    after = os.lstat(crash.upper / "d")
    assert (after.st_mode, after.st_uid, after.st_rdev) == \
        (before.st_mode, before.st_uid, before.st_rdev)
    assert os.stat("/etc") == etc


@pytest.mark.expect_log("sdeefs.apply")
def test_recover_aborts_a_record_that_cannot_be_redone(crash: State) -> None:
    crash.layers.mkdir(b"upper/d", 0o755, 0, 0)
    _mkfile(crash, b"upper/d/f", b"keep")
    impossible = [
        rec.Rmdir(b"upper/d"),  # not empty
        rec.Mkdir(b"upper/missing/x", 0o755, 0, 0),  # no parent
        rec.Symlink(b"upper/d/f/x", b"t", 0, 0),  # parent is a file
        rec.Rename(b"upper/d/f", b"upper/nowhere/f", 0, 0),
    ]
    for record in impossible:
        seq = crash.journal.append(record)
        crash.reopen()
        assert crash.recover() == seq
        after = [e.record for e in crash.journal.read(seq + 1)]
        assert after == [rec.Abort(seq), rec.Sync(SYNC_FLUSHED)], record
        assert crash.journal.synced == crash.journal.head  # the Abort is durable
        # once aborted, it is never redone
        crash.reopen()
        assert crash.recover() is None
        assert [e.record for e in crash.journal.read(seq + 1)] == after
    assert _file(crash.upper / "d" / "f") == b"keep"
    assert sorted(os.listdir(crash.upper)) == ["d"]
    crash.check()


def test_recover_with_nothing_to_do(crash: State) -> None:
    assert crash.recover() is None
    crash.journal.append(rec.Sync(0))
    seq = crash.journal.append(rec.Mkdir(b"upper/d", 0o755, 0, 0))
    crash.journal.append(rec.Abort(seq))  # the operation failed and said so
    crash.reopen()
    assert crash.recover() is None
    assert not os.path.lexists(crash.upper / "d")
    crash.check()


# Regression (was a bug): recover() re-applies the last *metadata* record even when later Write
# records prove it took effect: an O_TRUNC open followed by writes and a kill -9 truncates the
# written data away on the next mount
def test_recover_does_not_undo_writes_after_a_truncate(crash: State) -> None:
    _mkfile(crash, b"upper/f", b"old contents")
    crash.layers.setattr(rec.Setattr(b"upper/f", rec.SET_SIZE, size=0))  # open(O_TRUNC)
    crash.write(b"upper/f", b"new data, acknowledged")
    crash.journal.sync()  # the user even fsync'd
    crash.reopen()  # kill -9, mount again
    crash.recover()
    assert _file(crash.upper / "f") == b"new data, acknowledged"
    crash.check()


# Regression (was a bug): recover() only reads the last segment; a metadata record in flight at
# the end of the previous segment is never redone when a Write record (from a worker thread)
# started a new segment after it
def test_recover_finds_the_record_in_flight_in_the_previous_segment(tmp_path: Path) -> None:
    upper, work = tmp_path / "upper", tmp_path / "state" / "work"
    upper.mkdir()
    work.mkdir(parents=True)
    jdir = str(tmp_path / "state" / "journal")
    journal = Journal.open(jdir, segment_bytes=100)
    journal.append(rec.Mkdir(b"upper/d", 0o755, 0, 0))  # not performed: killed
    journal.append(rec.Write(b"upper/other", b"", 0, 10))  # a concurrent write rotates
    journal.close()
    assert len(journal.segments()) == 2
    journal = Journal.open(jdir, segment_bytes=100)
    assert recover(journal, bytes(upper), bytes(work)) == 1
    journal.close()
    assert os.path.isdir(upper / "d")


# --------------------------------------------------------------------------
# replay and apply


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, uid, gid, content / target / rdev, xattrs, hard-link group)."""
    out: dict[str, tuple[object, ...]] = {}
    names_of: dict[int, list[str]] = {}
    ino_of: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    body: object = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            else:
                body = st.st_rdev if stat.S_ISCHR(st.st_mode) else None
            xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                  for n in os.listxattr(path, follow_symlinks=False)))
            names_of.setdefault(st.st_ino, []).append(rel)
            ino_of[rel] = st.st_ino
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, body, xattrs)
    # names of one inode: the same set in both trees
    return {rel: (*sig, tuple(sorted(names_of[ino_of[rel]]))) for rel, sig in out.items()}


def build_upper_with_cowfs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A busy session over a small lower tree; returns (upper, work, state)."""
    lower, upper, state = tmp_path / "lower", tmp_path / "upper", tmp_path / "state"
    work = state / "work"
    for d in (lower / "d" / "sub", upper, work, lower / "e"):
        d.mkdir(parents=True)
    for name, data in (("a", b"A"), ("b", b"B" * 5000), ("d/x", b"X"), ("d/sub/y", b"Y")):
        (lower / name).write_bytes(data)
    os.link(lower / "a", lower / "d" / "a-link")
    os.setxattr(lower / "b", b"user.k", b"v")
    journal = Journal.open(str(state / "journal"))
    fs = CowFS.open(ViewConfig(upper=bytes(upper), work=bytes(work), lower=bytes(lower)), journal)

    def ino(path: bytes) -> int:
        i = ROOT_INO
        for part in path.split(b"/"):
            i = fs.lookup(i, part).ino
        return i

    def write(path: bytes, data: bytes, off: int = 0) -> None:
        node = fs.node(ino(path))
        fs.copy_up(node)
        fd = fs.open_fd(node.ino, os.O_WRONLY)
        fs.journal_write(node, name_to_handle(fd), off, len(data))
        os.pwrite(fd, data, off)
        os.close(fd)

    try:
        write(b"a", b"changed a")  # hard-linked: d/a-link follows
        write(b"b", b"!", 4999)
        fs.setattr(ino(b"b"), AttrChange(mode=0o600, uid=1234, gid=5678))
        fs.unlink(ino(b"d"), b"x")
        fs.unlink(ino(b"d/sub"), b"y")
        fs.rmdir(ino(b"d"), b"sub")
        fs.mkdir(ino(b"d"), b"sub", 0o700, 0, 0)  # opaque
        fs.create(ino(b"d/sub"), b"n", 0o644, 0, 0)
        write(b"d/sub/n", b"new file")
        fs.symlink(ROOT_INO, b"l", b"d/sub/n", 0, 0)
        fs.mknod(ROOT_INO, b"fifo", stat.S_IFIFO | 0o644, 0, 0, 0)
        fs.rename(ROOT_INO, b"a", ino(b"e"), b"moved-a", 0)  # whiteout at a
        fs.mkdir(ROOT_INO, b"nd", 0o755, 0, 0)
        fs.create(ino(b"nd"), b"f", 0o644, 0, 0)
        write(b"nd/f", b"F" * 10000)
        fs.rename(ROOT_INO, b"nd", ROOT_INO, b"nd2", 0)
        fs.create(ROOT_INO, b"x1", 0o644, 0, 0)
        fs.create(ROOT_INO, b"x2", 0o644, 0, 0)
        write(b"x1", b"one")
        write(b"x2", b"two")
        fs.rename(ROOT_INO, b"x1", ROOT_INO, b"x2", RENAME_EXCHANGE)
        fs.setxattr(ino(b"x1"), b"user.x", b"1")
        fs.setxattr(ino(b"b"), b"user.k", b"changed")
        fs.removexattr(ino(b"b"), b"user.k")
        fs.link(ino(b"x1"), ino(b"nd2"), b"x1-link")
        fs.create(ROOT_INO, b"tmp", 0o644, 0, 0)
        write(b"tmp", b"temporary")
        fs.unlink(ROOT_INO, b"tmp")
        fs.setattr(ino(b"x2"), AttrChange(size=1))
    finally:
        fs.close()
        journal.close()
    return upper, work, state


def _open_layers(upper: Path, work: Path) -> LayerRoot:
    return LayerRoot(os.open(upper, os.O_PATH | os.O_DIRECTORY),
                     os.open(work, os.O_PATH | os.O_DIRECTORY), NullJournal())


def _close_layers(*layers: LayerRoot) -> None:
    for layer in layers:
        os.close(layer.upper_fd)
        os.close(layer.work_fd)
        if layer._mount_fd >= 0:
            os.close(layer._mount_fd)


@needs_root
def test_replay_into_empty_layer_root_reproduces_upper(tmp_path: Path) -> None:
    upper, work, state = build_upper_with_cowfs(tmp_path)
    assert run_checks(str(upper), str(state)) == []
    replica = tmp_path / "replica"
    (replica / "upper").mkdir(parents=True)
    (replica / "work").mkdir()
    journal = Journal(directory=str(state / "journal"))
    source = _open_layers(upper, work)
    target = _open_layers(replica / "upper", replica / "work")
    try:
        last = replay(journal, source, target)
        assert last == max(e.seq for e in journal.read())
        assert tree(replica / "upper") == tree(upper)
        # replaying again from any point converges to the same tree
        replay(journal, source, target, from_seq=last - 5)
        assert tree(replica / "upper") == tree(upper)
    finally:
        _close_layers(source, target)


@needs_root
def test_replay_applies_a_rename_whose_source_inode_number_is_taken_in_the_target(
        tmp_path: Path) -> None:
    """``sdeefs check`` replays next to the upper, on its filesystem: inode numbers freed
    in the upper come back in the scratch tree.  A Rename whose src_ino (a number of the
    upper) names the entry at dst in the target by coincidence was taken for done and
    skipped: check then reported a replay that differs, or failed on an Rmdir."""
    target = tmp_path / "target"
    (target / "upper").mkdir(parents=True)
    (target / "work").mkdir()
    (target / "upper" / "b").write_bytes(b"what b held")
    coincidence = os.lstat(target / "upper" / "b").st_ino
    journal = Journal.open(str(tmp_path / "journal"))
    try:
        for record in (rec.Mknod(b"upper/a", stat.S_IFREG | 0o644, 0, 0),
                       rec.Rename(b"upper/a", b"upper/b", 0, coincidence)):
            journal.append(record)
    finally:
        journal.close()
    source = _open_layers(tmp_path / "target" / "upper", tmp_path / "target" / "work")
    layers = _open_layers(target / "upper", target / "work")
    try:
        replay(Journal(directory=str(tmp_path / "journal")), source, layers)
    finally:
        _close_layers(source, layers)
    assert not (target / "upper" / "a").exists()
    assert (target / "upper" / "b").read_bytes() == b""


@needs_root
@pytest.mark.xfail(strict=True, reason="BUG: on a replica, apply_record(Rename) is not idempotent: "
                   "the 'already done' test compares src_ino (an inode number of the SOURCE "
                   "filesystem) with the replica's inode; re-applying a RENAME_WHITEOUT moves the "
                   "whiteout left at src over dst (dst content lost), re-applying RENAME_EXCHANGE "
                   "swaps back")
def test_replay_applying_every_record_twice_reproduces_upper(tmp_path: Path) -> None:
    """apply.py promises: applying a record twice leaves the same tree as applying it once."""
    upper, work, state = build_upper_with_cowfs(tmp_path)
    replica = tmp_path / "replica"
    (replica / "upper").mkdir(parents=True)
    (replica / "work").mkdir()
    journal = Journal(directory=str(state / "journal"))
    source = _open_layers(upper, work)
    target = _open_layers(replica / "upper", replica / "work")
    try:
        entries = list(journal.read())
        aborted = {e.record.seq for e in entries if isinstance(e.record, rec.Abort)}
        for entry in entries:
            if entry.seq in aborted:
                continue
            data = read_write_data(source, entry.record) \
                if isinstance(entry.record, rec.Write) else None
            apply_record(target, entry.record, data)
            apply_record(target, entry.record, data)  # delivered twice
        assert tree(replica / "upper") == tree(upper)
    finally:
        _close_layers(source, target)


@pytest.mark.xfail(strict=True, reason="BUG: on a replica, re-applying "
                   "Rename(a, b, RENAME_WHITEOUT) moves the whiteout left at a over b "
                   "(src_ino is a SOURCE inode number)")
def test_apply_rename_whiteout_twice_on_a_replica(tmp_path: Path) -> None:
    for d in ("upper", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "upper" / "a").write_bytes(b"A")
    source_ino = os.lstat(tmp_path / "upper" / "a").st_ino + 1_000_000  # another filesystem's
    record = rec.Rename(b"upper/a", b"upper/b", RENAME_WHITEOUT, source_ino)
    target = _open_layers(tmp_path / "upper", tmp_path / "work")
    try:
        apply_record(target, record)
        assert (tmp_path / "upper" / "b").read_bytes() == b"A"
        apply_record(target, record)  # delivered again after a reconnect
    finally:
        _close_layers(target)
    assert not is_whiteout(os.lstat(tmp_path / "upper" / "b"))
    assert (tmp_path / "upper" / "b").read_bytes() == b"A"


@pytest.mark.xfail(strict=True, reason="BUG: on a replica, re-applying "
                   "Rename(a, b, RENAME_EXCHANGE) swaps the two back "
                   "(src_ino is a SOURCE inode number)")
def test_apply_rename_exchange_twice_on_a_replica(tmp_path: Path) -> None:
    for d in ("upper", "work"):
        (tmp_path / d).mkdir()
    (tmp_path / "upper" / "a").write_bytes(b"A")
    (tmp_path / "upper" / "b").write_bytes(b"B")
    source_ino = os.lstat(tmp_path / "upper" / "a").st_ino + 1_000_000
    record = rec.Rename(b"upper/a", b"upper/b", RENAME_EXCHANGE, source_ino)
    target = _open_layers(tmp_path / "upper", tmp_path / "work")
    try:
        apply_record(target, record)
        apply_record(target, record)
    finally:
        _close_layers(target)
    assert (tmp_path / "upper" / "b").read_bytes() == b"A"
    assert (tmp_path / "upper" / "a").read_bytes() == b"B"


@needs_root
# Regression (was a bug): apply_setattr(SET_MODE) follows a symlink: a record stream (e.g. from a
# replica peer) Symlink(upper/f -> host file) + Setattr(upper/f, mode) chmods the host file
# (os.chmod via /proc/self/fd)
def test_apply_setattr_never_follows_a_symlink(tmp_path: Path) -> None:
    for d in ("upper", "work"):
        (tmp_path / d).mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"host")
    os.chmod(victim, 0o600)
    target = _open_layers(tmp_path / "upper", tmp_path / "work")
    try:
        apply_record(target, rec.Symlink(b"upper/f", os.fsencode(str(victim)), 0, 0))
        with contextlib.suppress(OSError):
            apply_record(target, rec.Setattr(b"upper/f", rec.SET_MODE, 0o4777))
    finally:
        _close_layers(target)
        mode = stat.S_IMODE(os.stat(victim).st_mode)
        os.chmod(victim, 0o600)
    assert mode == 0o600


def test_apply_never_leaves_the_layer_root(tmp_path: Path) -> None:
    """Records are validated on decode; apply resolves beneath upper/work even if not."""
    for d in ("upper", "work", "outside"):
        (tmp_path / d).mkdir()
    (tmp_path / "outside" / "f").write_bytes(b"o")
    os.symlink(tmp_path / "outside", tmp_path / "upper" / "link")
    target = _open_layers(tmp_path / "upper", tmp_path / "work")
    hostile = [
        rec.Mkdir(b"upper/link/x", 0o755, 0, 0),
        rec.Mknod(b"upper/link/x", stat.S_IFREG, 0, 0),
        rec.Unlink(b"upper/link/f"),
        rec.Rename(b"upper/link/f", b"upper/stolen", 0, 0),
        rec.Link(b"upper/link/f", b"upper/stolen"),
        rec.Setattr(b"upper/link/f", rec.SET_SIZE, size=0),
        rec.Setxattr(b"upper/link/f", b"user.x", b"1"),
        rec.Mkdir(b"upper/../outside/x", 0o755, 0, 0),
        rec.Unlink(b"upper/../outside/f"),
    ]
    try:
        for record in hostile:
            with contextlib.suppress(OSError):
                apply_record(target, record)
            assert sorted(os.listdir(tmp_path / "outside")) == ["f"], record
            assert (tmp_path / "outside" / "f").read_bytes() == b"o", record
            assert os.listxattr(tmp_path / "outside" / "f") == [], record
        assert sorted(os.listdir(tmp_path / "upper")) == ["link"]
    finally:
        _close_layers(target)


# --------------------------------------------------------------------------
# journals written before long paths were carried (segment version 1)

# seg-0000000000000001.log as sdeefs wrote it before segment version 2 (commit 1e90051),
# zlib + base64: OLD_RECORDS appended to a fresh journal.  Path fields have u16 lengths.
OLD_SEGMENT = (
    "eNoLdnF1dQv2YmBkYABjEOi/Ys7w6YB6gSiSGIhmZygtKEgt0k95ywgRYALiJk3fLnEomwFKc8IU6qctaWRgYAYK"
    "sQDxiY971PUZIHwQ4EZVKgDkckCtykjMS8lJ1dODqmRghdKdk18UK0ONY4AaBXNWDh+Qo6enX5yfm6pfkliUnloC"
    "066VkjNFmR9hDDsQ8zGU5xdl6xenpKamFesrG7LyQ4wpGNlg1P+j/h/1/6j/R/0/6v9R/4/6f9T/o/4f9f+o/0f9"
    "PzIAqPfdfk0I3E3+Gv1kthqQZoN2mzmRBwHEGEqKSotLUlP08stSi3ISK/XyCxILS1NBBlRO6bq2nwPa0WYAd7YR"
    "pgAA8AvMlA=="
)
OLD_RECORDS = [
    rec.Mkdir(b"upper/d", 0o755, 1, 2),
    rec.Mknod(b"upper/d/f", stat.S_IFREG | 0o644, 3, 4),
    rec.Write(b"upper/d/f", b"\x08\x00\x00\x00\x01\x00\x00\x00handle..", 0, 5),
    rec.Symlink(b"upper/l", b"../some/target", 0, 0),
    rec.Rename(b"work/sdeefs/#1", b"upper/" + b"/".join([b"p" * 255] * 15), 1, 1234567),
    rec.Setxattr(b"upper/d", b"trusted.overlay.opaque", b"y"),
    rec.Done(6),
]


def _old_journal(tmp_path: Path) -> tuple[str, bytes]:
    jdir = tmp_path / "journal"
    jdir.mkdir()
    (jdir / "id").write_bytes(b"i" * 16)
    data = zlib.decompress(base64.b64decode(OLD_SEGMENT))
    (jdir / segment_name(1)).write_bytes(data)
    return str(jdir), data


def test_a_version_1_segment_still_reads_and_appends_go_to_a_version_2_one(
        tmp_path: Path) -> None:
    jdir, old = _old_journal(tmp_path)
    assert read_segment_header(old) == (1, 1)
    assert [e.record for e in Journal(directory=jdir).read()] == OLD_RECORDS  # sdeefs log/check
    journal = Journal.open(jdir)
    try:
        assert journal.head == len(OLD_RECORDS)
        deep = b"upper/" + b"/".join([b"q" * 255] * 40)  # 10 KB: only version 2 carries it
        assert journal.append(rec.Mkdir(deep, 0o755, 0, 0)) == len(OLD_RECORDS) + 1
        journal.sync()
    finally:
        journal.close()
    segments = Journal(directory=jdir).segments()
    assert [first for first, _ in segments] == [1, len(OLD_RECORDS) + 1]
    assert Path(segments[0][1]).read_bytes() == old  # the old segment is never rewritten
    assert read_segment_header(Path(segments[1][1]).read_bytes())[1] == SEGMENT_VERSION
    expected = [*OLD_RECORDS, rec.Mkdir(deep, 0o755, 0, 0), rec.Sync(SYNC_FLUSHED)]
    assert [e.record for e in Journal(directory=jdir).read()] == expected
    reopened = Journal.open(jdir)
    try:
        assert [e.record for e in reopened.read()] == expected
    finally:
        reopened.close()
    # a replication source reading the live journal crosses the versions too
    tail = JournalTail(jdir, 1)
    try:
        got: list[rec.Record] = []
        for _ in range(4):
            got += [e.record for e in tail.poll()]
        assert got == expected
    finally:
        tail.close()


def test_an_empty_version_1_segment_is_started_again_in_version_2(tmp_path: Path) -> None:
    jdir = tmp_path / "journal"
    jdir.mkdir()
    (jdir / segment_name(9)).write_bytes(encode_segment_header(9, version=1))
    journal = Journal.open(str(jdir))
    try:
        assert journal.head == 8
        assert journal.append(rec.Sync(1)) == 9
    finally:
        journal.close()
    assert read_segment_header((jdir / segment_name(9)).read_bytes()) == (9, SEGMENT_VERSION)
    assert [(e.seq, e.record) for e in Journal(directory=str(jdir)).read(9)] == [(9, rec.Sync(1))]


def test_a_version_2_segment_still_reads_and_a_create_goes_to_a_version_3_one(
        tmp_path: Path) -> None:
    """Journals of the release before Create (segment version 2) read as before; what is
    appended next starts a version-3 segment; a Create inside a version-2 segment is
    damage (that encoding never had it), refused with one clear error."""
    jdir = tmp_path / "journal"
    jdir.mkdir()
    (jdir / "id").write_bytes(b"i" * 16)
    old = [rec.Mkdir(b"upper/d", 0o755, 1, 2), rec.Mknod(b"upper/d/f", stat.S_IFREG | 0o644, 1, 2),
           rec.Write(b"upper/d/f", b"h", 0, 3)]
    (jdir / segment_name(1)).write_bytes(
        encode_segment_header(1, version=2)
        + b"".join(encode_frame(seq, r, 2) for seq, r in enumerate(old, 1)))
    create = rec.Create(b"upper/d/g", stat.S_IFREG | 0o600, 1, 2, 5, b"h", b"", b"new")
    journal = Journal.open(str(jdir))
    try:
        assert journal.head == 3
        assert journal.append(create) == 4
    finally:
        journal.close()
    segments = Journal(directory=str(jdir)).segments()
    assert [first for first, _ in segments] == [1, 4]
    assert read_segment_header(Path(segments[1][1]).read_bytes())[1] == SEGMENT_VERSION == 3
    assert [e.record for e in Journal(directory=str(jdir)).read()][:4] == [*old, create]
    # a Create framed into a version-2 segment (no sdeefs writes that)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / segment_name(1)).write_bytes(encode_segment_header(1, version=2)
                                        + encode_frame(1, old[0], 2)
                                        + encode_frame(2, create, 3))
    with pytest.raises(BadRecord, match="record type 21 is not in encoding version 2"):
        list(Journal(directory=str(bad)).read())


def test_a_fallocate_record_applies_without_the_mode_too(tmp_path: Path) -> None:
    """Replay or a replica on a filesystem without a mode (tmpfs has no ZERO_RANGE) writes
    the bytes fallocate(2) leaves: zeros in place, the size extended."""
    from sdeefs.layers import apply_fallocate, emulate_fallocate

    steps = ((rec.FALLOC_ZERO_RANGE | rec.FALLOC_KEEP_SIZE, 10, 200),
             (rec.FALLOC_ZERO_RANGE, 90, 20), (0, 0, 150), (rec.FALLOC_KEEP_SIZE, 0, 999),
             (rec.FALLOC_PUNCH_HOLE | rec.FALLOC_KEEP_SIZE, 0, 2))
    results = []
    for apply in (apply_fallocate, emulate_fallocate):
        path = tmp_path / apply.__name__
        path.write_bytes(b"A" * 100)
        fd = os.open(path, os.O_RDWR)
        try:
            for mode, offset, length in steps:
                apply(fd, rec.Fallocate(b"upper/f", mode, offset, length))
        finally:
            os.close(fd)
        results.append(path.read_bytes())
    assert results[0] == results[1] == bytes(2) + b"A" * 8 + bytes(140)


def test_a_tail_skips_records_without_decoding_them_across_segments(tmp_path: Path) -> None:
    """``JournalTail.skip`` (how the login node learns a head: a cold follower's first
    query passes the whole journal) reaches exactly where ``poll`` does, segment after
    segment, and decodes nothing: a record that would not decode does not stop it."""
    jdir = str(tmp_path / "journal")
    journal = Journal.open(jdir, segment_bytes=4096)
    try:
        for i in range(300):
            journal.append(rec.Mkdir(b"upper/d%d" % i, 0o755, 1, 2))
        head = journal.head
    finally:
        journal.close()
    assert len(os.listdir(jdir)) > 3  # several segments
    polled, skipped = JournalTail(jdir, 1), JournalTail(jdir, 1)
    try:
        seqs = []
        while entries := polled.poll(1000):
            seqs += [e.seq for e in entries]
        count = 0
        while passed := skipped.skip(1000):
            count += passed
        assert seqs == list(range(1, head + 1))
        assert count == head
        assert skipped.next_seq == polled.next_seq == head + 1
    finally:
        polled.close()
        skipped.close()
    # a frame whose checksum is right but whose record would not decode: poll stops on it,
    # skip passes it (what is in a record is not the head's business)
    body = _FRAME_BODY.pack(1, head + 1, rec.Mkdir.TYPE, 0) + b"\xff"
    with open(os.path.join(jdir, sorted(os.listdir(jdir))[-1]), "ab") as segment:
        segment.write(struct.pack("<I", zlib.crc32(body)) + body)
    polled = JournalTail(jdir, head)
    try:
        with pytest.raises(BadRecord):
            polled.poll()
    finally:
        polled.close()
    skipped = JournalTail(jdir, head)
    try:
        assert skipped.skip() == 2
        assert skipped.next_seq == head + 2
    finally:
        skipped.close()
