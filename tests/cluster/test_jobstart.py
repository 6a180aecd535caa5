"""SLURM's Prolog and Epilog start no Python: a C client asks the node's resident replicad.

A real 2-node cluster with the SPANK plugin, the prolog and epilog of docs/admin.md
(``sdeefs-prolog``/``sdeefs-epilog``: launcher/enter/jobhook.c), a replicad on every node
(sdeefs.replication.daemon, ops ``job-start``/``job-end``).  The user types plain ``sbatch``
inside the environment; the node's replicad counts the jobs it started and ended.  With the
replicad killed, the epilog still ends the job's environment (the client runs ``sdeefs
job-epilog`` instead), and the prolog fails with one line in slurmd's log (the node's problem:
SLURM drains it, as docs/admin.md says).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from ..launcher.launcher_site import SHELL, VENV_BIN, requires_launcher
from .slurm_cluster import requires_slurm
from .test_slurm_jobs import Grid, open_grid

pytestmark = [requires_slurm, requires_launcher]

REPO = Path(__file__).resolve().parents[2]
IN_SERVICE = ("idle", "allocated", "mixed", "completing")


@pytest.fixture
def grid() -> Iterator[Grid]:
    with open_grid(2, spank=True) as g:
        yield g


def inside(g: Grid, command: str) -> str:
    """sdeefs-shell -c COMMAND on the login node, as the user types it."""
    home = g.site.home(g.user)
    return g.slurm.run([str(SHELL), "-c", command], user=g.user, cwd=home, timeout=120,
                       env={"SDEEFS_RUN_DIR": str(g.site.run_dir), "HOME": str(home),
                            "SDEEFS_CONFIG": str(g.site.config)}).stdout


def job_files(g: Grid, i: int) -> list[str]:
    """What JOB_DIR of node i holds (scratch uppers, run directories, problems)."""
    jobs = g.base / f"n{i}" / "jobs"
    return sorted(os.listdir(jobs)) if jobs.is_dir() else []


def alive(pid: int) -> bool:
    """Is ``pid`` a live process (a zombie is not: its parent reaps it when it will)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_spare_only(g: Grid, i: int) -> None:
    """Nothing of a finished job left in JOB_DIR: only the user's spare environment and the
    layers their jobs share."""
    spare = [f".layers-{g.user}", f".spare-{g.user}", f".spare-{g.user}.run"]
    deadline = time.monotonic() + 20  # the scratch upper goes in the background
    while job_files(g, i) != spare and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job_files(g, i) == spare, job_files(g, i)


def submit(g: Grid, name: str, script: str, *args: str) -> tuple[int, Path]:
    home = g.site.home(g.user)
    (home / f"{name}.sh").write_text(script)
    out = home / f"{name}.out"
    job = inside(g, f"sbatch --parsable {' '.join(args)} -o {out} {home}/{name}.sh").strip()
    return int(job), out


def test_slurm_runs_the_c_client_and_the_replicad_starts_and_ends_each_job(grid: Grid) -> None:
    g = grid
    for which in ("prolog", "epilog"):  # what slurmd runs: no interpreter
        assert (VENV_BIN / f"sdeefs-{which}").resolve().read_bytes()[:4] == b"\x7fELF"
    g.site.start(g.user)
    # /opt/scratch: made at login, anybody's to write in; what a job writes there lands in
    # the job's scratch upper
    g.site.run(g.user, "echo v1 > /etc/sdeefs-demo && mkdir -m 1777 /opt/scratch")
    uid = g.site.uid(g.user)
    for round_ in (1, 2):
        job, out = submit(g, f"job{round_}", "#!/bin/sh\nsrun -N2 sh -c 'echo task $(hostname) "
                          "$(cat /etc/sdeefs-demo) $(id -u) >> $HOME/tasks; "
                          "touch /opt/scratch/$SLURM_JOB_ID-$(hostname)'\nls /opt/scratch\n",
                          "-N2")
        state = g.slurm.wait_job(job, timeout=120)  # the epilog included
        assert state == "COMPLETED", (state, out.read_text() if out.exists() else "",
                                      g.hook_logs())
        # a job's scratch is its own: the second job on n1 sees nothing of the first
        assert out.read_text().split() == [f"{job}-n1"], out.read_text()
        for i in (1, 2):
            # the node's replicad did this job's prolog and epilog; the second job took the
            # spare environment started after the first one's start
            status = g.control(i, {"op": "status"})
            assert status["jobs"] == {"job-start": round_, "job-end": round_,
                                      "spare": round_ - 1}, status
            # the job's own directories are gone when the epilog returned (a new job of the
            # same id finds nothing); its scratch upper follows in the background
            assert not any(name in (str(job), f"{job}.run", f"{job}.problem")
                           for name in job_files(g, i)), job_files(g, i)
            wait_spare_only(g, i)
    tasks = (g.site.home(g.user) / "tasks").read_text().splitlines()
    assert sorted(tasks) == sorted([f"task n{i} v1 {uid}" for i in (1, 2)] * 2), tasks
    logs = g.hook_logs()
    assert "Traceback" not in logs, logs
    assert "job-prolog:" not in logs, logs  # no fallback to the Python prolog


