"""The replication protocol over in-memory streams: convergence, resume, hostile peers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from sdeefs import records as rec
from sdeefs.errors import BadRecord
from sdeefs.fs.cow import AttrChange, CowFS, ViewConfig
from sdeefs.fs.inodes import ROOT_INO
from sdeefs.identity import Identity
from sdeefs.journal import Journal, NullJournal
from sdeefs.layers import LayerRoot
from sdeefs.replicable import NOBODY, UserIds, of_identity, user_ids
from sdeefs.replication.auth import SharedKey
from sdeefs.replication.relay import Downstream
from sdeefs.replication.replica import MAX_SKIPPED, Follower, LinkStats, Replica
from sdeefs.replication.snapshot import snapshot_frames
from sdeefs.replication.wire import (
    ACK,
    CHUNK,
    ERROR,
    MORE,
    RECORD,
    Frame,
    FrameReader,
    ProtocolError,
    Refused,
    VersionMismatch,
    answer_hello,
    decode_hello,
    decode_record_payload,
    decode_report,
    encode_record_payload,
    record_frames,
    sanitize,
)
from sdeefs.sysio import name_to_handle
from sdeefs.trees import signature
from sdeefs.writeahead import read_write_data

KEY = b"k" * 32
AUTH = SharedKey(KEY)
USER = "alice"
ALICE_UID = 4242
ALICE = user_ids(ALICE_UID, 4242)
ALICE_OWNER = (ALICE_UID, 4242)  # what her records give their entries


def _cap_v3(rootid: int) -> bytes:
    """A v3 security.capability (effective, permitted CAP_NET_RAW) for ``rootid``."""
    return struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, rootid)


class Login:
    """A login node's layer root with its journal, changed through CowFS (no mount needed)."""

    def __init__(self, tmp: Path) -> None:
        self.lower, self.upper, self.work = tmp / "lower", tmp / "upper", tmp / "state" / "work"
        for path in (self.lower, self.upper, self.work):
            path.mkdir(parents=True)
        (self.lower / "etc").mkdir()
        (self.lower / "etc" / "profile").write_text("export A=1\n")
        (self.lower / "old").mkdir()
        (self.lower / "old" / "f").write_text("old\n")
        self.journal = Journal.open(str(tmp / "state" / "journal"))
        self.fs = CowFS.open(ViewConfig(upper=bytes(self.upper), work=bytes(self.work),
                                    lower=bytes(self.lower)), self.journal)

    def write(self, parent: int, name: bytes, data: bytes, mode: int = 0o644) -> int:
        attr = self.fs.create(parent, name, mode, 0, 0)
        node = self.fs.node(attr.ino)
        fd = self.fs.open_fd(attr.ino, os.O_WRONLY)
        try:
            handle = name_to_handle(fd)
            self.fs.journal_write(node, handle, 0, len(data))
            os.pwrite(fd, data, 0)
        finally:
            os.close(fd)
        return attr.ino

    def source(self) -> LayerRoot:
        fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in (self.upper, self.work)]
        return LayerRoot(fds[0], fds[1], NullJournal())

    def close(self) -> None:
        self.fs.close()
        self.journal.close()


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    sig = signature(str(root))
    out: dict[str, tuple[object, ...]] = {}
    for path, value in sig.items():
        full = root / path
        digest = hashlib.sha256(full.read_bytes()).hexdigest() if full.is_file() and \
            not full.is_symlink() else None
        out[path] = (*value, digest)
    return out


JOURNAL_ID = b"j" * 16


async def upstream(stream: trio.abc.Stream, frames: list[Frame], last: int) -> int:
    """A minimal upstream: answer HELLO, send ``frames`` after the replica's position,
    wait for the ACK of ``last``, close.  Returns the last seq acknowledged."""
    reader = FrameReader(stream)
    hello = decode_hello(await reader.frame(KEY))
    key = await answer_hello(stream, KEY, hello, last, JOURNAL_ID)
    follower = Downstream("n1", USER, acked=hello.want - 1)
    await stream.send_all(b"".join(f.encode(key) for f in frames if f.seq >= hello.want))
    while follower.acked < last:
        frame = await reader.frame(key)
        assert frame.type == ACK
        follower.acked = frame.seq
    await stream.aclose()
    return follower.acked


async def stream(login: Login, replica_dir: Path) -> tuple[int, int]:
    """Send the login node's whole journal to the replica in ``replica_dir``."""
    source = login.source()
    try:
        frames = []
        for entry in login.journal.read(1):
            data = read_write_data(source, entry.record) \
                if isinstance(entry.record, rec.Write) else None
            frames.extend(record_frames(entry.seq, entry.record, data))
    finally:
        source.close()
    left, right = trio.testing.memory_stream_pair()
    replica = Replica.open(str(replica_dir / USER))
    result: dict[str, int] = {}
    try:
        async with trio.open_nursery() as nursery:
            async def replica_side() -> None:
                await Follower(right, replica, AUTH, USER, "n1", LinkStats()).run()
                result["applied"] = replica.applied

            nursery.start_soon(replica_side)
            result["acked"] = await upstream(left, frames, login.journal.head)
    finally:
        replica.close()
    return result["acked"], result["applied"]


@pytest.fixture
def login(tmp_path: Path) -> Iterator[Login]:
    result = Login(tmp_path / "login")
    yield result
    result.close()


async def test_replica_converges_and_resumes(login: Login, tmp_path: Path) -> None:
    fs = login.fs
    etc = fs.lookup(ROOT_INO, b"etc").ino
    big = os.urandom(CHUNK * 2 + 12345)
    login.write(ROOT_INO, b"big.bin", big)
    fs.mkdir(ROOT_INO, b"opt", 0o755, 0, 0)
    login.write(fs.lookup(ROOT_INO, b"opt").ino, b"tool", b"#!/bin/sh\n", 0o755)
    fs.unlink(etc, b"profile")                        # whiteout of a lower file
    fs.unlink(fs.lookup(ROOT_INO, b"old").ino, b"f")
    fs.rmdir(ROOT_INO, b"old")
    fs.mkdir(ROOT_INO, b"old", 0o700, 0, 0)           # opaque directory
    fs.setxattr(fs.lookup(ROOT_INO, b"opt").ino, b"user.tag", b"v1")
    replica_dir = tmp_path / "replicas"
    acked, applied = await stream(login, replica_dir)
    assert acked == applied == login.journal.head
    replica_upper = replica_dir / USER / "upper"
    assert tree(replica_upper) == tree(login.upper)
    assert os.getxattr(replica_upper / "old", "trusted.overlay.opaque") == b"y"
    assert stat.S_ISCHR(os.lstat(replica_upper / "etc" / "profile").st_mode)

    # resume: only what is new travels, and the replica ends identical again
    before = login.journal.head
    fs.rename(ROOT_INO, b"big.bin", fs.lookup(ROOT_INO, b"opt").ino, b"big2.bin", 0)
    acked, applied = await stream(login, replica_dir)
    assert applied == login.journal.head > before
    assert tree(replica_upper) == tree(login.upper)
    reopened = Replica.open(str(replica_dir / USER))
    assert reopened.applied == login.journal.head
    reopened.close()


async def test_setuid_bits_are_stripped_on_the_replica(login: Login, tmp_path: Path) -> None:
    login.write(ROOT_INO, b"suid", b"x", 0o4755)
    ino = login.fs.lookup(ROOT_INO, b"suid").ino
    login.fs.setattr(ino, AttrChange(mode=0o6755))
    await stream(login, tmp_path / "replicas")
    mode = os.lstat(tmp_path / "replicas" / USER / "upper" / "suid").st_mode
    assert stat.S_IMODE(mode) == 0o755


def _frames(payloads: list[tuple[int, bytes, int]], key: bytes) -> bytes:
    return b"".join(Frame(RECORD, seq, payload, flags).encode(key)
                    for seq, payload, flags in payloads)


