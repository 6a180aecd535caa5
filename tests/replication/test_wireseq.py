"""Wire version 9 (review finding 4, branch wireseq): every frame bound to its place.

A man in the middle cannot forge a frame, but before version 9 he could drop, replay or
reorder whole frames of a session: the MAC had a random nonce and bound no frame to its
place.  The seq checks caught most of it, not all: a frame dropped before a SKIP frame
(``test_applyc_hostile``), a chunk dropped from the middle of a big write (a hole in
the file, the record taken as complete), a SKIP frame moved before the frames it
follows, a frame dropped before a HEAD or an ACK.  Now the nonce of every frame under a
session key is its direction and number on the connection (``wire.LinkKey``): a frame
that arrives anywhere but its place does not pass.  Each test that says "finding"
failed on main before version 9 (the man in the middle is the ``build`` or ``tamper``
step: frames are sealed by the real sender, in order, then changed on the path).
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from sdeefs import records as rec
from sdeefs.offload import Offload
from sdeefs.replication.relay import Downstream, DownstreamLink, RelayBuffer, RelaySender
from sdeefs.replication.replica import Follower, LinkStats, Replica
from sdeefs.replication.wire import (
    ACK,
    CHUNK,
    ERROR,
    FRAME_HEADER,
    HEAD,
    MAC_SIZE,
    NO_ID,
    NONCE_SIZE,
    QUERY,
    RECORD,
    RUN,
    RUN_ENTRY,
    SKIP,
    Frame,
    FrameReader,
    Hello,
    HistoryDiverged,
    ProtocolError,
    answer_hello,
    decode_hello,
    encode_error,
    encode_record_payload,
    open_link_tasks,
    record_frames,
    send_hello,
)

from .test_protocol import ALICE, ALICE_OWNER, AUTH, JOURNAL_ID, KEY, USER, _hostile_session

MKNOD = rec.Mknod(b"upper/f", stat.S_IFREG | 0o644, *ALICE_OWNER)


def _mkdir(name: bytes) -> bytes:
    return encode_record_payload(rec.Mkdir(b"upper/" + name, 0o755, *ALICE_OWNER))


def _entry(seq: int, flags: int, payload: bytes) -> bytes:
    return RUN_ENTRY.pack(seq, flags, len(payload)) + payload


def _big_write() -> list[Frame]:
    """A Mknod (1) and a Write of 2.5 chunks (2): three frames of seq 2, MORE on two."""
    data = bytes(range(256)) * ((CHUNK * 5 // 2) // 256)
    frames = record_frames(1, MKNOD, None) + \
        record_frames(2, rec.Write(b"upper/f", b"", 0, len(data)), data)
    assert [f.seq for f in frames] == [1, 2, 2, 2]
    return frames


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_a_chunk_dropped_from_the_middle_of_a_big_write_is_noticed(
        tmp_path: Path) -> None:
    """Finding: the chunks of a big write are frames of one seq (MORE on all but the
    last), each a Write of its own range.  With the middle one dropped, the replica
    applied the first and the last, took record 2 as complete and left a hole in the
    file for good."""
    frames = _big_write()

    def build(key: bytes) -> bytes:
        sent = [frame.encode(key) for frame in frames]
        del sent[2]
        return b"".join(sent)

    replica, error = await _hostile_session(tmp_path, build, ALICE)
    try:
        assert "out of sequence" in error
        assert replica.applied == 1  # the write is asked for again, whole
    finally:
        replica.close()


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_a_replayed_frame_is_refused(tmp_path: Path) -> None:
    """Finding: a chunk of a big write delivered twice (a replay within the session: its
    MAC stayed valid) was applied twice without a word."""
    frames = _big_write()

    def build(key: bytes) -> bytes:
        sent = [frame.encode(key) for frame in frames]
        return b"".join([sent[0], sent[1], sent[1], sent[2], sent[3]])

    replica, error = await _hostile_session(tmp_path, build, ALICE)
    try:
        assert "out of sequence" in error
        assert replica.applied == 1
    finally:
        replica.close()


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_a_reordered_pair_is_refused_before_anything_of_it_applies(
        tmp_path: Path) -> None:
    """Finding: a run (records 1-3) and the SKIP frame that follows it (5; 4 was a marker)
    swapped on the path.  The replica applied 5 as following 0 and refused the run only
    after: records 1-3 lost for good."""
    run = Frame(RECORD, 3, b"".join(_entry(s, 0, _mkdir(b"d%d" % s)) for s in (1, 2, 3)), RUN)
    after = Frame(RECORD, 5, _mkdir(b"d5"), SKIP)

    def build(key: bytes) -> bytes:
        first, second = run.encode(key), after.encode(key)
        return bytes(second + first)

    replica, error = await _hostile_session(tmp_path, build, ALICE)
    try:
        assert "out of sequence" in error
        assert replica.applied == 0
        assert os.listdir(tmp_path / "replicas" / USER / "upper") == []
    finally:
        replica.close()


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_a_frame_dropped_before_a_head_is_noticed(tmp_path: Path) -> None:
    """Finding: a record dropped, then an idle HEAD: the HEAD passed, and the replica
    waited, short of the head, for a record its upstream took as sent."""
    def build(key: bytes) -> bytes:
        record, head = Frame(RECORD, 1, _mkdir(b"d")).encode(key), Frame(HEAD, 1).encode(key)
        del record
        return bytes(head)

    replica, error = await _hostile_session(tmp_path, build, ALICE)
    try:
        assert "out of sequence" in error
        assert replica.applied == 0
    finally:
        replica.close()


async def test_an_ack_dropped_on_the_way_up_is_noticed() -> None:
    """Finding: the other direction.  An ACK (with its subtree report) dropped, the next
    one passed: the upstream's view of the follower went on without it.  Now the
    upstream's link refuses the ACK that arrives in its place."""
    up, down = trio.testing.memory_stream_pair()
    errors: list[str] = []
    ended = trio.Event()

    async def upstream_side() -> None:
        reader = FrameReader(up)
        hello = decode_hello(await reader.frame(KEY))
        key = await answer_hello(up, KEY, hello, 9, JOURNAL_ID)
        link = DownstreamLink(up, reader, key, Downstream("n1", USER, sent_seq=9), Offload())
        try:
            await link.run(trio.sleep_forever)
        except ProtocolError as exc:
            errors.append(str(exc))
        finally:
            ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(upstream_side)
        reader = FrameReader(down)
        session = await send_hello(down, reader, AUTH, Hello(
            os.urandom(NONCE_SIZE), NO_ID, USER, "n1", 1))
        first, second = Frame(ACK, 1).encode(session.key), Frame(ACK, 2).encode(session.key)
        del first  # dropped on the path
        await down.send_all(second)
        await down.send_stream.aclose()
        with trio.move_on_after(5):
            await ended.wait()
        nursery.cancel_scope.cancel()
    assert len(errors) == 1
    assert "out of sequence" in errors[0]