def test_with_the_replicad_down_the_epilog_still_ends_the_job_and_the_prolog_says_why(
        grid: Grid) -> None:
    g = grid
    g.site.start(g.user)
    g.site.run(g.user, "echo v2 > /etc/sdeefs-demo")
    home = g.site.home(g.user)
    job, out = submit(g, "long", f"#!/bin/sh\ncat /etc/sdeefs-demo\n"
                      f"while [ ! -e {home}/go ]; do sleep 0.1; done\n", "-N1", "-w", "n1")
    init = g.base / "n1" / "jobs" / f"{job}.run" / "init"
    deadline = time.monotonic() + 60
    while not init.exists():
        assert time.monotonic() < deadline, g.hook_logs()
        time.sleep(0.1)
    pid = int(init.read_text().split()[0])
    spare = g.base / "n1" / "jobs" / f".spare-{g.user}.run"
    while not (spare / "spare-key").exists():  # the next job's, started ahead
        assert time.monotonic() < deadline, g.log(1)
        time.sleep(0.1)
    spare_pid = int((spare / "init").read_text().split()[0])
    g.kill_replicad(1)
    (home / "go").touch()
    state = g.slurm.wait_job(job, timeout=120)
    assert state == "COMPLETED", (state, out.read_text(), g.hook_logs())
    assert out.read_text() == "v2\n"
    # The epilog ran `sdeefs job-epilog` in its place: the environment ended, nothing left
    # (the scratch upper removed by a process of its own, as the replicad does it: the
    # epilog does not wait), the node in service.
    assert not alive(pid)
    assert str(job) not in job_files(g, 1)
    assert f"{job}.run" not in job_files(g, 1)
    wait_spare_only(g, 1)
    assert g.slurm.node_states().get("n1") in IN_SERVICE, g.slurm.node_states()

    # The prolog cannot serve a job without the replicad: the node's problem, one line.
    log = g.base / "prolog-n1.log"
    before = log.read_text() if log.exists() else ""
    job, out = submit(g, "never", "#!/bin/sh\necho ran\n", "-N1", "-w", "n1")
    deadline = time.monotonic() + 60
    while "drain" not in g.slurm.node_states().get("n1", ""):
        assert time.monotonic() < deadline, (g.slurm.node_states(), g.hook_logs())
        time.sleep(0.2)
    new = log.read_text()[len(before):].splitlines()
    assert len(new) == 1, new
    assert new[0].startswith("sdeefs job-prolog: sdeefs-replicad is not running"), new
    assert not out.exists()
    # The admin's fix (docs/admin.md): the replicad back, the node resumed; jobs run again.
    g.slurm.run(["scancel", str(job)], check=False)  # requeued, held: SLURM's own way
    g.start_replicad(1)  # it ends the spare it left
    assert not alive(spare_pid)
    g.slurm.run(["scontrol", "update", "nodename=n1", "state=resume"])
    job, out = submit(g, "again", "#!/bin/sh\ncat /etc/sdeefs-demo\n", "-N1", "-w", "n1")
    state = g.slurm.wait_job(job, timeout=120)
    assert state == "COMPLETED", (state, g.hook_logs())
    assert out.read_text() == "v2\n"
    wait_spare_only(g, 1)


