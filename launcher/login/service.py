"""``sdeefs-launchd``: a resident root service that starts environments without a cold Python.

Starting an environment from the command line pays for a fresh interpreter and
its imports (trio, pyfuse3: ~135 ms of a ~170 ms ``sdeefs start``).  The service
keeps them loaded and answers on a Unix socket, ``RUN_DIR/launchd.sock``, so a
start costs what the work itself costs (two daemons forked, the idmapped mount,
the mask, the namespaces).  ``sdeefs-shell`` asks it when the caller has no
running environment; without the service it says so, as before.

Protocol: a JSON-line control socket (sdeefs.control), one request per connection::

    -> {"op": "start", "engine": "fuse"}       engine optional (default: the config's)
    -> {"op": "stop"}
    -> {"op": "start", "user": "alice"}        "user" only from root
    <- {"ok": true, "pid": 1234, "engine": "hybrid"}
    <- {"ok": true, "stopped": true}
    <- {"ok": false, "error": "one line", "code": 4}

The C client in ``sdeefs-shell`` (launcher/enter/shell.c) reads ``ok``, ``error`` and
``code``: they stay.

Who may ask (SO_PEERCRED, not anything in the request): root for any user; any
other uid only for itself, and only if it is at least ``min_uid``.  A client gets
2 s to send its line and at most 4 KiB.

Concurrency: connections are answered concurrently; the work of a request blocks
(daemons forked, mounts, the C helper), so it runs in a worker thread (the one
offloader), at most ``MAX_WORKERS`` at once and one at a time per asking uid: a uid
that sends many requests holds one worker, never all of them.  Requests for one user
are serialised by ``env.locked`` in any case.

Forking from this process: an environment's daemons are forked (not exec'd) from a
worker thread while the trio loop runs in the main thread.  The child keeps only the
forking thread (trio clears its thread cache in forked children itself); what it
must not keep is the loop's signal handling, the wakeup fd number and the handlers
that write to it, which would land in whatever the child opens under that number.
An at-fork hook gives every child this process forks the signal handling of a fresh
process, as a daemon forked by ``sdeefs start`` has.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import signal
import sys

import attrs
import trio

from sdeefs import config as config_mod
from sdeefs import control
from sdeefs.config import ENGINES, Engine, SiteConfig
from sdeefs.errors import ExitCode, QuietError
from sdeefs.offload import Offload

from .. import env, limits
from ..layout import SiteRun

log = logging.getLogger(__name__)

MAX_REQUEST = 4096  # bytes of a request line
READ_TIMEOUT = 2.0  # seconds a client has to send its line
MAX_WORKERS = 4  # requests worked on at once (each in a thread)


def handle(config: SiteConfig, peer_uid: int, request: control.Request,
           peer_pid: int | None = None) -> control.Reply:
    """Answer one request of a client whose uid the kernel vouched for (blocking); a user
    asking for their own environment (``peer_pid``: sdeefs-shell) joins its limits."""
    op, engine, name = request.get("op"), request.get("engine"), request.get("user")
    if op not in ("start", "stop"):
        raise control.BadRequest(f"unknown op {op!r}")
    if engine is not None and engine not in ENGINES:
        raise QuietError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})",
                         ExitCode.USAGE)
    if peer_uid != 0:
        try:
            own = pwd.getpwuid(peer_uid).pw_name
        except KeyError:
            raise QuietError(f"uid {peer_uid} has no passwd entry", ExitCode.UNAVAILABLE) from None
        if name not in (None, own):
            raise QuietError("only root may start or stop another user's environment",
                             ExitCode.UNAVAILABLE)
        name = own
    if not isinstance(name, str):
        raise control.BadRequest("which user?")
    user = env.User.lookup(name)
    if user.uid < config.min_uid:
        raise QuietError(f"{user.name} is below min_uid {config.min_uid}: no environment",
                         ExitCode.UNAVAILABLE)
    if op == "stop":
        return {"ok": True, "stopped": env.stop(config, user)}
    record = env.ensure(config, user, Engine(engine) if engine is not None else None)
    if peer_pid is not None and peer_uid == user.uid:
        limits.join(user.name, peer_pid)
    return {"ok": True, "pid": record.init_pid, "engine": str(record.engine)}


@attrs.define(eq=False)
class Launchd:
    """The service: requests handed to worker threads, one at a time per asking uid.

    ``asking`` holds a lock for each uid with a request in progress or waiting, and
    forgets it when none is left.
    """

    config: SiteConfig
    offload: Offload = attrs.field(factory=lambda: Offload(trio.CapacityLimiter(MAX_WORKERS)))
    asking: dict[int, trio.Lock] = attrs.field(factory=dict)

    async def answer(self, peer: control.Peer, request: control.Request) -> control.Reply:
        lock = self.asking.setdefault(peer.uid, trio.Lock())
        try:
            async with lock:
                reply = await self.offload.run(handle, self.config, peer.uid, request, peer.pid)
        finally:
            if self.asking.get(peer.uid) is lock and not lock.locked() and \
                    lock.statistics().tasks_waiting == 0:
                del self.asking[peer.uid]
        log.info("uid %d: %s -> %s", peer.uid, request, reply)
        return reply

    async def serve(self) -> None:
        """Answer on RUN_DIR/launchd.sock until SIGTERM or SIGINT (then remove it)."""
        path = SiteRun(self.config.run_dir).launchd_socket
        os.makedirs(self.config.run_dir, mode=0o755, exist_ok=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                # 0666: everybody may ask; SO_PEERCRED says who asks
                await nursery.start(functools.partial(
                    control.serve, path, self.answer, mode=0o666, max_request=MAX_REQUEST,
                    read_timeout=READ_TIMEOUT))
                log.info("listening on %s", path)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break


def _fresh_signal_handling() -> None:
    """In a child forked from the service: no trace of the parent's trio loop's signals."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> int:
    """Entry point of ``sdeefs-launchd`` (runs in the foreground; logs to stderr)."""
    logging.basicConfig(level=logging.INFO, format="sdeefs-launchd: %(message)s")
    try:
        if os.geteuid() != 0:
            raise QuietError("sdeefs-launchd must run as root", ExitCode.UNAVAILABLE)
        service = Launchd(config_mod.load())
        os.register_at_fork(after_in_child=_fresh_signal_handling)
        trio.run(service.serve)
    except QuietError as exc:
        print(f"sdeefs-launchd: {exc}", file=sys.stderr)
        return exc.exitcode
    except KeyboardInterrupt:  # before the loop listens for SIGINT itself
        return 0
    return 0
