"""``sdeefs-replicad``: one daemon per node that serves and keeps users' replicas.

Roles (one process can have both):

* **origin** (login node, ``--origin ROOT``): serves every user's journal from
  ``ROOT/USER/state/journal`` (``origin``).  The journal is trimmed below what every
  follower acknowledged; a follower gone longer than ``expire`` no longer holds it back
  and gets a snapshot when it returns.
* **replica** (compute node, ``--replica-dir DIR --upstream HOST:PORT``): follows the
  users it is asked to (``follow`` on the control socket: the SLURM prolog, or
  ``--follow USER`` for warm replicas), applying into ``DIR/USER`` (``replica``),
  reconnecting with backoff after any failure and following REDIRECTs down the tree.
  With ``--listen`` it also *relays*: what it applied is kept in a bounded buffer and
  served to replicas that connect to it (``relay``), so the login node sends each
  record to at most ``fanout`` nodes whatever the size of the job.

This module wires the roles: the TCP listener (a peer's HELLO goes to the origin or to
the relay of its user, or is redirected down the tree), each followed user's link
upstream, the barrier, the control socket and the command line.

Control socket (unix, root only; ``sdeefs.control``)::

    {"op": "follow", "user": U, "wait": true, "timeout": 120}   -> {"applied", "barrier"}
    {"op": "follow", "user": U}                                  -> {"following": true}
    {"op": "unfollow", "user": U}                                -> {"stopped": bool}
    {"op": "resync", "user": U, "timeout": 300}                  -> {"applied", "snapshots"}
    {"op": "status"}                                             -> every user, both roles
    {"op": "job-start", "job": ID, "user": U, "node": N}         -> {"verdict", "message"}
    {"op": "job-end", "job": ID, "node": N}                      -> {"ended": bool}

``follow`` with ``wait`` learns the login node's head *now* (``relay.HeadRounds``: at
least the position the user's journal had when the job was submitted) and returns once
the replica holds it, of the same history (journal id): that is the job's barrier.  A
failed request's ``kind`` (``control.ControlError``) says why:

    no-replicas       this node keeps no replicas (no --replica-dir/--upstream)
    no-layer          the login node answered that it holds nothing of the user (NO_LAYER):
                      the user has no environment (answered at once: a head query that
                      reaches a relay not holding the user falls back to the login node,
                      so a NO_LAYER that comes back is the login node's own)
    barrier-timeout   the replica was not at the barrier in time (anything else)
    skipped           the replica is at the barrier but skipped records on the way
                      (``replica``: the user's problem, never the link's): it differs
                      from the user's upper until ``resync``

``job-start`` and ``job-end`` are SLURM's prolog and epilog for job ID on node N (its SLURM
name: the job directory's ``%n``), done by this resident daemon for the small C client that
slurmd runs (``sdeefs-prolog``/``-epilog``, launcher/enter/jobhook.c), so that no job starts
a Python process: ``job-start`` waits for U's barrier (as ``follow --wait``, in-process) and
starts the job's environment; its ``verdict`` is ``ready``, or ``bare``/``failed`` with the
one line the job's tasks will tell (sdeefs.launcher.compute.job: the user's problems never
fail the request, the node's do).  ``job-end`` answers once the job's processes are gone and
its mounts detached; its scratch upper, renamed out of the way first, is removed in the
background (a stop does not wait for it: ``sdeefs end-spares``, the unit's ExecStopPost,
or the next start removes what is left).  SIGTERM stops the daemon cleanly (``serve``):
work in its threads finishes, so a spare being started is recorded for end-spares.  After a job of U
started, the next one's environment is started ahead, a *spare* (``NodeJobs``): the next
``job-start`` of U takes it once at the barrier; ``unfollow`` ends it.  Only compute nodes
(a ``--replica-dir``) answer them (``jobs``: the launcher's job host, given by ``main``).

``resync`` makes the replica of U faithful again, whatever it holds: the link ends, and
the next one goes to the login node itself (never redirected) with the HELLO flag RESYNC;
the login node sends a verified snapshot of U's upper, which replaces the copy (and its
list of skipped records) only once verified, then the journal from there on.  The nodes
this one relays to get a snapshot of the new copy in turn (``relay``): resyncing a relay
resyncs the nodes below it.  Answered once the snapshot swapped in.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs
import trio

from .. import control
from ..errors import ExitCode, QuietError
from ..offload import Offload
from ..replicable import ids_of_user
from ..statedir import ReplicaDirs
from ..sysio import malloc_trim
from .applier import DirFds
from .auth import HelloAuth, Munge, SharedKey
from .origin import Origin, OriginUser
from .relay import (
    HEAD_QUERY_ERRORS,
    DownstreamLink,
    Downstreams,
    FollowerStalled,
    HeadRounds,
    RelayBuffer,
    RelaySender,
)
from .replica import Follower, LinkStats, Replica
from .wire import (
    NO_ID,
    OLD_VERSIONS,
    QUERY,
    REDIRECT,
    RESYNC,
    VERSION,
    Frame,
    FrameReader,
    Hello,
    HistoryDiverged,
    NoLayer,
    ProtocolError,
    Redirected,
    VersionMismatch,
    answer_hello,
    answer_key,
    decode_hello,
    encode_error,
    parse_address,
)

log = logging.getLogger(__name__)

MEMORY_CHECK = 1.0  # seconds between looks at whether the streams went quiet
MAX_REDIRECTS = 64  # hops a joiner follows down the tree (depth 13 holds 10,000 at fan-out 2)
HELLO_TIMEOUT = 10.0  # seconds a peer has to say HELLO
# Peers connected that have not said an authenticated HELLO yet ("strangers"): at most this
# many; a new one beyond it makes the daemon close the oldest (which is never a real node
# for long: a real HELLO takes milliseconds), so idle sockets cannot lock real nodes out.
# Each holds at most a handshake's read buffer (wire.HANDSHAKE_READ + MAX_HANDSHAKE_PAYLOAD):
# strangers cost at most ~12 MiB together.
MAX_STRANGERS = 512
CONNECT_TIMEOUT = 5.0  # seconds to reach an upstream
THREADS = 40  # worker threads at once (trio's default): replicas applying, shippers reading
LOCKED_READ_THREADS = 4  # of relays reading their copy for a snapshot, under its lock
BARRIER_RETRY = 0.2  # seconds between attempts to learn the login node's head for a barrier
BARRIER_POLL = 0.05  # seconds between looks at a replica catching up with its barrier
SPARE_TTL = 600.0  # seconds a spare job environment waits for its user's next job
SPARE_CHECK = 30.0  # seconds between looks for spares older than that
JOB_ID = re.compile(r"[0-9]{1,20}")  # a SLURM job id, as job-start/job-end take it
NODE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # a SLURM node name


@attrs.frozen
class DaemonConfig:
    node: str
    auth: HelloAuth
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


def address_arg(text: str) -> tuple[str, int]:
    """A HOST:PORT of the command line or the config (QuietError if it is not one)."""
    try:
        return parse_address(text)
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


def hello_auth(kind: str, key_file: str, munge_socket: str) -> HelloAuth:
    """How this node's HELLOs authenticate (``replication.auth``; ``sdeefs.replication.auth``)."""
    if kind == "auto":
        kind = "key" if os.path.exists(key_file) else "munge"
    if kind == "key":
        return SharedKey(load_key(key_file))
    return Munge(munge_socket, Offload(trio.CapacityLimiter(4)))