def masks(g: Grid, i: int) -> dict[str, int]:
    """The masks of the user's shared layers on node i: name -> device of its tmpfs."""
    layers = g.base / f"n{i}" / "jobs" / f".layers-{g.user}"
    return {p.name: p.stat().st_dev for p in sorted(layers.glob("mask-*"))
            if p.is_dir() and os.path.ismount(p)}


def wait_spare(g: Grid, i: int) -> None:
    """The jobs ended on node i, the next one's spare environment made."""
    jobs = g.base / f"n{i}" / "jobs"
    deadline = time.monotonic() + 20
    while not ((jobs / f".spare-{g.user}.run" / "spare-key").exists() and
               not any(n[:1].isdigit() or n.startswith(".gone-") for n in job_files(g, i))):
        assert time.monotonic() < deadline, job_files(g, i)
        time.sleep(0.1)


def test_a_users_jobs_share_one_mask_and_a_file_the_deny_list_matches_since_is_hidden(
        grid: Grid) -> None:
    """The mask (thousands of whiteouts: every root-only host entry) is made once per user
    and node, not per job; a file the deny list matches made between two jobs is hidden
    from the second all the same (it makes a new mask, and the spare made before it is not
    used)."""
    g = grid
    g.site.start(g.user)
    denied = g.base / "denied-1"  # the grid's deny list has BASE/denied-*
    # per task: the node, whether the grid's prolog.sh shows (the directory is seen), how
    # many denied-* show, what reading the file gives
    look = (f"#!/bin/sh\nsrun -N2 sh -c 'echo $(hostname) $(ls {g.base} | grep -c prolog.sh) "
            f"$(ls {g.base} | grep -c denied) $(cat {denied} 2>&1)'\n")
    seen = []
    for round_ in (1, 2, 3):
        if round_ == 3:  # after the spare of the next job was made
            denied.write_text("secret\n")
            denied.chmod(0o644)  # readable by all: only the deny list hides it
        job, out = submit(g, f"look{round_}", look, "-N2")
        state = g.slurm.wait_job(job, timeout=120)
        assert state == "COMPLETED", (state, out.read_text() if out.exists() else "",
                                      g.hook_logs())
        assert sorted(line.split()[:3] for line in out.read_text().splitlines()) == \
            [["n1", "1", "0"], ["n2", "1", "0"]], out.read_text()
        assert "secret" not in out.read_text()
        for i in (1, 2):
            wait_spare(g, i)
        seen.append({i: masks(g, i) for i in (1, 2)})
    for i in (1, 2):
        wait_spare_only(g, i)
        # one mask at a time: the second job and the spares took the first's (made once);
        # the new file made a new one
        assert len(seen[0][i]) == 1, seen
        assert seen[1][i] == seen[0][i], seen
        assert len(seen[2][i]) == 1, seen
        assert seen[2][i] != seen[0][i], seen
        # and no environment has a mask (or an idmapped lower) of its own
        private = g.base / f"n{i}" / "jobs" / f".spare-{g.user}.run" / "private"
        assert not os.path.ismount(private / "mask")
        assert not os.path.ismount(private / "lower")
    # The replicad stops following the user: their spare and layers end, nothing is left.
    for i in (1, 2):
        g.control(i, {"op": "unfollow", "user": g.user})
        assert job_files(g, i) == [], job_files(g, i)
        left = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if f"n{i}/jobs/.layers-{g.user}" in line]
        assert not left, left


def unit_service(role: str) -> dict[str, list[str]]:
    """The [Service] settings of ``sdeefs-replicad@ROLE.service`` as scripts/install.sh
    renders the unit for this installation (its commands: VENV_BIN): key -> values."""
    text = (REPO / "launcher" / "systemd" / "sdeefs-replicad@.service").read_text()
    text = text.replace("@SBIN_DIR@", str(VENV_BIN)).replace("@BIN_DIR@", str(VENV_BIN))
    service: dict[str, list[str]] = {}
    section = ""
    for line in text.replace("%i", role).splitlines():
        if line.startswith("["):
            section = line.strip()
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            service.setdefault(key.strip(), []).append(value.strip())
    return service


