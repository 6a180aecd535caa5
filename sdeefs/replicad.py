"""``sdeefs-replicad``: one daemon per node that serves and keeps users' replicas.

Roles (one process can have both):

* **origin** (login node, ``--origin ROOT``): serves every user's journal from
  ``ROOT/USER/state/journal``, reading the data of Write records from the live
  upper ``ROOT/USER/upper`` by file handle.  Each follower has its own reader of
  the journal, so a slow replica never stalls the user (the journal is the buffer)
  nor another replica.  The journal is trimmed below what every follower
  acknowledged; a follower gone longer than ``expire`` no longer holds it back and
  gets a snapshot when it returns.
* **replica** (compute node, ``--replica-dir DIR --upstream HOST:PORT``): follows the
  users it is asked to (``follow`` on the control socket: the SLURM prolog, or
  ``--follow USER`` for warm replicas), applying into ``DIR/USER`` (see
  ``sdeefs.replicate``), reconnecting with backoff after any failure.  It also
  *relays*: what it applied is kept in a bounded buffer and served to replicas
  that connect to it, so the login node sends each record to at most ``fanout``
  nodes whatever the size of the job.

Tree fan-out: an upstream that already has ``fanout`` direct followers of a user
answers a new one with REDIRECT to the one with the smallest subtree, counted by
what this upstream itself sent there (``Placement``: bookkeeping at redirect time,
so a burst of joiners spreads at once; the subtree reports in ACKs lag behind a
cold stream and only correct it).  Every follower places its share the same way,
so followers arrange themselves in a tree of degree ``fanout`` and the least depth
that degree allows (about log_fanout N), however they join.  A redirect names the
follower's relay address as seen by the upstream.

Control socket (unix, root only): one JSON request per connection, one JSON reply::

    {"op": "follow", "user": U, "wait": true, "timeout": 120}   -> {"applied", "barrier"}
    {"op": "unfollow", "user": U}
    {"op": "status"}                                             -> every user, both roles

``follow`` with ``wait`` learns the login node's head *now* (at least the position
the user's journal had when the job was submitted) and returns once the replica
holds it, of the same history (journal id): that is the job's barrier.  A node
asks its upstream (a QUERY HELLO), not the login node: a relay answers with the
head it learns from *its* upstream in turn, so the question climbs the tree and
only the login node reads its journal.  Each node asks in rounds: a round starts
after the previous one ended and answers every question that arrived before it
started, so its answer is the login node's head at some moment after each of
them was asked (the guarantee).  The login node's direct followers also leave
LOGIN_ROUND_GAP between the starts of their rounds, so the login node answers at
most ``fanout`` questions per gap whatever N, at the price of at most that gap
for a barrier asked during a burst (a deeper node's question arrives after the
rounds above it started, so a burst takes about one round per level below each
direct follower, or per gap while questions keep coming).  A node not linked to
an upstream, or whose upstream fails to answer, asks the login node itself.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import attrs
import trio

from . import control
from . import records as rec
from .errors import ExitCode, JournalCorrupt, QuietError
from .journal import Entry, Journal, JournalTail, Trimmed, journal_id
from .layers import LayerRoot, open_layer_root
from .replicate import (
    ERROR,
    HEAD,
    HELLO,
    ID_SIZE,
    MORE,
    NO_ID,
    NONCE_SIZE,
    OLD_VERSIONS,
    QUERY,
    REDIRECT,
    SKIP,
    SNAPSHOT_END,
    VERSION,
    Follower,
    Frame,
    Hello,
    LinkStats,
    ProtocolError,
    Redirected,
    Replica,
    VersionMismatch,
    answer_hello,
    decode_hello,
    encode_frame,
    encode_hello,
    encode_write_frames,
    follow,
    open_nursery,
    receive_acks,
    receive_frame,
    record_frames,
    snapshot_frames,
)
from .statedir import UserDirs
from .sysio import (
    IN_CREATE,
    IN_DELETE,
    IN_IGNORED,
    IN_MODIFY,
    IN_MOVED_TO,
    inotify_drain,
    inotify_watch,
    malloc_trim,
)
from .writeahead import open_write_data

log = logging.getLogger(__name__)

HOLD_BACK = 0.05  # seconds a trailing metadata record waits for a possible Abort
IDLE_HEAD = 1.0  # seconds between HEAD frames on an idle link
POLL = 0.01  # seconds between looks at a journal for new records, where inotify fails
JOURNAL_EVENTS = IN_MODIFY | IN_CREATE | IN_MOVED_TO | IN_DELETE  # a segment grew or came
BATCH_BYTES = 8 << 20  # data read from the upper per batch sent
MARKERS = (rec.Done, rec.Sync, rec.Abort)
LOGIN_ROUND_GAP = 0.010  # seconds between rounds of asking the login node itself
HEAD_QUERY_TIMEOUT = 10.0  # seconds for one head query to an upstream (and all above it)
HEAD_QUERY_ERRORS = (OSError, ConnectionError, EOFError, ProtocolError, trio.TooSlowError,
                     trio.BrokenResourceError)
MEMORY_CHECK = 1.0  # seconds between looks at whether the streams went quiet
RELAY_STALL = 5.0  # seconds a relay waits for a slow follower before leaving it behind
MAX_REDIRECTS = 64  # hops a joiner follows down the tree (depth 13 holds 10,000 at fan-out 2)
PLACEMENT_GRACE = 30.0  # seconds a node sent below a follower counts there unreported
# The start of the ERROR a replica gets when it holds records the login node's journal does
# not (the journal lost its unsynced tail in a crash of the login node): it must start over.
DIVERGED = "history diverged:"  # records a replica has nothing to do for


@attrs.frozen
class DaemonConfig:
    node: str
    key: bytes
    listen: tuple[str, int] | None = None
    origin_root: str | None = None
    replica_dir: str | None = None
    upstream: tuple[str, int] | None = None
    fanout: int = 4
    control: str | None = None
    follow: tuple[str, ...] = ()
    relay_bytes: int = 16 << 20
    expire: float = 86400.0
    silence_timeout: float = 10.0
    trim_interval: float = 10.0


def parse_address(text: str, default_port: int = 7077) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise QuietError(f"bad address {text!r} (want HOST:PORT)", ExitCode.USAGE) from None


def load_key(path: str) -> bytes:
    """The shared replication key: a root-only file of at least 32 bytes."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            key = f.read()
    except OSError as exc:
        raise QuietError(f"cannot read the replication key {path}: {exc.strerror}",
                         ExitCode.USAGE) from None
    if st.st_mode & 0o077:
        raise QuietError(f"{path}: the replication key must not be readable by others "
                         "(chmod 600)", ExitCode.USAGE)
    if len(key.strip()) < 32:
        raise QuietError(f"{path}: the replication key is shorter than 32 bytes", ExitCode.USAGE)
    return key.strip()


