"""MUNGE authentication between replicads (``auth = "munge"``): real munged daemons, no
shared key anywhere.  A replayed credential, a credential of another realm and a user's
own credential are refused; a replica of the realm follows as with the shared key."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from sdeefs.offload import Offload
from sdeefs.replication.auth import HELLO_LABEL, CredentialRefused, Munge
from sdeefs.replication.wire import (
    HELLO,
    NO_ID,
    NONCE_SIZE,
    Hello,
    encode_hello,
)

from ..conftest import requires_fuse
from .test_daemon import USER, Site, change_tree, converged

pytestmark = pytest.mark.skipif(shutil.which("munged") is None or os.geteuid() != 0,
                                reason="needs munged and root")


@contextlib.contextmanager
def munged(base: Path, name: str) -> Iterator[str]:
    """A munged of its own realm (a fresh key); its socket path."""
    d = base / name
    d.mkdir(mode=0o755)
    key = d / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(1024))
    sock, pid_file = d / "munge.sock", d / "munged.pid"
    subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={sock}",
                    f"--pid-file={pid_file}", f"--log-file={d / 'munged.log'}",
                    f"--seed-file={d / 'munged.seed'}"], check=True, capture_output=True,
                   timeout=30)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "munged did not start"
            time.sleep(0.01)
        yield str(sock)
    finally:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10  # it writes its seed file as it exits
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.02)


@pytest.fixture
def realm() -> Iterator[str]:
    """A munged whose socket every user can reach (pytest's tmp_path is root's, 0700)."""
    base = Path(tempfile.mkdtemp(prefix="sdeefs-munge-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    try:
        with munged(base, "realm") as sock:
            yield sock
    finally:
        shutil.rmtree(base, ignore_errors=True)


class MungeSite(Site):
    """test_daemon's site, its daemons authenticated by MUNGE instead of the key."""

    def __init__(self, tmp: Path, munge_socket: str) -> None:
        super().__init__(tmp)
        self.key.unlink()  # nothing to distribute
        self.munge_socket = munge_socket

    def start(self, name: str, *args: str) -> None:
        super().start(name, "--auth", "munge", "--munge-socket", self.munge_socket, *args)


def _hello_bytes(credential: bytes, k: bytes) -> bytes:
    hello = Hello(secrets.token_bytes(NONCE_SIZE), NO_ID, USER, "intruder", 1)
    return bytes(encode_hello(hello, credential).encode(k))


def _answer(port: int, data: bytes) -> bytes:
    """What the upstream sends back to these bytes (b"" if it just closes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        got = b""
        with contextlib.suppress(ConnectionError, TimeoutError):
            while chunk := sock.recv(65536):
                got += chunk
                if len(got) >= 24:
                    break
        return got


@requires_fuse
def test_replicas_of_the_realm_follow_without_a_key(tmp_path: Path, realm: str) -> None:
    site = MungeSite(tmp_path / "site", realm)
    try:
        site.mount()
        change_tree(site.view, "one")
        site.start_origin()
        site.start_replica("n1")
        site.sync_to("n1")
        assert converged(site, "n1")
        assert not site.key.exists()

        munge = Munge(realm, Offload())
        k = secrets.token_bytes(32)
        credential = munge.encode(HELLO_LABEL + k)
        first = _answer(site.port, _hello_bytes(credential, k))
        assert first[5] == HELLO, first[:24]  # accepted: the upstream's HELLO
        assert _answer(site.port, _hello_bytes(credential, k)) == b""  # replayed: closed
        assert "Replayed credential" in site.log("login")

        user = subprocess.run(  # a user's own credential of the same payload shape
            ["runuser", "-u", "nobody", "--", "munge", f"--socket={realm}"],
            input=HELLO_LABEL + k, capture_output=True, check=True, timeout=30).stdout
        assert _answer(site.port, _hello_bytes(user.strip(), k)) == b""
        assert "credential made by uid 65534" in site.log("login")
        assert site.daemons["login"].poll() is None
    finally:
        site.close()


@requires_fuse
def test_a_replica_of_another_realm_is_refused(tmp_path: Path, realm: str) -> None:
    site = MungeSite(tmp_path / "site", realm)
    try:
        with munged(tmp_path, "other") as other:
            site.mount()
            change_tree(site.view, "one")
            site.start_origin()
            site.munge_socket = other
            site.start_replica("n1")
            with pytest.raises(Exception, match="replica not at the barrier"):
                site.control("n1", {"op": "follow", "user": USER, "wait": True,
                                    "timeout": 3})
            assert "HELLO not authenticated: munge: Invalid credential" in site.log("login")
    finally:
        site.close()


def test_a_credential_is_checked_for_what_it_carries(realm: str) -> None:
    munge = Munge(realm, Offload())

    async def accept(payload: bytes) -> bytes:
        return await munge.accept(munge.encode(payload))

    k = secrets.token_bytes(32)
    assert trio.run(accept, HELLO_LABEL + k) == k
    with pytest.raises(CredentialRefused, match="something else"):
        trio.run(accept, b"x" * 56)
    with pytest.raises(CredentialRefused, match="no MUNGE credential"):
        trio.run(munge.accept, b"")