def stop_as_systemd(g: Grid, i: int, signalled: Callable[[], None] | None = None
                    ) -> list[subprocess.CompletedProcess[str]]:
    """``systemctl stop sdeefs-replicad@compute`` on node i, as systemd does it with the
    unit (no systemd runs here): its KillSignal to the main process only (KillMode=process),
    then its ExecStopPost commands once that exited, in order, each checked.  ``signalled``
    is called once the signal is sent."""
    service = unit_service("compute")
    # the grid runs the unit's own command (Grid.start_replicad)
    assert service["ExecStart"] == [f"{VENV_BIN}/sdeefs-replicad --role compute"], service
    assert service["KillMode"] == ["process"], service
    proc = g.replicads.pop(i)
    proc.send_signal(signal.Signals[service.get("KillSignal", ["SIGTERM"])[-1]])
    if signalled is not None:
        signalled()
    proc.wait(90)  # systemd's TimeoutStopSec
    return exec_stop_post(g, i)


def exec_stop_post(g: Grid, i: int) -> list[subprocess.CompletedProcess[str]]:
    """The unit's ExecStopPost commands on node i, in order, each checked: what systemd runs
    once the daemon is gone, after a stop as after a crash."""
    service = unit_service("compute")
    done = []
    for line in service.get("ExecStopPost", []):
        checked = not line.startswith("-")  # "-": its failure is ignored
        result = g.slurm.node_run(i, shlex.split(line.lstrip("-@:+!")), check=False,
                                  env={"SDEEFS_CONFIG": str(g.site.config)})
        assert result.returncode == 0 or not checked, (line, result.stderr)
        done.append(result)
    return done


@attrs.frozen
class LongJob:
    """A job on n1 that waits for ``home/go``, and the spare environment started beside it."""

    home: Path
    job: int
    out: Path
    pid: int  # the job environment's init
    spare_pid: int  # the spare's init


def start_long_job_beside_a_spare(g: Grid, version: str) -> LongJob:
    """The user writes ``version`` into /etc/sdeefs-demo at login and submits a job that
    prints it once ``home/go`` exists; returns once the job's and the spare's inits run."""
    g.site.start(g.user)
    g.site.run(g.user, f"echo {version} > /etc/sdeefs-demo")
    home = g.site.home(g.user)
    job, out = submit(g, "long", f"#!/bin/sh\nwhile [ ! -e {home}/go ]; do sleep 0.1; done\n"
                      "cat /etc/sdeefs-demo\n", "-N1", "-w", "n1")
    jobs = g.base / "n1" / "jobs"
    spare = jobs / f".spare-{g.user}.run"
    deadline = time.monotonic() + 60
    while not ((jobs / f"{job}.run" / "init").exists() and (spare / "spare-key").exists()):
        assert time.monotonic() < deadline, (job_files(g, 1), g.hook_logs())
        time.sleep(0.1)
    return LongJob(home, job, out,
                   int((jobs / f"{job}.run" / "init").read_text().split()[0]),
                   int((spare / "init").read_text().split()[0]))


