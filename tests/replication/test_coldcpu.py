"""A cold stream's CPU per byte (issue 16, branch coldcpu).

* the login node's sender reads an Extent's data into the buffers of its pool
  (``wire.BufferPool``), as a Write's: not a new zeroed ``bytearray`` per MiB; a buffer
  still held (a batch being sent) is never read into, and a frame held back (its data
  changed since the capture read it) frees its buffer; a full pool finds the buffer
  freed first at its first look; a sender keeps them between a capture's committed
  batches and drops them once its link is idle.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import trio

from sdeefs.replication.origin import write_frame_data
from sdeefs.replication.relay import IDLE_HEAD
from sdeefs.replication.wire import BufferPool, Encoded
from tests.replication import test_coldsource
from tests.replication.test_coldsource import _Sender, _stable, _wrong_sums

login = test_coldsource.login  # the same login journal and sender fixture


def _bases(frames: Sequence[bytes | bytearray | memoryview]) -> list[int]:
    """The buffers the frames are made in (a view's underlying object)."""
    return [id(f.obj) if isinstance(f, memoryview) else id(f) for f in frames]


def _writable(frame: bytes | bytearray | memoryview) -> bytearray | memoryview:
    assert not isinstance(frame, bytes)  # (a big frame is made in a buffer)
    return frame


def test_an_extents_frames_are_read_into_the_senders_pool(login: _Sender) -> None:
    """Every frame of a (witnessed) Extent is a view of a buffer of the sender's pool;
    once the frames are dropped, the next Extent's are read into the same buffers."""
    first = os.urandom((2 << 20) + 4321)
    second = os.urandom((2 << 20) + 99)
    _, h1, c1 = login.file("one", first)
    _, h2, c2 = login.file("two", second)
    login.journal.append(_stable("one", h1, first, c1, _wrong_sums(first)))
    out, _ = login.sender.next_batch()
    pool = [id(b) for b in login.sender.frames._buffers]
    assert len(out) == 3
    assert set(_bases(out)) <= set(pool)
    used = _bases(out)
    del out
    login.journal.append(_stable("two", h2, second, c2, _wrong_sums(second)))
    out, _ = login.sender.next_batch()
    assert b"".join(bytes(write_frame_data(_writable(f))) for f in out) == second
    assert sorted(id(b) for b in login.sender.frames._buffers) == sorted(pool)  # no new one
    assert len(set(used)) == 3


def test_frames_still_held_keep_their_bytes(login: _Sender) -> None:
    """A batch still being sent holds its buffers: the next Extent is read elsewhere,
    and the held frames keep the bytes they were sealed over."""
    first = os.urandom(3 << 20)
    second = os.urandom(3 << 20)
    _, h1, c1 = login.file("one", first)
    _, h2, c2 = login.file("two", second)
    login.journal.append(_stable("one", h1, first, c1, _wrong_sums(first)))
    held, _ = login.sender.next_batch()
    login.journal.append(_stable("two", h2, second, c2, _wrong_sums(second)))
    out, _ = login.sender.next_batch()
    assert not set(_bases(out)) & set(_bases(held))
    assert b"".join(bytes(write_frame_data(_writable(f))) for f in held) == first
    assert b"".join(bytes(write_frame_data(_writable(f))) for f in out) == second


def test_a_frame_held_back_frees_its_buffer(login: _Sender) -> None:
    """Data changed since the capture read them (a ctime moved) and sums no data has:
    the Extent waits, and its buffer is free for the next read."""
    data = os.urandom(1 << 20)
    path, handle, ctime = login.file("f", data)
    os.chmod(path, 0o600)  # the ctime moves: the witness no longer holds
    login.journal.append(_stable("f", handle, data, ctime, _wrong_sums(data)))
    assert login.frames() == []
    assert login.sender.waiting
    buffers = login.sender.frames._buffers
    assert len(buffers) == 1
    assert len(buffers[0]) >= len(data)
    assert login.sender.frames.take(len(data)).obj is buffers[0]  # free again


def test_a_full_pool_looks_at_the_oldest_buffer_first() -> None:
    """Frames come free in the order they were taken: a pool of many buffers in flight
    finds the free one at its first look (and the next, in flight, ends the run of free
    ones), not after a look at every buffer."""
    looks = []

    class Counted(BufferPool):
        @staticmethod
        def _refs(buf: bytearray) -> int:
            looks.append(1)
            return sys.getrefcount(buf) - 1  # (this frame's own reference)

    pool = Counted(keep=64)
    window = [pool.take(100) for _ in range(64)]  # the sender's window, all in flight
    for step in range(200):
        window.pop(0)  # the oldest was sent
        looks.clear()
        view = pool.take(100)
        view[:] = bytes([step % 256]) * 100
        window.append(view)
        assert len(looks) <= 2
    assert len(pool._buffers) == 64
    assert len({id(v.obj) for v in window}) == 64  # no buffer handed out twice


def test_a_brief_idle_keeps_the_senders_buffers_a_long_one_drops_them(
        login: _Sender) -> None:
    """Between a capture's committed batches the sender finds nothing for a moment: it
    keeps its buffers for the next batch (they were dropped at every such look, and
    each batch faulted in new ones), and lets them go once the link is idle
    (IDLE_HEAD: its HEAD frame then)."""
    data = os.urandom(2 << 20)
    _, handle, ctime = login.file("one", data)
    login.journal.append(_stable("one", handle, data, ctime, _wrong_sums(data)))

    async def main() -> None:
        send, receive = trio.open_memory_channel[tuple[list[Encoded], int]](1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(login.sender._produce, send)
            with trio.fail_after(10):
                buffers, _ = await receive.receive()
            assert len(buffers) == 2
            del buffers
            await trio.sleep(IDLE_HEAD / 4)  # the looks that find nothing
            assert len(login.sender.frames._buffers) == 2
            with trio.fail_after(IDLE_HEAD * 5):
                head, _ = await receive.receive()  # idle: the HEAD frame ...
            assert len(head) == 1
            assert login.sender.frames._buffers == []  # ... and no buffers kept
            nursery.cancel_scope.cancel()

    trio.run(main)
