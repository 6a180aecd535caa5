"""The tree: serving followers, placing joiners, relaying, and asking for the head.

Every upstream (the login node's daemon, or a replica that relays) serves the replicas
following a user through it over a :class:`DownstreamLink` (frames out, ACKs back).
What it knows of each is a :class:`Downstream`; all of a user's are its
:class:`Downstreams`, which also decide where a new one goes.

Tree fan-out
============

An upstream that already has ``fanout`` direct followers of a user answers a new one
with REDIRECT to the one with the smallest subtree, counted by what this upstream
itself sent there (:class:`Placement`: bookkeeping at redirect time, so a burst of
joiners spreads at once; the subtree reports in ACKs lag behind a cold stream and
only correct it).  Every follower places its share the same way, so followers
arrange themselves in a tree of degree ``fanout`` and the least depth that degree
allows (about log_fanout N), however they join.  A redirect names the follower's
relay address as seen by the upstream.

Relaying
========

A replica that listens keeps what it applied in a bounded :class:`RelayBuffer` and
serves it to the replicas below it (:class:`RelaySender`); one whose buffer no longer
leads from a follower's position sends a snapshot of its own copy, held still
meanwhile.  Hop by hop the stream is pipelined: a relay applies no further than its
followers have taken (for at most RELAY_STALL: a stuck follower is left behind and
later gets a snapshot).  A follower that takes none of its snapshot for RELAY_STALL is
dropped (:class:`FollowerStalled`; it reconnects for a new one): the copy is held still
while it is read, so a stopped follower would otherwise stop its relay, and every node
below, from applying anything until it woke.

Barriers: asking for the login node's head
==========================================

A SLURM prolog's barrier is the login node's head *now* (at least the position the
user's journal had when the job was submitted).  A node asks its upstream (a QUERY
HELLO, :func:`ask_head`), not the login node: a relay answers with the head it learns
from *its* upstream in turn, so the question climbs the tree and only the login node
reads its journal.  Each node asks in rounds (:class:`HeadRounds`): a round starts
after the previous one ended and answers every question that arrived before it
started, so its answer is the login node's head at some moment after each of them
was asked (the guarantee).  The login node's direct followers also leave
LOGIN_ROUND_GAP between the starts of their rounds, so the login node answers at most
``fanout`` questions per gap whatever N, at the price of at most that gap for a
barrier asked during a burst (a deeper node's question arrives after the rounds above
it started, so a burst takes about one round per level below each direct follower, or
per gap while questions keep coming).  A node not linked to an upstream, or whose
upstream fails to answer, asks the login node itself.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import secrets
import select
import time
from collections.abc import Awaitable, Callable, Iterator

import attrs
import trio

from ..offload import Offload
from ..replicable import UserIds
from .auth import HelloAuth
from .replica import LinkStats, Replica
from .snapshot import snapshot_frames
from .wire import (
    ACK,
    ERROR,
    HEAD,
    MORE,
    NO_ID,
    NONCE_SIZE,
    QUERY,
    SNAPSHOT_END,
    Encoded,
    Frame,
    FrameReader,
    Hello,
    LinkKey,
    ProtocolError,
    Redirected,
    decode_error,
    decode_report,
    encode_error,
    open_link_tasks,
    parse_address,
    send_hello,
)

log = logging.getLogger(__name__)

IDLE_HEAD = 1.0  # seconds between HEAD frames on an idle link
RELAY_STALL = 5.0  # seconds a relay waits for a slow follower before leaving it behind
RELAY_SEND_BYTES = 1 << 20  # payload bytes a relay takes from its buffer per send
SNAPSHOT_SEND_BYTES = 4 << 20  # payload bytes of a snapshot read per worker-thread call
PLACEMENT_GRACE = 30.0  # seconds a node sent below a follower counts there unreported
LOGIN_ROUND_GAP = 0.010  # seconds between rounds of asking the login node itself
HEAD_QUERY_TIMEOUT = 10.0  # seconds for one head query to an upstream (and all above it)
HEAD_QUERY_ERRORS = (OSError, ConnectionError, EOFError, ProtocolError, trio.TooSlowError,
                     trio.BrokenResourceError)


# -- serving a follower -----------------------------------------------------------------------


class FollowerStalled(ConnectionError):
    """A follower took none of what was sent to it for a time: the link is dropped (mid-frame:
    no ERROR can follow), and the follower reconnects."""


@attrs.define(eq=False)
class Downstream:
    """What an upstream knows of one replica following a user through it."""

    node: str
    user: str
    acked: int = 0
    sent_seq: int = 0
    bytes_sent: int = 0
    connected_at: float = attrs.field(factory=time.time)
    report: list[tuple[str, int]] = attrs.field(factory=list)


SEND_IOVECS = 512  # buffers per writev (Linux takes up to IOV_MAX, 1024)
SEND_WAIT = 100  # ms a sending thread waits for room before it looks for a cancellation


def send_blocking(fd: int, buffers: list[Encoded]) -> None:
    """Write ``buffers`` whole to the non-blocking socket ``fd`` (a worker thread of
    ``trio.to_thread``): ``writev`` of many at once, ``poll`` for room between; raises
    ``trio.Cancelled`` (``trio.from_thread.check_cancelled``) if the task that waits for
    it was cancelled meanwhile, OSError if the connection failed."""
    views = [memoryview(b) for b in buffers]
    waiting = select.poll()
    waiting.register(fd, select.POLLOUT)
    first = 0
    try:
        while first < len(views):
            try:
                sent = os.writev(fd, views[first:first + SEND_IOVECS])
            except BlockingIOError:
                while not waiting.poll(SEND_WAIT):
                    trio.from_thread.check_cancelled()
                continue
            while sent:
                size = len(views[first])
                if sent < size:
                    views[first] = views[first][sent:]
                    break
                sent -= size
                first += 1
    finally:
        for view in views:
            view.release()


def coalesce(buffers: list[Encoded], small: int = 1 << 16,
             target: int = 1 << 18) -> Iterator[Encoded]:
    """Small frames joined into sends of about ``target`` bytes; big ones as they are."""
    pending: list[Encoded] = []
    size = 0
    for buf in buffers:
        if len(buf) >= small:
            if pending:
                yield b"".join(pending)
                pending, size = [], 0
            yield buf
            continue
        pending.append(buf)
        size += len(buf)
        if size >= target:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


@attrs.define(eq=False)
class DownstreamLink:
    """An upstream's end of one link after the handshake: frames to the follower, its
    ACKs back (the origin's ``JournalSender`` and a relay's ``RelaySender`` both send
    through it)."""

    stream: trio.abc.Stream
    reader: FrameReader
    key: LinkKey  # the session key, and the place of the frames either way
    downstream: Downstream
    offload: Offload  # reads the tree of a snapshot

    async def run(self, producer: Callable[[], Awaitable[None]]) -> None:
        """Run ``producer`` (which sends) while receiving ACKs, until either ends; a
        ProtocolError of the producer is told to the follower, in this session's key."""
        async with open_link_tasks() as nursery:
            async def acks() -> None:
                await self._receive_acks()
                nursery.cancel_scope.cancel()
            nursery.start_soon(acks)
            try:
                await producer()
            except ProtocolError as exc:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.stream.send_all(encode_error(exc, self.key))
                raise
            nursery.cancel_scope.cancel()

    async def _receive_acks(self) -> None:
        """Record the follower's ACKs until it closes; an ERROR or a bad frame ends the link."""
        downstream = self.downstream
        while True:
            try:
                frame = await self.reader.frame(self.key)
            except EOFError:
                return
            if frame.type == ERROR:
                raise decode_error(frame, f"replica {downstream.node} refused: ")
            if frame.type != ACK or frame.seq > downstream.sent_seq:
                raise ProtocolError(f"replica {downstream.node} sent a bad ACK")
            downstream.acked = max(downstream.acked, frame.seq)
            if frame.payload:
                downstream.report = decode_report(frame.body)

    async def send_encoded(self, buffers: list[Encoded], last_seq: int,
                           stall: float = math.inf) -> None:
        """Send encoded frames whose last seq is ``last_seq``; FollowerStalled if one send
        of about 256 KiB (``coalesce``) does not go through within ``stall`` seconds."""
        if not buffers:
            return
        # Before sending: the ACK can arrive before send_all returns.
        self.downstream.sent_seq = max(self.downstream.sent_seq, last_seq)
        for buf in coalesce(buffers):
            self.downstream.bytes_sent += len(buf)
            with trio.move_on_after(stall) as sending:
                await self.stream.send_all(buf)
            if sending.cancelled_caught:
                raise FollowerStalled(f"{self.downstream.node} took nothing for "
                                      f"{stall:.0f} s; dropped")

    async def send_encoded_offloaded(self, buffers: list[Encoded], last_seq: int,
                                     offload: Offload) -> None:
        """``send_encoded`` (no stall bound) from a worker thread of ``offload``: the
        frames go out in ``writev`` calls of many frames each, waiting for room in
        ``poll``, so the trio loop does nothing per send (it looped on every ~100 KiB the
        socket took: a tenth of a cold stream's CPU, bench/RESULTS.md, branch
        coldorigin).  A stream that is not a socket's is sent on the loop."""
        if not isinstance(self.stream, trio.SocketStream):
            await self.send_encoded(buffers, last_seq)
            return
        if not buffers:
            return
        self.downstream.sent_seq = max(self.downstream.sent_seq, last_seq)
        self.downstream.bytes_sent += sum(map(len, buffers))
        try:
            await offload.run(send_blocking, self.stream.socket.fileno(), buffers)
        except OSError as exc:  # as trio.SocketStream.send_all says it
            raise trio.BrokenResourceError(str(exc)) from exc

    async def send(self, frames: list[Frame], stall: float = math.inf) -> None:
        if frames:
            await self.send_encoded([f.encode(self.key) for f in frames], frames[-1].seq,
                                    stall)

    async def send_snapshot(self, upper: str, seq: int, ids: UserIds,
                            stall: float = math.inf) -> None:
        """Stream a snapshot of ``upper`` as the state at ``seq`` (the caller keeps it
        still), of what replicas carry for the user of ``ids``; FollowerStalled if the
        follower takes nothing for ``stall`` seconds (``send_encoded``)."""
        digest: list[bytes] = []
        frames = snapshot_frames(upper, seq, digest, ids)

        def take() -> list[Frame]:  # a worker thread: reading the tree
            out, size = [], 0
            for frame in frames:
                out.append(frame)
                size += len(frame.payload)
                if size >= SNAPSHOT_SEND_BYTES:
                    break
            return out

        while batch := await self.offload.run(take):
            await self.send(batch, stall)
        await self.send([Frame(SNAPSHOT_END, seq, digest[0])], stall)
        log.info("sent a snapshot of %s at seq %d to %s", self.downstream.user, seq,
                 self.downstream.node)