def control_request(path: str, request: control.Request, timeout: float = 600
                    ) -> control.Reply:
    """Send one request to a replicad's control socket (blocking; for the CLI and prolog)."""
    return control.request(path, request, timeout, what="sdeefs-replicad")


class JobHost(Protocol):
    """What runs a job's prolog and epilog for this daemon (``job-start``, ``job-end``;
    sdeefs.launcher.compute.job.NodeJobs).  Blocking: called in a worker thread."""

    def start(self, node: str, user: str, job: str,
              barrier: Callable[[str, float], Mapping[str, object]]) -> dict[str, object]: ...

    def end(self, node: str, job: str) -> tuple[dict[str, object], str | None]: ...

    def prepare(self, node: str, user: str) -> bool: ...

    def forget(self, node: str, user: str) -> None: ...

    def leftovers(self, node: str) -> list[str]: ...

    def expire(self, node: str, max_age: float) -> list[str]: ...

    def remove_gone(self, path: str) -> bool: ...


@attrs.define(eq=False)
class ReplicaUser:
    """One user this node follows: the replica, its link upstream, what it relays.

    Attributes:
        stats: the link upstream (where it goes, its head, whether it is up).
        relay: what the replica applied, for the replicas below this node.
        downstreams: the replicas following the user through this node.
        rounds: the barrier's rounds of asking for the login node's head.
        scope: cancels the follow loop (``unfollow``).
        applied_changed: set (and replaced) whenever the replica moved.
        queries: head queries answered for nodes below.
    """

    name: str
    replica: Replica
    stats: LinkStats
    relay: RelayBuffer
    downstreams: Downstreams
    rounds: HeadRounds
    scope: trio.CancelScope | None = None
    applied_changed: trio.Event = attrs.field(factory=trio.Event)
    queries: int = 0
    link_scope: trio.CancelScope | None = None  # the current link upstream (``resync``)
    resync: bool = False  # the next link asks the login node for a snapshot

    def note_applied(self, before: int, frames: list[Frame], relaying: bool) -> None:
        """The replica applied ``frames`` after seq ``before``."""
        if frames and relaying:  # a node that cannot relay keeps none
            self.relay.append(before, frames)
        self.applied_changed.set()
        self.applied_changed = trio.Event()