async def test_an_error_is_read_after_frames_that_were_never_sent() -> None:
    """Guard: an ERROR ends a link and may follow frames the sender sealed and never sent
    (the origin encodes its next batch while one is on the wire): it is read, with its
    code.  An ERROR from before (a replay) is not."""
    up, down = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        async def upstream_side() -> None:
            reader = FrameReader(up)
            hello = decode_hello(await reader.frame(KEY))
            key = await answer_hello(up, KEY, hello, 9, JOURNAL_ID)
            Frame(RECORD, 1, _mkdir(b"never-sent")).encode(key)
            await up.send_all(encode_error(HistoryDiverged("the journal ends at 0"), key))

        nursery.start_soon(upstream_side)
        reader = FrameReader(down)
        session = await send_hello(down, reader, AUTH, Hello(
            os.urandom(NONCE_SIZE), NO_ID, USER, "n1", 1))
        frame = await reader.frame(session.key)
    assert frame.type == ERROR
    old = bytearray(encode_error(ProtocolError("an old error"), session.key))
    with pytest.raises(ProtocolError, match="out of sequence"):  # a reflected one: not ours
        Frame.decode(bytes(old[:24]), bytes(old[24:-32]), bytes(old[-32:]), session.key)


async def test_an_answer_to_an_old_hello_does_not_answer_a_new_one() -> None:
    """Finding: with a shared key the HELLO key is long-lived, and the upstream's answer
    (a HELLO carrying its head) passed as the answer to any later HELLO.  Replayed to a
    barrier's head query (``relay.ask_head`` takes the answer's head; no frame follows),
    an old head let a job start before its replica had what the user wrote since.  Now
    the answer is authenticated with a key bound to the replica's nonce."""
    recorded = b""

    async def upstream(stream: trio.abc.Stream) -> None:
        nonlocal recorded
        hello = decode_hello(await FrameReader(stream).frame(KEY))
        if recorded:  # a man in the middle answers a new question with the old answer
            await stream.send_all(recorded)
            return
        tap, path = trio.testing.memory_stream_pair()  # the answer, recorded on the path
        await answer_hello(tap, KEY, hello, 5, JOURNAL_ID)
        recorded = bytes(await path.receive_some(1 << 16))
        await stream.send_all(recorded)

    async def ask() -> int:
        up, down = trio.testing.memory_stream_pair()
        async with open_link_tasks() as nursery:  # its first error, not a group
            nursery.start_soon(upstream, up)
            session = await send_hello(down, FrameReader(down), AUTH, Hello(
                os.urandom(NONCE_SIZE), NO_ID, USER, "n1", 1, QUERY))
        return session.head

    assert await ask() == 5
    with pytest.raises(ProtocolError, match="authentication failed"):
        await ask()