# -- placement: where an upstream puts a joiner ----------------------------------------------


@attrs.define(eq=False)
class Subtree:
    """What an upstream knows of the nodes below one of its direct followers.

    Attributes:
        sent: nodes this upstream redirected there and the follower has not reported
            yet, with the (monotonic) time they were sent; oldest first.
        reported: the nodes of the follower's last subtree report.
        report_of: the ``Downstream.report`` list ``reported`` was taken from.
    """

    sent: dict[str, float] = attrs.field(factory=dict)
    reported: frozenset[str] = frozenset()
    report_of: object = None

    def size(self, now: float) -> int:
        while self.sent:  # a node sent long ago and never reported went elsewhere
            node, when = next(iter(self.sent.items()))
            if now - when < PLACEMENT_GRACE:
                break
            del self.sent[node]
        return len(self.reported) + len(self.sent)


@attrs.define(eq=False)
class Placement:
    """Where an upstream with ``fanout`` direct followers of a user puts the next joiner.

    Below the direct follower with the smallest subtree, where a subtree is what this
    upstream sent there (counted when it redirects, so joiners arriving together spread
    at once) plus what that follower last reported (nodes there from before: this
    daemon restarted, or they stayed while their relay reconnected).  Each follower
    places what it receives the same way, so subtree sizes differ by at most about one
    at every level and the depth is the least the fan-out allows.  Costs O(fanout) per
    redirect, and O(subtree) once per report.

    Attributes:
        subtrees: direct follower's node -> its ``Subtree``.
        below: node -> the direct follower it was last sent below.
    """

    subtrees: dict[str, Subtree] = attrs.field(factory=dict)
    below: dict[str, str] = attrs.field(factory=dict)

    def _subtree(self, follower: Downstream) -> Subtree:
        sub = self.subtrees.setdefault(follower.node, Subtree())
        if sub.report_of is not follower.report:  # a new report: it confirms what was sent
            sub.report_of = follower.report
            sub.reported = frozenset(node for node, _ in follower.report)
            for node in sub.reported.intersection(sub.sent):
                del sub.sent[node]
        return sub

    def choose(self, followers: list[Downstream], node: str, now: float) -> Downstream | None:
        """The follower to send ``node`` below (None: there is none).

        A redirect never makes a cycle: every follower a redirect names is connected to
        the redirecting upstream right now, so its chain of upstreams leads here, while
        ``node`` is asking here because it has no upstream.
        """
        best: tuple[tuple[int, str], Downstream] | None = None
        for follower in followers:
            if follower.node == node:
                continue
            rank = (self._subtree(follower).size(now), follower.node)
            if best is None or rank < best[0]:
                best = rank, follower
        return best[1] if best is not None else None

    def sent(self, node: str, follower: Downstream, now: float) -> None:
        """``node`` was redirected below ``follower``."""
        self.joined(node)
        sub = self._subtree(follower)
        if node not in sub.reported:
            sub.sent[node] = now
        self.below[node] = follower.node

    def joined(self, node: str) -> None:
        """``node`` follows this upstream directly now: it is below none of its followers."""
        old = self.below.pop(node, None)
        sub = self.subtrees.get(old) if old is not None else None
        if sub is not None:
            sub.sent.pop(node, None)


