"""Wire version 7 (issue 16: a cold stream as fast as tar): the payload is covered by the MAC
alone, and big frames are read from the socket without copying their payload.

Every byte from a peer stays hostile: a flipped bit anywhere in a frame is refused before
anything of it is applied, whatever path the reader took for it."""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest
import trio
import trio.testing

from sdeefs import records as rec
from sdeefs.replication.auth import SharedKey
from sdeefs.replication.replica import Follower, LinkStats, Replica
from sdeefs.replication.wire import (
    ACK,
    FRAME_HEADER,
    MAC_SIZE,
    MAX_FRAME_PAYLOAD,
    RECORD,
    RECORD_HEAD,
    VERSION,
    Frame,
    FrameReader,
    ProtocolError,
    answer_hello,
    decode_hello,
    decode_record_payload,
    encode_record_payload,
)

KEY = b"k" * 32
USER = "alice"
JOURNAL_ID = b"j" * 16
BIG = FrameReader.BIG_FRAME
OVERHEAD = FRAME_HEADER.size + MAC_SIZE


def _write(seq: int, path: bytes, data: bytes, offset: int = 0) -> Frame:
    return Frame(RECORD, seq, encode_record_payload(
        rec.Write(path, b"", offset, len(data)), data))


def _data_frame(total: int, seq: int) -> Frame:
    """A RECORD frame of exactly ``total`` bytes on the wire."""
    head = len(encode_record_payload(rec.Write(b"upper/f", b"", 0, 0)))
    data = random.Random(total).randbytes(total - OVERHEAD - head)
    frame = _write(seq, b"upper/f", data)
    assert FRAME_HEADER.size + len(frame.payload) + MAC_SIZE == total
    return frame


def test_the_crc_covers_the_header_and_the_mac_every_payload_byte() -> None:
    """Version 7: the CRC is of the header alone (no second pass over the payload); a bit
    flipped in the payload is caught by the MAC, one in the header by the CRC."""
    wire = Frame(RECORD, 5, encode_record_payload(rec.Mkdir(b"upper/d", 0o755, 0, 0))
                 ).encode(KEY)
    header = bytes(wire[:FRAME_HEADER.size])
    version, crc = FRAME_HEADER.unpack(header)[1], FRAME_HEADER.unpack(header)[6]
    assert version == VERSION >= 7
    assert crc == zlib.crc32(header[:-4] + bytes(4))

    def decode(buf: bytes | bytearray) -> Frame:
        end = len(buf) - MAC_SIZE
        return Frame.decode(bytes(buf[:FRAME_HEADER.size]), bytes(buf[FRAME_HEADER.size:end]),
                            bytes(buf[end:]), KEY)

    assert decode(wire).payload == encode_record_payload(rec.Mkdir(b"upper/d", 0o755, 0, 0))
    for byte in range(FRAME_HEADER.size, len(wire) - MAC_SIZE):
        bad = bytearray(wire)
        bad[byte] ^= 0x10
        with pytest.raises(ProtocolError, match="authentication failed"):
            decode(bad)
    bad = bytearray(wire)
    bad[16] ^= 1  # the seq
    with pytest.raises(ProtocolError, match="header checksum"):
        decode(bad)


async def _socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


SIZES = [OVERHEAD + RECORD_HEAD.size + 40, BIG - 1, BIG, BIG + 1, 3 * BIG + 7,
         OVERHEAD + MAX_FRAME_PAYLOAD]


@pytest.mark.parametrize("transport", ["socket", "memory"])
async def test_frames_of_every_size_arrive_whole_and_big_ones_are_not_copied(
        transport: str) -> None:
    """Frames on both sides of the big-frame threshold, sent in pieces of random sizes,
    arrive as they were sent; a big RECORD's payload (and the data of its Write) is a
    view of the buffer it was received into, not a copy."""
    if transport == "socket":
        left, right = await _socket_pair()
    else:
        left, right = trio.testing.memory_stream_pair()  # type: ignore[assignment]
    frames = [_data_frame(total, seq) for seq, total in enumerate(SIZES * 2, start=1)]
    wire = b"".join(bytes(f.encode(KEY)) for f in frames)
    reader = FrameReader(right)
    reader.trust()
    got: list[Frame] = []

    async def send() -> None:
        rng, pos = random.Random(7), 0
        while pos < len(wire):
            step = rng.choice([1, 23, 1000, BIG - 5, 200_000])
            await left.send_all(wire[pos:pos + step])
            pos += step
        await left.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        for _ in frames:
            got.append(await reader.frame(KEY))
        with pytest.raises(EOFError):
            await reader.frame(KEY)
    assert [(f.type, f.seq, bytes(f.payload)) for f in got] == \
        [(f.type, f.seq, bytes(f.payload)) for f in frames]
    for frame in got:
        big = FRAME_HEADER.size + len(frame.payload) + MAC_SIZE >= BIG
        assert isinstance(frame.payload, memoryview) == big
        record, data = decode_record_payload(frame.payload)
        assert isinstance(record, rec.Write)
        assert len(data) == record.length
        if big:
            assert isinstance(data, memoryview)
            assert isinstance(frame.payload, memoryview)
            assert data.obj is frame.payload.obj


async def test_a_connection_closed_inside_a_big_frame_is_a_protocol_error() -> None:
    left, right = await _socket_pair()
    wire = bytes(_data_frame(3 * BIG, 1).encode(KEY))
    reader = FrameReader(right)
    reader.trust()
    await left.send_all(wire[:2 * BIG])
    await left.aclose()
    with pytest.raises(ProtocolError, match="closed in the middle of a frame"):
        await reader.frame(KEY)


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_a_big_frame_with_one_flipped_payload_bit_is_refused_and_nothing_applied(
        tmp_path: Path) -> None:
    """Over a real socket (the zero-copy path): a file's Mknod, then 1 MiB of its data with
    one bit flipped.  The replica refuses the frame for its MAC and applies none of it."""
    left, right = await _socket_pair()
    replica = Replica.open(str(tmp_path / USER))
    errors: list[str] = []
    data = os.urandom(1 << 20)

    async def replica_side() -> None:
        try:
            await Follower(right, replica, SharedKey(KEY), USER, "n1", LinkStats()).run()
        except ProtocolError as exc:
            errors.append(str(exc))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(replica_side)
            reader = FrameReader(left)
            hello = decode_hello(await reader.frame(KEY))
            key = await answer_hello(left, KEY, hello, 2, JOURNAL_ID)
            reader.trust()
            mknod = Frame(RECORD, 1, encode_record_payload(
                rec.Mknod(b"upper/f", 0o100644, 0, 0))).encode(key)
            bad = _write(2, b"upper/f", data).encode(key)
            bad[FRAME_HEADER.size + len(bad) // 2] ^= 0x04
            await left.send_all(bytes(mknod))
            assert (await reader.frame(key)).type == ACK  # the Mknod is applied
            await left.send_all(bytes(bad))
            while True:  # until its ERROR (or the end): the link ends
                try:
                    if (await reader.frame(key)).type != ACK:
                        break
                except EOFError:
                    break
            await left.aclose()
    finally:
        replica.close()
    assert errors
    assert "authentication failed" in errors[0]
    replica = Replica.open(str(tmp_path / USER))
    try:
        assert replica.applied == 1
    finally:
        replica.close()
    assert (tmp_path / USER / "upper" / "f").stat().st_size == 0
