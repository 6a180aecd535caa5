"""A replica's frames read in a worker thread over a real socket (``receiver.ThreadReader``).

The per-frame reader (``wire.FrameReader``) stays the one for memory streams and for the
HELLOs, and test_protocol.py checks the replica through it; these run the same rules
through the threaded reader, which takes over a link that is a socket."""

from __future__ import annotations

import os
import random
import socket
import tempfile
import time
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdeefs import records as rec
from sdeefs.replicable import NOBODY, UserIds
from sdeefs.replication import applier, mac
from sdeefs.replication import replica as replica_mod
from sdeefs.replication.receiver import SLAB, SlabPool, ThreadReader
from sdeefs.replication.replica import Follower, LinkStats, Replica, _apply_batch
from sdeefs.replication.wire import (
    DOWN,
    HEAD,
    MAX_FRAME_PAYLOAD,
    RECORD,
    RUN,
    RUN_ENTRY,
    SNAPSHOT,
    UP,
    Frame,
    FrameReader,
    LinkKey,
    ProtocolError,
    _gmacc,
    answer_hello,
    decode_hello,
    encode_record_payload,
)

from .test_applyc import ALICE, PAYLOADS, _state
from .test_protocol import ALICE_OWNER, AUTH, JOURNAL_ID, KEY, USER

SESSION = b"s" * 32


def _stream(count: int, seed: int) -> list[Frame]:
    """``count`` frames of random sizes (a few bytes to the largest a frame may carry) and
    random contents, so a byte out of place shows."""
    rng = random.Random(seed)
    frames = []
    for seq in range(1, count + 1):
        size = rng.choice([0, 1, 37, 4000, 70000, 300000, 1 << 20, MAX_FRAME_PAYLOAD])
        frames.append(Frame(SNAPSHOT, seq, rng.randbytes(size)))
    return frames