def test_stopping_the_replicad_ends_its_spares_and_leaves_running_jobs(grid: Grid) -> None:
    """``systemctl stop`` (and so a restart) of the node's replicad: the spare environment it
    started ahead and the layers the user's jobs share end with it, nothing of them running
    or mounted; the job that runs keeps its environment and ends as usual."""
    g = grid
    run = start_long_job_beside_a_spare(g, "v3")
    home, job, out = run.home, run.job, run.out
    pid, spare_pid = run.pid, run.spare_pid

    def ours_mounted() -> list[str]:
        return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if f"n1/jobs/.layers-{g.user}" in line or f"n1/jobs/.spare-{g.user}" in line]

    assert ours_mounted()  # the shared lower (and mask) of the user's jobs
    # While the replicad runs, the command leaves its spares alone: one line, BUSY.
    busy = g.slurm.node_run(1, [str(VENV_BIN / "sdeefs"), "end-spares"], check=False,
                            env={"SDEEFS_CONFIG": str(g.site.config)})
    assert busy.returncode == 4, busy
    assert busy.stderr.strip().splitlines() == [
        "sdeefs: sdeefs-replicad is running on n1: it ends its spare environments itself "
        "(stop it first)"], busy.stderr
    assert alive(spare_pid)

    stopped = stop_as_systemd(g, 1)
    assert not alive(spare_pid)
    assert ours_mounted() == []
    assert job_files(g, 1) == [str(job), f"{job}.run"], job_files(g, 1)
    assert [r.stdout for r in stopped] == [f"{g.user}: spare job environment ended\n"], stopped
    # the running job keeps its environment, over its own clones of the ended layers
    assert alive(pid)
    (home / "go").touch()
    state = g.slurm.wait_job(job, timeout=120)
    assert state == "COMPLETED", (state, out.read_text() if out.exists() else "", g.hook_logs())
    assert out.read_text() == "v3\n"
    assert not alive(pid)
    # ... the unit's start (a restart is this stop, then a start): jobs run as before
    g.start_replicad(1)
    job, out = submit(g, "again", "#!/bin/sh\ncat /etc/sdeefs-demo\n", "-N1", "-w", "n1")
    state = g.slurm.wait_job(job, timeout=120)
    assert state == "COMPLETED", (state, g.hook_logs())
    assert out.read_text() == "v3\n"
    wait_spare_only(g, 1)


