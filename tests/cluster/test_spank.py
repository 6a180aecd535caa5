"""Jobs run in the user's environment with no wrapper: the SPANK plugin (launcher/enter/spank.c).

A real 2-node cluster whose plugstack is what ``sdeefs install-slurm`` writes, the prolog and
epilog of docs/admin.md, replicas on the nodes; the user logs in, installs a program, and
types ``sbatch``/``srun``/``salloc`` inside the environment with no sdeefs in the scripts.
Each task checks where it runs: the program installed at login, the file the user changed,
``id -u`` (inside u: the user's own uid), ``/proc/self`` and ``ps``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..launcher.launcher_site import SHELL, VENV_BIN, requires_launcher
from .slurm_cluster import ClusterError, requires_slurm
from .test_slurm_jobs import Grid, install_software, open_grid

pytestmark = [requires_slurm, requires_launcher]

# Where a task runs: its node, uid, the file the user changed at login, the program installed
# at login, whether /proc/self names it (it dangles for a process outside the PID namespace
# /proc belongs to) and what ps says the shell is.
WHERE = ('"$(hostname) $(id -u) $(cat /etc/sdeefs-demo 2>/dev/null || echo bare) '
         '$(greet 2>/dev/null || echo no-greet) $(test -e /proc/self/exe && echo procself) '
         '$(ps -o comm= -p $$)"')
# no_new_privs and no capabilities in the environment (bare: whatever SLURM gives)
PRIVS = "$(grep -E '^(NoNewPrivs|CapEff|CapBnd)' /proc/self/status | tr -s '\t\n' '  ')"

BATCH = f"""#!/bin/sh
#SBATCH -N2
echo batch {WHERE}
pwd
echo spool $(ls "$(dirname "$(dirname "$0")")")
srun -N2 sh -c 'echo step {WHERE}'
srun -N1 sh -c "echo privs {PRIVS}"
srun -N2 greet
echo "0 greet" > multi.conf
srun -N1 -n1 --multi-prog multi.conf
srun -N2 --sdeefs=off sh -c 'echo off {WHERE}'
srun -N1 --sdeefs=off {VENV_BIN / "sdeefs-run"} -- sh -c 'echo explicit {WHERE}'
cat /etc/sdeefs-late-secret 2>&1 | sed 's/^/secret: /'
"""


@pytest.fixture
def grid() -> Iterator[Grid]:
    # use_interactive_step: salloc's shell is a step on the first node (SLURM's interactive
    # step), as sites configure it for salloc to land on a compute node
    with open_grid(2, spank=True, extra_conf="LaunchParameters=use_interactive_step") as g:
        yield g


def inside(g: Grid, command: str, user: str | None = None, timeout: float = 120,
           stdin: str | None = None) -> str:
    """sdeefs-shell -c COMMAND on the login node (the hub), as the user types it."""
    user = user or g.user
    home = g.site.home(user)
    out = g.slurm.run([str(SHELL), "-c", command], user=user, cwd=home, timeout=timeout,
                      env={"SDEEFS_RUN_DIR": str(g.site.run_dir), "HOME": str(home),
                           "SDEEFS_CONFIG": str(g.site.config),
                           # as a login sets it: salloc's interactive step runs $SHELL
                           "SHELL": "/bin/sh"}, input=stdin)
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
    # slurmd's spool is hidden inside (deny list): only this job's directory, brought in
    assert lines(text, "spool") == [f"job{int(job):05d}"], text
    assert lines(text, "step") == [f"n{i} {uid} v1 hello from libgreet procself sh"
                                   for i in (1, 2)], text
    # srun greet on both nodes, and --multi-prog's bare name (slurmstepd looks it up on the
    # host and does not find it; the plugin finds it in the environment's PATH)
    assert text.splitlines().count("hello from libgreet") == 3, text
    assert lines(text, "privs") == ["CapEff: 0000000000000000 CapBnd: 0000000000000000 "
                                    "NoNewPrivs: 1"], text
    assert lines(text, "off") == [f"n{i} {uid} bare no-greet procself sh" for i in (1, 2)], text
    # sdeefs-run in a step left bare joins (the batch script's SDEEFS_JOB_ENV, passed on by
    # srun, is not the step's: with it, sdeefs-run ran its command bare)
    assert lines(text, "explicit") == ["n1 0 v1 hello from libgreet procself sh"], text
    assert "host secret" not in text
    assert lines(text, "secret:")[0].endswith("Permission denied"), text

    # --sdeefs=off for the whole job: the batch script and its steps run bare
    job = inside(g, f"sbatch --parsable --sdeefs=off -N2 -o {home}/off.out {home}/job.sh").strip()
    text = wait_output(g, job, home / "off.out")
    assert lines(text, "batch") == [f"n1 {uid} bare no-greet procself slurm_script"], text
    assert lines(text, "step") == [f"n{i} {uid} bare no-greet procself sh" for i in (1, 2)], text


MPI_HELLO = r"""
#include <mpi.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    int rank, size;
    char host[64], demo[64] = "bare";
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host);
    FILE *f = fopen("/etc/sdeefs-demo", "r");
    if (f) { if (fscanf(f, "%63s", demo) != 1) demo[0] = 0; fclose(f); }
    int sum = 0;
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    printf("rank %d of %d on %s %s sum %d\n", rank, size, host, demo, sum);
    MPI_Finalize();
    return 0;
}
"""


def test_interactive_steps_salloc_and_mpi_ranks_run_in_the_environment(grid: Grid) -> None:
    g = grid
    g.site.start(g.user)
    uid, home = g.site.uid(g.user), g.site.home(g.user)
    (home / "hello.c").write_text(MPI_HELLO)
    # MPI built at login, into the user's environment only (the host has no mpi-hello)
    g.site.run(g.user, f"echo v1 > /etc/sdeefs-demo && "
               f"mpicc.mpich -o /usr/local/bin/mpi-hello {home}/hello.c")
    assert not Path("/usr/local/bin/mpi-hello").exists()

    # srun --pty, typed at a terminal (script(1) gives srun the pty a terminal would)
    (home / "pty.sh").write_text('test -t 0 && echo "pty $(hostname) $(cat /etc/sdeefs-demo) '
                                 '$(id -u)"\n')
    out = inside(g, f"script -qec 'srun -N1 -w n2 --pty sh {home}/pty.sh' /dev/null")
    assert f"pty n2 v1 {uid}" in out, out
    # salloc: its command runs here (in the login environment), its steps on the nodes
    out = inside(g, "salloc -N2 srun -N2 sh -c 'echo alloc $(hostname) $(cat /etc/sdeefs-demo)'")
    assert lines(out, "alloc") == ["n1 v1", "n2 v1"], out
    # salloc's interactive shell (the interactive step), at a terminal: on n1, inside
    out = inside(g, "script -qec 'salloc -N1 -w n1' /dev/null",
                 stdin='echo "istep $(hostname) $(cat /etc/sdeefs-demo) $(id -u)"; exit\n')
    assert f"istep n1 v1 {uid}" in out, out
    # MPI ranks started by srun (Debian's MPICH over UCX; PMI-2 of SLURM's mpi/pmi2 plugin).
    # Two ranks on one node: UCX's shared memory between them (they share the node's
    # environment).
    out = inside(g, "srun -n2 -N1 --mpi=pmi2 mpi-hello")
    ranks = sorted(line for line in out.splitlines() if line.startswith("rank "))
    assert [line.split()[:5] + line.split()[6:] for line in ranks] == \
        [["rank", str(r), "of", "2", "on", "v1", "sum", "1"] for r in (0, 1)], out
    # One rank on each node.  These two "nodes" share one kernel (and boot id), so UCX takes
    # them for one host and maps the other node's ranks' memory through /proc/PID/fd,
    # which the kernel refuses between two jobs' user namespaces (as it should); on real
    # nodes it never tries.  TCP between the nodes, as between real ones.  (With two ranks
    # on each node, now and then one rank spun forever in UCX's MPI_Finalize over TCP while
    # the others waited in PMI: also on main before this session's changes, 1 run in 9;
    # Debian's MPICH/UCX on simulated nodes, not the environment: the ranks had all
    # computed and printed their result.)  The same spin was seen once with one rank on each
    # node under load (both ranks had printed "sum 1"): then the step is cancelled and run once
    # more; a second hang, or a rank that did not print its result, fails the test.
    for attempt in (1, 2):
        try:
            out = inside(g, "UCX_TLS=tcp,self srun -n2 -N2 --mpi=pmi2 mpi-hello")
            break
        except ClusterError as exc:
            if attempt == 2 or str(exc).count(" v1 sum 1") < 2:
                raise
            g.slurm.cancel_jobs()
    ranks = sorted(line for line in out.splitlines() if line.startswith("rank "))
    assert len(ranks) == 2, out
    for rank, line in enumerate(ranks):
        assert line.startswith(f"rank {rank} of 2 on n"), out
        assert line.endswith(" v1 sum 1"), out
    assert {line.split()[5] for line in ranks} == {"n1", "n2"}, out


def test_a_user_without_an_environment_runs_bare_and_a_users_problem_fails_only_the_job(
        grid: Grid) -> None:
    from .test_slurm_nowedge import append_refused_record

    g = grid
    # Never logged in with sdeefs: the job runs as usual, bare.
    other = g.site.add_user()
    home = g.site.home(other)
    job = g.slurm.sbatch(f"#!/bin/sh\nsrun -N2 sh -c 'echo plain {WHERE}'\n",
                         ["-N2", "-o", str(home / "plain.out")], user=other, cwd=home)
    text = wait_output(g, str(job), home / "plain.out")
    assert lines(text, "plain") == [f"n{i} {g.site.uid(other)} bare no-greet procself sh"
                                    for i in (1, 2)], text
    assert "sdeefs" not in text

    # A record no replica may apply: the user's job fails with one line a task, the nodes
    # stay in service (the crafted record of test_slurm_nowedge).
    g.site.start(g.user)
    g.site.run(g.user, "echo before > /etc/sdeefs-demo")
    bad = append_refused_record(g)
    g.site.start(g.user)
    home = g.site.home(g.user)
    (home / "fails.sh").write_text("#!/bin/sh\necho never printed\n")
    failing = inside(g, f"sbatch --parsable -N2 -o {home}/fails.out {home}/fails.sh").strip()
    state = g.slurm.wait_job(int(failing), timeout=120)
    text = (home / "fails.out").read_text() if (home / "fails.out").exists() else ""
    assert state == "FAILED", (state, text, g.hook_logs())
    assert len(text.splitlines()) == 1, text  # one line, from the batch script's task
    assert text.startswith(f"sdeefs: job {failing} on n1: "), text
    assert f"record {bad} was skipped" in text, text
    states = g.slurm.node_states()
    assert all(states.get(f"n{i}") in ("idle", "allocated", "mixed", "completing")
               for i in (1, 2)), states