@attrs.define(eq=False)
class Daemon:
    """The roles of one node wired together (see the module docstring).

    Attributes:
        offload: every worker thread of the daemon, but ``locked_reads``'.
        origin: the login role, with ``--origin``.
        replicas: the users this node follows, by name.
    """

    config: DaemonConfig
    offload: Offload = attrs.field(factory=lambda: Offload(trio.CapacityLimiter(THREADS)))
    jobs: JobHost | None = None  # compute nodes: the job ops (module docstring)
    job_ops: dict[str, int] = attrs.field(
        factory=lambda: {"job-start": 0, "job-end": 0, "spare": 0})
    spare_nodes: dict[str, str] = attrs.field(factory=dict)  # user -> node of their spare
    # A relay reads its copy for a snapshot holding Replica.lock, which threads of
    # ``offload`` may be waiting for: its reads have slots of their own (docs/threading.md).
    locked_reads: Offload = attrs.field(
        factory=lambda: Offload(trio.CapacityLimiter(LOCKED_READ_THREADS)))
    origin: Origin | None = attrs.field(init=False, default=None)  # with --origin
    replicas: dict[str, ReplicaUser] = attrs.field(factory=dict)
    # the directory fds every replica's applier keeps open, together (one user's traffic
    # must not take the fds another's apply needs): from RLIMIT_NOFILE at start
    dir_fds: DirFds = attrs.field(factory=DirFds.from_rlimit)
    started: float = attrs.field(factory=time.time)
    _nursery: trio.Nursery | None = attrs.field(init=False, default=None)
    _opening: trio.Lock = attrs.field(init=False, factory=trio.Lock)  # one open at a time
    # connections before their HELLO, oldest first: a scope to close each
    _strangers: dict[int, trio.CancelScope] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.config.origin_root is not None:
            self.origin = Origin(self.config.origin_root, self.config.fanout,
                                 self.config.expire, self.offload)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.origin is not None:
                await nursery.start(self.origin.run, self.config.trim_interval)
            if self.config.listen is not None:
                host, port = self.config.listen
                listeners = await trio.open_tcp_listeners(port, host=host or None)
                nursery.start_soon(trio.serve_listeners, self._handle_peer, listeners)
            if self.jobs is not None:  # before any job op: the spares a stopped daemon left
                for path in await self.offload.run(self.jobs.leftovers, self.config.node):
                    nursery.start_soon(self._remove_gone, path)
            if self.config.control is not None:
                await nursery.start(self._serve_control)
            for user in self.config.follow:
                await self.start_following(user)
            nursery.start_soon(self._release_memory)
            if self.jobs is not None:
                nursery.start_soon(self._expire_spares)
            log.info("sdeefs-replicad %s ready (listen %s, origin %s, replicas %s, upstream %s)",
                     self.config.node, self.config.listen, self.config.origin_root,
                     self.config.replica_dir, self.config.upstream)
            task_status.started()

    async def serve(self) -> None:
        """:meth:`run` until SIGTERM (``systemctl stop``, the unit's ``KillSignal``), then a
        clean stop: every task cancelled, and the work in worker threads *finished*, not
        abandoned (``Offload``): a spare environment being prepared is started and recorded
        (``JOB_DIR/.spare-U.run``: its init, its key), so that the unit's ``ExecStopPost``
        (``sdeefs end-spares``) finds and ends it.  Killed by the default action instead,
        the daemon left the spare's ``sdeefs-enter start`` running on its own: an init and
        an overlay nothing named, never ended.  A job's barrier wait is cancelled at once
        (its prolog's client sees the daemon gone, as before)."""
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.run)
                async for signum in signals:
                    log.info("sdeefs-replicad %s: %s: stopping (work in progress finishes)",
                             self.config.node, signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    # -- serving followers ------------------------------------------------------------------

    async def _handle_peer(self, stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()[0]
        reader = FrameReader(stream)
        try:
            hello, k = None, None
            with trio.move_on_after(HELLO_TIMEOUT) as waiting:
                if len(self._strangers) >= MAX_STRANGERS:  # close the oldest stranger
                    self._strangers.pop(next(iter(self._strangers))).cancel()
                self._strangers[id(waiting)] = waiting
                try:
                    frame, k = await reader.hello_frame(self.config.auth)
                    hello = decode_hello(frame)
                finally:
                    self._strangers.pop(id(waiting), None)
            if hello is None or k is None:
                raise ProtocolError(f"no HELLO within {HELLO_TIMEOUT:.0f} s" if
                                    waiting.deadline <= trio.current_time() else
                                    f"no HELLO before {MAX_STRANGERS} newer connections")
            reader.trust()
            await self._serve_hello(stream, reader, hello, k, peer)
        except (ProtocolError, EOFError, trio.TooSlowError, ValueError) as exc:
            log.error("peer %s: %s", peer, exc)
            # A peer of an older version is told in its own version (it could not read ours).
            version = exc.peer_version if isinstance(exc, VersionMismatch) and \
                exc.peer_version in OLD_VERSIONS else VERSION
            # The refusal is authenticated as an answer to the peer's HELLO (its K and
            # nonce: ``wire.answer_key``), or with K or the shared key if the HELLO did
            # not decode; a peer whose HELLO did not authenticate under MUNGE gets no
            # ERROR (nothing to MAC it with that it could check): it sees the connection
            # close.
            refusal_key = answer_key(k, hello.nonce) if k is not None and hello is not None \
                else k or (self.config.auth.key if isinstance(self.config.auth, SharedKey)
                           else None)
            if refusal_key is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(encode_error(exc, refusal_key, version=version))
        except FollowerStalled as exc:  # a node stopped (or hung): it reconnects
            log.warning("peer %s: %s", peer, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("peer %s went away: %s", peer, exc)
        except Exception:  # a bug in one link must not end the daemon and every other link
            log.exception("peer %s: internal error", peer)
        finally:
            await stream.aclose()

    async def _serve_hello(self, stream: trio.SocketStream, reader: FrameReader, hello: Hello,
                           hello_key: bytes, peer: str) -> None:
        origin = self.origin.user(hello.user) if self.origin is not None else None
        relay = self.replicas.get(hello.user)
        if origin is None and relay is None:
            raise NoLayer(f"{self.config.node} holds nothing of user {hello.user}")
        if hello.flags & QUERY:
            head, jid = await self._answer_query(hello, origin, relay)
            await answer_hello(stream, hello_key, hello, head, jid)
            return
        if origin is not None:
            downstreams = origin.downstreams
        else:
            assert relay is not None
            downstreams = relay.downstreams
        # a resync is served by the login node itself (the relays' copies may be the bad ones)
        target = None if origin is not None and hello.flags & RESYNC else \
            downstreams.redirect(hello.node)
        if target is not None:
            await stream.send_all(Frame(REDIRECT, 0, target.encode()).encode(
                answer_key(hello_key, hello.nonce)))
            return
        downstream = downstreams.join(hello, peer)
        try:
            if origin is not None:
                assert self.origin is not None
                await self.origin.serve(stream, reader, hello, hello_key, origin, downstream)
            else:
                assert relay is not None
                if relay.replica.journal_id == NO_ID:
                    raise ProtocolError(f"{self.config.node} has no history of {hello.user} yet")
                await self._refuse_diverged(relay, hello)
                key = await answer_hello(stream, hello_key, hello,
                                         max(relay.stats.head, relay.replica.applied),
                                         relay.replica.journal_id)
                link = DownstreamLink(stream, reader, key, downstream, self.locked_reads)
                await RelaySender(link, relay.replica, relay.relay, relay.stats,
                                  hello.want - 1, self.offload).run()
        finally:
            downstreams.leave(downstream)

    async def _answer_query(self, hello: Hello, origin: OriginUser | None,
                            relay: ReplicaUser | None) -> tuple[int, bytes]:
        """A head query's answer: the login node's head of the user now, and its journal id."""
        if origin is not None:
            assert self.origin is not None
            origin.queries += 1
            return await self.origin.head(origin)
        assert relay is not None
        relay.queries += 1
        try:  # never what this relay last heard: the login node's head *now*
            return await self._login_head(relay)
        except HEAD_QUERY_ERRORS as exc:
            raise ProtocolError(f"{self.config.node} cannot learn the head of "
                                f"{hello.user}: {exc}") from None

    async def _refuse_diverged(self, user: ReplicaUser, hello: Hello) -> None:
        """A follower of this history that holds more than this relay: normal if this relay
        lags, but if it holds more than the login node, its history was lost there (the
        login node crashed before syncing it) and it must start over, as the origin says."""
        if hello.journal_id != user.replica.journal_id or hello.want - 1 <= user.replica.applied:
            return
        try:
            head, jid = await self._login_head(user)
        except HEAD_QUERY_ERRORS:
            return  # cannot tell now: serve it; nothing reaches it until this relay catches up
        if jid == hello.journal_id and hello.want - 1 > head:
            raise HistoryDiverged(f"history diverged: replica wants seq {hello.want} but the "
                                  f"journal ends at {head}")

    # -- following upstream ------------------------------------------------------------------

    async def start_following(self, name: str) -> ReplicaUser:
        if self.config.replica_dir is None or self.config.upstream is None:
            raise control.ControlError(
                f"{self.config.node} keeps no replicas (no replica_dir/upstream)",
                ExitCode.USAGE, "no-replicas")
        async with self._opening:
            user = self.replicas.get(name)
            if user is None:
                dirs = ReplicaDirs.of(self.config.replica_dir, name)
                ids = await self.offload.run(ids_of_user, name)
                replica = await self.offload.run(Replica.open, dirs.path, ids, self.dir_fds)
                stats = LinkStats()
                rounds = HeadRounds(name, self.config.node, self.config.auth,
                                    self.config.upstream, stats)
                user = self.replicas[name] = ReplicaUser(
                    name, replica, stats, RelayBuffer(self.config.relay_bytes),
                    Downstreams(self.config.fanout), rounds)
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
        """Follow ``user`` from the login node, or from where it redirects, until unfollowed:
        reconnect with backoff after every failure, start over when told the history
        diverged."""
        assert self.config.upstream is not None
        home = f"{self.config.upstream[0]}:{self.config.upstream[1]}"
        address, redirects, backoff = home, 0, 0.05
        relaying = self.config.listen is not None
        with trio.CancelScope() as scope:
            user.scope = scope
            try:
                while True:
                    if user.resync:
                        address, redirects = home, 0
                    user.stats.upstream = address
                    try:
                        with trio.CancelScope() as user.link_scope:
                            await self._link(user, address, relaying)
                        if user.link_scope.cancelled_caught:  # resync: at once
                            continue
                        backoff = 0.05
                    except HistoryDiverged as exc:
                        user.stats.last_error = f"{address}: {exc}"
                        log.warning("%s: %s; starting over with a full resync", user.name, exc)
                        await self.offload.run(user.replica.locked, user.replica.reset)
                        address, redirects = home, 0
                    except ProtocolError as exc:
                        user.stats.last_error = f"{address}: {exc}"
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
                    user.note_applied(0, [], relaying)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
            finally:
                with trio.CancelScope(shield=True):
                    await self.offload.run(user.replica.close)

    async def _link(self, user: ReplicaUser, address: str, relaying: bool) -> None:
        """One link upstream for ``user`` (a resync's: to the login node, snapshot first)."""
        def snapshotted() -> None:
            user.resync = False
            user.relay.clear()

        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(*address_arg(address))
        async with stream:
            await Follower(
                stream, user.replica, self.config.auth, user.name,
                self.config.node, user.stats,
                report=user.downstreams.report,
                on_applied=lambda before, frames: user.note_applied(
                    before, frames, relaying),
                on_snapshot=snapshotted,
                silence_timeout=self.config.silence_timeout,
                relay_port=self.config.listen[1] if self.config.listen else 0,
                wait_room=user.relay.wait_room,
                # a batch never evicts what it waited to keep
                batch_bytes=max(1, user.relay.limit // 4),
                offload=self.offload, resync=user.resync).run()

    async def resync(self, name: str, limit: float) -> dict[str, object]:
        """Replace ``name``'s replica with a verified snapshot from the login node (see the
        module docstring); ControlError ``barrier-timeout`` if none landed in time."""
        user = await self.start_following(name)
        snapshots = user.stats.snapshots
        user.resync = True
        if user.link_scope is not None:
            user.link_scope.cancel()
        try:
            with trio.fail_after(limit):
                while user.stats.snapshots == snapshots:
                    with trio.move_on_after(BARRIER_POLL):
                        await user.applied_changed.wait()
        except trio.TooSlowError:
            raise control.ControlError(
                f"{name}: no snapshot from the login node within {limit:.0f} s (last error: "
                f"{user.stats.last_error})", ExitCode.FAILURE, "barrier-timeout") from None
        return {"user": name, "applied": user.replica.applied,
                "snapshots": user.stats.snapshots, "skipped": user.replica.skipped.count}

    async def _login_head(self, user: ReplicaUser) -> tuple[int, bytes]:
        assert self._nursery is not None
        return await user.rounds.login_head(self._nursery)

    async def wait_barrier(self, name: str, limit: float) -> dict[str, object]:
        """Follow ``name`` and wait until the replica holds the login node's head as it is
        now (ControlError after ``limit`` seconds, its kind saying why)."""
        user = await self.start_following(name)
        try:
            with trio.fail_after(limit):
                while True:
                    try:
                        barrier, jid = await self._login_head(user)
                        break
                    except NoLayer as exc:
                        raise control.ControlError(f"{name}: {exc}", ExitCode.FAILURE,
                                                   "no-layer") from None
                    except HEAD_QUERY_ERRORS as exc:
                        user.stats.last_error = str(exc)
                        await trio.sleep(BARRIER_RETRY)
                while True:
                    applied = user.replica.journal_id, user.replica.applied
                    if applied[0] not in (NO_ID, jid):  # the user's history was replaced since
                        with contextlib.suppress(*HEAD_QUERY_ERRORS):
                            barrier, jid = await self._login_head(user)
                    # More than the login node had is normal (it moved on since), unless it is
                    # more than it has *now*: then this copy holds a history the login node
                    # lost, and the link is about to start it over.
                    elif applied[0] == jid and applied[1] >= barrier and (
                            applied[1] == barrier or applied[1] <= await self._head_now(user)):
                        break
                    with trio.move_on_after(BARRIER_POLL):
                        await user.applied_changed.wait()
            skipped = user.replica.skipped
            if skipped.count:
                raise control.ControlError(
                    f"the replica of {name}'s environment on {self.config.node} differs: "
                    f"{skipped.summary()}; `sdeefs replica resync {name}` repairs it",
                    ExitCode.FAILURE, "skipped")
        except trio.TooSlowError:
            raise control.ControlError(
                f"{name}: replica not at the barrier after {limit:.0f} s (applied "
                f"{user.replica.applied}, last error: {user.stats.last_error})",
                ExitCode.FAILURE, "barrier-timeout") from None
        return {"user": name, "applied": user.replica.applied, "barrier": barrier}

    async def _head_now(self, user: ReplicaUser) -> int:
        try:
            return (await self._login_head(user))[0]
        except HEAD_QUERY_ERRORS:
            await trio.sleep(BARRIER_RETRY)
            return -1

    async def _release_memory(self) -> None:
        """Once the streams went quiet, give freed heap pages back (an idle node's replicad
        is bounded by its relay buffers, not by the largest burst it relayed)."""
        seen = trimmed = 0
        while True:
            await trio.sleep(MEMORY_CHECK)
            origin_users = self.origin.users.values() if self.origin is not None else ()
            moved = sum(u.replica.applied for u in self.replicas.values()) + sum(
                f.sent_seq for u in origin_users for f in u.downstreams.followers.values())
            if moved == seen and moved != trimmed:
                await self.offload.run(malloc_trim)
                trimmed = moved
            seen = moved

    # -- control and status ----------------------------------------------------------------

    async def _serve_control(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                             ) -> None:
        assert self.config.control is not None
        await control.serve(self.config.control, self._control, task_status=task_status)

    async def _control(self, peer: control.Peer, request: control.Request) -> control.Reply:
        """The control socket's requests (root only: the socket file is 0600)."""
        op = request.get("op")
        if op == "status":
            return await self.status()
        if op in ("job-start", "job-end"):
            return await self._job_op(op, request)
        user = request.get("user")
        if not isinstance(user, str) or not user or "/" in user or user.startswith("."):
            raise control.BadRequest("user must be a user name")
        if op == "follow":
            if request.get("wait"):
                try:
                    timeout = float(request.get("timeout", 300))
                except (TypeError, ValueError):
                    raise control.BadRequest("timeout must be a number") from None
                return await self.wait_barrier(user, timeout)
            await self.start_following(user)
            return {"user": user, "following": True}
        if op == "unfollow":
            stopped = self.stop_following(user)
            node = self.spare_nodes.pop(user, None)
            if node is not None:  # before the answer: remove-user removes the replica next
                await self._forget_spare(node, user)
            return {"user": user, "stopped": stopped}
        if op == "resync":
            try:
                timeout = float(request.get("timeout", 300))
            except (TypeError, ValueError):
                raise control.BadRequest("timeout must be a number") from None
            return await self.resync(user, timeout)
        raise control.BadRequest(f"unknown op {op!r}")

    async def _job_op(self, op: str, request: control.Request) -> control.Reply:
        """``job-start``/``job-end`` (module docstring).  Whatever goes wrong is the node's
        problem (the prolog's client exits non-zero): the user's are in the verdict."""
        if self.jobs is None:
            raise control.ControlError(f"{self.config.node} runs no jobs (no replica_dir)",
                                       ExitCode.USAGE, "no-replicas")
        job, node = request.get("job"), request.get("node")
        if not isinstance(job, str) or not JOB_ID.fullmatch(job):
            raise control.BadRequest("job must be a SLURM job id")
        if not isinstance(node, str) or not NODE_NAME.fullmatch(node):
            raise control.BadRequest("node must be a node name")
        jobs = self.jobs
        began = time.monotonic()
        try:
            if op == "job-end":
                reply, gone = await self.offload.run(jobs.end, node, job)
                if gone is not None:
                    assert self._nursery is not None
                    self._nursery.start_soon(self._remove_gone, gone)
                self._job_done(op, job, node, began, "ended")
                return reply
            user = request.get("user")
            if not isinstance(user, str) or not user or "/" in user or user.startswith("."):
                raise control.BadRequest("user must be a user name")

            def barrier(name: str, timeout: float) -> Mapping[str, object]:
                return trio.from_thread.run(self.wait_barrier, name, timeout)

            reply = await self.offload.run(jobs.start, node, user, job, barrier)
            self._job_done(op, job, node, began, f"{user}: {reply.get('verdict')}, barrier "
                           f"{reply.get('barrier_ms')} ms, spare {reply.get('spare')}")
            if reply.get("spare"):
                self.job_ops["spare"] += 1
            if reply.get("verdict") == "ready" and user in self.replicas:
                assert self._nursery is not None  # the next job of the user: ready ahead
                self.spare_nodes[user] = node
                self._nursery.start_soon(self._prepare_spare, node, user)
            return reply
        except QuietError as exc:
            log.error("%s of job %s on %s: %s", op, job, node, exc)
            raise
        except OSError as exc:
            raise QuietError(f"job {job} on {node}: {exc}", ExitCode.FAILURE) from None
        except Exception as exc:  # a bug must not end the daemon (and every replica with it)
            log.exception("%s of job %s", op, job)
            raise QuietError(f"job {job} on {node}: internal error: {exc!r}",
                             ExitCode.FAILURE) from None

    def _job_done(self, op: str, job: str, node: str, began: float, what: str) -> None:
        self.job_ops[op] += 1
        log.info("%s of job %s on %s: %s (%.1f ms)", op, job, node, what,
                 (time.monotonic() - began) * 1000)

    async def _prepare_spare(self, node: str, user: str) -> None:
        assert self.jobs is not None
        try:
            await self.offload.run(self.jobs.prepare, node, user)
        except Exception:  # a spare is an optimisation: never the daemon's end
            log.exception("a spare environment of %s on %s", user, node)

    async def _expire_spares(self) -> None:
        """End spares unused for SPARE_TTL (every SPARE_CHECK seconds)."""
        assert self.jobs is not None
        while True:
            await trio.sleep(SPARE_CHECK)
            for node in set(self.spare_nodes.values()):
                try:
                    for user in await self.offload.run(self.jobs.expire, node, SPARE_TTL):
                        self.spare_nodes.pop(user, None)
                except Exception:
                    log.exception("ending old spare environments on %s", node)

    async def _forget_spare(self, node: str, user: str) -> None:
        assert self.jobs is not None
        try:
            await self.offload.run(self.jobs.forget, node, user)
        except Exception:
            log.exception("ending the spare environment of %s on %s", user, node)

    async def _remove_gone(self, path: str) -> None:
        """A finished job's scratch upper, renamed out of the way by ``job-end`` (or left by
        a stopped daemon): removed in a worker thread that a stop abandons (it may be
        gigabytes; ``sdeefs end-spares``, the unit's ExecStopPost, removes the rest)."""
        assert self.jobs is not None
        await self.offload.run_abandoning(self.jobs.remove_gone, path)

    async def status(self) -> dict[str, object]:
        origin = await self.origin.status() if self.origin is not None else {}
        replicas = {}
        for r in self.replicas.values():
            replicas[r.name] = {
                "applied": r.replica.applied, "upstream_head": r.stats.head,
                "lag": max(0, r.stats.head - r.replica.applied),
                "bytes_received": r.stats.bytes_received, "connected": r.stats.connected,
                "upstream": r.stats.upstream, "last_error": r.stats.last_error,
                "followers": sorted(r.downstreams.followers), "queries": r.queries,
                "snapshots": r.stats.snapshots, "skipped": r.replica.skipped.count,
                "skipped_records": [x.as_json() for x in r.replica.skipped.records],
            }
        return {"node": self.config.node, "origin": origin, "replicas": replicas,
                "uptime": time.time() - self.started, "jobs": dict(self.job_ops)}


# -- the command ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdeefs-replicad", description="serve users' journals (login node) and keep "
        "their replicas (compute nodes); see `pydoc sdeefs.replication`")
    parser.add_argument("--role", choices=("login", "compute"),
                        help="take every setting from the site config for this role: login "
                             "(serve [sdeefs] root's journals at replication.login) or compute "
                             "(follow replication.login, keep replicas in replication.replica_dir, "
                             "relay at replication.listen); what the systemd units run")
    parser.add_argument("--node", default=socket.gethostname().split(".")[0],
                        help="this node's name (default: the short host name)")
    parser.add_argument("--auth", choices=("auto", "munge", "key"),
                        help="how HELLOs authenticate (default: replication.auth of the "
                             "sdeefs config; auto: the shared key if its file exists, MUNGE "
                             "otherwise); --key-file means key")
    parser.add_argument("--key-file",
                        help="shared replication key, root-only, >= 32 bytes (default: "
                             "replication.key_file of the sdeefs config)")
    parser.add_argument("--munge-socket",
                        help="munged's socket (default: replication.munge_socket)")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="serve followers here (origin, and relays for the tree)")
    parser.add_argument("--origin", metavar="ROOT",
                        help="login node: serve the journals of ROOT/USER/state/journal")
    parser.add_argument("--replica-dir", metavar="DIR",
                        help="compute node: keep replicas here (default with --upstream or "
                             "replication.login set: replication.replica_dir)")
    parser.add_argument("--upstream", metavar="HOST:PORT",
                        help="the login node's replicad (default: replication.login)")
    parser.add_argument("--fanout", type=int,
                        help="direct followers per user before redirecting (default: "
                             "replication.fanout, 4)")
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
    from .. import config as config_mod

    site = config_mod.load()
    rep = site.replication.on(args.node)
    if args.key_file and not args.auth:
        args.auth = "key"
    args.auth = args.auth or rep.auth
    args.munge_socket = args.munge_socket or rep.munge_socket
    args.key_file = args.key_file or rep.key_file
    args.control = args.control or rep.control
    if args.fanout is None:
        args.fanout = rep.fanout
    if args.role == "login":
        if not (args.listen or rep.login):
            raise QuietError("--role login: set replication.login (HOST:PORT) in the config",
                             ExitCode.USAGE)
        args.origin = args.origin or site.root
        args.listen = args.listen or rep.login
        return
    if args.role == "compute":
        if not (args.upstream or rep.login):
            raise QuietError("--role compute: set replication.login (HOST:PORT) in the config",
                             ExitCode.USAGE)
        args.listen = args.listen or rep.listen or None
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
            node=args.node, auth=hello_auth(args.auth, args.key_file, args.munge_socket),
            listen=address_arg(args.listen) if args.listen else None,
            origin_root=args.origin, replica_dir=args.replica_dir,
            upstream=address_arg(args.upstream) if args.upstream else None,
            fanout=args.fanout, control=args.control, follow=tuple(args.follow),
            relay_bytes=args.relay_bytes, trim_interval=args.trim_interval,
            expire=args.expire)
        if config.replica_dir:
            os.makedirs(config.replica_dir, mode=0o700, exist_ok=True)
        jobs = None
        if config.replica_dir:  # a compute node runs the jobs' prolog and epilog too
            from ..launcher.compute.job import NodeJobs

            jobs = NodeJobs()
        trio.run(Daemon(config, jobs=jobs).serve)
    except QuietError as exc:
        print(f"sdeefs-replicad: {exc}", file=sys.stderr)
        return exc.exitcode
    except OSError as exc:
        print(f"sdeefs-replicad: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
