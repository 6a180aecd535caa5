"""The SLURM test cluster itself: nodes, jobs, prologs for other users, links, clean stops."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .slurm_cluster import Cluster, ClusterError, cluster, requires_slurm, start_cluster

pytestmark = requires_slurm


@pytest.fixture
def slurm(tmp_path: Path) -> Iterator[Cluster]:
    with cluster(tmp_path / "cluster") as running:
        yield running


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users can reach: pytest's tmp_path sits under a 0700 directory."""
    path = Path(tempfile.mkdtemp(prefix="sdeefs-slurm-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def test_user() -> Iterator[str]:
    name = f"sdtst{uuid.uuid4().hex[:4]}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", "-r", name], capture_output=True)


def write_script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def traces_of(directory: Path) -> list[str]:
    """Processes whose cwd or command line mention ``directory``, found independently."""
    root = str(directory)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(root) or root in cmdline:
            found.append(f"{entry} cwd={cwd} cmd={cmdline}")
    return found


def eventually(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {timeout} s")
        time.sleep(0.05)


def netns_with(prefix: str) -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                             check=True).stdout
    return [line for line in listing.splitlines() if line.startswith(prefix)]


def test_nodes_have_their_names_and_addresses(slurm: Cluster) -> None:
    assert slurm.node_names == ["n1", "n2", "n3"]
    out = slurm.run(["srun", "-N3", "-l", "hostname"]).stdout
    assert sorted(out.splitlines()) == ["0: n1", "1: n2", "2: n3"]

    out = slurm.run(["srun", "-N3", "sh", "-c",
                     'echo "$(hostname) $(ip -4 -o addr show eth0 | awk \'{print $4}\')"']).stdout
    assert sorted(out.splitlines()) == [f"n{i} {slurm.node_addr(i)}/24" for i in (1, 2, 3)]
    assert slurm.hub_addr.endswith(".0.1")

    # sbatch/srun export the submitter's environment to the job.
    out = slurm.run(["srun", "-N1", "sh", "-c", 'echo "$SDT_MARK"'],
                    env={"SDT_MARK": "x42"}).stdout
    assert out.strip() == "x42"


def test_batch_job_runs_a_step_on_every_node(slurm: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    job = slurm.sbatch(f"#!/bin/sh\nsrun sh -c 'hostname > {out}/host.$(hostname)'\n",
                       ["-N3", "-o", str(tmp_path / "job.log")])
    assert slurm.wait_job(job) == "COMPLETED", (tmp_path / "job.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["host.n1", "host.n2", "host.n3"]
    for name in slurm.node_names:
        assert (out / f"host.{name}").read_text().strip() == name


def test_prolog_runs_for_a_job_of_another_user(open_dir: Path, test_user: str) -> None:
    marks = open_dir / "marks"
    marks.mkdir()
    prolog = write_script(open_dir / "prolog.sh",
                          f'#!/bin/sh\necho "$SLURM_JOB_USER $SLURMD_NODENAME" '
                          f'> {marks}/prolog.$SLURMD_NODENAME\n')
    with cluster(open_dir / "cluster", prolog=prolog) as running:
        out = running.run(["srun", "-N3", "-l", "id", "-u"], user=test_user).stdout
    uid = pwd.getpwnam(test_user).pw_uid
    assert sorted(out.splitlines()) == [f"{rank}: {uid}" for rank in range(3)]
    for name in ("n1", "n2", "n3"):
        assert (marks / f"prolog.{name}").read_text().strip() == f"{test_user} {name}"


LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
while True:
    c, _ = s.accept()
    c.sendall(socket.gethostname().encode())
    c.close()
"""

PROBE = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1)
    print(c.recv(100).decode())
except OSError as exc:
    print("unreachable", exc)
"""


def probe(slurm: Cluster, port: int) -> str:
    return slurm.run(["python3", "-c", PROBE, slurm.node_addr(2), str(port)]).stdout.strip()


def wait_probe(slurm: Cluster, port: int, want: str, tries: int = 100) -> str:
    for _ in range(tries):
        answer = probe(slurm, port)
        if answer == want:
            break
    return answer


def test_link_down_cuts_a_node_off(slurm: Cluster) -> None:
    port = 8123
    listener = slurm.node_popen(2, ["python3", "-c", LISTENER, str(port)])
    assert wait_probe(slurm, port, "n2") == "n2"
    slurm.link_down(2)
    assert probe(slurm, port).startswith("unreachable")
    slurm.link_up(2)
    assert wait_probe(slurm, port, "n2") == "n2"
    assert listener.poll() is None
    slurm.stop()
    assert listener.poll() is not None


def test_stop_leaves_nothing_behind(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"
    running = start_cluster(directory, nodes=2)
    try:
        prefix = running.prefix
        assert netns_with(prefix)
        assert traces_of(directory)
        # A job still running and an extra daemon must both be taken down by stop().
        job = running.sbatch("#!/bin/sh\nsrun sleep 300\n", ["-N2", "-o", "/dev/null"])
        running.node_popen(1, ["sleep", "300"])
        running.hub_popen(["sh", "-c", "sleep 300 & sleep 300"])
        eventually(lambda: running.job_state(job) == "RUNNING", "running")
    finally:
        running.stop()
    assert traces_of(directory) == []
    assert netns_with(prefix) == []
    running.stop()  # idempotent


def test_failed_start_cleans_up_and_shows_the_log(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"
    with pytest.raises(ClusterError, match="NoSuchOption"):
        start_cluster(directory, nodes=1, extra_conf="NoSuchOption=1")
    assert traces_of(directory) == []
    assert netns_with(Cluster.create(directory).prefix) == []


def test_two_clusters_side_by_side(tmp_path: Path) -> None:
    with cluster(tmp_path / "a", nodes=1) as a, cluster(tmp_path / "b", nodes=2) as b:
        assert a.prefix != b.prefix
        assert a.run(["srun", "-N1", "hostname"]).stdout.split() == ["n1"]
        assert sorted(b.run(["srun", "-N2", "hostname"]).stdout.split()) == ["n1", "n2"]
        # A second start in a live cluster's directory must refuse, and leave it running.
        with pytest.raises(ClusterError, match="running"):
            start_cluster(tmp_path / "a", nodes=1)
        assert a.run(["srun", "-N1", "hostname"]).stdout.split() == ["n1"]


def test_stop_copes_with_a_dead_controller(tmp_path: Path) -> None:
    """With slurmctld gone nobody can scancel; slurmstepd and its tasks outlive slurmd."""
    directory = tmp_path / "cluster"
    running = start_cluster(directory, nodes=2)
    try:
        marker = "sdtst-orphan-" + uuid.uuid4().hex[:6]
        running.hub_popen(["srun", "-N2", "--job-name", marker, "sleep", "300"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        eventually(lambda: bool(running.run(["squeue", "-h", "-t", "R", "-n", marker]).stdout),
                   "running")
        # The tasks run in the submitter's cwd, DIR, and so do the two slurmstepds (log dir).
        eventually(lambda: sum("slurmstepd" in t or "sleep 300" in t
                               for t in traces_of(directory)) >= 4, "tasks started")
        os.kill(int((directory / "run" / "slurmctld.pid").read_text()), 9)
    finally:
        running.stop()
    assert traces_of(directory) == []
    assert netns_with(running.prefix) == []
