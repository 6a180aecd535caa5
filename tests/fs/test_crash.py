"""``kill -9`` of the daemon in the middle of a write storm: nothing acknowledged is lost,
and after the next mount the upper and the journal agree (replaying the journal rebuilds it)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdeefs.check import run_checks
from sdeefs.fs.daemon import daemon_pid

from ..conftest import Layers, mounted, requires_fuse

pytestmark = requires_fuse

# The storm: many small mutations of every kind, and after each fsync'd file a line
# "durable NAME SIZE" on stdout, which the test holds the filesystem to after the crash.
STORM = r"""
import errno, os, sys, random, time
root = sys.argv[1]
rng = random.Random(int(sys.argv[2]))
i = 0
try:
    while True:
        i += 1
        d = os.path.join(root, "d%d" % (i % 7))
        os.makedirs(d, exist_ok=True)
        name = os.path.join(d, "f%d" % i)
        op = rng.randrange(8)
        if op == 0:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644)
            data = bytes([i % 251]) * rng.randrange(1, 200000)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            print("durable", name, len(data), flush=True)
        elif op == 1:
            with open(os.path.join(root, "lower-file-%d" % (i % 5)), "ab") as f:
                f.write(b"appended %d\n" % i)
        elif op == 2:
            victims = os.listdir(d)
            if victims:
                os.unlink(os.path.join(d, rng.choice(victims)))
        elif op == 3:
            src = os.path.join(d, "r%d" % i)
            with open(src, "wb") as f:
                f.write(b"r" * 100)
            other = os.path.join(root, "d%d" % ((i + 1) % 7))
            os.makedirs(other, exist_ok=True)
            os.rename(src, os.path.join(other, "moved%d" % i))
        elif op == 4:
            os.chmod(os.path.join(root, "lower-file-%d" % (i % 5)), 0o600 + (i % 2) * 0o44)
        elif op == 5:
            os.setxattr(os.path.join(root, "lower-file-%d" % (i % 5)), "user.n", b"%d" % i)
        elif op == 6:
            try:
                os.unlink(os.path.join(root, "lower-gone-%d" % (i % 5)))
            except FileNotFoundError:
                pass
        else:
            os.symlink("target%d" % i, os.path.join(d, "l%d" % i))
except OSError as exc:
    # How "the daemon is gone" shows: ENOTCONN/ECONNABORTED from FUSE, EIO from a flush,
    # ESTALE from kernel overlayfs (the FUSE upper's dentries fail to revalidate).
    if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ESTALE):
        raise  # anything else is a bug the test must see
    print("stopped", exc.errno, time.monotonic(), flush=True)
"""


def populate(lower: Path) -> None:
    for n in range(5):
        (lower / f"lower-file-{n}").write_bytes(b"lower %d\n" % n * 1000)
        (lower / f"lower-gone-{n}").write_text("will be deleted\n")


def kill_daemon_during_storm(layers: Layers, engine: str, seed: int, delay: float) -> list[str]:
    mnt = layers.mount(engine)
    storm = subprocess.Popen([sys.executable, "-c", STORM, str(mnt), str(seed)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = ""
    try:
        # The delay counts from the storm's first fsync'd file, not from its start: on a
        # loaded machine Python alone may take longer than the delay to get going.
        assert storm.stdout is not None
        if select.select([storm.stdout], [], [], 60)[0]:
            first = storm.stdout.readline()
        time.sleep(delay)
        pid = daemon_pid(str(layers.state))
        assert pid is not None
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        out, err = storm.communicate(timeout=60)
    finally:
        if storm.poll() is None:
            storm.kill()
            storm.wait()
    deadline = time.monotonic() + 10
    while daemon_pid(str(layers.state)) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    for path in (mnt, layers.state / "mnt"):
        if mounted(path):
            subprocess.run(["umount", "-l", str(path)], check=True)
    lines = first.splitlines() + out.splitlines()
    assert lines, f"the storm failed at once: {err.strip()[-600:]}"
    assert lines[-1].startswith("stopped"), f"the storm failed: {err.strip()[-600:]}"
    stopped_at = float(lines[-1].split()[2])
    assert stopped_at >= killed_at, f"the storm hit {lines[-1]} before the daemon was killed"
    return lines


@pytest.mark.parametrize(("engine", "seed", "delay"), [
    ("fuse", 1, 0.4), ("fuse", 2, 1.1), ("fuse", 3, 2.0), ("hybrid", 4, 0.7), ("hybrid", 5, 1.6),
])
def test_kill_9_during_write_storm(layers: Layers, engine: str, seed: int, delay: float) -> None:
    populate(layers.lower)
    lines = kill_daemon_during_storm(layers, engine, seed, delay)
    durable = [line.split() for line in lines if line.startswith("durable")]
    assert durable, "the storm did not get going before the kill"

    mnt = layers.mount(engine)  # recovery runs here
    for _, name, size in durable:
        path = Path(name)
        rel = path.relative_to(layers.mnt)
        if (mnt / rel).exists():  # the storm may have deleted it again later
            assert (mnt / rel).stat().st_size == int(size)
    layers.umount()
    assert run_checks(str(layers.upper), str(layers.state)) == []
