"""A replica's frames read and checked in a worker thread (issue 16: a cold stream's bulk).

``wire.FrameReader`` reads a frame at a time on the trio thread: for each frame a wait
for the socket, a ``recv_into``, a header decode, the MAC check through ctypes and a
reschedule, and for each big frame a new zeroed buffer (a memset, then a page fault per
page).  On a cold stream that trio thread was two thirds of the replica's CPU
(bench/RESULTS.md, branch coldreplica), more than applying the records.  A
:class:`ThreadReader` takes over a link's socket once its HELLOs are done and reads it
from a worker thread (``Follower``: its own one, never the daemon's pool):

* bytes go straight from the socket into *slabs* (SLAB bytes each, :class:`SlabPool`):
  one ``readv`` takes whatever the socket holds, many frames at once, and a frame's
  payload is a view of its slab (nothing copies it between the kernel and the
  ``pwrite`` that applies it).  A slab is used again once nothing refers to it (every
  frame of it applied, and dropped by a relay's buffer); a frame cut by a slab's end is
  moved whole to the next slab (at most one frame per slab);
* every frame is checked as ``FrameReader.frame`` checks it (``Frame.decode``: header,
  CRC, MAC, and under the session key its place on the link) before it is handed over,
  in the order it arrived; the MAC runs in libcrypto with the GIL released;
* :meth:`ThreadReader.frames` returns every checked frame the socket already held (at
  least one, waiting for it), up to the payload bytes the caller has room for: one
  hand-over to the trio thread per batch, not per frame.

Nothing changes in what is accepted: the same checks in the same order, the same errors
(a frame that fails is the last thing read: the frames checked before it are handed over
first, as the per-frame reader handed them over before reading it, and its error is
raised by the next call).  Waiting for data, the thread looks every POLL_MS for a
cancellation (``trio.from_thread.check_cancelled``), and before every read: a link that
ends, or whose upstream is silent for too long (the caller's deadline), is not held by
it, even while bytes trickle in.
"""

from __future__ import annotations

import mmap
import os
import select
import sys

import attrs
import trio

from .wire import (
    FRAME_HEADER,
    MAC_SIZE,
    MAX_FRAME_PAYLOAD,
    Frame,
    FrameReader,
    LinkKey,
    ProtocolError,
    decode_header,
)

SLAB = 4 << 20  # bytes per slab: the biggest frame (MAX_FRAME_PAYLOAD + 56) and more
MIN_READ = 64 << 10  # a slab with less room than this left is changed before a read
KEEP_SLABS = 8  # slabs a pool keeps (about IN_FLIGHT_BYTES of frames, and one being read)
MAX_BATCH = 1024  # frames handed over at most per call
POLL_MS = 100  # ms a reading thread waits for data before it looks for a cancellation
assert FRAME_HEADER.size + MAX_FRAME_PAYLOAD + MAC_SIZE + MIN_READ <= SLAB


@attrs.define(eq=False)
class SlabPool:
    """Slabs of SLAB bytes, each used again once nothing refers to it any more.

    A slab is free when the pool holds the only reference to it (``sys.getrefcount``
    against the count of one known free: interpreters differ).  Every view of it (a
    frame's payload, a slice, a ctypes view while its MAC is checked) keeps a reference,
    so a frame queued, being applied or kept by a relay keeps its slab.  At most
    ``keep`` slabs are kept; beyond that a slab of its own, let go when its frames are.
    """

    keep: int = KEEP_SLABS
    _slabs: list[mmap.mmap] = attrs.field(factory=list)
    _free_refs: int = 0

    def __attrs_post_init__(self) -> None:
        self._slabs.append(_new_slab())
        slab = self._slabs[0]
        self._free_refs = sys.getrefcount(slab)
        del slab
        self._slabs.clear()

    def take(self) -> mmap.mmap:
        """A slab nothing else refers to, contents undefined."""
        for slab in self._slabs:  # (a local name: counted as when measured)
            if sys.getrefcount(slab) <= self._free_refs:
                return slab
        slab = _new_slab()
        if len(self._slabs) < self.keep:
            self._slabs.append(slab)
        return slab

    def trim(self) -> None:
        """Let the free slabs go (an idle link keeps none: its memory goes back)."""
        kept = []
        for slab in self._slabs:
            if sys.getrefcount(slab) > self._free_refs:
                kept.append(slab)
        self._slabs[:] = kept

    def __len__(self) -> int:
        return len(self._slabs)


def _new_slab() -> mmap.mmap:
    """Anonymous memory, its pages made on first use: not a ``bytearray``, which is zeroed
    whole when made (a memset of SLAB bytes, every page at once)."""
    return mmap.mmap(-1, SLAB)


NO_SLAB = bytearray()  # the slab of a reader that let its slab go (idle): none


