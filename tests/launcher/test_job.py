"""The SLURM prolog without SLURM: real replicads on loopback, ``sdeefs job-prolog`` run as
slurmd runs it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import wait_for_socket
from .launcher_site import VENV_BIN, Site, requires_launcher

pytestmark = requires_launcher

BARRIER_TIMEOUT = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def replication_config(site: Site, barrier_timeout: float) -> tuple[Path, int]:
    """Add a [replication] table for a login node and node n1 on loopback to the site's
    config: (their directory, the login replicad's port)."""
    base = site.base / "nodes"
    base.mkdir()
    (base / "key").write_text(os.urandom(32).hex())
    os.chmod(base / "key", 0o600)
    port = _free_port()
    with site.config.open("a") as f:
        f.write(f'\n[replication]\nlogin = "127.0.0.1:{port}"\nkey_file = "{base}/key"\n'
                f'control = "{base}/%n.sock"\nreplica_dir = "{base}/%n-replicas"\n'
                f'job_dir = "{base}/%n-jobs"\nbarrier_timeout = {barrier_timeout}\n')
    site.root.mkdir(exist_ok=True)
    return base, port


def _start_replicad(site: Site, base: Path, name: str) -> subprocess.Popen[bytes]:
    """The replicad of node ``name`` as its unit starts it: ``--role``, the rest from the
    site config (one machine plays both nodes: ``--node`` tells them apart)."""
    control = base / f"{name}.sock"
    # A replicad killed by a test (kill -9) leaves its socket: waiting for the file would
    # return at once and the next request could meet nobody (ECONNREFUSED).  The daemon
    # puts its socket in place once it listens, so the file's appearance says it is up.
    control.unlink(missing_ok=True)
    log = open(base / f"{name}.log", "ab")  # noqa: SIM115 (kept by the process)
    role = "login" if name == "login" else "compute"
    proc = subprocess.Popen([str(VENV_BIN / "sdeefs-replicad"), "--role", role, "--node", name],
                            stdout=log, stderr=log, start_new_session=True, env=site.env())
    wait_for_socket(proc, control, base / f"{name}.log")
    return proc


def test_a_user_without_a_layer_gets_a_job_without_an_environment(site: Site) -> None:
    """Someone who never logged in with sdeefs submits a job: the prolog lets it run without
    an environment at once (it used to recognise the case by the text of the replicad's
    error, and only once the barrier timed out)."""
    user = site.add_user()  # no environment: the login node holds nothing of them
    base, _ = replication_config(site, BARRIER_TIMEOUT)
    daemons = [_start_replicad(site, base, "login")]
    try:
        daemons.append(_start_replicad(site, base, "n1"))
        began = time.monotonic()
        prolog = subprocess.run([str(VENV_BIN / "sdeefs"), "job-prolog"], capture_output=True,
                                text=True, timeout=BARRIER_TIMEOUT + 60,
                                env={**site.env(), "SLURM_JOB_ID": "7", "SLURM_JOB_USER": user,
                                     "SLURMD_NODENAME": "n1"})
        took = time.monotonic() - began
    finally:
        for proc in daemons:
            proc.kill()
            proc.wait(10)
    assert prolog.returncode == 0, prolog.stderr
    assert f"{user} has no sdeefs environment; the job runs without one" in prolog.stderr
    assert took < BARRIER_TIMEOUT / 2, took
    assert not (base / "n1-jobs" / "7.run").exists()
    # Its steps run bare: sdeefs-run runs the command as it is.
    step = subprocess.run(["runuser", "-u", user, "--", str(VENV_BIN / "sdeefs-run"), "--",
                           "sh", "-c", "echo bare $(id -u)"], capture_output=True, text=True,
                          timeout=60, env={**site.env(), "SLURM_JOB_ID": "7",
                                           "SLURMD_NODENAME": "n1"})
    assert step.returncode == 0, step.stderr
    assert step.stdout.split() == ["bare", str(site.uid(user))]


def _hook(site: Site, which: str, user: str, job: str = "8"
          ) -> subprocess.CompletedProcess[str]:
    """``sdeefs-prolog``/``-epilog`` as slurmd runs them, on node n1."""
    return subprocess.run([str(VENV_BIN / f"sdeefs-{which}")], capture_output=True, text=True,
                          timeout=60, env={**site.env(), "SLURM_JOB_ID": job,
                                           "SLURM_JOB_USER": user, "SLURMD_NODENAME": "n1"})


def test_a_users_problem_fails_the_job_and_a_nodes_problem_fails_the_prolog(site: Site) -> None:
    """SLURM drains a node whose prolog fails: only the node's own problems may do that."""
    user = site.add_user()
    base, _ = replication_config(site, 2)  # no login replicad: the login node is unreachable
    # The node's problem: its replicad is not running.
    prolog = _hook(site, "prolog", user)
    assert prolog.returncode != 0
    assert prolog.stderr.count("\n") == 1, prolog.stderr
    assert "sdeefs-replicad is not running" in prolog.stderr
    # The user's problem: the stream does not reach the barrier in time.
    daemon = _start_replicad(site, base, "n1")
    try:
        prolog = _hook(site, "prolog", user)
    finally:
        daemon.kill()
        daemon.wait(10)
    assert prolog.returncode == 0, prolog.stderr
    assert "the node stays in service" in prolog.stderr
    step = subprocess.run(["runuser", "-u", user, "--", str(VENV_BIN / "sdeefs-run"), "--",
                           "echo", "ran"], capture_output=True, text=True, timeout=60,
                          env={**site.env(), "SLURM_JOB_ID": "8", "SLURMD_NODENAME": "n1"})
    assert step.returncode == 1
    assert step.stdout == ""
    lines = step.stderr.splitlines()
    assert len(lines) == 1, step.stderr
    assert lines[0].startswith("sdeefs-run: job 8 on n1: ")
    assert "not at the barrier" in lines[0]
    epilog = _hook(site, "epilog", user)
    assert epilog.returncode == 0, epilog.stderr
    assert not (base / "n1-jobs" / "8.problem").exists()
    # An unreadable config is the node's problem too.
    os.chmod(site.config, 0)
    try:
        prolog = subprocess.run([str(VENV_BIN / "sdeefs-prolog")], capture_output=True,
                                text=True, timeout=60, user=site.uid(user),
                                env={**site.env(), "SLURM_JOB_ID": "9",
                                     "SLURM_JOB_USER": user, "SLURMD_NODENAME": "n1"})
    finally:
        os.chmod(site.config, 0o644)
    assert prolog.returncode != 0
    assert prolog.stderr.count("\n") == 1, prolog.stderr


def test_install_slurm_writes_the_plugstack_line_and_says_what_slurm_conf_needs(
        tmp_path: Path) -> None:
    config = tmp_path / "sdeefs.toml"
    config.write_text('[replication]\njob_dir = "/var/tmp/jobs-%n"\n')
    plugstack = tmp_path / "plugstack.conf.d"
    env = {**os.environ, "SDEEFS_CONFIG": str(config)}
    for _ in range(2):  # again: our file is replaced
        out = subprocess.run([str(VENV_BIN / "sdeefs"), "install-slurm", "--plugstack-dir",
                              str(plugstack)], capture_output=True, text=True, check=True,
                             env=env).stdout
    plugin = VENV_BIN.parent / "lib" / "sdeefs" / "sdeefs_spank.so"
    assert plugin.is_file()
    line = f"required {plugin} job_dir=/var/tmp/jobs-%n"
    assert (plugstack / "sdeefs.conf").read_text().splitlines()[1:] == [line]
    assert "PrologFlags=Alloc" in out, out
    assert "sdeefs-prolog" in out, out
    (plugstack / "sdeefs.conf").write_text("someone else's\n")
    refused = subprocess.run([str(VENV_BIN / "sdeefs"), "install-slurm", "--plugstack-dir",
                              str(plugstack)], capture_output=True, text=True, env=env)
    assert refused.returncode == 4
    assert "not replaced" in refused.stderr
    assert (plugstack / "sdeefs.conf").read_text() == "someone else's\n"


def test_doctor_checks_that_slurms_plugstack_loads_the_plugin(tmp_path: Path) -> None:
    from sdeefs import config as config_mod
    from sdeefs.launcher import doctor
    from sdeefs.launcher.compute import job

    config = tmp_path / "sdeefs.toml"
    config.write_text('[replication]\njob_dir = "/var/tmp/jobs-%n"\n')
    site = config_mod.load(str(config))
    main = tmp_path / "plugstack.conf"
    main.write_text(f"include {tmp_path}/plugstack.conf.d/*.conf\n")
    assert doctor._plugstack(site, str(main)).verdict == doctor.Verdict.FAIL  # not loaded
    if not os.path.isfile(job.spank_plugin()):
        pytest.skip(f"{job.spank_plugin()} is not built here (scripts/setup.sh builds it)")
    job.install_slurm(site, str(tmp_path / "plugstack.conf.d"))
    assert doctor._plugstack(site, str(main)).verdict == doctor.Verdict.OK
    config.write_text('[replication]\njob_dir = "/elsewhere"\n')  # the site's changed since
    moved = doctor._plugstack(config_mod.load(str(config)), str(main))
    assert moved.verdict == doctor.Verdict.FAIL
    assert "/var/tmp/jobs-%n" in moved.detail, moved


@contextlib.contextmanager
def nodes_on_tmpfs(site: Site, barrier_timeout: float) -> Iterator[tuple[Path, int]]:
    """:func:`replication_config`, the nodes' directory (replicas, job directories) on a
    tmpfs of its own, as a node's local disk is (a job's overlay refuses layers on the
    lower's filesystem); unmounted at the end."""
    base, port = replication_config(site, barrier_timeout)
    key = (base / "key").read_text()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=512m", "tmpfs", str(base)],
                   check=True)
    try:
        (base / "key").write_text(key)
        os.chmod(base / "key", 0o600)
        yield base, port
    finally:
        subprocess.run(["umount", "-l", str(base)], capture_output=True)