# -- the tree: where an upstream puts a joiner -------------------------------------------------


@attrs.define(eq=False)
class Subtree:
    """What an upstream knows of the nodes below one of its direct followers.

    Attributes:
        sent: nodes this upstream redirected there and the follower has not reported
            yet, with the (monotonic) time they were sent; oldest first.
        reported: the nodes of the follower's last subtree report.
        report_of: the ``Follower.report`` list ``reported`` was taken from.
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

    def _subtree(self, follower: Follower) -> Subtree:
        sub = self.subtrees.setdefault(follower.node, Subtree())
        if sub.report_of is not follower.report:  # a new report: it confirms what was sent
            sub.report_of = follower.report
            sub.reported = frozenset(node for node, _ in follower.report)
            for node in sub.reported.intersection(sub.sent):
                del sub.sent[node]
        return sub

    def choose(self, followers: list[Follower], node: str, now: float) -> Follower | None:
        """The follower to send ``node`` below (None: there is none).

        A redirect never makes a cycle: every follower a redirect names is connected to
        the redirecting upstream right now, so its chain of upstreams leads here, while
        ``node`` is asking here because it has no upstream.
        """
        best: tuple[tuple[int, str], Follower] | None = None
        for follower in followers:
            if follower.node == node:
                continue
            rank = (self._subtree(follower).size(now), follower.node)
            if best is None or rank < best[0]:
                best = rank, follower
        return best[1] if best is not None else None

    def sent(self, node: str, follower: Follower, now: float) -> None:
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


# -- origin: a user's journal as a source -------------------------------------------------------


@attrs.define(eq=False)
class OriginUser:
    """One user's journal on the login node and the replicas following it directly."""

    name: str
    dirs: UserDirs  # ROOT/USER
    followers: dict[str, Follower] = attrs.field(factory=dict)
    addresses: dict[str, str] = attrs.field(factory=dict)  # node -> where it relays
    placement: Placement = attrs.field(factory=lambda: Placement())
    head: int = 0
    queries: int = 0  # head queries answered (barriers of the nodes below)
    grew: trio.Event = attrs.field(factory=trio.Event)  # replaced each time the journal grows
    _head_tail: JournalTail | None = None

    @property
    def journal_dir(self) -> str:
        return str(self.dirs.state.journal)
    _head_lock: threading.Lock = attrs.field(factory=threading.Lock)

    def refresh_head(self) -> int:
        """Read new records' seqs (worker threads call this concurrently: one at a time)."""
        with self._head_lock:
            return self._refresh_head()

    def _refresh_head(self) -> int:
        if self._head_tail is None:
            self._head_tail = JournalTail(self.journal_dir, max(1, self.head + 1))
        try:
            while entries := self._head_tail.poll(16 << 20):
                self.head = entries[-1].seq
        except Trimmed:
            self._head_tail.close()
            self._head_tail = None
        return self.head

    def journal_grew(self) -> None:
        self.grew.set()
        self.grew = trio.Event()

    def source(self) -> LayerRoot:
        return open_layer_root(self.dirs.upper, self.dirs.state.work)


def _settled(pending: list[Entry], first_seen: float) -> int:
    """How many of ``pending`` may be sent now.

    A metadata record is written just before its operation; if the operation fails an
    Abort follows at once.  So the last metadata record waits until anything follows
    it, or HOLD_BACK has passed.
    """
    if not pending:
        return 0
    last = pending[-1]
    if last.record.METADATA and not isinstance(last.record, rec.Sync | rec.Done | rec.Abort) \
            and time.monotonic() - first_seen < HOLD_BACK:
        return len(pending) - 1
    return len(pending)


def _coalesce(buffers: list[bytes | bytearray], small: int = 1 << 16,
              target: int = 1 << 18) -> Iterator[bytes | bytearray]:
    """Small frames joined into sends of about ``target`` bytes; big ones as they are."""
    pending: list[bytes | bytearray] = []
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


def merge_setattr(first: rec.Setattr, then: rec.Setattr) -> rec.Setattr | None:
    """One Setattr with the effect of ``first`` followed by ``then`` on a replica, or None.

    rsync, tar and pip set mode, owner and times of a file in separate calls: three
    records where one does.  The merged record is applied in apply_setattr's order (size,
    owner, mode, times), which differs from the two in sequence only where the order
    matters: a truncate after a time change (the truncate would move the time: not
    merged) and set-ID bits cleared by chown (replicas strip set-ID bits anyway).
    """
    if first.path != then.path:
        return None
    times = rec.SET_ATIME | rec.SET_MTIME
    if then.mask & rec.SET_SIZE and first.mask & times:
        return None

    def pick(bit: int, name: str) -> int:
        return int(getattr(then if then.mask & bit else first, name))

    return rec.Setattr(first.path, first.mask | then.mask, pick(rec.SET_MODE, "mode"),
                       pick(rec.SET_OWNER, "uid"), pick(rec.SET_OWNER, "gid"),
                       pick(rec.SET_SIZE, "size"), pick(rec.SET_ATIME, "atime_ns"),
                       pick(rec.SET_MTIME, "mtime_ns"))


def _without_aborted(entries: list[Entry]) -> list[Entry]:
    aborted = {e.record.seq for e in entries if isinstance(e.record, rec.Abort)}
    return [Entry(e.seq, rec.Sync(0)) if e.seq in aborted else e for e in entries]


