"""The SLURM prolog without SLURM: real replicads on loopback, ``sdeefs job-prolog`` run as
slurmd runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
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
