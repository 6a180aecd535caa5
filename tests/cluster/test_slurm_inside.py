"""SLURM clients typed inside a login environment, with no flags (docs/identity.md).

A real 2-node cluster (tests/cluster/slurm_cluster.py; no prolog: the job runs bare on the
nodes, running it inside the environment there is issue 12), munge's socket directory
bound into the environment by ``[sdeefs] sockets``, and the C helper's shims at the
clients' paths: inside root submits, the job belongs to the user's own uid.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path

from ..launcher.launcher_site import SHELL, open_site, requires_launcher
from .slurm_cluster import cluster, requires_slurm

pytestmark = [requires_slurm, requires_launcher]


def test_sbatch_srun_squeue_scancel_from_inside_run_as_the_user() -> None:
    base = Path(tempfile.mkdtemp(prefix="sdeefs-slurm-inside-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    try:
        with cluster(str(base / "cluster"), nodes=2) as slurm, \
                open_site(extra=f'sockets = ["{base}/cluster/munge"]\n') as site:
            user = site.add_user()
            uid, home = site.uid(user), site.home(user)
            gid = pwd.getpwnam(user).pw_gid
            site.start(user)

            def inside(command: str, timeout: float = 90) -> str:
                """sdeefs-shell -c COMMAND, as the user logs in on the login node (the hub)."""
                return slurm.run([str(SHELL), "-c", command], user=user, cwd=home,
                                 env={"SDEEFS_RUN_DIR": str(site.run_dir), "HOME": str(home)},
                                 timeout=timeout).stdout

            assert inside("id -u").strip() == "0"  # root inside, as the user knows it
            # srun: a step on both nodes, as the user's own uid, its output streamed back
            out = inside("srun -N2 sh -c 'echo $(hostname) $(id -u)'")
            assert sorted(out.split("\n")[:2]) == [f"n1 {uid}", f"n2 {uid}"], out
            # salloc: its command runs here, in the environment, as the user; its steps on a node
            out = inside("salloc -N1 sh -c 'id -u; test -e /run/sdeefs/slurm/srun && "
                         "echo inside; srun id -u'")
            assert out.split()[-3:] == [str(uid), "inside", str(uid)], out
            # sbatch: the job is the user's; squeue and scontrol see it, scancel ends it
            job = inside(f"sbatch --parsable -o {home}/long.out --wrap 'sleep 300'").strip()
            assert job.isdigit(), job
            listed = inside("squeue -h -o '%i %u'")
            assert f"{job} {user}" in listed, listed
            shown = inside(f"scontrol show job {job}")
            assert f"UserId={user}({uid})" in shown, shown
            inside(f"scancel {job}")
            state = slurm.wait_job(int(job), timeout=60)
            assert state == "CANCELLED", state
            job = inside(f"sbatch --parsable -o {home}/job.out --wrap 'id -u; echo $USER'").strip()
            assert slurm.wait_job(int(job), timeout=60) == "COMPLETED"
            deadline = time.monotonic() + 10
            while not (home / "job.out").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert (home / "job.out").read_text().split() == [str(uid), user]
            assert (home / "job.out").stat().st_uid == uid
            # a client run as the user already (a job, salloc's shell) runs unchanged
            job = inside(f"setpriv --reuid={uid} --regid={gid} --init-groups "
                         f"sbatch --parsable -o {home}/as-user.out --wrap 'id -u'").strip()
            assert slurm.wait_job(int(job), timeout=60) == "COMPLETED"
    finally:
        shutil.rmtree(base, ignore_errors=True)
