"""The fuse engine's daemon keeps memory bounded by --node-limit, not by the tree walked."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sdeefs.fs.daemon import daemon_pid

from ..conftest import Layers, requires_fuse, sdeefs

pytestmark = requires_fuse

DIRS, FILES = 200, 200  # 40,000 lower files: ~60 MB of nodes and name caches if all kept


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def walk_count(top: Path) -> int:
    out = subprocess.run(["find", str(top)], capture_output=True, check=True).stdout
    return out.count(b"\n")


def test_a_walk_over_a_big_tree_stays_within_the_node_limit(layers: Layers) -> None:
    for d in range(DIRS):
        sub = layers.lower / "tree" / f"d{d:03}"
        sub.mkdir(parents=True)
        for f in range(FILES):
            (sub / f"f{f:03}").write_bytes(b"x")
    mnt = layers.mount("fuse", "--node-limit", "1000")
    pid = daemon_pid(str(layers.state))
    assert pid is not None
    # held across the walk: an open file and a directory in use are never handed back
    kept = os.open(mnt / "tree" / "d000" / "f000", os.O_RDONLY)
    cwd = os.open(mnt / "tree" / "d001", os.O_RDONLY | os.O_DIRECTORY)
    try:
        walk_count(mnt / "tree" / "d199")  # warm: the daemon's own working set
        before = rss_mib(pid)
        expected = 1 + DIRS * (FILES + 1)
        assert walk_count(mnt / "tree") == expected
        assert walk_count(mnt / "tree") == expected  # what was handed back is found again
        grown = rss_mib(pid) - before
        # unbounded, the daemon grew by ~60 MiB here (a node and a cached stat per entry);
        # bounded, 10-21 MiB (allocator and interpreter noise on top of 1,000 nodes)
        assert grown < 30, f"the daemon grew by {grown:.1f} MiB walking {expected} entries"
        assert os.pread(kept, 1, 0) == b"x"
        assert os.fstat(kept).st_size == 1
        assert sorted(os.listdir(cwd))[:2] == ["f000", "f001"]
        (mnt / "tree" / "d002" / "new").write_text("after the walk\n")
    finally:
        os.close(kept)
        os.close(cwd)
    layers.umount()
    assert (layers.upper / "tree" / "d002" / "new").read_text() == "after the walk\n"
    assert sdeefs("check", "--upper", str(layers.upper), "--state", str(layers.state)
                  ).returncode == 0


def test_a_node_limit_below_the_minimum_is_one_line(layers: Layers) -> None:
    result = sdeefs("mount", "--engine", "fuse", "--lower", str(layers.lower), "--upper",
                    str(layers.upper), "--state", str(layers.state), "--node-limit", "10",
                    str(layers.mnt), check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "sdeefs: cannot mount: --node-limit must be at least 1000"