@attrs.define(eq=False)
class Downstreams:
    """The replicas following one user through this upstream, where they relay (the
    address a redirect names), and where the next one goes.

    Attributes:
        followers: node -> what this upstream knows of it (direct followers only).
        addresses: node -> "host:port" where it serves followers (absent: it does not).
    """

    fanout: int
    followers: dict[str, Downstream] = attrs.field(factory=dict)
    addresses: dict[str, str] = attrs.field(factory=dict)
    placement: Placement = attrs.field(factory=Placement)

    def redirect(self, node: str) -> str | None:
        """Where ``node`` should ask instead of here (None: serve it here)."""
        if node in self.followers or len(self.followers) < self.fanout:
            self.placement.joined(node)
            return None
        now = time.monotonic()
        best = self.placement.choose(
            [f for f in self.followers.values() if f.node in self.addresses], node, now)
        if best is None:
            self.placement.joined(node)
            return None
        self.placement.sent(node, best, now)
        return self.addresses[best.node]

    def join(self, hello: Hello, peer: str) -> Downstream:
        """``hello``'s node, at ``peer``, follows through here now."""
        downstream = Downstream(hello.node, hello.user, acked=hello.want - 1,
                                sent_seq=hello.want - 1)
        self.followers[hello.node] = downstream
        if hello.port:
            self.addresses[hello.node] = f"{peer}:{hello.port}"
        else:
            self.addresses.pop(hello.node, None)
        return downstream

    def leave(self, downstream: Downstream) -> None:
        if self.followers.get(downstream.node) is downstream:
            del self.followers[downstream.node]

    def report(self) -> list[tuple[str, int]]:
        """Every node below this one and its applied seq (what an ACK reports upstream)."""
        report = []
        for follower in self.followers.values():
            report.append((follower.node, follower.acked))
            report.extend(follower.report)
        return report


