"""Jobs run in the user's environment with no wrapper: the SPANK plugin (launcher/enter/spank.c).

A real 2-node cluster whose plugstack is what ``sdeefs install-slurm`` writes, the prolog and
epilog of docs/admin.md, replicas on the nodes; the user logs in, installs a program, and
types ``sbatch``/``srun``/``salloc`` inside the environment with no sdeefs in the scripts.
Each task checks where it runs: the program installed at login, the file the user changed,
``id -u`` (inside u: the user's own uid), ``/proc/self`` and ``ps``.
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
from .test_slurm_jobs import Grid, install_software, open_grid

pytestmark = [requires_slurm, requires_launcher]

# Where a task runs: its node, uid, the file the user changed at login, the program installed
# at login, whether /proc/self names it (it dangles for a process outside the PID namespace
# /proc belongs to) and what ps says the shell is.
WHERE = ('"$(hostname) $(id -u) $(cat /etc/sdeefs-demo 2>/dev/null || echo bare) '
         '$(greet 2>/dev/null || echo no-greet) $(test -e /proc/self/exe && echo procself) '
         '$(ps -o comm= -p $$)"')

BATCH = f"""#!/bin/sh
#SBATCH -N2
echo batch {WHERE}
pwd
srun -N2 sh -c 'echo step {WHERE}'
srun -N2 greet
srun -N2 --sdeefs=off sh -c 'echo off {WHERE}'
cat /etc/sdeefs-late-secret 2>&1 | sed 's/^/secret: /'
"""


@pytest.fixture
def grid() -> Iterator[Grid]:
    with open_grid(2, spank=True) as g:
        try:
            yield g
        finally:  # the login environments name the cluster's munge directory: end them first
            for user in g.site.users:
                subprocess.run([str(SHELL.parent / "sdeefs"), "stop", user],
                               env=g.site.env(), capture_output=True)


def inside(g: Grid, command: str, user: str | None = None, timeout: float = 120) -> str:
    """sdeefs-shell -c COMMAND on the login node (the hub), as the user types it."""
    user = user or g.user
    home = g.site.home(user)
    out = g.slurm.run([str(SHELL), "-c", command], user=user, cwd=home, timeout=timeout,
                      env={"SDEEFS_RUN_DIR": str(g.site.run_dir), "HOME": str(home),
                           "SDEEFS_CONFIG": str(g.site.config)})
    return out.stdout


def wait_output(g: Grid, job: str, path: Path) -> str:
    state = g.slurm.wait_job(int(job), timeout=120)
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = path.read_text() if path.exists() else ""
    assert state == "COMPLETED", (state, text, g.hook_logs())
    return text


def lines(text: str, tag: str) -> list[str]:
    return sorted(" ".join(line.split()[1:]) for line in text.splitlines()
                  if line.startswith(tag + " "))


def test_every_task_of_an_ordinary_job_runs_in_the_environment(grid: Grid) -> None:
    g = grid
    g.site.start(g.user)
    install_software(g)
    g.site.run(g.user, "echo v1 > /etc/sdeefs-demo")
    uid = g.site.uid(g.user)
    home = g.site.home(g.user)
    # A first job: the private scan runs at its prolog on each node (and is kept 24 h).
    assert inside(g, "srun -N2 cat /etc/sdeefs-demo").split() == ["v1", "v1"]
    # A root-only file made on the nodes after that: invisible to the next jobs.
    secret = Path("/etc/sdeefs-late-secret")
    secret.write_text("host secret\n")
    os.chmod(secret, 0o600)
    try:
        (home / "job.sh").write_text(BATCH)
        job = inside(g, f"cd {home} && sbatch --parsable -o {home}/job.out job.sh").strip()
        text = wait_output(g, job, home / "job.out")
    finally:
        secret.unlink()
    assert lines(text, "batch") == [f"n1 {uid} v1 hello from libgreet procself slurm_script"], \
        text
    assert f"\n{home}\n" in f"\n{text}", text  # cwd: the directory sbatch ran in
    assert lines(text, "step") == [f"n{i} {uid} v1 hello from libgreet procself sh"
                                   for i in (1, 2)], text
    assert text.count("hello from libgreet\n") >= 2, text
    assert lines(text, "off") == [f"n{i} {uid} bare no-greet procself sh" for i in (1, 2)], text
    assert "host secret" not in text
    assert lines(text, "secret:")[0].endswith("Permission denied"), text