def _stop_node(site: Site, base: Path, daemon: subprocess.Popen[bytes]) -> None:
    """As the unit stops node n1's replicad: SIGTERM, then ``sdeefs end-spares``."""
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait(10)
    subprocess.run([str(VENV_BIN / "sdeefs"), "end-spares"], capture_output=True, timeout=60,
                   env={**site.env(), "SLURMD_NODENAME": "n1"})


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("old", ["died", "unrecorded"])
def test_a_job_environment_starts_again_over_its_old_directories(site: Site, old: str) -> None:
    """The prolog runs again for a job (SLURM requeues a job with its id) whose environment
    on the node ``died`` (its init killed while the node ran on), or was started and never
    recorded (``unrecorded``: its starter, the replicad, killed -9 between the start and
    the record; the record removed here for that): the new environment starts over the old
    job's directories, and the old one, if it still runs, is ended first (else its init
    would run on, forever, over the same scratch upper: fails without that).  The scratch
    upper is mounted volatile, and the kernel leaves WORK/work/incompat/volatile behind and
    refuses another mount over that workdir until it is cleared: fails if the prolog does
    not clear it (the mount fails, the job with it)."""
    user = site.add_user()
    with nodes_on_tmpfs(site, BARRIER_TIMEOUT) as (base, _):
        login = _start_replicad(site, base, "login")
        node, pid = None, 0
        try:
            node = _start_replicad(site, base, "n1")
            site.start(user)
            site.run(user, "echo v1 > /etc/sdeefs-again")
            first = _hook(site, "prolog", user, "21")
            assert (first.returncode, first.stderr) == (0, ""), first
            init = base / "n1-jobs" / "21.run" / "init"
            pid = int(init.read_text().split()[0])
            if old == "died":
                os.kill(pid, signal.SIGKILL)  # the environment dies; the node runs on
                deadline = time.monotonic() + 20
                while _alive(pid):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                markers = list((base / "n1-jobs" / "21").rglob("incompat/volatile"))
                assert markers, "the kernel left no volatile marker: nothing to test"
            else:
                init.unlink()
                (base / "n1-jobs" / "21.run" / "private" / "env.json").unlink()
            again = _hook(site, "prolog", user, "21")
            assert (again.returncode, again.stderr) == (0, ""), again
            assert int(init.read_text().split()[0]) != pid
            assert not _alive(pid)
            step = subprocess.run(["runuser", "-u", user, "--", str(VENV_BIN / "sdeefs-run"),
                                   "--", "cat", "/etc/sdeefs-again"], capture_output=True,
                                  text=True, timeout=60,
                                  env={**site.env(), "SLURM_JOB_ID": "21",
                                       "SLURMD_NODENAME": "n1"})
            assert (step.returncode, step.stdout) == (0, "v1\n"), step.stderr
            epilog = _hook(site, "epilog", user, "21")
            assert epilog.returncode == 0, epilog.stderr
            assert not any(n in ("21", "21.run") for n in os.listdir(base / "n1-jobs"))
        finally:  # nothing of the job left, whatever failed (the old init: the test's own)
            _hook(site, "epilog", user, "21")
            if pid and _alive(pid) and Path(f"/proc/{pid}/comm").read_text() == "sdeefs-init\n":
                os.kill(pid, signal.SIGKILL)
            if node is not None:
                _stop_node(site, base, node)
            login.kill()
            login.wait(10)