async def _hostile_session(tmp_path: Path, build: object, ids: UserIds = NOBODY
                           ) -> tuple[Replica, str]:
    """Run a replica against a scripted upstream; return the replica (opened again: what
    is on disk) and the error text."""
    left, right = trio.testing.memory_stream_pair()
    replica_dir = tmp_path / "replicas"
    errors: list[str] = []
    replica = Replica.open(str(replica_dir / USER), ids)

    async def replica_side() -> None:
        try:
            await Follower(right, replica, AUTH, USER, "n1", LinkStats()).run()
        except ProtocolError as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(replica_side)
        hello = decode_hello(await FrameReader(left).frame(KEY))
        key = await answer_hello(left, KEY, hello, 9, JOURNAL_ID)
        await left.send_all(build(key))  # type: ignore[operator]
        await left.send_stream.aclose()  # half-close: the replica still answers
    replica.close()
    return Replica.open(str(replica_dir / USER), ids), errors[0] if errors else ""


def _mkdir(path: bytes) -> bytes:
    return encode_record_payload(rec.Mkdir(path, 0o755, *ALICE_OWNER))


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_tampered_frame_is_rejected_and_nothing_applied(tmp_path: Path) -> None:
    def build(key: bytes) -> bytes:
        frame = bytearray(_frames([(1, _mkdir(b"upper/evil"), 0)], key))
        frame[30] ^= 1  # a payload byte: the CRC and the MAC no longer match
        return bytes(frame)

    replica, error = await _hostile_session(tmp_path, build)
    assert "checksum" in error or "authentication" in error
    assert replica.applied == 0
    assert not (tmp_path / "replicas" / USER / "upper" / "evil").exists()


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_frames_from_another_session_are_rejected(tmp_path: Path) -> None:
    replayed = _frames([(1, _mkdir(b"upper/replayed"), 0)], b"s" * 32)  # another session's key
    replica, error = await _hostile_session(tmp_path, lambda key: replayed)
    assert "authentication" in error
    assert not (tmp_path / "replicas" / USER / "upper" / "replayed").exists()


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_out_of_sequence_is_rejected(tmp_path: Path) -> None:
    replica, error = await _hostile_session(
        tmp_path, lambda key: _frames([(1, _mkdir(b"upper/a"), 0), (3, _mkdir(b"upper/b"), 0)],
                                      key))
    assert "out of sequence" in error
    assert replica.applied == 1
    assert not (tmp_path / "replicas" / USER / "upper" / "b").exists()


@pytest.mark.parametrize("payload", [
    encode_record_payload(rec.Setxattr(b"upper/f", b"security.capability", b"\1" * 20)),
    encode_record_payload(rec.Setxattr(b"upper/f", b"security.capability",
                                       _cap_v3(ALICE_UID + 1))),  # another user's rootid
    encode_record_payload(rec.Setxattr(b"upper/f", b"security.capability", _cap_v3(0))),
    encode_record_payload(rec.Setxattr(b"upper/f", b"trusted.evil", b"1")),
    encode_record_payload(rec.Mkdir(b"upper/missing/child", 0o755, 0, 0)),  # cannot apply
    struct.pack("<HI", rec.Mknod.TYPE, 0) + b"",
    rec.encode_record(rec.Mkdir(b"upper/ok", 0o755, 0, 0))[1],  # missing the payload header
])
@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_hostile_records_are_skipped_recorded_and_the_stream_goes_on(
        tmp_path: Path, payload: bytes) -> None:
    create = encode_record_payload(rec.Mknod(b"upper/f", stat.S_IFREG | 0o755, *ALICE_OWNER))
    replica, error = await _hostile_session(tmp_path, lambda key: _frames(
        [(1, create, 0), (2, payload, 0), (3, _mkdir(b"upper/after"), 0)], key), ALICE)
    assert error == ""  # not the link's problem: it stayed up
    assert replica.applied == 3
    assert (tmp_path / "replicas" / USER / "upper" / "after").is_dir()
    assert [r.seq for r in replica.skipped.records] == [2]  # kept on disk, by seq
    assert replica.skipped.count == 1
    assert "record 2 was skipped" in replica.skipped.summary()
    names = os.listxattr(tmp_path / "replicas" / USER / "upper" / "f")
    assert not [n for n in names if not n.startswith("user.")], names


async def test_a_file_capability_for_the_users_own_rootid_is_carried(tmp_path: Path) -> None:
    create = encode_record_payload(rec.Mknod(b"upper/f", stat.S_IFREG | 0o755, *ALICE_OWNER))
    cap = _cap_v3(ALICE_UID)
    setcap = encode_record_payload(rec.Setxattr(b"upper/f", b"security.capability", cap))
    replica, error = await _hostile_session(
        tmp_path, lambda key: _frames([(1, create, 0), (2, setcap, 0)], key), ALICE)
    assert error == ""
    assert replica.applied == 2
    assert replica.skipped.count == 0
    assert os.getxattr(tmp_path / "replicas" / USER / "upper" / "f",
                       "security.capability") == cap


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_a_refused_chunked_write_is_skipped_once_whole(tmp_path: Path) -> None:
    first = struct.pack("<HI", rec.Write.TYPE, 999) + b"abcd"  # does not decode
    second = encode_record_payload(rec.Write(b"upper/f", b"", 4, 4), b"efgh")
    create = encode_record_payload(rec.Mknod(b"upper/f", stat.S_IFREG | 0o644, *ALICE_OWNER))
    replica, error = await _hostile_session(tmp_path, lambda key: _frames(
        [(1, create, 0), (2, first, MORE), (2, second, 0),
         (3, _mkdir(b"upper/after"), 0)], key), ALICE)
    assert error == ""
    assert replica.applied == 3
    assert replica.skipped.count == 1
    assert replica.skipped.records[0].seq == 2
    assert (tmp_path / "replicas" / USER / "upper" / "f").read_bytes() == b""  # nothing of it


@pytest.mark.expect_log("sdeefs.replication.replica")
def test_skipped_records_are_kept_bounded_and_cleared_by_a_snapshot_or_reset(
        tmp_path: Path) -> None:
    replica = Replica.open(str(tmp_path / "r"), ALICE)
    replica.adopt(JOURNAL_ID)
    bad = rec.Setxattr(b"upper", b"security.selinux", b"x")
    _accept_all(replica, [(seq, bad, None) for seq in range(1, MAX_SKIPPED + 5)])
    assert replica.skipped.count == MAX_SKIPPED + 4
    assert [r.seq for r in replica.skipped.records] == list(range(1, MAX_SKIPPED + 1))
    for seq in (5, MAX_SKIPPED + 4):  # delivered again after a crash: counted once
        again = replica.skipped.plus(attrs.evolve(replica.skipped.records[0], seq=seq))
        assert again == replica.skipped
    replica.close()
    replica = Replica.open(str(tmp_path / "r"), ALICE)
    assert replica.skipped.count == MAX_SKIPPED + 4  # on disk
    # a verified snapshot makes the copy faithful again
    source = tmp_path / "source"
    _sample_tree(source)
    os.chown(source, *ALICE_OWNER)
    for dirpath, dirnames, filenames in os.walk(source):  # a user's upper holds her ids
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), *ALICE_OWNER)
    digest: list[bytes] = []
    frames = list(snapshot_frames(str(source), 50, digest))
    replica.begin_snapshot(50)
    for frame in frames:
        replica.accept_snapshot(frame)
    replica.finish_snapshot(50, digest[0])
    assert replica.skipped.count == 0
    assert not os.path.exists(replica.dirs.skipped)
    _accept_all(replica, [(51, bad, None)])
    assert replica.skipped.count == 1
    replica.reset()
    assert replica.skipped.count == 0
    assert not os.path.exists(replica.dirs.skipped)
    replica.close()
    # a damaged list says the copy is not to be trusted
    replica = Replica.open(str(tmp_path / "r2"), ALICE)
    replica.adopt(JOURNAL_ID)
    _accept_all(replica, [(1, bad, None)])
    replica.close()
    Path(replica.dirs.skipped).write_bytes(b"{")
    replica = Replica.open(str(tmp_path / "r2"), ALICE)
    assert replica.skipped.count == 1
    replica.close()


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_symlinked_parent_on_the_replica_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    upper = tmp_path / "replicas" / USER / "upper"
    upper.mkdir(parents=True)
    os.symlink(outside, upper / "link")
    replica, error = await _hostile_session(
        tmp_path, lambda key: _frames([(1, _mkdir(b"upper/link/escaped"), 0)], key))
    assert replica.skipped.count == 1  # skipped, never followed
    assert os.listdir(outside) == []