def test_session_frames_carry_their_place_and_only_there_they_pass() -> None:
    """The nonce of a session frame is (direction, number): the same frame sealed twice
    differs in its number only; the receiver takes each at its place once, never the
    sender's own frames sent back (reflected)."""
    from sdeefs.replication import mac
    from sdeefs.replication.wire import DOWN, UP, LinkKey

    sender, receiver = LinkKey(b"k" * 32, DOWN), LinkKey(b"k" * 32, UP)
    frame = Frame(RECORD, 1, _mkdir(b"d"))
    one, two = frame.encode(sender), frame.encode(sender)
    assert one[:-MAC_SIZE] == two[:-MAC_SIZE]
    nonces = [bytes(b[-MAC_SIZE:-MAC_SIZE + mac.NONCE_SIZE]) for b in (one, two)]
    assert nonces == [mac.counted(DOWN, 0), mac.counted(DOWN, 1)]

    def decode(wire: bytearray, key: LinkKey) -> Frame:
        size = FRAME_HEADER.size
        return Frame.decode(bytes(wire[:size]), bytes(wire[size:-MAC_SIZE]),
                            bytes(wire[-MAC_SIZE:]), key)

    with pytest.raises(ProtocolError, match="frame 1 arrived where frame 0 was due"):
        decode(two, receiver)
    assert decode(one, receiver) == frame
    with pytest.raises(ProtocolError, match="out of sequence"):
        decode(one, receiver)  # replayed
    with pytest.raises(ProtocolError, match="out of sequence"):
        decode(two, LinkKey(b"k" * 32, DOWN))  # reflected to its sender
    assert decode(two, receiver) == frame
    forged = bytearray(two)
    forged[-MAC_SIZE + mac.NONCE_SIZE - 1] ^= 1  # the number changed: the tag fails
    with pytest.raises(ProtocolError, match="authentication failed"):
        decode(forged, receiver)


# -- through a relay --------------------------------------------------------------------------


Tamper = Callable[[bytes], list[bytes]]