def children(pid: int) -> list[int]:
    """The processes ``pid``'s threads forked (each thread's children file)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def spare_traces(g: Grid, i: int) -> list[str]:
    """Whatever of the user's spare on node i is running or mounted, in any process's mount
    namespace: a process naming it, a mount made from its directories."""
    mark = f"n{i}/jobs/.spare-{g.user}"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if mark.encode() in (proc / "cmdline").read_bytes():
                found.append(f"{proc.name}: {(proc / 'cmdline').read_bytes()!r}")
            found += [f"{proc.name}: {line}" for line in
                      (proc / "mountinfo").read_text().splitlines() if mark in line]
    return found


@pytest.mark.parametrize("how", ["stop", "kill -9"])
def test_a_spare_the_replicad_was_starting_when_it_stopped_or_died_is_ended(
        grid: Grid, how: str) -> None:
    """``systemctl stop`` (``stop``), or a SIGKILL (``kill -9``: the OOM killer, systemd's
    last resort), while the replicad is starting the next job's spare environment (its
    ``sdeefs-enter start`` running: held there with SIGSTOP by the test, the window made
    wide), then the unit's ``sdeefs end-spares``: nothing of the spare runs or is mounted
    anywhere.  On a stop the daemon finishes the start and records the spare before it
    exits; killed, it leaves the start's output (``private/starting``: the init) that
    end-spares reads, once the start it did not wait for is done.  Fails on the old code
    both ways: SIGTERM killed the daemon at once as SIGKILL does, the start went on without
    it, and its init and overlay were named nowhere end-spares looks."""
    g = grid
    # The spare's start held where it is: the replicad's sdeefs-enter, through a wrapper that
    # stops itself before it execs the real one when it is asked to start the spare (polling
    # /proc for it lost the race under load: the start was done before it was seen).
    holder = g.base / "hold-spare-start"
    hold_pid = g.base / "held-spare-start.pid"
    holder.write_text(f"#!/bin/sh\nif [ \"$1\" = start ]; then case \"$*\" in "
                      f"*n1/jobs/.spare-{g.user}/upper*) [ -e {hold_pid} ] || "
                      f"{{ echo $$ > {hold_pid}.new; mv {hold_pid}.new {hold_pid}; "
                      f"kill -STOP $$; }} ;; esac; fi\n"
                      f"exec {VENV_BIN / 'sdeefs-enter'} \"$@\"\n")
    holder.chmod(0o755)
    g.kill_replicad(1)
    g.start_replicad(1, {"SDEEFS_ENTER": str(holder)})
    g.site.start(g.user)
    g.site.run(g.user, "echo v4 > /etc/sdeefs-demo")
    home = g.site.home(g.user)
    daemon = g.replicads[1].pid
    job, out = submit(g, "long", f"#!/bin/sh\nwhile [ ! -e {home}/go ]; do sleep 0.1; done\n"
                      "cat /etc/sdeefs-demo\n", "-N1", "-w", "n1")
    deadline = time.monotonic() + 60
    while not hold_pid.exists():
        assert time.monotonic() < deadline, (job_files(g, 1), g.hook_logs())
        time.sleep(0.05)
    held = int(hold_pid.read_text())
    assert held in children(daemon)
    proc = g.replicads[1]
    if how == "stop":
        def release() -> None:  # once the daemon had the signal (the old one dies at once)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)
            os.kill(held, signal.SIGCONT)

        stopped = stop_as_systemd(g, 1, release)
        assert "SIGTERM: stopping" in g.log(1), g.log(1)
    else:
        g.replicads.pop(1)
        os.kill(daemon, signal.SIGKILL)  # the daemon only (KillMode=process), by its pid
        proc.wait(10)
        os.kill(held, signal.SIGCONT)  # the start goes on while ExecStopPost runs
        stopped = exec_stop_post(g, 1)
    assert [r.stdout for r in stopped] == [f"{g.user}: spare job environment ended\n"], stopped
    assert not alive(held)
    assert spare_traces(g, 1) == []
    assert f".spare-{g.user}.run" not in job_files(g, 1)
    # the running job keeps its environment and ends as usual; the replicad back, jobs run
    (home / "go").touch()
    state = g.slurm.wait_job(job, timeout=120)
    assert state == "COMPLETED", (state, out.read_text() if out.exists() else "", g.hook_logs())
    assert out.read_text() == "v4\n"
    g.start_replicad(1)
    job, out = submit(g, "again", "#!/bin/sh\ncat /etc/sdeefs-demo\n", "-N1", "-w", "n1")
    state = g.slurm.wait_job(job, timeout=120)
    assert state == "COMPLETED", (state, g.hook_logs())
    assert out.read_text() == "v4\n"
    wait_spare_only(g, 1)


def test_a_node_whose_replicad_was_killed_mid_job_comes_back_and_runs_the_next_job(
        grid: Grid) -> None:
    """The node's replicad killed -9 (the OOM killer; systemd's SIGKILL after a stop timed
    out) while a job runs: systemd runs the unit's ExecStopPost (the spare ends) and starts
    it again (Restart=always); the running job goes on in its environment, the new daemon
    does its epilog (the environment the old one started ends), and the next job of the
    user runs on that node as ever: the node never leaves service."""
    g = grid
    run = start_long_job_beside_a_spare(g, "v5")
    home, job, out = run.home, run.job, run.out
    pid, spare_pid = run.pid, run.spare_pid
    proc = g.replicads.pop(1)
    os.kill(proc.pid, signal.SIGKILL)  # the daemon only (KillMode=process), by its pid
    proc.wait(10)
    stopped = exec_stop_post(g, 1)
    assert [r.stdout for r in stopped] == [f"{g.user}: spare job environment ended\n"], stopped
    assert not alive(spare_pid)
    assert spare_traces(g, 1) == []
    assert alive(pid)
    g.start_replicad(1)
    (home / "go").touch()
    state = g.slurm.wait_job(job, timeout=120)
    assert state == "COMPLETED", (state, out.read_text() if out.exists() else "", g.hook_logs())
    assert out.read_text() == "v5\n"
    assert not alive(pid)
    assert g.control(1, {"op": "status"})["jobs"] == {"job-start": 0, "job-end": 1, "spare": 0}
    job, out = submit(g, "next", "#!/bin/sh\ncat /etc/sdeefs-demo\nsrun cat /etc/sdeefs-demo\n",
                      "-N1", "-w", "n1")
    state = g.slurm.wait_job(job, timeout=120)
    assert state == "COMPLETED", (state, out.read_text() if out.exists() else "", g.hook_logs())
    assert out.read_text() == "v5\nv5\n"
    wait_spare_only(g, 1)
    assert g.slurm.node_states().get("n1") in IN_SERVICE, g.slurm.node_states()
    logs = g.hook_logs()
    assert "Traceback" not in logs, logs
    assert "job-prolog:" not in logs, logs  # the replicad did every prolog