async def test_chunked_writes_apply_only_when_complete(tmp_path: Path) -> None:
    create = encode_record_payload(rec.Mknod(b"upper/f", stat.S_IFREG | 0o644, 0, 0))
    first = encode_record_payload(rec.Write(b"upper/f", b"", 0, 4), b"abcd")
    second = encode_record_payload(rec.Write(b"upper/f", b"", 4, 4), b"efgh")
    replica, error = await _hostile_session(
        tmp_path, lambda key: _frames([(1, create, 0), (2, first, MORE), (2, second, 0)], key))
    assert error == ""
    assert replica.applied == 2
    assert (tmp_path / "replicas" / USER / "upper" / "f").read_bytes() == b"abcdefgh"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_record_payload_decoder_fuzz(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_record_payload(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=24, max_size=24), st.binary(max_size=64), st.binary(max_size=40))
def test_frame_checker_fuzz(header: bytes, payload: bytes, mac: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        Frame.decode(header, payload, mac, KEY)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(min_value=0, max_value=5))
def test_hello_and_report_decoders_fuzz(data: bytes, seq: int) -> None:
    with contextlib.suppress(ProtocolError):
        decode_hello(Frame(1, seq, data))
    with contextlib.suppress(ProtocolError):
        decode_report(data)


def _accept_all(replica: Replica, records: Sequence[tuple[int, rec.Record, bytes | None]]) -> None:
    for seq, record, data in records:
        for frame in record_frames(seq, record, data):
            replica.accept(frame)