def _sender(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` in pieces of odd sizes (frames cut anywhere), then close."""
    sock.settimeout(30)  # a reader that stopped fails the test, never hangs it
    with sock:
        rng = random.Random(len(data))
        view = memoryview(data)
        while view:
            piece = rng.choice([1, 23, 4096, 65537, 1 << 20])
            sock.sendall(view[:piece])
            view = view[piece:]


async def _read_all(reader: ThreadReader, key: LinkKey, room: int = 8 << 20
                    ) -> list[Frame]:
    got: list[Frame] = []
    while True:
        try:
            got += await trio.to_thread.run_sync(reader.frames, key, room)
        except EOFError:
            return got


def _frame_by_frame(sock: socket.socket, frames: list[bytes]) -> None:
    """Send each frame whole, a pause now and then: the reader finds the socket empty
    at a frame's end (where the per-frame reader started its buffer again)."""
    sock.settimeout(30)
    with sock:
        for number, frame in enumerate(frames):
            sock.sendall(frame)
            if number % 3 == 0:
                time.sleep(0.01)


@pytest.mark.parametrize("cut", [True, False])
async def test_frames_held_while_more_arrive_keep_their_bytes(cut: bool) -> None:
    """Every frame is still intact after the rest of the stream was read behind it (a
    frame's payload is a view of a slab: a slab must never be written while held),
    whether frames arrive cut anywhere or whole."""
    frames = _stream(60, seed=1)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    sealing = LinkKey(SESSION, DOWN)
    encoded = [bytes(f.encode(sealing)) for f in frames]
    async with trio.open_nursery() as nursery:
        if cut:
            nursery.start_soon(trio.to_thread.run_sync, _sender, theirs, b"".join(encoded))
        else:
            nursery.start_soon(trio.to_thread.run_sync, _frame_by_frame, theirs, encoded)
        reader = ThreadReader(ours.fileno(), MAX_FRAME_PAYLOAD, b"")
        got = await _read_all(reader, LinkKey(SESSION, UP))  # receives DOWN
    ours.close()
    assert [(f.type, f.seq, bytes(f.payload)) for f in got] == \
        [(f.type, f.seq, f.payload) for f in frames]


async def test_slabs_are_used_again_once_their_frames_are_let_go() -> None:
    frames = _stream(120, seed=2)
    total = sum(len(f.payload) for f in frames)
    assert total > 8 * SLAB  # more than a pool keeps: only used again can it stay small
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    sealing = LinkKey(SESSION, DOWN)
    data = b"".join(f.encode(sealing) for f in frames)
    pool = SlabPool()
    reader = ThreadReader(ours.fileno(), MAX_FRAME_PAYLOAD, b"", pool)
    key = LinkKey(SESSION, UP)
    seen = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, _sender, theirs, data)
        while True:
            try:
                batch = await trio.to_thread.run_sync(reader.frames, key, 1 << 20)
            except EOFError:
                break
            for frame in batch:
                assert bytes(frame.payload) == frames[seen].payload
                seen += 1
            del batch, frame
    ours.close()
    assert seen == len(frames)
    assert len(pool) <= 3  # the slab being read, the one before it, and one spare


async def test_a_bad_frame_ends_the_stream_after_the_good_ones_before_it() -> None:
    frames = [Frame(SNAPSHOT, seq, bytes([seq]) * 100) for seq in range(1, 6)]
    sealing = LinkKey(SESSION, DOWN)
    encoded = [f.encode(sealing) for f in frames]
    encoded[3][30] ^= 1  # a payload byte of the fourth frame: its MAC fails
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.sendall(b"".join(encoded))
    theirs.close()
    reader = ThreadReader(ours.fileno(), MAX_FRAME_PAYLOAD, b"")
    key = LinkKey(SESSION, UP)
    got = await trio.to_thread.run_sync(reader.frames, key, 64 << 20)
    assert [f.seq for f in got] == [1, 2, 3]  # handed over first: they were checked
    with pytest.raises(ProtocolError, match="authentication"):
        await trio.to_thread.run_sync(reader.frames, key, 64 << 20)
    ours.close()


async def test_a_stranger_cannot_send_a_big_frame_through_a_reader_not_trusting_it() -> None:
    big = Frame(SNAPSHOT, 1, bytes(100000)).encode(LinkKey(SESSION, DOWN))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.sendall(big[:1000])  # its header says what it is
    theirs.close()
    reader = ThreadReader.take_over(FrameReader(trio.SocketStream(trio.socket.from_stdlib_socket(
        ours))))
    assert reader is not None
    with pytest.raises(ProtocolError, match="too large|at most"):
        await trio.to_thread.run_sync(reader.frames, LinkKey(SESSION, UP), 1 << 20)
    ours.close()


async def _socket_session(tmp_path: Path, send: object, silence: float = 10.0
                          ) -> tuple[Replica, str]:
    """A replica following a scripted upstream over a socket (the threaded reader); the
    replica (opened again: what is on disk) and the error the link ended with."""
    left_sock, right_sock = trio.socket.socketpair()
    left, right = trio.SocketStream(left_sock), trio.SocketStream(right_sock)
    replica = Replica.open(str(tmp_path / "replicas" / USER))
    errors: list[str] = []

    async def replica_side() -> None:
        try:
            await Follower(right, replica, AUTH, USER, "n1", LinkStats(),
                           silence_timeout=silence).run()
        except (ProtocolError, ConnectionError) as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(replica_side)
        hello = decode_hello(await FrameReader(left).frame(KEY))
        key = await answer_hello(left, KEY, hello, 9, JOURNAL_ID)
        await send(left, key)  # type: ignore[operator]
    await left.aclose()
    replica.close()
    return Replica.open(str(tmp_path / "replicas" / USER)), errors[0] if errors else ""


def _mkdir(name: bytes) -> bytes:
    return encode_record_payload(rec.Mkdir(b"upper/" + name, 0o755, *ALICE_OWNER))


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_over_a_socket_a_tampered_frame_is_refused_after_what_came_before(
        tmp_path: Path) -> None:
    async def send(stream: trio.SocketStream, key: LinkKey) -> None:
        good = [Frame(RECORD, seq, _mkdir(b"d%d" % seq)).encode(key) for seq in (1, 2, 3)]
        bad = Frame(RECORD, 4, _mkdir(b"evil")).encode(key)
        bad[-20] ^= 1  # its tag
        await stream.send_all(b"".join([*good, bad]))
        await stream.send_eof()

    replica, error = await _socket_session(tmp_path, send)
    assert "authentication" in error
    upper = tmp_path / "replicas" / USER / "upper"
    assert replica.applied == 3
    assert (upper / "d3").is_dir()
    assert not (upper / "evil").exists()


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_over_a_socket_a_frame_replayed_on_the_link_is_refused(tmp_path: Path) -> None:
    async def send(stream: trio.SocketStream, key: LinkKey) -> None:
        first = Frame(RECORD, 1, _mkdir(b"a")).encode(key)
        await stream.send_all(bytes(first) + bytes(first))  # the same frame twice
        await stream.send_eof()

    replica, error = await _socket_session(tmp_path, send)
    assert "out of sequence on the link" in error
    assert replica.applied == 1


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_over_a_socket_a_silent_upstream_ends_the_link(tmp_path: Path) -> None:
    async def send(stream: trio.SocketStream, key: LinkKey) -> None:
        await stream.send_all(Frame(RECORD, 1, _mkdir(b"a")).encode(key))
        await trio.sleep(1.5)  # then nothing, not even HEAD

    with trio.fail_after(10):
        replica, error = await _socket_session(tmp_path, send, silence=0.5)
    assert "silent" in error
    assert replica.applied == 1


async def test_over_a_socket_a_big_write_arrives_whole(tmp_path: Path) -> None:
    data = os.urandom(5 << 20)

    async def send(stream: trio.SocketStream, key: LinkKey) -> None:
        from sdeefs.replication.wire import record_frames
        frames = record_frames(1, rec.Mknod(b"upper/f", 0o100644, *ALICE_OWNER), None) + \
            record_frames(2, rec.Write(b"upper/f", b"", 0, len(data)), data)
        for frame in frames:
            await stream.send_all(frame.encode(key))
        await stream.send_eof()

    replica, error = await _socket_session(tmp_path, send)
    assert error == ""
    assert replica.applied == 2
    assert (tmp_path / "replicas" / USER / "upper" / "f").read_bytes() == data


# -- the MAC check in C (``_gmacc``) against the one through ctypes (``mac.matches``) ----------


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=1, max_size=40), header=st.binary(max_size=40),
       payload=st.binary(max_size=3000), nonce=st.binary(min_size=12, max_size=12),
       damage=st.sampled_from(["none", "tag", "nonce", "zeros", "short", "long", "payload"]),
       at=st.integers(0, 1 << 16))
@pytest.mark.skipif(_gmacc is None, reason="sdeefs.replication._gmacc is not built")
def test_the_mac_check_in_c_says_what_the_ctypes_one_says(
        key: bytes, header: bytes, payload: bytes, nonce: bytes, damage: str, at: int) -> None:
    assert _gmacc is not None
    field = bytearray(mac.seal(key, header, payload, nonce=nonce))
    if damage == "tag":
        field[12 + at % 16] ^= 1 << at % 8 or 1
    elif damage == "nonce":
        field[at % 12] ^= 1
    elif damage == "zeros":
        field[28 + at % 4] = 1 + at % 255
    elif damage == "short":
        del field[at % 32:]
    elif damage == "long":
        field += b"\0"
    elif damage == "payload" and payload:
        payload = payload[:at % len(payload)] + bytes([payload[at % len(payload)] ^ 0x80]) + \
            payload[at % len(payload) + 1:]
    want = mac.matches(key, field, header, payload)
    assert want == (damage == "none" or damage == "payload" and not payload)
    assert _gmacc.matches(mac.derived(key), bytes(field), header, payload) == want
    assert _gmacc.matches(mac.derived(key), memoryview(field), bytearray(header),
                          memoryview(bytearray(payload))) == want


@pytest.mark.skipif(_gmacc is None, reason="sdeefs.replication._gmacc is not built")
def test_the_mac_check_in_c_refuses_a_key_not_derived() -> None:
    assert _gmacc is not None
    with pytest.raises(ValueError, match="32 bytes"):
        _gmacc.matches(b"short", bytes(32), b"", b"")


# -- a whole run applied by one C call (``_applyc.apply_run``) -------------------------------


def _run_payload(payloads: list[bytes]) -> bytes:
    return b"".join(RUN_ENTRY.pack(seq, 0, len(p)) + p for seq, p in enumerate(payloads, 1))


def _apply_as_run(root: Path, payloads: list[bytes], ids: UserIds, native: bool
                  ) -> tuple[object, ...]:
    outside = root / "outside"
    outside.mkdir(parents=True)
    replica = Replica.open(str(root / USER), ids)
    os.symlink(outside, root / USER / "upper" / "l")
    replica.batch_applier().native = native
    error = None
    try:
        _apply_batch(replica, [Frame(RECORD, len(payloads), _run_payload(payloads), RUN)])
    except ProtocolError as exc:
        error = str(exc)
    result = (error, replica.applied, [(r.seq, r.reason) for r in replica.skipped.records],
              replica.skipped.count, _state(root / USER / "upper", time.time_ns()),
              os.listdir(outside))
    replica.close()
    return result


@pytest.mark.skipif(applier._applyc is None, reason="sdeefs.replication._applyc is not built")
@pytest.mark.expect_log("sdeefs.replication.replica")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PAYLOADS, min_size=1, max_size=12), st.sampled_from(["alice", "nobody"]))
def test_a_run_applied_in_c_leaves_what_python_leaves(payloads: list[bytes], who: str) -> None:
    """The hostile records of test_applyc.py in one run: applied by ``apply_run`` (C
    until a record it does not take, Python for that one, C again) and by Python alone,
    the same tree, the same skips and errors, nothing outside the copy."""
    ids = ALICE if who == "alice" else NOBODY
    with tempfile.TemporaryDirectory() as tmp:
        native = _apply_as_run(Path(tmp) / "n", payloads, ids, True)
        python = _apply_as_run(Path(tmp) / "p", payloads, ids, False)
    assert native == python
    assert native[-1] == []


@pytest.mark.skipif(applier._applyc is None, reason="sdeefs.replication._applyc is not built")
def test_a_run_of_common_records_takes_no_python_call_per_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = applier.BatchApplier.take

    def take(self: applier.BatchApplier, payload: bytes | memoryview, seq: int) -> bool:
        calls.append(seq)
        return original(self, payload, seq)

    monkeypatch.setattr(applier.BatchApplier, "take", take)
    payloads = [encode_record_payload(rec.Mkdir(b"upper/d", 0o755, 4242, 4242))]
    for n in range(20):
        path = b"upper/d/f%d" % n
        payloads += [encode_record_payload(rec.Mknod(path, 0o100644, 4242, 4242)),
                     encode_record_payload(rec.Write(path, b"", 0, 5), b"hello"),
                     encode_record_payload(rec.Setattr(path, rec.SET_MTIME, 0, 0, 0, 0, 0,
                                                       10**18))]
    replica = Replica.open(str(tmp_path / USER), ALICE)
    _apply_batch(replica, [Frame(RECORD, len(payloads), _run_payload(payloads), RUN)])
    assert replica.applied == len(payloads)
    replica.close()
    assert calls == [1]  # the Mkdir, which C does not take; the 60 others in one call
    for n in range(20):
        f = tmp_path / USER / "upper" / "d" / f"f{n}"
        assert f.read_bytes() == b"hello"
        assert f.stat().st_mtime_ns == 10**18


async def test_a_head_announced_mid_stream_is_caught_up_to_without_a_sync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold follower's link is answered before the login node drained its capture (the
    head then is short of what the job's barrier will ask); the origin announces the
    barrier's head as HEAD once known.  Below it the copy is catching up: no syncfs every
    SYNC_INTERVAL in the middle of the stream (each waits for the writeback of all that
    was written since, under the lock the applier needs)."""
    syncs: list[int] = []
    real_sync = Replica.sync

    def counting(self: Replica) -> None:
        syncs.append(self.applied)
        real_sync(self)

    monkeypatch.setattr(Replica, "sync", counting)

    async def send(stream: trio.SocketStream, key: LinkKey) -> None:  # the hello said 9
        await stream.send_all(b"".join(bytes(Frame(RECORD, seq, _mkdir(b"d%d" % seq)).encode(
            key)) for seq in range(1, 10)))
        await stream.send_all(Frame(HEAD, 1000).encode(key))  # the barrier's head
        await stream.send_all(Frame(RECORD, 10, _mkdir(b"d10")).encode(key))
        await trio.sleep(replica_mod.SYNC_INTERVAL + 1.0)  # the rest is still coming
        during.extend(syncs)
        await stream.send_eof()

    during: list[int] = []
    replica, _ = await _socket_session(tmp_path, send)
    assert replica.applied == 10
    assert during == []
