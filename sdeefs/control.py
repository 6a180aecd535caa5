"""Control sockets: one JSON line in, one JSON line out, over a Unix stream socket.

Shared core: ``sdeefs-replicad`` (``replica follow --wait``, ``status``), the kernel
engine's capture daemon (``drain``, ``status``) and ``sdeefs-launchd`` (``start``,
``stop``) all speak it, and the command line, the SLURM prolog and the C helper
``sdeefs-enter`` ask them.

Protocol::

    client -> server   one JSON object and "\\n" (at most ``max_request`` bytes)
    server -> client   one JSON object and "\\n", then the server closes

A reply is whatever the handler returned, or, when the request failed::

    {"ok": false, "error": "<one line for a person>", "code": <exit code>,
     "kind": "<machine-readable reason, or absent>"}

so that a caller acts on ``kind``, never on the message's text.  :func:`request`
turns such a reply into a :class:`ControlError`.

Every byte of a request is hostile: the line is bounded in size and in time (a
client that does not finish its line within ``read_timeout`` gets an error
reply), must be a JSON object, and the handler learns who asks from
``SO_PEERCRED`` (:class:`Peer`), never from the request.  Connections are served
concurrently, each in its own task: one slow or hostile client never delays
another.  The socket file appears only once the server listens (it is bound under
a temporary name and renamed), so a client that sees the path can connect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs

from .errors import ExitCode, QuietError

if TYPE_CHECKING:  # the server's side imports trio when it serves: clients (a job's
    import trio  # prolog, sdeefs-shell) stay free of its import time

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
MAX_REQUEST = 64 << 10


@attrs.frozen
class Peer:
    """Who is on the other end of a connection (``SO_PEERCRED``, host ids)."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket | trio.socket.SocketType) -> Peer:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _UCRED.size))
        return cls(pid, uid, gid)


class BadRequest(QuietError):
    """A request that is not what the handler accepts (the client's mistake)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bad request: {message}", ExitCode.USAGE)


class ControlError(QuietError):
    """An error with a machine-readable ``kind``: raised by a handler (the reply carries
    the kind), and by :func:`request` for every error reply (``kind`` None if it had none).
    """

    def __init__(self, message: str, exitcode: int, kind: str | None) -> None:
        super().__init__(message, exitcode)
        self.kind = kind


Request = dict[str, Any]
Reply = dict[str, Any]
Handler = Callable[[Peer, Request], Awaitable[Reply]]


def error_reply(exc: QuietError) -> Reply:
    reply: Reply = {"ok": False, "error": str(exc), "code": int(exc.exitcode)}
    kind = getattr(exc, "kind", None)
    if kind:
        reply["kind"] = kind
    return reply


async def serve(path: str, handler: Handler, *, mode: int = 0o600,
                max_request: int = MAX_REQUEST, read_timeout: float = 10.0,
                task_status: trio.TaskStatus[None] | None = None) -> None:
    """Answer requests on the Unix socket ``path`` until cancelled (then remove it).

    ``mode`` is the socket file's mode: 0600 for root-only services, 0666 where
    everybody may ask and the handler decides by :class:`Peer`.
    """
    import trio

    staging = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        await sock.bind(staging)
    finally:
        os.umask(old)
    os.chmod(staging, mode)
    sock.listen(128)
    os.replace(staging, path)
    ours = os.stat(path).st_ino  # removed at the end unless another server replaced it
    listener = trio.SocketListener(sock)
    if task_status is not None:
        task_status.started()
    async def answer(stream: trio.SocketStream) -> None:
        await _answer(stream, handler, max_request, read_timeout)

    try:
        await trio.serve_listeners(answer, [listener])
    finally:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == ours:
                os.unlink(path)


async def _answer(stream: trio.SocketStream, handler: Handler, max_request: int,
                  read_timeout: float) -> None:
    import trio

    async with stream:
        try:
            peer = Peer.of(stream.socket)
            line = await _read_line(stream, max_request, read_timeout)
            try:
                request = json.loads(line)
            except ValueError:
                raise BadRequest("not JSON") from None
            if not isinstance(request, dict):
                raise BadRequest("not a JSON object")
            reply = await handler(peer, request)
        except QuietError as exc:
            reply = error_reply(exc)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            with trio.move_on_after(read_timeout):
                await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _read_line(stream: trio.SocketStream, max_request: int, read_timeout: float) -> bytes:
    import trio

    data = b""
    with trio.move_on_after(read_timeout) as scope:
        while b"\n" not in data:
            chunk = await stream.receive_some(max_request + 1)
            if not chunk:
                break
            data += chunk
            if len(data) > max_request:
                raise BadRequest(f"longer than {max_request} bytes")
    if scope.cancelled_caught:
        raise BadRequest(f"no complete line within {read_timeout:g} s")
    if b"\n" not in data:
        raise BadRequest("no complete line")
    return data.split(b"\n", 1)[0]


def request(path: str, message: Request, timeout: float = 60.0, what: str = "the service"
            ) -> Reply:
    """Send one request to the server at ``path`` and return its reply (blocking).

    QuietError (UNAVAILABLE) if nothing listens there; :class:`ControlError` if the
    server answered with an error.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            raise QuietError(f"{what} is not running ({path}: {exc.strerror})",
                             ExitCode.UNAVAILABLE) from None
        try:
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise QuietError(f"{what} did not answer within {timeout:g} s",
                             ExitCode.FAILURE) from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise QuietError(f"{what} closed the connection without an answer ({path})",
                         ExitCode.FAILURE) from None
    if not isinstance(reply, dict):
        raise QuietError(f"{what} gave a malformed answer", ExitCode.FAILURE)
    if "error" in reply:
        raise ControlError(str(reply["error"]), int(reply.get("code", ExitCode.FAILURE)),
                           reply.get("kind"))
    return reply
