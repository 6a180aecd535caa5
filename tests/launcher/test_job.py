"""The SLURM prolog without SLURM: real replicads on loopback, ``sdeefs job-prolog`` run as
slurmd runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from .launcher_site import VENV_BIN, Site, requires_launcher

pytestmark = requires_launcher

BARRIER_TIMEOUT = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_replicad(base: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    control = base / f"{name}.sock"
    log = open(base / f"{name}.log", "ab")  # noqa: SIM115 (kept by the process)
    proc = subprocess.Popen([str(VENV_BIN / "sdeefs-replicad"), "--node", name, "--key-file",
                             str(base / "key"), "--control", str(control), *args],
                            stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 10
    while not control.exists():
        assert proc.poll() is None, (base / f"{name}.log").read_text()
        assert time.monotonic() < deadline, (base / f"{name}.log").read_text()
        time.sleep(0.02)
    return proc


def test_a_user_without_a_layer_gets_a_job_without_an_environment(site: Site) -> None:
    """Someone who never logged in with sdeefs submits a job: the prolog lets it run without
    an environment at once (it used to recognise the case by the text of the replicad's
    error, and only once the barrier timed out)."""
    user = site.add_user()  # no environment: the login node holds nothing of them
    base = site.base / "nodes"
    base.mkdir()
    (base / "key").write_text(os.urandom(32).hex())
    os.chmod(base / "key", 0o600)
    port = _free_port()
    with site.config.open("a") as f:
        f.write(f'\n[replication]\nlogin = "127.0.0.1:{port}"\nkey_file = "{base}/key"\n'
                f'control = "{base}/%n.sock"\nreplica_dir = "{base}/%n-replicas"\n'
                f'job_dir = "{base}/%n-jobs"\nbarrier_timeout = {BARRIER_TIMEOUT}\n')
    (site.root).mkdir(exist_ok=True)
    daemons = [_start_replicad(base, "login", "--origin", str(site.root), "--listen",
                               f"127.0.0.1:{port}")]
    try:
        daemons.append(_start_replicad(base, "n1", "--replica-dir", str(base / "n1-replicas"),
                                       "--upstream", f"127.0.0.1:{port}"))
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
