"""The replication protocol over in-memory streams: convergence, resume, hostile peers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from sdeefs import records as rec
from sdeefs.check import _tree_signature
from sdeefs.cow import ROOT_INO, Config, CowFS, LayerRoot
from sdeefs.journal import Journal, NullJournal
from sdeefs.replicate import (
    CHUNK,
    HELLO,
    MORE,
    RECORD,
    Frame,
    ProtocolError,
    Replica,
    check_frame,
    decode_record_payload,
    encode_frame,
    encode_record_payload,
    send_journal,
    serve_replica,
)
from sdeefs.sysio import name_to_handle

KEY = b"k" * 32
USER = "alice"


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
        self.fs = CowFS.open(Config(upper=bytes(self.upper), work=bytes(self.work),
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
    sig = _tree_signature(str(root))
    out: dict[str, tuple[object, ...]] = {}
    for path, value in sig.items():
        full = root / path
        digest = hashlib.sha256(full.read_bytes()).hexdigest() if full.is_file() and \
            not full.is_symlink() else None
        out[path] = (*value, digest)
    return out


async def stream(login: Login, replica_dir: Path, key: bytes = KEY) -> tuple[int, int]:
    left, right = trio.testing.memory_stream_pair()
    result: dict[str, int] = {}
    source = login.source()
    try:
        async with trio.open_nursery() as nursery:
            async def replica_side() -> None:
                result["applied"] = await serve_replica(right, str(replica_dir), key, USER)

            nursery.start_soon(replica_side)
            result["acked"] = await send_journal(left, login.journal, source, key)
            await left.aclose()
    finally:
        source.close()
    return result["acked"], result["applied"]


@pytest.fixture
def login(tmp_path: Path) -> Login:
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
    assert Replica.open(str(replica_dir / USER)).applied == login.journal.head


async def test_setuid_bits_are_stripped_on_the_replica(login: Login, tmp_path: Path) -> None:
    login.write(ROOT_INO, b"suid", b"x", 0o4755)
    ino = login.fs.lookup(ROOT_INO, b"suid").ino
    login.fs.setattr(ino, rec.Setattr(b"upper", rec.SET_MODE, 0o6755))
    await stream(login, tmp_path / "replicas")
    mode = os.lstat(tmp_path / "replicas" / USER / "upper" / "suid").st_mode
    assert stat.S_IMODE(mode) == 0o755


def _frames(payloads: list[tuple[int, bytes, int]], key: bytes) -> bytes:
    return b"".join(encode_frame(Frame(RECORD, seq, payload, flags), key)
                    for seq, payload, flags in payloads)


async def _hostile_session(tmp_path: Path, build: object) -> tuple[Replica, str]:
    """Run serve_replica against a scripted peer; return the replica and the error text."""
    left, right = trio.testing.memory_stream_pair()
    replica_dir = tmp_path / "replicas"
    errors: list[str] = []

    async def replica_side() -> None:
        try:
            await serve_replica(right, str(replica_dir), KEY, USER)
        except ProtocolError as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(replica_side)
        from sdeefs.replicate import receive_frame, session_key

        hello = await receive_frame(left, KEY)
        sender_nonce = b"n" * 16
        await left.send_all(encode_frame(Frame(HELLO, 0, sender_nonce), KEY))
        key = session_key(KEY, hello.payload[:16], sender_nonce)
        await left.send_all(build(key))  # type: ignore[operator]
        await left.send_stream.aclose()  # half-close: the replica still answers
    return Replica.open(str(replica_dir / USER)), errors[0] if errors else ""


def _mkdir(path: bytes) -> bytes:
    return encode_record_payload(rec.Mkdir(path, 0o755, 0, 0))


async def test_tampered_frame_is_rejected_and_nothing_applied(tmp_path: Path) -> None:
    def build(key: bytes) -> bytes:
        frame = bytearray(_frames([(1, _mkdir(b"upper/evil"), 0)], key))
        frame[30] ^= 1  # a payload byte: the CRC and the MAC no longer match
        return bytes(frame)

    replica, error = await _hostile_session(tmp_path, build)
    assert "checksum" in error or "authentication" in error
    assert replica.applied == 0
    assert not (tmp_path / "replicas" / USER / "upper" / "evil").exists()


async def test_frames_from_another_session_are_rejected(tmp_path: Path) -> None:
    replayed = _frames([(1, _mkdir(b"upper/replayed"), 0)], b"s" * 32)  # another session's key
    replica, error = await _hostile_session(tmp_path, lambda key: replayed)
    assert "authentication" in error
    assert not (tmp_path / "replicas" / USER / "upper" / "replayed").exists()


async def test_out_of_sequence_is_rejected(tmp_path: Path) -> None:
    replica, error = await _hostile_session(
        tmp_path, lambda key: _frames([(1, _mkdir(b"upper/a"), 0), (3, _mkdir(b"upper/b"), 0)],
                                      key))
    assert "out of sequence" in error
    assert replica.applied == 1
    assert not (tmp_path / "replicas" / USER / "upper" / "b").exists()


@pytest.mark.parametrize("payload", [
    encode_record_payload(rec.Setxattr(b"upper/f", b"security.capability", b"\1" * 20)),
    encode_record_payload(rec.Setxattr(b"upper/f", b"trusted.evil", b"1")),
    struct.pack("<HI", rec.Mknod.TYPE, 0) + b"",
    rec.encode_record(rec.Mkdir(b"upper/ok", 0o755, 0, 0))[1],  # missing the payload header
])
async def test_hostile_records_are_rejected(tmp_path: Path, payload: bytes) -> None:
    replica, error = await _hostile_session(tmp_path, lambda key: _frames([(1, payload, 0)], key))
    assert error
    assert replica.applied == 0


async def test_symlinked_parent_on_the_replica_is_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    upper = tmp_path / "replicas" / USER / "upper"
    upper.mkdir(parents=True)
    os.symlink(outside, upper / "link")
    replica, error = await _hostile_session(
        tmp_path, lambda key: _frames([(1, _mkdir(b"upper/link/escaped"), 0)], key))
    assert error
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
        check_frame(header, payload, mac, KEY)
