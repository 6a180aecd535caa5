"""``sdeefs-launchd``: a resident root service that starts environments without a cold Python.

Starting an environment from the command line pays for a fresh interpreter and
its imports (trio, pyfuse3: ~135 ms of a ~170 ms ``sdeefs start``).  The service
keeps them loaded and answers on a Unix socket, ``RUN_DIR/launchd.sock``, so a
start costs what the work itself costs (two daemons forked, the idmapped mount,
the mask, the namespaces).  ``sdeefs-shell`` asks it when the caller has no
running environment; without the service it says so, as before.

Protocol: one request per connection, one JSON object per line each way::

    -> {"op": "start", "engine": "fuse"}       engine optional (default: the config's)
    -> {"op": "stop"}
    -> {"op": "start", "user": "alice"}        "user" only from root
    <- {"ok": true, "pid": 1234, "engine": "hybrid"}
    <- {"ok": false, "error": "one line", "code": 4}

Who may ask (SO_PEERCRED, not anything in the request): root for any user; any
other uid only for itself, and only if it is at least ``min_uid``.  Requests are
served one at a time (the daemons are forked from this process, which therefore
has no other threads); a client gets 2 s to send its line and at most 4 KiB.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import signal
import socket
import struct
import sys
from typing import Any

from sdeefs import config as config_mod
from sdeefs.errors import ExitCode, QuietError

from . import env

log = logging.getLogger(__name__)

SOCKET_NAME = "launchd.sock"
MAX_REQUEST = 4096
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path(config: config_mod.SiteConfig) -> str:
    return os.path.join(config.run_dir, SOCKET_NAME)


def handle(config: config_mod.SiteConfig, peer_uid: int, request: object) -> dict[str, Any]:
    """Answer one request of a client whose uid the kernel vouched for."""
    if not isinstance(request, dict):
        raise QuietError("bad request: not a JSON object", ExitCode.USAGE)
    op, engine, name = request.get("op"), request.get("engine"), request.get("user")
    if op not in ("start", "stop"):
        raise QuietError(f"bad request: unknown op {op!r}", ExitCode.USAGE)
    if engine is not None and engine not in config_mod.ENGINES:
        raise QuietError(f"unknown engine {engine!r} (choose from {', '.join(config_mod.ENGINES)})",
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
        raise QuietError("bad request: which user?", ExitCode.USAGE)
    user = env.User.lookup(name)
    if user.uid < config.min_uid:
        raise QuietError(f"{user.name} is below min_uid {config.min_uid}: no environment",
                         ExitCode.UNAVAILABLE)
    if op == "stop":
        return {"ok": True, "stopped": env.stop(config, user)}
    record = env.ensure(config, user, engine)
    return {"ok": True, "pid": record.init_pid, "engine": record.engine}


def _serve_one(config: config_mod.SiteConfig, conn: socket.socket) -> None:
    peer_uid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                             _UCRED.size))[1]
    conn.settimeout(2.0)
    data = b""
    try:
        while b"\n" not in data and len(data) <= MAX_REQUEST:
            chunk = conn.recv(MAX_REQUEST)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        return
    try:
        if len(data) > MAX_REQUEST or b"\n" not in data:
            raise QuietError("bad request: one JSON line of at most 4 KiB expected", ExitCode.USAGE)
        try:
            request = json.loads(data.split(b"\n", 1)[0])
        except ValueError:
            raise QuietError("bad request: not JSON", ExitCode.USAGE) from None
        reply = handle(config, peer_uid, request)
        log.info("uid %d: %s -> %s", peer_uid, request, reply)
    except QuietError as exc:
        reply = {"ok": False, "error": str(exc), "code": exc.exitcode}
    conn.settimeout(5.0)
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(reply).encode() + b"\n")


def serve(config: config_mod.SiteConfig) -> None:
    path = socket_path(config)
    os.makedirs(config.run_dir, mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    server.bind(path)
    os.chmod(path, 0o666)  # everybody may ask; SO_PEERCRED says who asks
    server.listen(64)
    log.info("listening on %s", path)

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                _serve_one(config, conn)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def request(config: config_mod.SiteConfig, message: dict[str, Any], timeout: float = 60.0
            ) -> dict[str, Any]:
    """Send one request to the running service (used by tests and the benchmark)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(socket_path(config))
        conn.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


def main() -> int:
    """Entry point of ``sdeefs-launchd`` (runs in the foreground; logs to stderr)."""
    logging.basicConfig(level=logging.INFO, format="sdeefs-launchd: %(message)s")
    try:
        if os.geteuid() != 0:
            raise QuietError("sdeefs-launchd must run as root", ExitCode.UNAVAILABLE)
        serve(config_mod.load())
    except QuietError as exc:
        print(f"sdeefs-launchd: {exc}", file=sys.stderr)
        return exc.exitcode
    except KeyboardInterrupt:
        return 0
    return 0
