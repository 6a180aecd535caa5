"""sdeefs-replicad for real: daemons over loopback TCP, a live journaling mount as the origin."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs.mount import daemon_pid
from sdeefs.replicad import control_request, load_key
from sdeefs.replicate import (
    ERROR,
    FRAME_HEADER,
    MAC_SIZE,
    NO_ID,
    NONCE_SIZE,
    Hello,
    encode_frame,
    encode_hello,
    tree_digest,
)

from .conftest import requires_fuse

SDEEFS = [sys.executable, "-m", "sdeefs"]
REPLICAD = os.path.join(os.path.dirname(sys.executable), "sdeefs-replicad")
USER = "alice"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Site:
    """A login node (journaling passthrough mount + origin replicad) and replica daemons."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = tmp / "root"
        self.upper = self.root / USER / "upper"
        self.state = self.root / USER / "state"
        self.mnt = tmp / "mnt"
        for path in (self.upper, self.state, self.mnt):
            path.mkdir(parents=True)
        (self.state / "work").mkdir()
        self.key = tmp / "key"
        self.key.write_bytes(os.urandom(32).hex().encode())
        os.chmod(self.key, 0o600)
        self.port = free_port()
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ports: dict[str, int] = {}

    def mount(self) -> None:
        subprocess.run([*SDEEFS, "mount", "--passthrough-upper", "--upper", str(self.upper),
                        "--state", str(self.state), "--segment-bytes", "16384", str(self.mnt)],
                       check=True)

    def umount(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run([*SDEEFS, "umount", str(self.mnt)], check=False)

    @property
    def view(self) -> Path:
        return self.mnt / "upper"

    def start(self, name: str, *args: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 (kept by the process)
        control = self.tmp / f"{name}.sock"
        with contextlib.suppress(FileNotFoundError):
            control.unlink()
        self.daemons[name] = subprocess.Popen(
            [REPLICAD, "--node", name, "--key-file", str(self.key), "--control", str(control),
             *args], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 10
        while not control.exists():
            if self.daemons[name].poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start: {self.log(name)}")
            time.sleep(0.02)

    def start_origin(self, fanout: int = 4) -> None:
        self.start("login", "--origin", str(self.root), "--listen", f"127.0.0.1:{self.port}",
                   "--fanout", str(fanout))

    def start_replica(self, name: str, fanout: int = 4, listen: bool = False) -> None:
        args = ["--replica-dir", str(self.tmp / name), "--upstream",
                f"127.0.0.1:{self.port}", "--fanout", str(fanout)]
        if listen:
            self.node_ports[name] = free_port()
            args += ["--listen", f"127.0.0.1:{self.node_ports[name]}"]
        self.start(name, *args)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.daemons.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        proc.wait(10)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def control(self, name: str, request: dict[str, object]) -> dict[str, object]:
        return control_request(str(self.tmp / f"{name}.sock"), request, timeout=60)

    def sync_to(self, name: str) -> dict[str, object]:
        return self.control(name, {"op": "follow", "user": USER, "wait": True, "timeout": 30})

    def replica_upper(self, name: str) -> Path:
        return self.tmp / name / USER / "upper"

    def close(self) -> None:
        for name in list(self.daemons):
            self.kill(name)
        self.umount()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    try:
        s.mount()
        yield s
    finally:
        s.close()


def converged(site: Site, name: str) -> bool:
    return tree_digest(str(site.upper)) == tree_digest(str(site.replica_upper(name)))


def change_tree(view: Path, tag: str) -> None:
    (view / "usr" / "local" / "bin").mkdir(parents=True, exist_ok=True)
    tool = view / "usr" / "local" / "bin" / f"tool-{tag}"
    tool.write_text(f"#!/bin/sh\necho {tag}\n")
    tool.chmod(0o755)
    (view / "etc").mkdir(exist_ok=True)
    (view / "etc" / "motd").write_text(f"hello {tag}\n")
    big = view / "data.bin"
    with open(big, "ab") as f:
        f.write(os.urandom(3 << 20))
    with contextlib.suppress(FileNotFoundError):
        (view / "etc" / "old").unlink()
    (view / "etc" / "old").symlink_to("motd")


@requires_fuse
def test_replica_follows_a_live_journal_and_resumes_after_kill(site: Site) -> None:
    change_tree(site.view, "one")
    site.start_origin()
    site.start_replica("n1")
    reply = site.sync_to("n1")
    assert reply["applied"] >= reply["barrier"] > 0  # type: ignore[operator]
    assert converged(site, "n1")
    assert (site.replica_upper("n1") / "usr/local/bin/tool-one").read_text() == \
        "#!/bin/sh\necho one\n"

    # The replica daemon dies mid-stream: it resumes from its persisted position.
    with open(site.view / "stream.bin", "wb") as f:
        for _ in range(20):
            f.write(os.urandom(1 << 20))
    site.kill("n1")
    change_tree(site.view, "two")
    site.start_replica("n1")
    site.sync_to("n1")
    assert converged(site, "n1")
    assert "starting over" not in site.log("n1")


@requires_fuse
def test_one_byte_edit_sends_that_byte_not_the_file(site: Site) -> None:
    with open(site.view / "big.bin", "wb") as f:
        f.write(os.urandom(16 << 20))
    site.start_origin()
    site.start_replica("n1")
    site.sync_to("n1")
    before = site.control("n1", {"op": "status"})["replicas"][USER]["bytes_received"]  # type: ignore[index]
    with open(site.view / "big.bin", "r+b") as f:
        f.seek(8 << 20)
        f.write(b"X")
    site.sync_to("n1")
    after = site.control("n1", {"op": "status"})["replicas"][USER]["bytes_received"]  # type: ignore[index]
    assert converged(site, "n1")
    # The page cache writes back whole pages: one 4 KiB page plus framing, not 16 MiB.
    assert 0 < after - before < 8192, after - before  # type: ignore[operator]


@requires_fuse
def test_origin_restart_and_login_daemon_kill(site: Site) -> None:
    change_tree(site.view, "one")
    site.start_origin()
    site.start_replica("n1")
    site.sync_to("n1")
    site.kill("login")
    change_tree(site.view, "two")
    site.start_origin()
    site.sync_to("n1")
    assert converged(site, "n1")
    # kill -9 of the journaling daemon of the login node mid-write; remount recovers.
    pid = daemon_pid(str(site.state))
    assert pid is not None
    writer = subprocess.Popen(["sh", "-c", f"while :; do echo x >> {site.view}/spin; done"])
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    writer.kill()
    writer.wait()
    subprocess.run(["umount", "-l", str(site.mnt)], check=False)
    time.sleep(0.2)
    site.mount()
    change_tree(site.view, "three")
    site.sync_to("n1")
    assert converged(site, "n1")


@requires_fuse
def test_tree_fan_out_relays_and_status(site: Site) -> None:
    change_tree(site.view, "one")
    site.start_origin(fanout=2)
    for name in ("n1", "n2", "n3", "n4"):
        site.start_replica(name, fanout=2, listen=True)
    # The login node takes two followers; the others are redirected below them.
    for name in ("n1", "n2", "n3", "n4"):
        site.sync_to(name)
    change_tree(site.view, "two")
    for name in ("n1", "n2", "n3", "n4"):
        site.sync_to(name)
        assert converged(site, name), name
    status = site.control("login", {"op": "status"})
    followers = status["origin"][USER]["followers"]  # type: ignore[index]
    direct = [n for n, f in followers.items() if f["direct"]]
    assert len(direct) <= 2, followers
    deadline = time.monotonic() + 10
    while set(followers) != {"n1", "n2", "n3", "n4"} and time.monotonic() < deadline:
        time.sleep(0.2)
        followers = site.control("login", {"op": "status"})["origin"][USER]["followers"]  # type: ignore[index]
    assert set(followers) == {"n1", "n2", "n3", "n4"}, json.dumps(followers)


@requires_fuse
def test_trimmed_history_and_a_relay_without_it_resync_by_verified_snapshots(site: Site) -> None:
    site.start("login", "--origin", str(site.root), "--listen", f"127.0.0.1:{site.port}",
               "--fanout", "1", "--trim-interval", "0.3")
    site.start_replica("n1", listen=True)
    change_tree(site.view, "one")
    for i in range(3):  # several 16 KiB journal segments' worth of records
        with open(site.view / f"blob{i}", "wb") as f:
            for _ in range(100):
                f.write(os.urandom(1 << 20))
                f.flush()
    site.sync_to("n1")
    journal = site.state / "journal"
    deadline = time.monotonic() + 20
    while "seg-0000000000000001.log" in os.listdir(journal):
        assert time.monotonic() < deadline, os.listdir(journal)
        time.sleep(0.1)

    # n1 restarts with an empty relay buffer; n2 is redirected to it (fan-out 1) and
    # needs everything: n1 sends a snapshot of its own copy.
    site.kill("n1")
    site.start_replica("n1", listen=True)
    site.sync_to("n1")
    site.start_replica("n2")
    site.sync_to("n2")
    assert converged(site, "n2")
    assert "sent a snapshot" in site.log("n1")

    # n3 asks the origin itself for seq 1, which was trimmed: a snapshot of the live upper.
    site.kill("n1")
    site.kill("n2")
    site.start_replica("n3")
    change_tree(site.view, "two")
    site.sync_to("n3")
    assert converged(site, "n3")
    assert "sent a snapshot" in site.log("login")


def test_replication_config_names_the_bad_key_and_substitutes_the_node() -> None:
    from sdeefs.errors import QuietError
    from sdeefs_launcher.config import parse

    config = parse({"replication": {"login": "login1:7077", "replica_dir": "/local/%n/rep",
                                    "control": "/run/%n.sock", "barrier_timeout": 5}})
    on = config.replication.on("n7")
    assert (on.login, on.replica_dir, on.control, on.barrier_timeout) == \
        ("login1:7077", "/local/n7/rep", "/run/n7.sock", 5.0)
    for table, key in (({"login": "no-port"}, "replication.login"),
                       ({"replica_dir": "relative"}, "replication.replica_dir"),
                       ({"barrier_timeout": 0}, "replication.barrier_timeout"),
                       ({"fanout": 3}, "replication.fanout")):
        with pytest.raises(QuietError, match=key):
            parse({"replication": table})


def test_replicad_refuses_a_readable_or_short_key(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("x" * 64)
    os.chmod(key, 0o644)
    result = subprocess.run([REPLICAD, "--key-file", str(key), "--origin", str(tmp_path)],
                            capture_output=True, text=True, env={**os.environ,
                                                                 "SDEEFS_CONFIG": ""})
    assert result.returncode == 2
    assert "chmod 600" in result.stderr
    assert "Traceback" not in result.stderr
    os.chmod(key, 0o600)
    key.write_text("short")
    result = subprocess.run([REPLICAD, "--key-file", str(key), "--origin", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "shorter than 32 bytes" in result.stderr


@requires_fuse
def test_a_replica_ahead_of_the_login_journal_starts_over(site: Site) -> None:
    """The login node lost its journal's unsynced tail in a crash; a replica had applied it:
    it holds history the login node no longer has, and must be rebuilt, not resumed."""
    from sdeefs.replicate import Replica

    change_tree(site.view, "one")
    site.start_origin()
    site.start_replica("n1")
    site.sync_to("n1")
    site.kill("n1")
    replica = Replica.open(str(site.tmp / "n1" / USER))
    replica.applied += 50  # records the login node no longer has
    replica._write_position()
    replica.close()
    site.start_replica("n1")
    site.sync_to("n1")
    assert converged(site, "n1")
    assert "starting over" in site.log("n1")


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


@requires_fuse
def test_a_replica_of_the_old_wire_version_is_told_why_in_its_own_version(site: Site) -> None:
    """Version 3 frames carry records with u32 path lengths.  A version-2 replica (u16)
    must get one error it can read, never records it would misparse."""
    site.start_origin()
    key = load_key(str(site.key))
    hello = encode_hello(Hello(b"n" * NONCE_SIZE, NO_ID, USER, "old-node", 1))
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as sock:
        sock.sendall(encode_frame(hello, key, version=2))
        header = _receive_exactly(sock, FRAME_HEADER.size)
        magic, version, ftype, _, length, _, crc = FRAME_HEADER.unpack(header)
        payload = _receive_exactly(sock, length)
        mac = _receive_exactly(sock, MAC_SIZE)
        assert sock.recv(1) == b""  # and the connection ends
    # what a version-2 replica checks: its own version, the CRC and the MAC (shared key)
    assert (magic, version, ftype) == (b"SDRP", 2, ERROR)
    assert zlib.crc32(payload, zlib.crc32(header[:-4] + b"\0\0\0\0")) == crc
    assert hmac.compare_digest(hmac.new(key, header + payload, hashlib.sha256).digest(), mac)
    message = payload.decode()
    assert "version 2" in message
    assert "same sdeefs release" in message
    assert site.log("login").count("replication protocol version 2") == 1