def test_redelivered_rename_after_a_crash_is_idempotent(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon dies after a rename, before noting it applied: the rename comes again."""
    replica = Replica.open(str(tmp_path / USER))
    _accept_all(replica, [
        (1, rec.Mknod(b"upper/a", stat.S_IFREG | 0o644, 0, 0), None),
        (2, rec.Write(b"upper/a", b"", 0, 1), b"A"),
        (3, rec.Mknod(b"upper/b", stat.S_IFREG | 0o644, 0, 0), None),
        (4, rec.Write(b"upper/b", b"", 0, 1), b"B"),
    ])
    exchange = rec.Rename(b"upper/a", b"upper/b", 2, 987654321)  # the LOGIN node's inode
    original = Replica._write_position

    def dies_after_applying(self: Replica, inflight: int = 0, inflight_ino: int = 0) -> None:
        if inflight == 0 and self.applied == 5 and \
                (tmp_path / USER / "upper" / "b").read_bytes() == b"A":
            raise KeyboardInterrupt  # killed before the position says 5
        original(self, inflight, inflight_ino)

    monkeypatch.setattr(Replica, "_write_position", dies_after_applying)
    with pytest.raises(KeyboardInterrupt):
        replica.accept(record_frames(5, exchange, None)[0])
    monkeypatch.setattr(Replica, "_write_position", original)
    replica.close()
    replica = Replica.open(str(tmp_path / USER))
    assert replica.applied == 4
    replica.accept(record_frames(5, exchange, None)[0])  # delivered again
    replica.close()
    assert (tmp_path / USER / "upper" / "b").read_bytes() == b"A"
    assert (tmp_path / USER / "upper" / "a").read_bytes() == b"B"


def _sample_tree(root: Path) -> None:
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "lib" / "libx.so").write_bytes(os.urandom(CHUNK + 777))
    os.link(root / "usr" / "lib" / "libx.so", root / "usr" / "lib" / "libx.so.1")
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("hi\n")
    os.symlink("motd", root / "etc" / "motd.link")
    os.mknod(root / "etc" / "gone", stat.S_IFCHR | 0, 0)  # whiteout
    os.setxattr(root / "usr", "trusted.overlay.opaque", b"y")
    os.setxattr(root / "etc" / "motd", "user.note", b"v")
    (root / "suid").write_bytes(b"x")
    os.chmod(root / "suid", 0o4755)
    os.mkfifo(root / "fifo")


def test_snapshot_rebuilds_a_verified_copy_and_a_bad_one_changes_nothing(tmp_path: Path) -> None:
    from sdeefs.replication.snapshot import snapshot_frames, tree_digest
    from sdeefs.replication.wire import SNAPSHOT

    source = tmp_path / "source"
    source.mkdir()
    _sample_tree(source)
    replica = Replica.open(str(tmp_path / USER))
    digest: list[bytes] = []
    frames = list(snapshot_frames(str(source), 42, digest))
    assert all(f.type == SNAPSHOT and f.seq == 42 for f in frames)
    replica.begin_snapshot(42)
    for frame in frames:
        replica.accept_snapshot(frame)
    replica.finish_snapshot(42, digest[0])
    upper = tmp_path / USER / "upper"
    assert replica.applied == 42
    assert tree_digest(str(upper)) == tree_digest(str(source)) == digest[0]
    assert os.stat(upper / "usr/lib/libx.so").st_ino == os.stat(upper / "usr/lib/libx.so.1").st_ino
    assert stat.S_IMODE(os.stat(upper / "suid").st_mode) == 0o755

    # A snapshot that does not match its digest is discarded; the copy stays as it was.
    (source / "etc" / "motd").write_text("changed\n")
    replica.begin_snapshot(50)
    for frame in snapshot_frames(str(source), 50, []):
        replica.accept_snapshot(frame)
    with pytest.raises(ProtocolError, match="digest"):
        replica.finish_snapshot(50, digest[0])
    assert replica.applied == 42
    assert (upper / "etc" / "motd").read_text() == "hi\n"
    replica.close()


@pytest.mark.expect_log("sdeefs.replication.replica")
def test_after_a_reboot_only_a_cleanly_synced_copy_is_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sdeefs.replication.replica as replica_module

    replica = Replica.open(str(tmp_path / USER))
    replica.adopt(b"i" * 16)
    _accept_all(replica, [(1, rec.Mkdir(b"upper/d", 0o755, 0, 0), None)])
    replica.sync()  # clean at 1
    _accept_all(replica, [(2, rec.Mkdir(b"upper/e", 0o755, 0, 0), None)])  # dirty, unsynced
    replica.close()
    assert Replica.open(str(tmp_path / USER)).applied == 2  # same boot: the page cache holds

    monkeypatch.setattr(replica_module, "boot_id", lambda: b"\x01" * 16)  # "after a reboot"
    again = Replica.open(str(tmp_path / USER))
    assert again.applied == 0
    assert os.listdir(tmp_path / USER / "upper") == []
    again.adopt(b"i" * 16)
    _accept_all(again, [(1, rec.Mkdir(b"upper/d", 0o755, 0, 0), None)])
    again.sync()
    again.close()
    monkeypatch.setattr(replica_module, "boot_id", lambda: b"\x02" * 16)
    clean = Replica.open(str(tmp_path / USER))
    assert clean.applied == 1
    assert clean.journal_id == b"i" * 16
    clean.close()


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 77])
def test_zero_copy_write_frames_equal_the_reference_encoding(tmp_path: Path, size: int) -> None:
    from sdeefs.replication.wire import encode_write_frames

    path = tmp_path / "f"
    data = os.urandom(size)
    path.write_bytes(data)
    key = b"s" * 32
    for offset, length in ((0, size), (0, size + 5000), (3, max(size - 3, 0))):
        record = rec.Write(b"upper/f", b"h", offset, length)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = [bytes(b) for b in encode_write_frames(9, record, fd, key)]
        finally:
            os.close(fd)
        want = [f.encode(key) for f in record_frames(9, record, data[offset:offset + length])]
        if offset + length <= size:  # the same frames (each MAC has a nonce of its own)
            assert [g[:-32] for g in got] == [bytes(w[:-32]) for w in want], (offset, length)
        # A file shorter than the record: the same bytes arrive (the chunking may differ
        # by an empty last chunk when the file ends on a chunk boundary).
        frames = [Frame.decode(b[:24], b[24:-32], b[-32:], key) for b in got]
        assert [f.flags for f in frames][-1] == 0
        assert b"".join(decode_record_payload(f.payload)[1] for f in frames) == \
            data[offset:offset + length]
    assert [bytes(b[:-32]) for b in encode_write_frames(9, rec.Write(b"upper/f", b"", 0, 10),
                                                        None, key)] == \
        [bytes(f.encode(key)[:-32])
         for f in record_frames(9, rec.Write(b"upper/f", b"", 0, 10), None)]


def test_skip_covers_markers_only_forwards(tmp_path: Path) -> None:
    """SKIP lets the upstream leave out no-op markers; it never lets a seq go backwards."""
    from sdeefs.replication.wire import SKIP

    replica = Replica.open(str(tmp_path / USER))
    _accept_all(replica, [(1, rec.Mkdir(b"upper/a", 0o755, 0, 0), None)])
    mkdir_b = record_frames(5, rec.Mkdir(b"upper/b", 0o755, 0, 0), None)[0]
    with pytest.raises(ProtocolError, match="out of sequence"):
        replica.accept(mkdir_b)  # a gap without SKIP
    replica.accept(Frame(RECORD, 5, mkdir_b.payload, SKIP))  # 2..4 were markers
    assert replica.applied == 5
    with pytest.raises(ProtocolError, match="out of sequence"):
        replica.accept(Frame(RECORD, 5, mkdir_b.payload, SKIP))  # not again
    with pytest.raises(ProtocolError, match="out of sequence"):
        replica.accept(Frame(RECORD, 3, mkdir_b.payload, SKIP))  # not backwards
    replica.close()


def test_a_relay_forwards_a_trailing_skip_frame_and_holds_back_only_incomplete_records(
        ) -> None:
    """The frame that carries a stream past its trailing markers (SKIP) is forwarded at
    once; only a record still missing chunks (MORE) waits."""
    from sdeefs.replication.relay import RelayBuffer
    from sdeefs.replication.wire import SKIP

    relay = RelayBuffer(1 << 20)
    write = record_frames(8, rec.Write(b"upper/f", b"", 0, 3), b"abc")[0]
    sync = Frame(RECORD, 10, encode_record_payload(rec.Sync(0)), SKIP)  # 9 was Done
    relay.append(7, [write, sync])
    assert [f.seq for f in relay.after(7)] == [8, 10]
    relay.append(10, [Frame(RECORD, 11, b"x", MORE)])
    assert [f.seq for f in relay.after(7)] == [8, 10]
    relay.append(10, [Frame(RECORD, 11, b"y", 0)])
    assert [f.seq for f in relay.after(10)] == [11, 11]


def test_a_relay_keeps_the_batch_it_just_applied_whole() -> None:
    """A batch larger than the relay buffer (a 1 MiB data frame and the SKIP frame after
    it, in a 1 MiB buffer) stays whole until a follower that was waited for is sent it: it
    lost the data frame, so an up-to-date follower was sent to a snapshot."""
    from sdeefs.replication.relay import RelayBuffer
    from sdeefs.replication.wire import SKIP

    relay = RelayBuffer(1 << 20)
    follower = object()
    relay.append(6, [record_frames(7, rec.Mkdir(b"upper/d", 0o755, 0, 0), None)[0]])
    relay.reader_at(follower, 7)  # sent everything so far
    data = record_frames(8, rec.Write(b"upper/f", b"", 0, 1 << 20), b"x" * (1 << 20))
    sync = Frame(RECORD, 10, encode_record_payload(rec.Sync(0)), SKIP)  # 9 was Done
    incoming = sum(len(f.payload) for f in [*data, sync])
    assert incoming > relay.limit
    assert relay._room(incoming)  # what the follower was sent may go
    relay.append(7, [*data, sync])
    assert relay.first_seq() == 8
    assert [f.seq for f in relay.frames] == [8, 10]
    assert relay.after(7)[0] is data[0]
    relay.reader_at(follower, 10)
    relay.append(10, [Frame(RECORD, 11, b"y", 0)])  # now the data frame goes
    assert [f.seq for f in relay.frames] == [10, 11]


def test_a_relay_drops_what_no_longer_leads_to_the_frames_it_is_given() -> None:
    """Records applied without reaching the buffer (an error part-way through a batch) leave
    a hole: the frames kept before it are dropped, so a follower behind the hole is sent a
    snapshot (first_seq past its position) instead of frames that skip records."""
    from sdeefs.replication.relay import RelayBuffer

    relay = RelayBuffer(1 << 20)
    relay.append(6, [record_frames(7, rec.Mkdir(b"upper/a", 0o755, 0, 0), None)[0]])
    assert relay.first_seq() == 7
    # seqs 8 and 9 were applied but never relayed
    relay.append(9, [record_frames(10, rec.Mkdir(b"upper/b", 0o755, 0, 0), None)[0]])
    assert [f.seq for f in relay.frames] == [10]
    assert relay.first_seq() == 10  # a follower at 7 falls off: 10 > 7 + 1
    assert relay.size == len(relay.frames[0].payload)


def test_merged_setattrs_apply_like_the_sequence(tmp_path: Path) -> None:
    from sdeefs.apply import apply_record
    from sdeefs.replication.origin import merge_setattr

    from ..core.test_journal import _close_layers, _open_layers

    chmod = rec.Setattr(b"upper/f", rec.SET_MODE, 0o640)
    chown = rec.Setattr(b"upper/f", rec.SET_OWNER, uid=1234, gid=5678)
    times = rec.Setattr(b"upper/f", rec.SET_ATIME | rec.SET_MTIME, atime_ns=10**18,
                        mtime_ns=2 * 10**18)
    truncate = rec.Setattr(b"upper/f", rec.SET_SIZE, size=3)
    sequences = [[chmod, chown, times], [truncate, chmod, times], [chown, truncate, chmod]]
    for records in sequences:
        results: list[tuple[int, int, int, int, int | None]] = []
        for merged in (False, True):
            root = tmp_path / f"{len(results)}-{sequences.index(records)}"
            (root / "upper").mkdir(parents=True)
            (root / "work").mkdir()
            (root / "upper" / "f").write_bytes(b"0123456789")
            todo: list[rec.Setattr] = list(records)
            if merged:
                combined = todo[0]
                for nxt in todo[1:]:
                    step = merge_setattr(combined, nxt)
                    assert step is not None
                    combined = step
                todo = [combined]
            layers = _open_layers(root / "upper", root / "work")
            try:
                for record in todo:
                    apply_record(layers, record)
            finally:
                _close_layers(layers)
            st = os.stat(root / "upper" / "f")
            results.append((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size,
                            st.st_mtime_ns if times in records else None))
        assert results[0] == results[1], records
    assert merge_setattr(times, truncate) is None  # the truncate would move mtime
    assert merge_setattr(chmod, rec.Setattr(b"upper/g", rec.SET_MODE, 0o600)) is None


def test_placement_builds_a_tree_of_least_depth_for_10000_joiners() -> None:
    """10,000 nodes join through upstreams that never get a subtree report (the worst case of
    a cold stream): placement alone gives the least depth fan-out 4 allows, and no upstream
    more than 4 direct followers."""
    from sdeefs.replication.relay import Placement

    fanout, count = 4, 10_000
    placement: dict[str, Placement] = {"login": Placement()}
    followers: dict[str, list[Downstream]] = {"login": []}
    depth = {"login": 0}
    for i in range(count):
        node, at = f"n{i}", "login"
        while len(followers[at]) >= fanout:  # what an upstream does with a HELLO
            best = placement[at].choose(followers[at], node, 0.0)
            assert best is not None
            placement[at].sent(node, best, 0.0)
            at = best.node
        followers[at].append(Downstream(node, USER))
        placement[node], followers[node], depth[node] = Placement(), [], depth[at] + 1
    assert max(depth.values()) == 7  # 4 + 16 + ... + 4096 < 10,000 <= ... + 16384
    assert max(len(f) for f in followers.values()) == fanout


def test_a_subtree_report_of_10000_nodes_travels_whole() -> None:
    from sdeefs.replication.wire import MAX_FRAME_PAYLOAD, encode_report

    report = [(f"node{i:05d}.cluster", i) for i in range(10_000)]
    payload = encode_report(report)
    assert len(payload) <= MAX_FRAME_PAYLOAD
    assert decode_report(payload) == report
    with pytest.raises(ProtocolError):
        decode_report(payload[:4] + payload[4:-3])


def test_an_error_frame_carries_a_code_and_its_type_comes_from_the_code() -> None:
    """What a receiver does about an ERROR (start over, tell the prolog the user has no
    environment) follows the u16 code before the message, never the message's text."""
    from sdeefs.replication.wire import (
        ERROR_CODE,
        ErrorCode,
        HistoryDiverged,
        NoLayer,
        decode_error,
        encode_error,
    )

    cases = [(HistoryDiverged("the journal ends at 7"), HistoryDiverged, ErrorCode.DIVERGED),
             (NoLayer("login holds nothing of user bob"), NoLayer, ErrorCode.NO_LAYER),
             (ProtocolError("history diverged: only in words"), ProtocolError,
              ErrorCode.REFUSED),
             (ValueError("not a protocol error"), ProtocolError, ErrorCode.REFUSED)]
    for exc, kind, code in cases:
        wire = bytes(encode_error(exc, KEY, seq=7))
        frame = Frame.decode(wire[:24], wire[24:-32], wire[-32:], KEY)
        assert (frame.type, frame.seq) == (ERROR, 7)
        assert frame.payload == ERROR_CODE.pack(code) + str(exc).encode()
        got = decode_error(frame, "upstream: ")
        assert type(got) is kind
        assert str(got) == f"upstream: {exc}"
    assert type(decode_error(Frame(ERROR, 0, b"\x09\x00why"), "")) is ProtocolError
    assert type(decode_error(Frame(ERROR, 0, b"x"), "")) is ProtocolError
    # to a peer of an old version: the message alone, as it reads ERRORs
    old = encode_error(HistoryDiverged("gone"), KEY, version=2)
    assert old[24:-32] == b"gone"


@pytest.mark.parametrize(("code", "message", "kind"), [
    (2, b"your copy is ahead of the journal", "HistoryDiverged"),
    (0, b"history diverged: replica wants seq 9 but the journal ends at 4", "ProtocolError"),
])
@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_a_replica_starts_over_on_the_diverged_code_not_on_the_text(
        tmp_path: Path, code: int, message: bytes, kind: str) -> None:
    """The daemon resets a replica when its link ends in HistoryDiverged; that type comes
    from the ERROR's code (once it was found in the message's text)."""
    left, right = trio.testing.memory_stream_pair()
    replica = Replica.open(str(tmp_path / USER))
    try:
        async with trio.open_nursery() as nursery:
            async def upstream_refusing() -> None:
                reader = FrameReader(left)
                hello = decode_hello(await reader.frame(KEY))
                key = await answer_hello(left, KEY, hello, 4, JOURNAL_ID)
                await left.send_all(Frame(ERROR, 0, struct.pack("<H", code) + message)
                                    .encode(key))
                with contextlib.suppress(EOFError, ProtocolError):
                    await reader.frame(key)  # the replica says why it ends the link too
            nursery.start_soon(upstream_refusing)
            with pytest.raises(ProtocolError) as info:
                await Follower(right, replica, AUTH, USER, "n1", LinkStats()).run()
        assert type(info.value).__name__ == kind
        assert message.decode() in str(info.value)
    finally:
        replica.close()


@pytest.mark.parametrize("old", [2, 3, 6, 7, 8])
async def test_an_upstream_of_an_old_wire_version_is_one_clear_error(tmp_path: Path,
                                                                    old: int) -> None:
    """A replica talking to an upstream of version 2 (records with u16 path lengths), 3
    (ERRORs without a code), 6 (a CRC over the payload), 7 (no runs of records) or 8
    (frames not bound to their place): its first frame is refused by version, never
    parsed."""
    left, right = trio.testing.memory_stream_pair()
    old_error = Frame(ERROR, 0, b"unsupported protocol version 4").encode(KEY, version=old)
    await left.send_all(old_error)
    with pytest.raises(VersionMismatch, match=f"version {old}.*same sdeefs release") as info:
        await FrameReader(right).frame(KEY)
    assert info.value.peer_version == old
    # and through Follower, as sdeefs-replicad runs it: the replica changes nothing
    replica = Replica.open(str(tmp_path / USER))
    try:
        async with trio.open_nursery() as nursery:
            async def old_upstream() -> None:
                await FrameReader(left).frame(KEY)  # the replica's HELLO (this version)
                await left.send_all(old_error)
            nursery.start_soon(old_upstream)
            with pytest.raises(VersionMismatch):
                await Follower(right, replica, AUTH, USER, "n1", LinkStats()).run()
        assert (replica.applied, replica.journal_id) == (0, bytes(16))
    finally:
        replica.close()


def test_a_snapshot_of_a_tree_deeper_than_path_max_rebuilds_it(tmp_path: Path) -> None:
    """snapshot_frames and tree_digest walk by directory fds (a few, whatever the depth);
    the records carry 40 KB paths, a replica applies them."""
    import resource

    from sdeefs.replication.snapshot import snapshot_frames, tree_digest
    from sdeefs.replication.wire import SNAPSHOT
    from sdeefs.trees import WINDOW, rmtree

    source = tmp_path / "source"
    source.mkdir()
    fd = os.open(source, os.O_PATH | os.O_DIRECTORY)
    for i in range(160):  # 160 levels of 255 bytes, a side directory at each
        name = b"%03d" % i + b"d" * 252
        os.mkdir(name, dir_fd=fd)
        os.mkdir(b"side", dir_fd=fd)
        os.mknod(b"side/wh", stat.S_IFCHR, 0, dir_fd=fd)
        step = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = step
    big = os.urandom(CHUNK + 4321)
    leaf = os.open(b"big", os.O_WRONLY | os.O_CREAT, 0o755, dir_fd=fd)
    os.write(leaf, big)
    os.close(leaf)
    os.link(b"big", b"big.link", src_dir_fd=fd, dst_dir_fd=fd)
    os.symlink(b"big", b"sym", dir_fd=fd)
    os.setxattr(f"/proc/self/fd/{fd}/big", "user.deep", b"yes")
    os.close(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    replica = Replica.open(str(tmp_path / USER))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (len(os.listdir("/proc/self/fd")) + WINDOW + 30, hard))
        digest: list[bytes] = []
        replica.begin_snapshot(7)
        for frame in snapshot_frames(str(source), 7, digest):
            assert frame.type == SNAPSHOT
            replica.accept_snapshot(frame)
        replica.finish_snapshot(7, digest[0])
        assert tree_digest(str(tmp_path / USER / "upper")) == tree_digest(str(source))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        replica.close()
    assert replica.applied == 7
    assert signature(str(tmp_path / USER / "upper")) == signature(str(source))
    rmtree(str(source))  # deeper than pytest's own clean-up goes
    rmtree(str(tmp_path / USER))


async def test_a_relay_snapshot_never_waits_for_a_thread_slot_held_by_its_lock_waiters(
        tmp_path: Path) -> None:
    """A relay reads its copy for a snapshot holding the replica's lock, in threads.  The
    daemon's appliers and syncers wait for that lock in threads too: were the reads to need
    one of their slots, a full pool of waiters would stop the snapshot for good."""
    from sdeefs.replication.daemon import Daemon, DaemonConfig
    from sdeefs.replication.relay import DownstreamLink, RelayBuffer, RelaySender
    from sdeefs.replication.wire import DOWN, SNAPSHOT, SNAPSHOT_END, UP, LinkKey

    daemon = Daemon(DaemonConfig(node="n1", auth=AUTH))
    replica = Replica.open(str(tmp_path / USER))
    size = 6 * CHUNK  # two reads of the tree at least, the first sent while the second waits
    _accept_all(replica, [(1, rec.Mknod(b"upper/f", stat.S_IFREG | 0o644, 0, 0), None),
                          (2, rec.Write(b"upper/f", b"", 0, size), os.urandom(size))])
    left, right = trio.testing.lockstep_stream_pair()  # a send waits until it is read
    link = DownstreamLink(left, FrameReader(left), LinkKey(KEY, DOWN), Downstream("n2", USER),
                          daemon.locked_reads)  # as the daemon serves a relayed follower
    sender = RelaySender(link, replica, RelayBuffer(1 << 20), LinkStats(), 0, daemon.offload)
    reader = FrameReader(right)
    reader.trust()  # the follower's end, past its (here omitted) handshake
    key = LinkKey(KEY, UP)
    finished = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.run)
            assert (await reader.frame(key)).type == SNAPSHOT  # the lock is held now
            slots = int(daemon.offload.limiter.total_tokens)
            for _ in range(slots):  # every slot: a thread waiting for the lock
                nursery.start_soon(daemon.offload.run, replica.locked, replica.sync)
            await trio.testing.wait_all_tasks_blocked()
            assert daemon.offload.limiter.borrowed_tokens == slots
            with trio.move_on_after(10):
                while (await reader.frame(key)).type != SNAPSHOT_END:
                    pass
                finished = True
            nursery.cancel_scope.cancel()  # a stuck snapshot lets go of the lock when cancelled
    finally:
        replica.close()
    assert finished