# -- relaying what a replica applied ----------------------------------------------------------


@attrs.define(eq=False)
class RelayBuffer:
    """The last RECORD frames a replica applied (at most ``limit`` payload bytes, or the
    last batch applied if it alone holds more: this is most of an idle node replicad's
    memory), and who waits for more.

    Pipelined like the hops of a tree should be: before applying more, the replica waits
    (``wait_room``) until the followers being served have been sent what the new frames
    would evict, for at most RELAY_STALL; a follower still behind then (stuck, or far
    slower than its siblings) is left behind: not waited for again until it has caught up
    with the buffer's end or was rebuilt (a stopped follower held the relay RELAY_STALL
    per batch, many times over), so it falls off the buffer and gets a snapshot, as one
    that connects too late does.  The batch just applied is kept whole, whatever the
    limit: evicting part of it would take from a follower that was waited for what it
    has not been sent yet (a 1 MiB data frame and a SKIP frame after it, in a 1 MiB
    buffer, sent a follower that was up to date to a snapshot).

    Attributes:
        readers: each follower being served (by token) and the last seq sent to it.
        left_behind: followers the relay no longer waits for.
    """

    limit: int
    frames: collections.deque[Frame] = attrs.field(factory=collections.deque)
    size: int = 0
    changed: trio.Event = attrs.field(factory=trio.Event)
    generation: int = 0  # bumps when the replica was replaced by a snapshot
    base: int = 0  # the seq just before the first frame kept
    readers: dict[object, int] = attrs.field(factory=dict)
    moved: trio.Event = attrs.field(factory=trio.Event)
    left_behind: set[object] = attrs.field(factory=set)

    def reader_at(self, token: object, pos: int | None) -> None:
        """Follower ``token`` was sent everything up to ``pos`` (None: it is gone)."""
        if pos is None:
            self.readers.pop(token, None)
            self.left_behind.discard(token)
        else:
            self.readers[token] = pos
            if not self.frames or pos >= self.frames[-1].seq:
                self.left_behind.discard(token)  # caught up: waited for again
        self.moved.set()
        self.moved = trio.Event()

    def _room(self, incoming: int) -> bool:
        """Whether appending ``incoming`` bytes evicts nothing a reader still needs."""
        excess = self.size + incoming - self.limit
        inside = [pos for token, pos in self.readers.items()
                  if pos >= self.base and token not in self.left_behind]
        if excess <= 0 or not self.frames or not inside:
            return True
        slowest, freed = min(inside), 0
        for frame in self.frames:
            if frame.seq > slowest:
                return False
            freed += len(frame.payload)
            if freed >= excess:
                return True
        return True

    async def wait_room(self, incoming: int) -> None:
        with trio.move_on_after(RELAY_STALL) as waiting:
            while not self._room(incoming):
                await self.moved.wait()
        if waiting.cancelled_caught:  # whoever still holds the room is left behind
            slowest = min((pos for token, pos in self.readers.items()
                           if pos >= self.base and token not in self.left_behind), default=None)
            self.left_behind |= {token for token, pos in self.readers.items()
                                 if pos == slowest}

    def append(self, before: int, frames: list[Frame]) -> None:
        """Keep ``frames``, applied after seq ``before``.

        ``before`` past the last frame kept means records were applied that never reached
        the buffer (an error part-way through a batch skips its relaying): what is kept no
        longer leads here, so it goes, and a follower behind ``before`` is sent a snapshot
        instead of a stream with a hole (it would be refused "out of sequence" at every
        reconnect, for good on an idle stream).  ``before`` below the last frame is a
        record whose chunks span batches (MORE).
        """
        if self.frames and before > self.frames[-1].seq:
            self.frames.clear()
            self.size = 0
        if not self.frames:
            self.base = before
        for frame in frames:
            self.frames.append(frame)
            self.size += len(frame.payload)
        while self.size > self.limit and self.frames[0].seq <= before:
            first = self.frames[0].seq
            while self.frames and self.frames[0].seq == first:  # whole records only
                self.size -= len(self.frames.popleft().payload)
            self.base = first
        self.changed.set()
        self.changed = trio.Event()

    def clear(self) -> None:
        self.frames.clear()
        self.size = 0
        self.generation += 1
        self.changed.set()
        self.changed = trio.Event()

    def first_seq(self) -> int | None:
        """The first seq the buffer covers (frames after a SKIP cover the markers too)."""
        return self.base + 1 if self.frames else None

    def after(self, seq: int, max_bytes: int = RELAY_SEND_BYTES) -> list[Frame]:
        """The frames after ``seq`` (about ``max_bytes``), ending on a complete record.

        Only MORE marks an incomplete record: a trailing frame with SKIP is the one that
        carries the stream to its position (the markers before it are not in the buffer),
        so holding it back would leave every follower short of the head for good.
        """
        out, size = [], 0
        for frame in self.frames:
            if frame.seq > seq:
                out.append(frame)
                size += len(frame.payload)
                if size >= max_bytes and not frame.flags & MORE:
                    break
        while out and out[-1].flags & MORE:  # only whole records
            out.pop()
        return out


