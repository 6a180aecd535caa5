"""Strangers at the replication port (issue 14): every user can reach every replicad from
inside their environment, so what a peer that cannot authenticate costs must be bounded."""

from __future__ import annotations

import socket
import time
import zlib

from sdeefs.replication.wire import FRAME_HEADER, HELLO, MAGIC, MAX_FRAME_PAYLOAD, VERSION

from ..conftest import requires_fuse
from .test_daemon import Site, change_tree, converged, rss_mb

STRANGERS = 200



def _reaches_eof(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


def _claim_a_big_frame(port: int) -> socket.socket:
    """A connection that announces a 2 MiB HELLO and sends as much of it as it can."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    header = FRAME_HEADER.pack(MAGIC, VERSION, HELLO, 0, MAX_FRAME_PAYLOAD, 1, 0)
    # a valid header CRC (anyone can compute one): refused for its size, not its CRC
    header = header[:-4] + zlib.crc32(header).to_bytes(4, "little")
    try:
        sock.send(header)
        sent, chunk = 0, b"\x00" * 65536
        while sent < MAX_FRAME_PAYLOAD - 1:
            sent += sock.send(chunk[:MAX_FRAME_PAYLOAD - 1 - sent])
    except (BlockingIOError, ConnectionError):
        pass  # the daemon stopped reading (or closed): as much as it takes is sent
    return sock


@requires_fuse
def test_unauthenticated_peers_cost_little_and_block_nobody(login: Site) -> None:
    """200 peers each claiming a 2 MiB first frame and sending 2 MiB - 1 bytes of it (they
    cost 480 MiB before): the origin's RSS grows by at most 32 MiB, and an authenticated
    replica is served meanwhile."""
    change_tree(login.view, "one")
    login.start_origin()
    login.start_replica("n1")
    login.sync_to("n1")
    origin_pid = login.daemons["login"].pid
    time.sleep(3)  # the daemon gives back what the first sync used
    before = rss_mb(origin_pid)
    strangers = []
    try:
        peak = before
        for _ in range(STRANGERS):
            strangers.append(_claim_a_big_frame(login.port))
            peak = max(peak, rss_mb(origin_pid))
        change_tree(login.view, "two")
        began = time.monotonic()
        login.sync_to("n1")
        assert time.monotonic() - began < 20
        assert converged(login, "n1")
        peak = max(peak, rss_mb(origin_pid))
        assert peak - before <= 32, f"RSS {before:.0f} -> {peak:.0f} MiB"
    finally:
        for sock in strangers:
            sock.close()
    assert login.daemons["login"].poll() is None
    assert "a first frame of 2097152 bytes (at most 8192 before authentication)" in \
        login.log("login")


@requires_fuse
def test_idle_strangers_cannot_lock_real_nodes_out(login: Site) -> None:
    """More idle connections than the daemon keeps waiting for a HELLO: the oldest are
    closed, and a replica that connects after them still gets in at once."""
    from sdeefs.replication.daemon import MAX_STRANGERS

    change_tree(login.view, "one")
    login.start_origin()
    idle = [socket.create_connection(("127.0.0.1", login.port)) for _ in range(MAX_STRANGERS + 20)]
    try:
        time.sleep(0.5)
        login.start_replica("n1")
        began = time.monotonic()
        login.sync_to("n1")
        assert time.monotonic() - began < 8  # well before the idle ones' 10 s HELLO timeout
        assert converged(login, "n1")
        assert all(_reaches_eof(sock, 2) for sock in idle[:20])  # the oldest: closed
        assert not _reaches_eof(idle[-1], 0.2)  # the newest: still waited for
    finally:
        for sock in idle:
            sock.close()