def test_end_spares_removes_finished_jobs_scratch_but_never_through_a_mount(
        site: Site) -> None:
    """``sdeefs end-spares`` (the replicad's unit, once it stopped) removes the scratch of
    finished jobs the daemon had not removed yet (``JOB_DIR/.gone-*``): following no symlink
    a job planted, through directories the job made unreadable; one with something mounted
    in it stays (rmtree would walk into the mount), with one line, until it is not.  Fails
    on the old code: it stayed until the replicad's next start."""
    with nodes_on_tmpfs(site, 2) as (base, _):
        jobs = base / "n1-jobs"
        victim = site.base / "victim"
        victim.write_text("keep\n")
        gone = jobs / ".gone-5-1"
        (gone / "upper" / "deep" / "er").mkdir(parents=True)
        (gone / "upper" / "deep" / "er" / "f").write_text("x")
        (gone / "upper" / "link").symlink_to(victim)
        (gone / "upper" / "dirlink").symlink_to(site.base)
        os.chmod(gone / "upper" / "deep", 0)
        held = jobs / ".gone-6-1"
        (held / "upper" / "m").mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(held / "upper" / "m")], check=True)
        try:
            (held / "upper" / "m" / "f").write_text("mounted\n")

            def end_spares() -> subprocess.CompletedProcess[str]:
                return subprocess.run([str(VENV_BIN / "sdeefs"), "end-spares"],
                                      capture_output=True, text=True, timeout=60,
                                      env={**site.env(), "SLURMD_NODENAME": "n1"})

            result = end_spares()
            assert (result.returncode, result.stdout) == (0, ""), result
            assert not gone.exists()
            assert victim.read_text() == "keep\n"
            assert site.base.is_dir()
            assert (held / "upper" / "m" / "f").read_text() == "mounted\n"
            assert result.stderr.splitlines() == [
                f"sdeefs: {held} not removed: {held}/upper/m mounted there"], result.stderr
        finally:
            subprocess.run(["umount", str(held / "upper" / "m")], capture_output=True)
        result = end_spares()
        assert (result.returncode, result.stderr) == (0, ""), result
        assert os.listdir(jobs) == []