@attrs.define(eq=False)
class RelaySender:
    """Serves one follower from what this node's replica applied (``buffer``), from
    ``pos`` on; a snapshot of the copy when the buffer no longer leads from there.

    ``offload`` waits for ``replica.lock``; ``link`` reads the copy while it is held, in
    threads of its own (a waiting thread must not hold the slot the reads need).
    """

    link: DownstreamLink
    replica: Replica
    buffer: RelayBuffer
    stats: LinkStats  # this node's own link upstream: the head HEAD frames tell
    pos: int  # the last seq the follower holds
    offload: Offload

    async def run(self) -> None:
        token = object()
        try:
            await self.link.run(lambda: self._produce(token))
        finally:
            self.buffer.reader_at(token, None)

    async def _produce(self, token: object) -> None:
        buffer = self.buffer
        generation = buffer.generation
        last_send = trio.current_time()
        while True:
            first = buffer.first_seq()
            if buffer.generation != generation or (
                    self.pos < self.replica.applied and (first is None or first > self.pos + 1)):
                buffer.reader_at(token, None)  # not waited for while it is rebuilt
                self.pos = await self._snapshot()
                generation = buffer.generation
            buffer.reader_at(token, self.pos)
            frames = buffer.after(self.pos)
            if frames:
                # Taken: the buffer may drop them now (this list keeps them until sent).
                buffer.reader_at(token, frames[-1].seq)
                await self.link.send(frames)
                self.pos = frames[-1].seq
                last_send = trio.current_time()
                continue
            if trio.current_time() - last_send >= IDLE_HEAD:
                await self.link.send([Frame(HEAD, max(self.stats.head, self.pos))])
                last_send = trio.current_time()
            with trio.move_on_after(IDLE_HEAD):
                await buffer.changed.wait()

    async def _snapshot(self) -> int:
        """Our own copy, held still (applying pauses) while it is read: by a follower that
        keeps taking it (FollowerStalled: not by one that stopped)."""
        replica = self.replica
        await self.offload.run(replica.lock.acquire)
        try:
            seq = replica.applied
            await self.link.send_snapshot(replica.upper, seq, replica.ids, RELAY_STALL)
        finally:
            replica.lock.release()
        return seq