class ThreadReader:
    """The frames of one link after its HELLOs, read in a worker thread (module docstring).

    Made from the link's ``FrameReader`` (:meth:`take_over`), whose bytes read ahead it
    takes; that reader must not be used after.  :meth:`frames` runs in one worker thread
    at a time (``trio.to_thread``); nothing else reads the socket meanwhile.
    """

    def __init__(self, fd: int, max_payload: int, pending: bytes | bytearray,
                 pool: SlabPool | None = None) -> None:
        self.fd = fd
        self.max_payload = max_payload
        self.pool = pool if pool is not None else SlabPool()
        self.slab: mmap.mmap | bytearray = self.pool.take()
        self.slab[:len(pending)] = pending
        self.start, self.end = 0, len(pending)  # bytes read and not taken: slab[start:end]
        self._failed: BaseException | None = None  # raised by the next call (docstring)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    @classmethod
    def take_over(cls, reader: FrameReader, pool: SlabPool | None = None
                  ) -> ThreadReader | None:
        """A thread reader of ``reader``'s socket and the bytes it read ahead; None if its
        stream is not a socket (then the frames come through ``reader``)."""
        sock = reader.socket
        if sock is None:
            return None
        pending = reader.buf[reader.start:reader.end]
        reader.start = reader.end = 0
        return cls(sock.fileno(), reader.max_payload, pending, pool)

    def frames(self, key: LinkKey, room: int) -> list[Frame]:
        """Checked frames in the order they arrived: at least one (waiting for it), then
        those the socket already holds, until their payloads reach ``room`` bytes or
        MAX_BATCH frames.  EOFError at a clean end; ProtocolError for a frame that must not
        be used; trio.BrokenResourceError if the connection failed; trio.Cancelled if the
        waiting task was cancelled (a worker thread of ``trio.to_thread``)."""
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        frames: list[Frame] = []
        size = 0
        while len(frames) < MAX_BATCH and size < room:
            try:
                raw = self._next_frame(wait=not frames)
                if raw is None:
                    break
                frame = Frame.decode(*raw, key)
            except (ProtocolError, EOFError, trio.BrokenResourceError) as exc:
                if not frames:
                    raise
                self._failed = exc  # the frames before it first
                break
            frames.append(frame)
            size += len(frame.payload)
        return frames

    def _next_frame(self, wait: bool) -> tuple[bytes, memoryview, bytes] | None:
        """(header, payload, mac) of the next whole frame, its header checked; None if it
        is not all here and ``wait`` is false (nothing is waited for then)."""
        while True:
            held = self.end - self.start
            total = 0
            if held >= FRAME_HEADER.size:
                header = bytes(self.slab[self.start:self.start + FRAME_HEADER.size])
                total = FRAME_HEADER.size + decode_header(header, self.max_payload)[2] \
                    + MAC_SIZE
                if held >= total:
                    view = memoryview(self.slab)[self.start:self.start + total]
                    self.start += total  # (never back to 0: the frames hold the slab)
                    payload = view[FRAME_HEADER.size:total - MAC_SIZE]
                    return header, payload, bytes(view[total - MAC_SIZE:])
            if not self._read(max(total, FRAME_HEADER.size), wait):
                return None

    def _idle(self) -> None:
        """Nothing came for POLL_MS: give the slabs back that nothing holds."""
        if self.start == self.end and self.slab is not NO_SLAB:
            self.slab, self.start, self.end = NO_SLAB, 0, 0
        self.pool.trim()

    def _read(self, need: int, wait: bool) -> bool:
        """Read what the socket holds (waiting for some if ``wait``) into the slab, with
        room for a frame of ``need`` bytes from ``start``; False if nothing was there.
        A cancellation is looked for before every read, not only when the socket stays
        empty: an upstream that trickles a byte every few ms never leaves it empty for
        POLL_MS, and would otherwise hold the link past its silence deadline and the
        daemon's shutdown (``trio.to_thread`` waits for this thread)."""
        while True:
            trio.from_thread.check_cancelled()
            if self.start + need > len(self.slab) or len(self.slab) - self.end < MIN_READ:
                slab = self.pool.take()  # the next slab, the frame begun moved to its start
                held = self.end - self.start
                slab[:held] = self.slab[self.start:self.end]
                self.slab, self.start, self.end = slab, 0, held
            try:
                with memoryview(self.slab) as view:
                    got = os.readv(self.fd, [view[self.end:]])
            except BlockingIOError:
                if not wait:
                    return False
                while not self._poll.poll(POLL_MS):
                    self._idle()  # (then the slab is looked at again)
                    trio.from_thread.check_cancelled()
                continue
            except OSError as exc:  # as FrameReader (trio.SocketStream) says it
                raise trio.BrokenResourceError(str(exc)) from exc
            break
        if not got:
            if self.end > self.start:
                raise ProtocolError("connection closed in the middle of a frame")
            raise EOFError("connection closed")
        self.end += got
        return True