def test_a_stop_does_not_wait_for_a_prolog_at_its_barrier(site: Site) -> None:
    """SIGTERM (``systemctl stop``) while a job's prolog waits on the node's replicad for a
    barrier that does not come (the login node unreachable): the daemon cancels the wait and
    exits well before the barrier's timeout (it waits only for work in its threads: a
    spare's start); the prolog fails with one line, as for any replicad that went away (the
    node's problem: SLURM drains it)."""
    user = site.add_user()
    base, _ = replication_config(site, 120)  # no login replicad: no barrier
    daemon = _start_replicad(site, base, "n1")
    try:
        prolog = subprocess.Popen([str(VENV_BIN / "sdeefs-prolog")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**site.env(), "SLURM_JOB_ID": "31",
                                       "SLURM_JOB_USER": user, "SLURMD_NODENAME": "n1"})
        deadline = time.monotonic() + 30
        while f"following {user} from" not in (base / "n1.log").read_text():  # at the barrier
            assert prolog.poll() is None, prolog.communicate()
            assert time.monotonic() < deadline, (base / "n1.log").read_text()
            time.sleep(0.05)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, (base / "n1.log").read_text()
        _, err = prolog.communicate(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
    assert prolog.returncode != 0
    assert err.count("\n") == 1, err
    assert "sdeefs-replicad closed the connection without an answer" in err, err
    assert "SIGTERM: stopping" in (base / "n1.log").read_text()