async def _frames_of(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    buf = b""
    while True:
        while len(buf) >= FRAME_HEADER.size:
            total = FRAME_HEADER.size + FRAME_HEADER.unpack_from(buf)[4] + MAC_SIZE
            if len(buf) < total:
                break
            yield buf[:total]
            buf = buf[total:]
        data = await stream.receive_some(1 << 16)
        if not data:
            return
        buf += data


async def _path(nursery: trio.Nursery, tamper: Tamper
                ) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """A link with a man in the middle: (the upstream's end, the follower's end); every
    frame downstream goes through ``tamper`` (what it returns is sent on), upstream
    everything passes."""
    upstream, mine_up = trio.testing.memory_stream_pair()
    mine_down, follower = trio.testing.memory_stream_pair()

    async def down() -> None:
        async for frame in _frames_of(mine_up):
            for out in tamper(frame):
                await mine_down.send_all(out)

    async def up() -> None:
        while data := await mine_down.receive_some(1 << 16):
            await mine_up.send_all(data)

    nursery.start_soon(down)
    nursery.start_soon(up)
    return upstream, follower


def _drop_first_record() -> Tamper:
    dropped: list[bytes] = []

    def tamper(frame: bytes) -> list[bytes]:
        if FRAME_HEADER.unpack_from(frame)[2] == RECORD and not dropped:
            dropped.append(frame)
            return []
        return [frame]
    return tamper


def _keep(frame: bytes) -> list[bytes]:
    return [frame]


@pytest.mark.expect_log("sdeefs.replication.replica")
@pytest.mark.parametrize("hop", [1, 2])
async def test_a_drop_on_either_hop_of_a_relay_is_noticed(tmp_path: Path, hop: int) -> None:
    """Finding: origin → relay → follower, the relay and its follower as sdeefs-replicad
    runs them (``Follower`` feeding a ``RelayBuffer``, ``RelaySender`` re-sealing what
    it forwards for each link).  The frame of record 1 is dropped on hop ``hop``, record
    3 follows with SKIP.  Before, the copy behind the drop (and, on hop 1, the relay's
    follower too) applied 3 and lost record 1 for good; now the node behind the drop
    refuses the next frame, and the follower never gets past record 1 either way."""
    frames = [Frame(RECORD, 1, _mkdir(b"one")), Frame(RECORD, 3, _mkdir(b"three"), SKIP)]
    relay = Replica.open(str(tmp_path / "relay" / USER), ALICE)
    leaf = Replica.open(str(tmp_path / "leaf" / USER), ALICE)
    buffer, stats = RelayBuffer(16 << 20), LinkStats()
    errors: dict[str, str] = {}
    relayed, settled = trio.Event(), trio.Event()  # the relay applied; the test may end

    async def follow(name: str, follower: Follower) -> None:
        try:
            await follower.run()
        except ProtocolError as exc:
            errors[name] = str(exc)
            settled.set()

    def relay_applied(before: int, applied: list[Frame]) -> None:
        buffer.append(before, applied)
        relayed.set()

    def leaf_applied(before: int, applied: list[Frame]) -> None:
        if leaf.applied >= 3:
            settled.set()

    try:
        async with trio.open_nursery() as nursery:
            origin_end, relay_end = await _path(
                nursery, _drop_first_record() if hop == 1 else _keep)
            serving_end, leaf_end = await _path(
                nursery, _drop_first_record() if hop == 2 else _keep)

            async def origin() -> None:
                reader = FrameReader(origin_end)
                hello = decode_hello(await reader.frame(KEY))
                key = await answer_hello(origin_end, KEY, hello, 3, JOURNAL_ID)
                await origin_end.send_all(b"".join(f.encode(key) for f in frames))
                while True:
                    await reader.frame(key)  # ACKs

            async def serve_leaf() -> None:
                await relayed.wait()
                reader = FrameReader(serving_end)
                hello = decode_hello(await reader.frame(KEY))
                key = await answer_hello(serving_end, KEY, hello, max(stats.head, relay.applied),
                                         relay.journal_id)
                link = DownstreamLink(serving_end, reader, key, Downstream(
                    hello.node, USER, acked=hello.want - 1, sent_seq=hello.want - 1), Offload())
                try:
                    await RelaySender(link, relay, buffer, stats, hello.want - 1,
                                      Offload()).run()
                except ProtocolError as exc:  # the leaf's ERROR: why it ends the link
                    errors["served"] = str(exc)

            nursery.start_soon(origin)
            nursery.start_soon(follow, "relay", Follower(
                relay_end, relay, AUTH, USER, "relay", stats, on_applied=relay_applied,
                wait_room=buffer.wait_room))
            nursery.start_soon(serve_leaf)
            nursery.start_soon(follow, "leaf", Follower(leaf_end, leaf, AUTH, USER, "leaf",
                                                        on_applied=leaf_applied))
            with trio.move_on_after(10):
                await settled.wait()
            await trio.sleep(0.5)  # whatever else would arrive
            nursery.cancel_scope.cancel()
        behind = "relay" if hop == 1 else "leaf"
        assert "out of sequence" in errors.get(behind, ""), errors
        assert leaf.applied == 0
        assert relay.applied == (0 if hop == 1 else 3)
        assert os.listdir(tmp_path / "leaf" / USER / "upper") == []
    finally:
        relay.close()
        leaf.close()