# -- barriers: the login node's head, asked up the tree ---------------------------------------


async def ask_head(address: tuple[str, int], auth: HelloAuth, node: str, user: str
                   ) -> tuple[int, bytes]:
    """One QUERY HELLO to ``address``: the login node's head of ``user`` and its journal
    id, as that node learns them now."""
    with trio.fail_after(HEAD_QUERY_TIMEOUT):
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            hello = Hello(secrets.token_bytes(NONCE_SIZE), NO_ID, user, node, 1, QUERY)
            try:
                session = await send_hello(stream, FrameReader(stream), auth, hello)
            except Redirected as exc:
                raise ProtocolError(f"upstream redirected a head query to {exc.address}") \
                    from None
            return session.head, session.journal_id


@attrs.define(eq=False)
class HeadQuery:
    """One round of asking upstream for the login node's head of a user: its answer (or
    error) serves every caller that arrived before the round started."""

    done: trio.Event = attrs.field(factory=trio.Event)
    head: int = 0
    journal_id: bytes = NO_ID
    error: Exception | None = None


@attrs.define(eq=False)
class HeadRounds:
    """This node's rounds of asking for the login node's head of ``user`` (see the module
    docstring): up the tree while ``link`` is connected, the login node (``home``) when
    it is not or the upstream fails to answer.

    Attributes:
        next_query: the round that starts next (None: nobody is waiting for one).
        querying: a task runs the rounds.
        last_round: trio time the last round started.
    """

    user: str
    node: str
    auth: HelloAuth
    home: tuple[str, int]
    link: LinkStats
    next_query: HeadQuery | None = None
    querying: bool = False
    last_round: float = -math.inf

    async def login_head(self, nursery: trio.Nursery) -> tuple[int, bytes]:
        """The login node's head of the user (and journal id) at a moment after this call
        began: the answer of the next round (run as a task of ``nursery``)."""
        query = self.next_query
        if query is None:
            query = self.next_query = HeadQuery()
            if not self.querying:
                self.querying = True
                nursery.start_soon(self._run)
        await query.done.wait()
        if query.error is not None:
            raise query.error
        return query.head, query.journal_id

    def _linked(self) -> bool:
        return self.link.connected and bool(self.link.upstream)

    async def _run(self) -> None:
        try:
            while self.next_query is not None:
                if not self._linked() or parse_address(self.link.upstream) == self.home:
                    # The login node's direct followers start a round at most every
                    # LOGIN_ROUND_GAP: what arrives meanwhile joins it, so a burst of
                    # prologs reaches the login node as rounds per interval, not per node.
                    await trio.sleep_until(self.last_round + LOGIN_ROUND_GAP)
                query, self.next_query = self.next_query, None  # later askers: next round
                self.last_round = trio.current_time()
                try:
                    query.head, query.journal_id = await self._ask()
                except HEAD_QUERY_ERRORS as exc:
                    query.error = exc
                query.done.set()
        finally:
            self.querying = False

    async def _ask(self) -> tuple[int, bytes]:
        # Up the tree while linked (the link's chain of upstreams leads to the login
        # node); the login node itself when not, or when that fails.
        try:
            if not self._linked():
                raise ConnectionError("not linked upstream")
            return await ask_head(parse_address(self.link.upstream), self.auth,
                                  self.node, self.user)
        except HEAD_QUERY_ERRORS as exc:
            log.debug("%s: head from %s: %s; asking the login node", self.user,
                      self.link.upstream, exc)
            return await ask_head(self.home, self.auth, self.node, self.user)


def tree_cost(nodes: int, fanout: int) -> dict[str, float]:
    """Depth and per-node streams of the relay tree (for the 1,000/10,000-node estimate
    of bench/fanout).

    ``depth``: the least number of hops below the login node that holds ``nodes`` at
    ``fanout`` followers each (fanout + fanout**2 + ... >= nodes), which ``Placement``
    reaches however the nodes join.
    """
    depth, capacity, level = 0, 0, 1
    while capacity < nodes:
        level *= max(fanout, 1)
        capacity += level if fanout > 1 else 1
        depth += 1
    return {"nodes": nodes, "fanout": fanout, "depth": depth, "login_streams": min(nodes, fanout)}