def test_a_snapshot_carries_device_nodes_and_fallocated_files(tmp_path: Path) -> None:
    """Device nodes (records.Mkdev, host root's) and a file with holes and preallocation
    are rebuilt by a replica from a snapshot, the same tree (issue 9 items 5, 6)."""
    from sdeefs.replication.snapshot import snapshot_frames, tree_digest
    from sdeefs.sysio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

    source = tmp_path / "source"
    source.mkdir()
    os.mknod(source / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(source / "loop", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    fd = os.open(source / "db", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"x" * 100_000)
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
    fallocate(fd, FALLOC_FL_KEEP_SIZE, 100_000, 1 << 20)
    os.close(fd)
    replica = Replica.open(str(tmp_path / USER))
    try:
        digest: list[bytes] = []
        replica.begin_snapshot(3)
        for frame in snapshot_frames(str(source), 3, digest):
            replica.accept_snapshot(frame)
        replica.finish_snapshot(3, digest[0])
        assert tree_digest(str(tmp_path / USER / "upper")) == tree_digest(str(source))
    finally:
        replica.close()
    copy = tmp_path / USER / "upper"
    assert os.lstat(copy / "null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(os.lstat(copy / "loop").st_mode)
    assert (copy / "db").read_bytes() == (source / "db").read_bytes()


def test_fallocate_and_device_records_cross_the_wire_made_safe() -> None:
    """Record types 19 and 20 (wire version 5): decoded strictly, set-ID bits stripped from
    a device node's mode as from every mode, no data attached to either."""
    from sdeefs.replication.wire import encode_record_payload

    falloc = rec.Fallocate(b"upper/db", rec.FALLOC_PUNCH_HOLE | rec.FALLOC_KEEP_SIZE, 0, 4096)
    assert decode_record_payload(encode_record_payload(falloc)) == (falloc, b"")
    dev = rec.Mkdev(b"upper/dev/x", stat.S_IFCHR | 0o4666, os.makedev(1, 3), 0, 0)
    record, data = decode_record_payload(encode_record_payload(dev))
    assert record == rec.Mkdev(b"upper/dev/x", stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0)
    with pytest.raises(ProtocolError):
        decode_record_payload(encode_record_payload(falloc, b"data"))
    with pytest.raises(ProtocolError):  # a whiteout is a Mknod, never a Mkdev
        decode_record_payload(encode_record_payload(
            rec.Mkdev(b"upper/wh", stat.S_IFCHR, 0, 0, 0)))


@pytest.mark.expect_log("sdeefs.replication.replica")
def test_a_replica_applies_only_its_users_ids(tmp_path: Path) -> None:
    """The owner rule (sdeefs.replicable, docs/identity.md): the user's uid and groups, its
    subordinate ranges; a record giving an entry any other id is skipped, naming the files
    whose difference between nodes would explain it, and the stream goes on."""
    ids = of_identity(Identity.build(1001, 1001, (27,), (165536, 65536), (231072, 65536),
                                     1000))
    replica = Replica.open(str(tmp_path / USER), ids)
    _accept_all(replica, [
        (1, rec.Mkdir(b"upper/root-s", 0o755, 165536, 231072), None),
        (2, rec.Mkdir(b"upper/apt", 0o700, 165536 + 42, 231072 + 65534), None),
        (3, rec.Mkdir(b"upper/mine", 0o755, 1001, 27), None),
        (4, rec.Mknod(b"upper/gone", stat.S_IFCHR, 0, 0), None),  # a whiteout: 0/0 is fine
        (5, rec.Setattr(b"upper/mine", rec.SET_MODE, 0o700, 0, 0, 0, 0, 0), None),  # no owner
        (6, rec.Mkdir(b"upper/host-root", 0o755, 0, 0), None),
        (7, rec.Mknod(b"upper/f", stat.S_IFREG | 0o644, 1002, 1001), None),
        (8, rec.Symlink(b"upper/l", b"x", 165536 + 65536, 231072), None),
        (9, rec.Setattr(b"upper/mine", rec.SET_OWNER, 0, 1001, 0, 0, 0, 0), None),
    ])
    assert replica.applied == 9
    assert [r.seq for r in replica.skipped.records] == [6, 7, 8, 9]
    assert "/etc/subuid" in replica.skipped.summary()
    assert sorted(os.listdir(tmp_path / USER / "upper")) == ["apt", "gone", "mine", "root-s"]
    st = (tmp_path / USER / "upper" / "mine").stat()
    assert (st.st_uid, st.st_gid) == (1001, 27)
    replica.close()


# -- Create (record type 21, wire version 6): a new file whole, judged as what it means ------


def _create(path: bytes = b"upper/new", mode: int = stat.S_IFREG | 0o640,
            xattrs: tuple[tuple[bytes, bytes], ...] = ((b"user.a", b"1"),),
            data: bytes = b"contents") -> rec.Create:
    return rec.Create(path, mode, *ALICE_OWNER, 1_700_000_000_123_456_789, b"h" * 12,
                      rec.encode_xattr_list(xattrs), data)


def _garbled_creates() -> list[tuple[str, bytes]]:
    """(what, RECORD payload) of Create records a hostile upstream might send."""
    good = rec.encode_record(_create())[1]
    xattr_at = good.index(b"user.a") - 2 - 4  # the xattrs blob's length field

    def with_xattrs(blob: bytes) -> bytes:
        (n,) = struct.unpack_from("<I", good, xattr_at)
        body = good[:xattr_at] + struct.pack("<I", len(blob)) + blob + \
            good[xattr_at + 4 + n:]
        return struct.pack("<HI", rec.Create.TYPE, len(body)) + body

    def raw(record: rec.Create) -> bytes:  # encoded without the door's checks
        body = rec.encode_record(record)[1]
        return struct.pack("<HI", rec.Create.TYPE, len(body)) + body

    pair = struct.pack("<H", 6) + b"user.b" + struct.pack("<I", 1) + b"2"
    first = struct.pack("<H", 6) + b"user.a" + struct.pack("<I", 1) + b"1"
    return [
        ("a directory", raw(attrs.evolve(_create(), mode=stat.S_IFDIR | 0o755))),
        ("a device", raw(attrs.evolve(_create(), mode=stat.S_IFCHR | 0o644))),
        ("data over 64 KiB", raw(attrs.evolve(_create(), data=b"d" * (rec.MAX_INLINE + 1)))),
        ("a handle over 136 bytes", raw(attrs.evolve(_create(), handle=b"h" * 137))),
        ("an escaping path", raw(attrs.evolve(_create(), path=b"upper/../../etc/passwd"))),
        ("xattrs out of order", with_xattrs(pair + first)),
        ("a repeated xattr", with_xattrs(first + first)),
        ("an xattr list cut short", with_xattrs(first[:-1])),
        ("an empty xattr name", with_xattrs(struct.pack("<HI", 0, 0))),
        ("a NUL in an xattr name", with_xattrs(struct.pack("<H", 3) + b"a\0b" +
                                               struct.pack("<I", 0))),
        ("a trailing byte", struct.pack("<HI", rec.Create.TYPE, len(good) + 1) + good + b"!"),
        ("cut short", struct.pack("<HI", rec.Create.TYPE, len(good) - 3) + good[:-3]),
    ]


@pytest.mark.parametrize(("what", "payload"), _garbled_creates(),
                         ids=[what for what, _ in _garbled_creates()])
@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_a_garbled_create_is_refused_with_one_clear_error(tmp_path: Path, what: str,
                                                                payload: bytes) -> None:
    with pytest.raises(Refused) as refused:  # the door: decoding
        decode_record_payload(payload)
    assert str(refused.value).startswith("bad record: ")
    assert "\n" not in str(refused.value)
    replica, error = await _hostile_session(tmp_path, lambda key: _frames(
        [(1, payload, 0), (2, _mkdir(b"upper/after"), 0)], key), ALICE)
    assert error == ""  # the user's problem, not the link's: the stream goes on
    assert replica.applied == 2
    assert [r.seq for r in replica.skipped.records] == [1]
    assert not (tmp_path / "replicas" / USER / "upper" / "new").exists()
    assert not (tmp_path / "replicas" / USER / "upper" / "etc").exists()
    assert (tmp_path / "replicas" / USER / "upper" / "after").is_dir()


def test_a_create_in_an_older_encoding_is_refused() -> None:
    rtype, payload = rec.encode_record(_create())
    for version in (1, 2):
        with pytest.raises(BadRecord, match="not in encoding version"):
            rec.decode_record(rtype, payload, version)


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_a_create_applies_as_the_records_it_means(tmp_path: Path) -> None:
    """A replica fed Creates holds what the old records (Mknod, Setxattr, Write, Setattr)
    made; set-ID bits are stripped as from a Mknod; a refused xattr is left out, the rest
    applied, and the record noted as skipped."""
    creates = [
        _create(b"upper/a", xattrs=((b"user.a", b"1"), (b"user.b", b"two"))),
        _create(b"upper/empty", data=b"", xattrs=()),
        _create(b"upper/whole", data=os.urandom(rec.MAX_INLINE), mode=stat.S_IFREG | 0o755),
        _create(b"upper/suid", mode=stat.S_IFREG | 0o4755, xattrs=()),
    ]
    frames = [(seq, encode_record_payload(r), 0) for seq, r in enumerate(creates, 1)]
    refused_xattr = _create(b"upper/sel", xattrs=((b"security.selinux", b"x"),
                                                  (b"user.ok", b"1")))
    frames.append((5, encode_record_payload(refused_xattr), 0))
    replica, error = await _hostile_session(tmp_path, lambda key: _frames(frames, key),
                                            ALICE)
    assert error == ""
    assert replica.applied == 5
    assert [r.seq for r in replica.skipped.records] == [5]
    assert "security.selinux" in replica.skipped.records[0].reason
    # the same records, the old way, on a second replica
    old = tmp_path / "old"
    plain = Replica.open(str(old / USER))
    seq = 0
    for record in [*creates, refused_xattr]:
        for part, data in sanitize(record).expand():  # type: ignore[attr-defined]
            if isinstance(part, rec.Setxattr) and part.name == b"security.selinux":
                continue
            seq += 1
            _accept_all(plain, [(seq, part, data)])
    plain.close()
    assert signature(str(tmp_path / "replicas" / USER / "upper")) == \
        signature(str(old / USER / "upper"))
    for record in [*creates, refused_xattr]:  # byte-identical, same mtime
        name = record.path.decode()[len("upper/"):]
        new, was = tmp_path / "replicas" / USER / "upper" / name, old / USER / "upper" / name
        assert new.read_bytes() == was.read_bytes() == record.data
        assert new.stat().st_mtime_ns == was.stat().st_mtime_ns == record.mtime_ns
    upper = tmp_path / "replicas" / USER / "upper"
    assert stat.S_IMODE((upper / "suid").stat().st_mode) == 0o755
    assert (upper / "whole").read_bytes() == creates[2].data
    assert os.getxattr(upper / "a", "user.b") == b"two"
    assert os.getxattr(upper / "sel", "user.ok") == b"1"
    assert (upper / "a").stat().st_mtime_ns == creates[0].mtime_ns


def _mixed_history() -> list[tuple[int, rec.Record, bytes | None]]:
    """A history of new files (the bulk of a cold stream) with renames, removals and a
    truncation among them: runs the batch applier takes, and records it must not."""
    owner = ALICE_OWNER
    big = os.urandom(CHUNK + 5)
    records: list[rec.Record | tuple[rec.Record, bytes]] = [
        rec.Mkdir(b"upper/d", 0o755, *owner),
        rec.Mknod(b"upper/d/f", stat.S_IFREG | 0o600, *owner),
        (rec.Write(b"upper/d/f", b"", 0, len(big)), big),
        rec.Setattr(b"upper/d/f", rec.SET_MODE | rec.SET_OWNER | rec.SET_ATIME | rec.SET_MTIME,
                    0o750, *owner, 0, 10**18, 2 * 10**18),
        rec.Mknod(b"upper/d/g", stat.S_IFREG | 0o644, *owner),
        (rec.Write(b"upper/d/g", b"", 0, 10), b"0123456789"),
        rec.Setattr(b"upper/d/g", rec.SET_SIZE, size=3),
        rec.Setxattr(b"upper/d/g", b"user.note", b"v"),
        rec.Setattr(b"upper/d/g", rec.SET_MTIME, mtime_ns=3 * 10**18),
        rec.Rename(b"upper/d/g", b"upper/d/h", 0, 0),
        rec.Mknod(b"upper/d/g", stat.S_IFREG | 0o644, *owner),  # a new g, after the move
        (rec.Write(b"upper/d/g", b"", 0, 3), b"new"),
        rec.Mkdir(b"upper/d/e", 0o700, *owner),
        rec.Symlink(b"upper/d/e/l", b"../h", *owner),
        rec.Mknod(b"upper/d/e/fifo", stat.S_IFIFO | 0o600, *owner),
        (rec.Write(b"upper/d/e/fifo", b"", 0, 1), b"x"),  # a fifo is no file to write
        rec.Unlink(b"upper/d/f"),
        rec.Mknod(b"upper/d/f", stat.S_IFREG | 0o640, *owner),
        (rec.Write(b"upper/d/f", b"", 5, 2), b"hi"),  # a hole, then data
        (rec.Write(b"upper/gone/x", b"", 0, 1), b"x"),  # its file is gone: nothing to do
        rec.Setattr(b"upper/d", rec.SET_ATIME | rec.SET_MTIME, 0, 0, 0, 0, 10**18, 10**18),
    ]
    out = []
    for seq, item in enumerate(records, 1):
        record, data = item if isinstance(item, tuple) else (item, None)
        out.append((seq, record, data))
    return out


def _tree_state(upper: Path) -> list[tuple[object, ...]]:
    """Every entry as a replica must reproduce it, and the mtime the history set (d/h's:
    the others are when the entry was made)."""
    state: list[tuple[object, ...]] = []
    for path in sorted(upper.rglob("*")):
        st = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        xattrs = {} if path.is_symlink() else {
            n: os.getxattr(path, n) for n in os.listxattr(path)}
        state.append((str(path.relative_to(upper)), st.st_mode, st.st_uid, st.st_gid,
                      st.st_size, content, xattrs,
                      st.st_mtime_ns if path.name == "h" else None))
    return state


def test_a_batch_applies_as_record_by_record_and_writes_its_position_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch applier (a cold stream's bulk) leaves the tree applying one record at a
    time leaves, and rewrites ``position`` per batch and before each record it does not
    take (here: the rename, the unlink), not after every record."""
    from sdeefs.replication.replica import _apply_batch

    history = _mixed_history()
    one_by_one = Replica.open(str(tmp_path / "one" / USER), ALICE)
    _accept_all(one_by_one, history)
    frames = [f for seq, record, data in history for f in record_frames(seq, record, data)]
    batched = Replica.open(str(tmp_path / "batch" / USER), ALICE)
    writes: list[int] = []
    original = Replica._write_position

    def counted(self: Replica, inflight: int = 0, inflight_ino: int = 0) -> None:
        writes.append(self.applied)
        original(self, inflight, inflight_ino)

    monkeypatch.setattr(Replica, "_write_position", counted)
    before, applied, _ = _apply_batch(batched, frames)
    assert (before, len(applied)) == (0, len(frames))
    assert batched.applied == one_by_one.applied == len(history)
    assert one_by_one.skipped.count == batched.skipped.count == 0
    assert _tree_state(tmp_path / "batch" / USER / "upper") == \
        _tree_state(tmp_path / "one" / USER / "upper")
    # for the rename: the batch's position before it, in flight, done; the same for the
    # unlink; once at the end of the batch: 7 (one per record, 21, before).
    assert len(writes) == 7
    one_by_one.close()
    batched.close()


@pytest.mark.parametrize("runs", [False, True])  # a frame per record, or runs (wire.RUN)
@pytest.mark.parametrize("dies_at", range(1, 21))  # each record the batch takes
def test_a_kill_in_the_middle_of_a_batch_converges_when_it_is_delivered_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_at: int, runs: bool) -> None:
    """kill -9 while a batch is applied: ``position`` says where the batch began (or the
    last record it did not take); the stream delivers the rest again and the copy ends
    exactly as if nothing had happened (the REPLAYABLE rule of ``applier``).  In runs:
    the run being applied comes again whole, and what the copy holds of it is passed
    over."""
    from sdeefs.replication.applier import BatchApplier
    from sdeefs.replication.replica import _apply_batch
    from sdeefs.replication.wire import RunEncoder

    history = _mixed_history()
    reference = Replica.open(str(tmp_path / "ref" / USER), ALICE)
    _accept_all(reference, history)
    reference.close()
    frames = [f for seq, record, data in history for f in record_frames(seq, record, data)]
    if runs:  # the chunked write alone, the rest in runs of 4 records
        wire: list[bytes | bytearray] = []
        encoder = RunEncoder(KEY)
        for frame in frames:
            if frame.seq == 3:
                encoder.flush(wire)
                wire.append(frame.encode(KEY))
                continue
            encoder.add(frame.seq, 0, bytes(frame.payload), wire)
            if frame.seq % 4 == 0:
                encoder.flush(wire)
        encoder.flush(wire)
        frames = [Frame.decode(bytes(b[:24]), bytes(b[24:-32]), bytes(b[-32:]), KEY)
                  for b in wire]
    replica = Replica.open(str(tmp_path / "n1" / USER), ALICE)
    calls: list[int] = []
    original_apply, original_position = BatchApplier.apply, Replica._write_position
    original_take = BatchApplier.take

    def apply(self: BatchApplier, record: rec.Record, data: bytes, what: str) -> None:
        calls.append(1)
        original_apply(self, record, data, what)
        if len(calls) == dies_at:
            raise KeyboardInterrupt  # SIGKILL: nothing after this runs, nothing is written

    def take(self: BatchApplier, payload: bytes, seq: int) -> bool:
        taken = original_take(self, payload, seq)
        if taken:  # applied in C (else apply() comes)
            calls.append(1)
            if len(calls) == dies_at:
                raise KeyboardInterrupt
        return taken

    original_take_run = BatchApplier.take_run

    def take_run(self: BatchApplier, entries: list[tuple[int, int, memoryview]], index: int,
                 applied: int) -> tuple[int, int, OSError | None]:
        """A run's records applied in C, one call: killed right after the record the
        kill falls on (C is given the run up to it, then the kill comes)."""
        while True:
            part = entries[:index + max(dies_at - len(calls), 0)]
            reached, at, failed = original_take_run(self, part, index, applied)
            calls.extend(1 for seq, _, _ in entries[index:reached] if seq > applied)
            if len(calls) == dies_at and reached > index:
                raise KeyboardInterrupt
            if reached < len(part) or failed is not None or reached == len(entries) \
                    or reached == index:
                return reached, at, failed
            index, applied = reached, at  # (records passed over used the part up)

    def position(self: Replica, inflight: int = 0, inflight_ino: int = 0) -> None:
        if len(calls) < dies_at:
            original_position(self, inflight, inflight_ino)

    monkeypatch.setattr(BatchApplier, "apply", apply)
    monkeypatch.setattr(BatchApplier, "take", take)
    monkeypatch.setattr(BatchApplier, "take_run", take_run)
    monkeypatch.setattr(Replica, "_write_position", position)
    with pytest.raises(KeyboardInterrupt):
        _apply_batch(replica, frames)
    monkeypatch.undo()
    replica = Replica.open(str(tmp_path / "n1" / USER), ALICE)  # the same boot
    resumed = replica.applied
    assert resumed < len(history)
    again = [f for f in frames if f.seq > resumed]
    _apply_batch(replica, again)
    assert replica.applied == len(history)
    assert replica.skipped.count == 0
    assert _tree_state(tmp_path / "n1" / USER / "upper") == \
        _tree_state(tmp_path / "ref" / USER / "upper")
    replica.close()


@pytest.mark.expect_log("sdeefs.replication.replica")
def test_a_hostile_record_in_a_batch_is_refused_like_one_alone(tmp_path: Path) -> None:
    """The batch applier judges every record by ``sdeefs.replicable`` as the per-record
    path does: a foreign owner, a host-root capability and a path through a planted
    symlink are skipped with one error each, nothing outside the copy is touched, and
    the records around them are applied."""
    from sdeefs.replication.replica import _apply_batch

    outside = tmp_path / "outside"
    outside.mkdir()
    v2_cap = struct.pack("<IIIII", 0x02000001, 0x2000, 0, 0, 0)  # cap_net_raw, host root's
    history: list[tuple[int, rec.Record, bytes | None]] = [
        (1, rec.Mknod(b"upper/ok", stat.S_IFREG | 0o644, *ALICE_OWNER), None),
        (2, rec.Mknod(b"upper/root-owned", stat.S_IFREG | 0o4755, 0, 0), None),
        (3, rec.Mknod(b"upper/link/escaped", stat.S_IFREG | 0o644, *ALICE_OWNER), None),
        (4, rec.Write(b"upper/link/escaped", b"", 0, 4), b"evil"),
        (5, rec.Setxattr(b"upper/ok", b"security.capability", v2_cap), None),
        (6, rec.Setattr(b"upper/ok", rec.SET_OWNER, uid=0, gid=0), None),
        (7, rec.Write(b"upper/ok", b"", 0, 2), b"ok"),
    ]
    skipped = []
    for how in ("one", "batch"):
        replica = Replica.open(str(tmp_path / how / USER), ALICE)
        os.symlink(outside, tmp_path / how / USER / "upper" / "link")
        if how == "one":
            _accept_all(replica, history)
        else:
            _apply_batch(replica, [f for seq, record, data in history
                                   for f in record_frames(seq, record, data)])
        assert replica.applied == 7
        skipped.append([(r.seq, r.reason) for r in replica.skipped.records])
        assert os.listdir(outside) == []
        ok = tmp_path / how / USER / "upper" / "ok"
        assert ok.read_bytes() == b"ok"
        assert (ok.stat().st_uid, ok.stat().st_gid) == ALICE_OWNER
        assert os.listxattr(ok) == []
        assert not (tmp_path / how / USER / "upper" / "root-owned").exists()
        replica.close()
    assert skipped[0] == skipped[1]
    assert {2, 3, 5, 6} <= {seq for seq, _ in skipped[1]}


def test_directories_the_applier_keeps_open_are_forgotten_when_an_entry_moves(
        tmp_path: Path) -> None:
    """The batch applier keeps the directories it resolved open across batches; a rename
    (or a snapshot, a reset) in between must not leave it writing into the old one."""
    from sdeefs.replication.replica import _apply_batch

    replica = Replica.open(str(tmp_path / USER), ALICE)
    owner = ALICE_OWNER
    batches: list[list[tuple[int, rec.Record, bytes | None]]] = [
        [(1, rec.Mkdir(b"upper/d", 0o755, *owner), None),
         (2, rec.Mknod(b"upper/d/f", stat.S_IFREG | 0o644, *owner), None)],
        [(3, rec.Rename(b"upper/d", b"upper/e", 0, 0), None)],
        [(4, rec.Mkdir(b"upper/d", 0o755, *owner), None),
         (5, rec.Mknod(b"upper/d/g", stat.S_IFREG | 0o644, *owner), None),
         (6, rec.Write(b"upper/d/g", b"", 0, 1), b"g")],
    ]
    for one in batches:
        _apply_batch(replica, [f for seq, record, data in one
                               for f in record_frames(seq, record, data)])
    upper = tmp_path / USER / "upper"
    assert sorted(os.listdir(upper / "e")) == ["f"]
    assert sorted(os.listdir(upper / "d")) == ["g"]
    assert (upper / "d" / "g").read_bytes() == b"g"
    replica.close()