# -- relay: what a replica applied, for the replicas below it ---------------------------------


@attrs.define(eq=False)
class RelayBuffer:
    """The last RECORD frames a replica applied (at most ``limit`` payload bytes: this is
    most of an idle node replicad's memory), and who waits for more.

    Pipelined like the hops of a tree should be: before applying more, the replica waits
    (``wait_room``) until the followers being served have been sent what the new frames
    would evict, for at most RELAY_STALL; a follower still behind then (stuck, or far
    slower than its siblings) falls off the buffer and gets a snapshot, as one that
    connects too late does.

    Attributes:
        readers: each follower being served (by token) and the last seq sent to it.
    """

    limit: int
    frames: collections.deque[Frame] = attrs.field(factory=collections.deque)
    size: int = 0
    changed: trio.Event = attrs.field(factory=trio.Event)
    generation: int = 0  # bumps when the replica was replaced by a snapshot
    base: int = 0  # the seq just before the first frame kept
    readers: dict[object, int] = attrs.field(factory=dict)
    moved: trio.Event = attrs.field(factory=trio.Event)

    def reader_at(self, token: object, pos: int | None) -> None:
        """Follower ``token`` was sent everything up to ``pos`` (None: it is gone)."""
        if pos is None:
            self.readers.pop(token, None)
        else:
            self.readers[token] = pos
        self.moved.set()
        self.moved = trio.Event()

    def _room(self, incoming: int) -> bool:
        """Whether appending ``incoming`` bytes evicts nothing a reader still needs."""
        excess = self.size + incoming - self.limit
        inside = [pos for pos in self.readers.values() if pos >= self.base]
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
        with trio.move_on_after(RELAY_STALL):
            while not self._room(incoming):
                await self.moved.wait()

    def append(self, before: int, frames: list[Frame]) -> None:
        """Keep ``frames``, applied after seq ``before``."""
        if not self.frames:
            self.base = before
        for frame in frames:
            self.frames.append(frame)
            self.size += len(frame.payload)
        while self.size > self.limit and len(self.frames) > 1:
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

    def after(self, seq: int, max_bytes: int = 1 << 20) -> list[Frame]:
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
class ReplicaUser:
    name: str
    replica: Replica
    stats: LinkStats = attrs.field(factory=LinkStats)
    relay: RelayBuffer = attrs.field(factory=lambda: RelayBuffer(16 << 20))
    followers: dict[str, Follower] = attrs.field(factory=dict)
    addresses: dict[str, str] = attrs.field(factory=dict)
    placement: Placement = attrs.field(factory=lambda: Placement())
    upstream: str = ""
    scope: trio.CancelScope | None = None
    applied_changed: trio.Event = attrs.field(factory=trio.Event)
    next_query: HeadQuery | None = None  # the round of asking upstream that starts next
    querying: bool = False  # a task runs the rounds
    last_round: float = -math.inf  # trio time the last round started
    queries: int = 0  # head queries answered for nodes below


@attrs.define(eq=False)
class HeadQuery:
    """One round of asking upstream for the login node's head of a user: its answer (or
    error) serves every caller that arrived before the round started."""

    done: trio.Event = attrs.field(factory=trio.Event)
    head: int = 0
    journal_id: bytes = NO_ID
    error: Exception | None = None


# -- the daemon ------------------------------------------------------------------------------------


