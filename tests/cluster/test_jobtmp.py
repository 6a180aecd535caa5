"""A job's /tmp: a plain directory of its own on the node's disk, gone after the job.

A real 1-node cluster (the SPANK plugin, the prolog and epilog of docs/admin.md) whose node
keeps its state on a block filesystem (ext4 on a loop device, ``open_grid(node_fs=...)``),
as a compute node's local disk.  Users log in and type plain ``sbatch`` inside their
environment; nothing in the scripts names sdeefs.  What a job writes to /tmp lands in
``JOB_DIR/JOBID/tmp`` on the node's filesystem (not in memory, not through the overlay:
launcher/compute/job.py), another job of the same user and a job of another user running
beside it on the same node see nothing of it, and the epilog leaves nothing of it on the
node, without following the symlinks the job planted there.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..launcher.launcher_site import SHELL, requires_launcher
from .slurm_cluster import requires_slurm
from .test_slurm_jobs import Grid, open_grid
from .test_spank import inside, wait_output

pytestmark = [requires_slurm, requires_launcher]

LOOK = """#!/bin/sh
echo tmp $(ls -A /tmp | tr '\\n' ' ')
cat /tmp/secret 2>/dev/null || echo no-secret
"""


@pytest.fixture
def grid() -> Iterator[Grid]:
    with open_grid(1, spank=True, node_fs="ext4") as g:
        try:
            yield g
        finally:
            for user in g.site.users:
                subprocess.run([str(SHELL.parent / "sdeefs"), "stop", user],
                               env=g.site.env(), capture_output=True)


def wait_for(path: Path, what: str, g: Grid, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{what}\n{g.hook_logs()}"
        time.sleep(0.1)


def test_a_jobs_tmp_is_its_own_on_the_nodes_disk_and_nothing_of_it_stays(grid: Grid) -> None:
    g = grid
    other = g.site.add_user()
    for user in (g.user, other):
        g.site.start(user)
    home = g.site.home(g.user)
    victim = g.base / "victim"  # a host directory the job points symlinks at
    victim.mkdir()
    (victim / "keep").write_text("host file\n")
    (home / "a.sh").write_text(f"""#!/bin/sh
echo fs $(stat -f -c %T /tmp) $(stat -c '%a %u' /tmp)
echo job-secret > /tmp/secret
mkdir /tmp/d && echo x > /tmp/d/f
ln -s {victim} /tmp/link
ln -s {victim}/keep /tmp/d/link
touch {home}/a-ready
i=0; while [ ! -e {home}/a-go ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
echo tmp $(ls -A /tmp | tr '\\n' ' ')
""")
    job = inside(g, f"sbatch --parsable -o {home}/a.out {home}/a.sh").strip()
    wait_for(home / "a-ready", "job A did not start", g)
    # On the node, while the job runs: its /tmp is the job's own directory on the node's disk
    tmp = g.base / "n1" / "jobs" / job / "tmp"
    assert (tmp / "secret").read_text() == "job-secret\n"
    assert os.stat(tmp / "secret").st_uid == g.site.uid(g.user)
    assert (os.stat(tmp).st_mode & 0o7777, os.stat(tmp.parent).st_mode & 0o777) == \
        (0o1777, 0o700)  # reachable by root only on the host
    # Beside it on the same node: another job of the user (it gets the spare environment
    # the replicad made after A started), and a job of another user
    (home / "b.sh").write_text(LOOK)
    b = inside(g, f"sbatch --parsable -o {home}/b.out {home}/b.sh").strip()
    other_home = g.site.home(other)
    (other_home / "c.sh").write_text(LOOK)
    c = inside(g, f"sbatch --parsable -o {other_home}/c.out {other_home}/c.sh",
               user=other).strip()
    for j, out in ((b, home / "b.out"), (c, other_home / "c.out")):
        assert wait_output(g, j, out).split() == ["tmp", "no-secret"]
    (home / "a-go").touch()
    text = wait_output(g, job, home / "a.out")
    assert text.splitlines()[0] == "fs ext2/ext3 1777 0", text  # not a tmpfs; inside root's
    assert text.splitlines()[-1].split() == ["tmp", "d", "link", "secret"], text
    # The epilog removed it (in the background) and followed no symlink of the job's
    jobs = g.base / "n1" / "jobs"
    deadline = time.monotonic() + 30
    while any(n == job or n.startswith(f".gone-{job}-") for n in os.listdir(jobs)):
        assert time.monotonic() < deadline, os.listdir(jobs)
        time.sleep(0.1)
    assert (victim / "keep").read_text() == "host file\n"
    node = g.base / "n1"  # the node's filesystem, not what spare environments mount on it
    left = []
    for d, dirs, files in os.walk(node):
        dirs[:] = [n for n in dirs if os.lstat(os.path.join(d, n)).st_dev == node.stat().st_dev]
        left += [os.path.join(d, n) for n in dirs + files if n == "secret"]
    assert left == [], left


def test_a_jobs_scratch_upper_is_volatile_and_a_logins_upper_is_not(grid: Grid) -> None:
    """A job's scratch upper (what it writes outside /tmp and the home: discarded at its
    end) is mounted volatile: never synced, a copy-up does not fsync the file it copied
    (bench/RESULTS.md, issue 15, branch jobwrite); the user's file the job writes into is
    copied up, written and fsynced as before, and the user's own file stays as it was.  A
    login's upper (journaled and kept) is not volatile.  Fails on the old code: no job's root
    was volatile."""
    g = grid
    g.site.start(g.user)
    home = g.site.home(g.user)
    inside(g, "mkdir -p /opt/mine && echo login > /opt/mine/f && chmod -R a+rwX /opt/mine")
    (home / "v.sh").write_text("""#!/bin/sh
echo root $(findmnt -no OPTIONS / | tr , '\\n' | grep -x fsync=volatile)
echo job >> /opt/mine/f && sync /opt/mine/f && echo file $(cat /opt/mine/f)
""")
    job = inside(g, f"sbatch --parsable -o {home}/v.out {home}/v.sh").strip()
    text = wait_output(g, job, home / "v.out")
    assert text.split("\n")[:2] == ["root fsync=volatile", "file login job"], text
    login = inside(g, "findmnt -no OPTIONS /; cat /opt/mine/f").split("\n")
    assert "fsync=volatile" not in login[0].split(","), login
    assert login[1] == "login", login