@attrs.define(eq=False)
class Daemon:
    config: DaemonConfig
    origin: dict[str, OriginUser] = attrs.field(factory=dict)
    replicas: dict[str, ReplicaUser] = attrs.field(factory=dict)
    _nursery: trio.Nursery | None = None
    started: float = attrs.field(factory=time.time)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.config.listen is not None:
                host, port = self.config.listen
                listeners = await trio.open_tcp_listeners(port, host=host or None)
                nursery.start_soon(trio.serve_listeners, self._handle_peer, listeners)
            if self.config.control is not None:
                await nursery.start(self._serve_control)
            for user in self.config.follow:
                self.start_following(user)
            if self.config.origin_root is not None:
                nursery.start_soon(self._trim_loop)
            nursery.start_soon(self._release_memory)
            log.info("sdeefs-replicad %s ready (listen %s, origin %s, replicas %s, upstream %s)",
                     self.config.node, self.config.listen, self.config.origin_root,
                     self.config.replica_dir, self.config.upstream)
            task_status.started()

    # -- serving followers ------------------------------------------------------------------

    async def _handle_peer(self, stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()[0]
        try:
            with trio.fail_after(10):
                hello_frame = await receive_frame(stream, self.config.key)
            hello = decode_hello(hello_frame)
            if hello.want == 0:
                raise ProtocolError("bad HELLO")
            await self._serve_hello(stream, hello_frame, hello, peer)
        except (ProtocolError, EOFError, trio.TooSlowError, ValueError) as exc:
            log.error("peer %s: %s", peer, exc)
            # A peer of an older version is told in its own version (it could not read ours).
            version = exc.peer_version if isinstance(exc, VersionMismatch) and \
                exc.peer_version in OLD_VERSIONS else VERSION
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(encode_frame(Frame(ERROR, 0, str(exc).encode()[:4096]),
                                                   self.config.key, version))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("peer %s went away: %s", peer, exc)
        except Exception:  # a bug in one link must not end the daemon and every other link
            log.exception("peer %s: internal error", peer)
        finally:
            await stream.aclose()

    def _origin_user(self, name: str) -> OriginUser | None:
        if self.config.origin_root is None:
            return None
        user = self.origin.get(name)
        if user is None:
            dirs = UserDirs.of(self.config.origin_root, name)
            if not os.path.isdir(dirs.state.journal):
                return None
            user = self.origin[name] = OriginUser(name, dirs)
            assert self._nursery is not None
            self._nursery.start_soon(self._watch_journal, user)
        return user

    async def _watch_journal(self, user: OriginUser) -> None:
        """Wake ``user``'s shippers whenever the journal directory changes (inotify), so an
        idle login node costs nothing; polling at POLL where inotify cannot watch it."""
        while True:
            try:
                fd = inotify_watch(user.journal_dir, JOURNAL_EVENTS)
            except OSError as exc:
                log.warning("%s: cannot watch %s (%s); polling it", user.name,
                            user.journal_dir, exc.strerror)
                with trio.move_on_after(IDLE_HEAD * 10):
                    while True:
                        await trio.sleep(POLL)
                        user.journal_grew()
                continue
            try:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    # Non-blocking reads of a few bytes: on the loop, no thread needed.
                    mask = inotify_drain(fd)
                    user.journal_grew()
                    if mask & IN_IGNORED:  # the directory went (a new history): watch anew
                        break
            finally:
                os.close(fd)

    def _redirect_target(self, followers: dict[str, Follower], addresses: dict[str, str],
                         placement: Placement, node: str) -> str | None:
        if node in followers or len(followers) < self.config.fanout:
            placement.joined(node)
            return None
        now = time.monotonic()
        best = placement.choose([f for f in followers.values() if f.node in addresses],
                                node, now)
        if best is None:
            placement.joined(node)
            return None
        placement.sent(node, best, now)
        return addresses[best.node]

    async def _serve_hello(self, stream: trio.SocketStream, frame: Frame, hello: Hello,
                           peer: str) -> None:
        origin = self._origin_user(hello.user)
        relay = self.replicas.get(hello.user)
        if origin is None and relay is None:
            raise ProtocolError(f"{self.config.node} holds nothing of user {hello.user}")
        if hello.flags & QUERY:
            if origin is not None:
                origin.queries += 1
                head = await trio.to_thread.run_sync(origin.refresh_head)
                jid = await trio.to_thread.run_sync(journal_id, origin.journal_dir)
            else:
                assert relay is not None
                relay.queries += 1
                try:  # never what this relay last heard: the login node's head *now*
                    head, jid = await self.login_head(relay)
                except HEAD_QUERY_ERRORS as exc:
                    raise ProtocolError(f"{self.config.node} cannot learn the head of "
                                        f"{hello.user}: {exc}") from None
            await answer_hello(stream, self.config.key, frame, head, jid)
            return
        followers = origin.followers if origin else relay.followers  # type: ignore[union-attr]
        addresses = origin.addresses if origin else relay.addresses  # type: ignore[union-attr]
        placement = origin.placement if origin else relay.placement  # type: ignore[union-attr]
        target = self._redirect_target(followers, addresses, placement, hello.node)
        if target is not None:
            await stream.send_all(encode_frame(Frame(REDIRECT, 0, target.encode()),
                                               self.config.key))
            return
        follower = Follower(hello.node, hello.user, acked=hello.want - 1,
                            sent_seq=hello.want - 1)
        followers[hello.node] = follower
        if hello.port:
            addresses[hello.node] = f"{peer}:{hello.port}"
        else:
            addresses.pop(hello.node, None)
        try:
            if origin is not None:
                head = await trio.to_thread.run_sync(origin.refresh_head)
                jid = await trio.to_thread.run_sync(journal_id, origin.journal_dir)
                hello, key = await answer_hello(stream, self.config.key, frame, head, jid)
                await self._serve_origin(stream, key, hello, origin, follower)
            else:
                assert relay is not None
                if relay.replica.journal_id == NO_ID:
                    raise ProtocolError(f"{self.config.node} has no history of {hello.user} yet")
                await self._refuse_diverged(relay, hello)
                hello, key = await answer_hello(stream, self.config.key, frame,
                                                max(relay.stats.head, relay.replica.applied),
                                                relay.replica.journal_id)
                await self._serve_relay(stream, key, hello, relay, follower)
        finally:
            if followers.get(hello.node) is follower:
                del followers[hello.node]

    async def _stream_with_acks(self, stream: trio.SocketStream, key: bytes, follower: Follower,
                                producer: object) -> None:
        async with open_nursery() as nursery:
            async def acks() -> None:
                await receive_acks(stream, key, follower)
                nursery.cancel_scope.cancel()
            nursery.start_soon(acks)
            try:
                await producer()  # type: ignore[operator]
            except ProtocolError as exc:  # tell the replica why, in this session's key
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(encode_frame(
                        Frame(ERROR, 0, str(exc).encode()[:4096]), key))
                raise
            nursery.cancel_scope.cancel()

    async def _send(self, stream: trio.SocketStream, key: bytes, follower: Follower,
                    frames: list[Frame]) -> None:
        if not frames:
            return
        data = b"".join(encode_frame(f, key) for f in frames)
        # Before sending: the ACK can arrive before send_all returns.
        follower.sent_seq = max(follower.sent_seq, frames[-1].seq)
        follower.bytes_sent += len(data)
        await stream.send_all(data)

    async def _send_snapshot(self, stream: trio.SocketStream, key: bytes, follower: Follower,
                             upper: str, seq: int) -> None:
        """Stream a snapshot of ``upper`` as the state at ``seq`` (the caller keeps it still)."""
        digest: list[bytes] = []
        frames: Iterator[Frame] = snapshot_frames(upper, seq, digest)

        def take() -> list[Frame]:
            out, size = [], 0
            for frame in frames:
                out.append(frame)
                size += len(frame.payload)
                if size >= 4 << 20:
                    break
            return out

        while batch := await trio.to_thread.run_sync(take):
            await self._send(stream, key, follower, batch)
        await self._send(stream, key, follower, [Frame(SNAPSHOT_END, seq, digest[0])])
        log.info("sent a snapshot of %s at seq %d to %s", follower.user, seq, follower.node)

    async def _serve_origin(self, stream: trio.SocketStream, key: bytes, hello: Hello,
                            user: OriginUser, follower: Follower) -> None:
        source = await trio.to_thread.run_sync(user.source)
        try:
            async def produce() -> None:
                want = hello.want
                if hello.journal_id != NO_ID and hello.journal_id != journal_id(user.journal_dir):
                    return  # another history: the replica resets itself and asks again
                tail = JournalTail(user.journal_dir, want)
                try:
                    if want > user.head + 1:
                        await trio.to_thread.run_sync(user.refresh_head)
                    if want > user.head + 1:
                        raise ProtocolError(f"{DIVERGED} replica wants seq {want} but the "
                                            f"journal ends at {user.head}")
                    try:
                        await trio.to_thread.run_sync(tail.poll, 0)
                    except Trimmed:
                        tail.close()
                        seq = await self._origin_snapshot(stream, key, user, follower)
                        tail = JournalTail(user.journal_dir, seq + 1)
                    await self._follow_journal(stream, key, user, follower, tail, source)
                finally:
                    tail.close()
            await self._stream_with_acks(stream, key, follower, produce)
        finally:
            source.close()

    async def _origin_snapshot(self, stream: trio.SocketStream, key: bytes, user: OriginUser,
                               follower: Follower) -> int:
        """A snapshot of the live upper, valid only if the journal did not move meanwhile."""
        journal = Journal(directory=user.journal_dir)
        for attempt in range(5):
            before = await trio.to_thread.run_sync(journal.size_bytes)
            seq = await trio.to_thread.run_sync(user.refresh_head)
            await trio.sleep(HOLD_BACK)
            if await trio.to_thread.run_sync(journal.size_bytes) != before:
                continue
            await self._send_snapshot(stream, key, follower, user.dirs.upper,
                                      seq)
            if await trio.to_thread.run_sync(journal.size_bytes) == before:
                return seq
            log.warning("snapshot of %s for %s: the upper changed while read (attempt %d)",
                        user.name, follower.node, attempt + 1)
            raise ProtocolError("the upper changed during the snapshot; reconnect and retry")
        raise ProtocolError(f"{user.name}'s environment is too busy for a snapshot; retrying")

    async def _follow_journal(self, stream: trio.SocketStream, key: bytes, user: OriginUser,
                              follower: Follower, tail: JournalTail, source: LayerRoot) -> None:
        pending: list[Entry] = []
        first_seen = 0.0
        skipped = False  # markers were left out since the last frame sent
        last_send = trio.current_time()

        def next_frames() -> tuple[list[bytes | bytearray], int]:
            """The next frames to send, encoded: about BATCH_BYTES of data, so reading,
            sending and applying overlap (and a big history never sits in memory at once).
            Write data goes from the upper straight into the frame buffers."""
            nonlocal pending, first_seen, skipped
            if len(pending) < 4096:
                new = tail.poll()
                if new and not pending:
                    first_seen = time.monotonic()
                pending = _without_aborted(pending + new)
            ready = _settled(pending, first_seen)
            frames: list[bytes | bytearray] = []
            size = taken = 0
            held: tuple[int, rec.Setattr, int] | None = None  # (seq, record, flags)

            def emit(seq: int, record: rec.Record, flags: int) -> None:
                nonlocal size
                if isinstance(record, rec.Write):
                    fd = open_write_data(source, record)
                    try:
                        encoded = encode_write_frames(seq, record, fd, key, flags)
                    finally:
                        if fd is not None:
                            os.close(fd)
                    frames.extend(encoded)
                    size += sum(len(b) for b in encoded)
                else:
                    frame = record_frames(seq, record, None)[0]
                    frames.append(encode_frame(attrs.evolve(frame, flags=flags), key))
                    size += 64

            while taken < ready and size < BATCH_BYTES:
                entry = pending[taken]
                record = entry.record
                taken += 1
                last_of_batch = taken == ready  # the batch may end on a marker: send it
                if isinstance(record, MARKERS) and not last_of_batch:
                    skipped = True  # nothing to apply; the next frame says SKIP
                    continue
                if held is not None and isinstance(record, rec.Setattr):
                    merged = merge_setattr(held[1], record)
                    if merged is not None:  # the earlier seq is left out: SKIP
                        held, skipped = (entry.seq, merged, SKIP), False
                        continue
                if held is not None:
                    emit(*held)
                    held = None
                flags = SKIP if skipped else 0
                skipped = False
                if isinstance(record, rec.Setattr) and not last_of_batch:
                    held = (entry.seq, record, flags)  # the next setattr may join it
                    continue
                emit(entry.seq, record, flags)
            if held is not None:
                emit(*held)
            last = pending[taken - 1].seq if taken else 0
            pending = pending[taken:]
            if pending and taken:
                first_seen = time.monotonic()
            return frames, last

        while True:
            grew = user.grew  # taken before reading: a record written meanwhile sets it
            try:
                frames, last = await trio.to_thread.run_sync(next_frames)
            except Trimmed:
                raise ProtocolError("the journal was trimmed below this replica; "
                                    "reconnect for a snapshot") from None
            except JournalCorrupt as exc:
                raise ProtocolError(f"journal of {user.name}: {exc}") from None
            if frames:
                follower.sent_seq = max(follower.sent_seq, last)  # before: ACKs may overtake
                for buf in _coalesce(frames):
                    follower.bytes_sent += len(buf)
                    await stream.send_all(buf)
                user.head = max(user.head, last)
                last_send = trio.current_time()
                continue
            if trio.current_time() - last_send >= IDLE_HEAD:
                await self._send(stream, key, follower,
                                 [Frame(HEAD, max(user.head, follower.sent_seq))])
                last_send = trio.current_time()
            # A held-back record goes after HOLD_BACK; otherwise sleep until the journal
            # grows or the next HEAD is due.
            idle = IDLE_HEAD - (trio.current_time() - last_send)
            with trio.move_on_after(HOLD_BACK if pending else max(idle, 0.0)):
                await grew.wait()

    async def _refuse_diverged(self, user: ReplicaUser, hello: Hello) -> None:
        """A follower of this history that holds more than this relay: normal if this relay
        lags, but if it holds more than the login node, its history was lost there (the
        login node crashed before syncing it) and it must start over, as the origin says."""
        if hello.journal_id != user.replica.journal_id or hello.want - 1 <= user.replica.applied:
            return
        try:
            head, jid = await self.login_head(user)
        except HEAD_QUERY_ERRORS:
            return  # cannot tell now: serve it; nothing reaches it until this relay catches up
        if jid == hello.journal_id and hello.want - 1 > head:
            raise ProtocolError(f"{DIVERGED} replica wants seq {hello.want} but the journal "
                                f"ends at {head}")

    async def _serve_relay(self, stream: trio.SocketStream, key: bytes, hello: Hello,
                           user: ReplicaUser, follower: Follower) -> None:
        token = object()

        async def produce() -> None:
            pos = hello.want - 1
            generation = user.relay.generation
            last_send = trio.current_time()
            while True:
                first = user.relay.first_seq()
                applied = user.replica.applied
                if user.relay.generation != generation or (
                        pos < applied and (first is None or first > pos + 1)):
                    user.relay.reader_at(token, None)  # not waited for while it is rebuilt
                    pos = await self._relay_snapshot(stream, key, user, follower)
                    generation = user.relay.generation
                user.relay.reader_at(token, pos)
                frames = user.relay.after(pos)
                if frames:
                    # Taken: the buffer may drop them now (this list keeps them until sent).
                    user.relay.reader_at(token, frames[-1].seq)
                    await self._send(stream, key, follower, frames)
                    pos = frames[-1].seq
                    last_send = trio.current_time()
                    continue
                if trio.current_time() - last_send >= IDLE_HEAD:
                    await self._send(stream, key, follower,
                                     [Frame(HEAD, max(user.stats.head, pos))])
                    last_send = trio.current_time()
                with trio.move_on_after(IDLE_HEAD):
                    await user.relay.changed.wait()
        try:
            await self._stream_with_acks(stream, key, follower, produce)
        finally:
            user.relay.reader_at(token, None)

    async def _relay_snapshot(self, stream: trio.SocketStream, key: bytes, user: ReplicaUser,
                              follower: Follower) -> int:
        """Our own copy, held still (applying pauses) while it is read."""
        replica = user.replica
        await trio.to_thread.run_sync(replica.lock.acquire)
        try:
            seq = replica.applied
            await self._send_snapshot(stream, key, follower, replica.upper, seq)
        finally:
            replica.lock.release()
        return seq

    # -- following upstream ------------------------------------------------------------------

    def start_following(self, name: str) -> ReplicaUser:
        if self.config.replica_dir is None or self.config.upstream is None:
            raise QuietError(f"{self.config.node} keeps no replicas (no replica_dir/upstream)",
                             ExitCode.USAGE)
        user = self.replicas.get(name)
        if user is None:
            replica = Replica.open(os.path.join(self.config.replica_dir, name))
            user = self.replicas[name] = ReplicaUser(name, replica,
                                                     relay=RelayBuffer(self.config.relay_bytes))
            assert self._nursery is not None
            self._nursery.start_soon(self._follow_loop, user)
        return user

    def stop_following(self, name: str) -> bool:
        user = self.replicas.pop(name, None)
        if user is None:
            return False
        if user.scope is not None:
            user.scope.cancel()
        return True

    async def _follow_loop(self, user: ReplicaUser) -> None:
        assert self.config.upstream is not None
        home = f"{self.config.upstream[0]}:{self.config.upstream[1]}"
        address, redirects, backoff = home, 0, 0.05
        with trio.CancelScope() as scope:
            user.scope = scope
            try:
                while True:
                    user.upstream = address
                    try:
                        host, port = parse_address(address)
                        with trio.fail_after(5):
                            stream = await trio.open_tcp_stream(host, port)
                        async with stream:
                            await follow(stream, user.replica, self.config.key, user.name,
                                         self.config.node, user.stats,
                                         report=lambda: self._report(user),
                                         on_applied=lambda before, frames: self._applied(
                                             user, frames, before),
                                         on_snapshot=user.relay.clear,
                                         silence_timeout=self.config.silence_timeout,
                                         relay_port=self.config.listen[1]
                                         if self.config.listen else 0,
                                         wait_room=user.relay.wait_room,
                                         # a batch never evicts what it waited to keep
                                         batch_bytes=max(1, user.relay.limit // 4))
                        backoff = 0.05
                    except ProtocolError as exc:
                        user.stats.last_error = f"{address}: {exc}"
                        if DIVERGED in str(exc):
                            log.warning("%s: %s; starting over with a full resync", user.name,
                                        exc)
                            await trio.to_thread.run_sync(_reset_locked, user.replica)
                        else:
                            log.warning("following %s from %s: %s", user.name, address, exc)
                        address, redirects = home, 0
                    except Redirected as r:
                        redirects += 1
                        if redirects <= MAX_REDIRECTS:
                            log.info("%s: %s redirects to %s", user.name, address, r.address)
                            address = r.address
                            continue
                        address, redirects = home, 0
                    except (OSError, ConnectionError, EOFError, trio.TooSlowError,
                            trio.BrokenResourceError, QuietError) as exc:
                        user.stats.last_error = f"{address}: {exc}"
                        log.warning("following %s from %s: %s", user.name, address, exc)
                        address, redirects = home, 0
                    except Exception as exc:  # a bug must not end every user's replication
                        user.stats.last_error = f"{address}: internal error: {exc!r}"
                        log.exception("following %s from %s", user.name, address)
                        address, redirects = home, 0
                        backoff = 2.0
                    self._applied(user, [])
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(user.replica.close)

    def _applied(self, user: ReplicaUser, frames: list[Frame], before: int = 0) -> None:
        if frames and self.config.listen is not None:  # a node that cannot relay keeps none
            user.relay.append(before, frames)
        user.applied_changed.set()
        user.applied_changed = trio.Event()

    def _report(self, user: ReplicaUser) -> list[tuple[str, int]]:
        report = []
        for follower in user.followers.values():
            report.append((follower.node, follower.acked))
            report.extend(follower.report)
        return report

    async def _ask_head(self, address: tuple[str, int], name: str) -> tuple[int, bytes]:
        """One QUERY HELLO to ``address``: the login node's head of ``name`` and its journal
        id, as that node learns them now."""
        with trio.fail_after(HEAD_QUERY_TIMEOUT):
            stream = await trio.open_tcp_stream(*address)
            async with stream:
                hello = Hello(os.urandom(NONCE_SIZE), NO_ID, name, self.config.node, 1, QUERY)
                await stream.send_all(encode_frame(encode_hello(hello), self.config.key))
                answer = await receive_frame(stream, self.config.key)
                if answer.type == ERROR:
                    raise ProtocolError("upstream: " + answer.payload.decode(errors="replace"))
                if answer.type != HELLO or len(answer.payload) != NONCE_SIZE + ID_SIZE:
                    raise ProtocolError("upstream did not answer")
                return answer.seq, answer.payload[NONCE_SIZE:]

    async def login_head(self, user: ReplicaUser) -> tuple[int, bytes]:
        """The login node's head of ``user`` (and journal id) at a moment after this call
        began: the answer of the next round of asking upstream (see the module docstring)."""
        query = user.next_query
        if query is None:
            query = user.next_query = HeadQuery()
            if not user.querying:
                user.querying = True
                assert self._nursery is not None
                self._nursery.start_soon(self._run_head_queries, user)
        await query.done.wait()
        if query.error is not None:
            raise query.error
        return query.head, query.journal_id

    async def _run_head_queries(self, user: ReplicaUser) -> None:
        assert self.config.upstream is not None
        home = parse_address(f"{self.config.upstream[0]}:{self.config.upstream[1]}")
        try:
            while user.next_query is not None:
                linked = user.stats.connected and bool(user.upstream)
                if not linked or parse_address(user.upstream) == home:
                    # The login node's direct followers start a round at most every
                    # LOGIN_ROUND_GAP: what arrives meanwhile joins it, so a burst of
                    # prologs reaches the login node as rounds per interval, not per node.
                    await trio.sleep_until(user.last_round + LOGIN_ROUND_GAP)
                query, user.next_query = user.next_query, None  # later askers: next round
                user.last_round = trio.current_time()
                try:
                    # Up the tree while linked (the link's chain of upstreams leads to the
                    # login node); the login node itself when not, or when that fails.
                    try:
                        if not (user.stats.connected and user.upstream):
                            raise ConnectionError("not linked upstream")
                        query.head, query.journal_id = await self._ask_head(
                            parse_address(user.upstream), user.name)
                    except HEAD_QUERY_ERRORS as exc:
                        log.debug("%s: head from %s: %s; asking the login node", user.name,
                                  user.upstream, exc)
                        query.head, query.journal_id = await self._ask_head(
                            self.config.upstream, user.name)
                except HEAD_QUERY_ERRORS as exc:
                    query.error = exc
                query.done.set()
        finally:
            user.querying = False

    async def wait_barrier(self, name: str, limit: float) -> dict[str, object]:
        user = self.start_following(name)
        with trio.fail_after(limit):
            while True:
                try:
                    barrier, jid = await self.login_head(user)
                    break
                except HEAD_QUERY_ERRORS as exc:
                    user.stats.last_error = str(exc)
                    await trio.sleep(0.2)
            while True:
                applied = user.replica.journal_id, user.replica.applied
                if applied[0] not in (NO_ID, jid):  # the user's history was replaced since
                    with contextlib.suppress(*HEAD_QUERY_ERRORS):
                        barrier, jid = await self.login_head(user)
                # More than the login node had is normal (it moved on since), unless it is
                # more than it has *now*: then this copy holds a history the login node
                # lost, and the link is about to start it over.
                elif applied[0] == jid and applied[1] >= barrier and (
                        applied[1] == barrier or applied[1] <= await self._head_now(user)):
                    break
                with trio.move_on_after(0.05):
                    await user.applied_changed.wait()
        return {"user": name, "applied": user.replica.applied, "barrier": barrier}

    async def _head_now(self, user: ReplicaUser) -> int:
        try:
            return (await self.login_head(user))[0]
        except HEAD_QUERY_ERRORS:
            await trio.sleep(0.2)
            return -1

    async def _release_memory(self) -> None:
        """Once the streams went quiet, give freed heap pages back (an idle node's replicad
        is bounded by its relay buffers, not by the largest burst it relayed)."""
        seen = trimmed = 0
        while True:
            await trio.sleep(MEMORY_CHECK)
            moved = sum(u.replica.applied for u in self.replicas.values()) + sum(
                f.sent_seq for u in self.origin.values() for f in u.followers.values())
            if moved == seen and moved != trimmed:
                await trio.to_thread.run_sync(malloc_trim)
                trimmed = moved
            seen = moved

    # -- trimming -----------------------------------------------------------------------------

    async def _trim_loop(self) -> None:
        while True:
            await trio.sleep(self.config.trim_interval)
            for user in list(self.origin.values()):
                with contextlib.suppress(OSError, JournalCorrupt):
                    await trio.to_thread.run_sync(self.trim, user)

    def trim(self, user: OriginUser) -> int:
        """Delete journal segments every follower (seen within ``expire``) acknowledged."""
        path = user.dirs.state.replicas
        try:
            with open(path) as f:
                seen = {k: (int(v[0]), float(v[1])) for k, v in json.load(f).items()}
        except (OSError, ValueError, TypeError, IndexError):
            seen = {}
        now = time.time()
        for node, follower in user.followers.items():
            seen[node] = (follower.acked, now)
        seen = {k: v for k, v in seen.items() if now - v[1] < self.config.expire}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(seen, f)
        os.replace(tmp, path)
        if not seen:
            return 0
        below = min(acked for acked, _ in seen.values()) + 1
        return Journal(directory=user.journal_dir).trim(below)

    # -- control and status ----------------------------------------------------------------

    async def _serve_control(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        assert self.config.control is not None
        await control.serve(self.config.control, self._control, task_status=task_status)

    async def _control(self, peer: control.Peer, request: control.Request) -> control.Reply:
        """The control socket's requests (root only: the socket file is 0600)."""
        op = request.get("op")
        if op == "status":
            return self.status()
        user = request.get("user")
        if not isinstance(user, str) or not user or "/" in user or user.startswith("."):
            raise control.BadRequest("user must be a user name")
        if op == "follow":
            if request.get("wait"):
                try:
                    timeout = float(request.get("timeout", 300))
                except (TypeError, ValueError):
                    raise control.BadRequest("timeout must be a number") from None
                try:
                    return await self.wait_barrier(user, timeout)
                except trio.TooSlowError:
                    r = self.replicas.get(user)
                    raise QuietError(
                        f"{user}: replica not at the barrier after {timeout:.0f} s "
                        f"(applied {r.replica.applied if r else 0}, "
                        f"last error: {r.stats.last_error if r else ''})",
                                     ExitCode.FAILURE) from None
            self.start_following(user)
            return {"user": user, "following": True}
        if op == "unfollow":
            return {"user": user, "stopped": self.stop_following(user)}
        raise control.BadRequest(f"unknown op {op!r}")

    def status(self) -> dict[str, object]:
        origin = {}
        for user in self.origin.values():
            with contextlib.suppress(OSError):
                user.refresh_head()
            followers: dict[str, dict[str, object]] = {}
            for f in user.followers.values():
                followers[f.node] = {"acked": f.acked, "lag": user.head - f.acked,
                                     "bytes_sent": f.bytes_sent, "direct": True}
                for node, seq in f.report:
                    followers.setdefault(node, {"acked": seq, "lag": user.head - seq,
                                                "direct": False, "via": f.node})
            origin[user.name] = {"head": user.head, "followers": followers,
                                 "queries": user.queries}
        replicas = {}
        for r in self.replicas.values():
            replicas[r.name] = {
                "applied": r.replica.applied, "upstream_head": r.stats.head,
                "lag": max(0, r.stats.head - r.replica.applied),
                "bytes_received": r.stats.bytes_received, "connected": r.stats.connected,
                "upstream": r.upstream, "last_error": r.stats.last_error,
                "followers": sorted(r.followers), "queries": r.queries,
            }
        return {"node": self.config.node, "origin": origin, "replicas": replicas,
                "uptime": time.time() - self.started}


def _reset_locked(replica: Replica) -> None:
    with replica.lock:
        replica.reset()


def control_request(path: str, request: control.Request, timeout: float = 600
                    ) -> control.Reply:
    """Send one request to a replicad's control socket (blocking; for the CLI and prolog)."""
    return control.request(path, request, timeout, what="sdeefs-replicad")


def tree_cost(nodes: int, fanout: int) -> dict[str, float]:
    """Depth and per-node streams of the relay tree (for the 1,000/10,000-node estimate).

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdeefs-replicad", description="serve users' journals (login node) and keep "
        "their replicas (compute nodes); see `pydoc sdeefs.replicad`")
    parser.add_argument("--node", default=socket.gethostname().split(".")[0],
                        help="this node's name (default: the short host name)")
    parser.add_argument("--key-file",
                        help="shared replication key, root-only, >= 32 bytes (default: "
                             "replication.key_file of the sdeefs config)")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="serve followers here (origin, and relays for the tree)")
    parser.add_argument("--origin", metavar="ROOT",
                        help="login node: serve the journals of ROOT/USER/state/journal")
    parser.add_argument("--replica-dir", metavar="DIR",
                        help="compute node: keep replicas here (default with --upstream or "
                             "replication.login set: replication.replica_dir)")
    parser.add_argument("--upstream", metavar="HOST:PORT",
                        help="the login node's replicad (default: replication.login)")
    parser.add_argument("--fanout", type=int, default=4,
                        help="direct followers per user before redirecting (default 4)")
    parser.add_argument("--control", metavar="SOCKET",
                        help="control socket, root only (default: replication.control)")
    parser.add_argument("--follow", action="append", default=[], metavar="USER",
                        help="follow USER continuously (a warm replica; repeatable)")
    parser.add_argument("--relay-bytes", type=int, default=16 << 20,
                        help="bytes of applied records kept for relaying (default 16 MiB: "
                             "an idle node's replicad stays under 64 MB)")
    parser.add_argument("--trim-interval", type=float, default=10.0, metavar="SECONDS",
                        help="origin: how often the journals are trimmed below every "
                             "follower's acknowledgement (default 10)")
    parser.add_argument("--expire", type=float, default=86400.0, metavar="SECONDS",
                        help="origin: a follower unseen this long no longer holds the journal "
                             "back; it gets a snapshot when it returns (default 1 day)")
    parser.add_argument("--log-file", help="log here instead of stderr")
    parser.add_argument("--debug", action="store_true")
    return parser


def _defaults_from_config(args: argparse.Namespace) -> None:
    """Options not given come from [replication] of the sdeefs config (the file the SLURM
    prolog and ``sdeefs-run`` read too), with ``%n`` the node's name."""
    from sdeefs import config as config_mod

    rep = config_mod.load().replication.on(args.node)
    args.key_file = args.key_file or rep.key_file
    args.control = args.control or rep.control
    if not args.origin:  # a compute node
        args.upstream = args.upstream or rep.login or None
        if args.upstream:
            args.replica_dir = args.replica_dir or rep.replica_dir


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(filename=args.log_file,
                        level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        _defaults_from_config(args)
        if args.replica_dir and not args.upstream:
            raise QuietError("--replica-dir needs --upstream (where to follow users from)",
                             ExitCode.USAGE)
        if not (args.origin or args.replica_dir):
            raise QuietError("nothing to do: give --origin and/or --replica-dir", ExitCode.USAGE)
        if args.fanout < 1:
            raise QuietError("--fanout must be at least 1", ExitCode.USAGE)
        config = DaemonConfig(
            node=args.node, key=load_key(args.key_file),
            listen=parse_address(args.listen) if args.listen else None,
            origin_root=args.origin, replica_dir=args.replica_dir,
            upstream=parse_address(args.upstream) if args.upstream else None,
            fanout=args.fanout, control=args.control, follow=tuple(args.follow),
            relay_bytes=args.relay_bytes, trim_interval=args.trim_interval,
            expire=args.expire)
        if config.replica_dir:
            os.makedirs(config.replica_dir, mode=0o700, exist_ok=True)
        trio.run(Daemon(config).run)
    except QuietError as exc:
        print(f"sdeefs-replicad: {exc}", file=sys.stderr)
        return exc.exitcode
    except OSError as exc:
        print(f"sdeefs-replicad: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
