"""End to end on a real SLURM cluster: a login environment streams to 3 (or 5) compute nodes.

munge + slurmctld + N slurmd, each node in its own network namespace
(tests/cluster/slurm_cluster.py);
sdeefs-replicad as the origin on the login node (the hub) and as a replica on every node;
SLURM's Prolog/Epilog are `sdeefs job-prolog`/`job-epilog`; job steps run `sdeefs-run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from sdeefs.config import DEFAULT_DENY
from sdeefs.fs.daemon import daemon_pid
from sdeefs.replication.daemon import control_request
from sdeefs.replication.snapshot import tree_digest
from sdeefs.replication.wire import REPORT_INTERVAL

from ..launcher.launcher_site import VENV_BIN, Site, open_site, requires_launcher
from .slurm_cluster import Cluster, cluster, requires_slurm

PORT = 7077
NODES = 3
# the login node (the hub) runs in the host's UTS namespace: its replicad's default --node
LOGIN_NODE = socket.gethostname().split(".")[0]

LIB_C = r"""
const char *greeting(void) { return "hello from libgreet"; }
"""
PROG_C = r"""
#include <stdio.h>
const char *greeting(void);
int main(void) { puts(greeting()); return 0; }
"""


@attrs.define
class Grid:
    site: Site
    slurm: Cluster
    base: Path
    user: str
    key: Path
    nodes: int = NODES
    replicads: dict[int, subprocess.Popen[bytes]] = attrs.field(factory=dict)

    def start_replicad(self, i: int, extra_env: dict[str, str] | None = None) -> None:
        """i = 0: the login node's origin; 1..nodes: compute nodes.  As the admin guide and
        the systemd units start them: ``sdeefs-replicad --role login|compute``, everything
        else from the site config (open_grid: [replication]); ``extra_env``: a test's hook
        (``SDEEFS_ENTER``)."""
        log = open(self.base / f"replicad-{i}.log", "ab")  # noqa: SIM115 (the process keeps it)
        control = self.control_path(i)
        control.unlink(missing_ok=True)
        control.parent.mkdir(exist_ok=True)
        argv = [str(VENV_BIN / "sdeefs-replicad"), "--role", "login" if i == 0 else "compute"]
        env = {"SDEEFS_CONFIG": str(self.site.config), **(extra_env or {})}
        if i == 0:
            proc = self.slurm.hub_popen(argv, stdout=log, stderr=log, env=env)
        else:
            proc = self.slurm.node_popen(i, argv, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 10
        while not control.exists():  # the old one was removed before the start (below)
            assert proc.poll() is None, self.log(i)
            assert time.monotonic() < deadline, self.log(i)
            time.sleep(0.02)
        self.replicads[i] = proc

    def kill_replicad(self, i: int) -> None:
        proc = self.replicads.pop(i)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def log(self, i: int) -> str:
        return (self.base / f"replicad-{i}.log").read_text(errors="replace")[-3000:]

    def control_path(self, i: int) -> Path:
        """replication.control of node i (``%n``: the login node's is its host name)."""
        return self.base / (LOGIN_NODE if i == 0 else f"n{i}") / "replicad.sock"

    def control(self, i: int, request: dict[str, object]) -> dict[str, object]:
        return control_request(str(self.control_path(i)), request, timeout=120)

    def sync(self, i: int) -> None:
        self.control(i, {"op": "follow", "user": self.user, "wait": True, "timeout": 90})

    def received(self, i: int) -> int:
        replicas = self.control(i, {"op": "status"})["replicas"]
        return int(replicas[self.user]["bytes_received"])  # type: ignore[index]

    def hook_logs(self) -> str:
        return "\n".join(f"{p.name}: {p.read_text(errors='replace')[-1500:]}"
                         for p in sorted(self.base.glob("*log*.log")) + sorted(
                             self.base.glob("*prolog*")) + sorted(self.base.glob("*epilog*")))

    def replica_upper(self, i: int) -> Path:
        return self.base / f"n{i}" / "rep" / self.user / "upper"

    def assert_converged(self) -> None:
        want = tree_digest(str(self.site.upper(self.user)))
        for i in range(1, self.nodes + 1):
            self.sync(i)
            if tree_digest(str(self.replica_upper(i))) != want:
                raise AssertionError(f"n{i} differs: " + tree_difference(
                    self.site.upper(self.user), self.replica_upper(i)))

    def submit(self, script: str, *args: str) -> str:
        """sbatch as the user; returns the job's output file's text."""
        return self.wait(self.start_job(script, *args))

    def start_job(self, script: str, *args: str, user: str | None = None) -> tuple[int, Path]:
        user = user or self.user
        home = self.site.home(user)
        out = home / f"job-{time.monotonic_ns()}.out"
        job = self.slurm.sbatch(script, ["-o", str(out), *args], user=user,
                                env={"SDEEFS_CONFIG": str(self.site.config)}, cwd=home)
        return job, out

    def wait(self, started: tuple[int, Path]) -> str:
        job, out = started
        try:
            state = self.slurm.wait_job(job, timeout=120)
        except Exception as exc:
            raise AssertionError(f"{exc}\n{self.hook_logs()}") from None
        text = out.read_text() if out.exists() else ""
        assert state in ("COMPLETED", "UNKNOWN"), (state, text, self.hook_logs())
        return text


def tree_difference(a: Path, b: Path) -> str:
    from sdeefs.trees import signature

    sa, sb = signature(str(a)), signature(str(b))
    out = []
    for path in sorted(set(sa) | set(sb)):
        va, vb = sa.get(path), sb.get(path)
        regular = (a / path).is_file() and not (a / path).is_symlink()
        if va is not None and vb is not None and va == vb and regular and \
                (a / path).read_bytes() != (b / path).read_bytes():
            va, vb = (*va, "content"), (*vb, "differs")
        if va != vb:
            out.append(f"{path}: {va} != {vb}")
    return "; ".join(out[:10]) or "digests differ, signatures equal"


@pytest.fixture
def grid() -> Iterator[Grid]:
    with open_grid(NODES) as g:
        yield g


@pytest.fixture
def grid5() -> Iterator[Grid]:
    """Five nodes under fan-out 2: three of them are fed by a relay."""
    with open_grid(5, barrier_timeout=30) as g:
        yield g


@contextlib.contextmanager
def open_grid(nodes: int, barrier_timeout: int = 90, engine: str = "hybrid",
              spank: bool = False, extra_conf: str = "", node_fs: str = "tmpfs"
              ) -> Iterator[Grid]:
    """``spank``: SLURM loads the SPANK plugin, as ``sdeefs install-slurm`` sets it up, and
    munge's socket is bound into environments (SLURM clients typed inside).

    Each node's state (replica, jobs' scratch: BASE/nI) is on a filesystem of its own:
    ``node_fs`` "tmpfs" (2 GiB), or "ext4": a block filesystem as a node's local disk (an
    image BASE/nI.img on a loop device with direct I/O, so its pages can be dropped and a
    cold read reaches the disk), made and removed here."""
    base = Path(tempfile.mkdtemp(prefix="sdeefs-grid-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    key = base / "replication.key"
    key.write_text(os.urandom(32).hex())
    os.chmod(key, 0o600)
    # Every node is its own network namespace: a relay listens on all its addresses.
    hub = Cluster.create(base / "cluster").hub_addr
    extra = (f'\n[replication]\nlogin = "{hub}:{PORT}"\nlisten = "0.0.0.0:{PORT}"\n'
             f'key_file = "{key}"\nfanout = 2\n'
             f'control = "{base}/%n/replicad.sock"\nreplica_dir = "{base}/%n/rep"\n'
             f'job_dir = "{base}/%n/jobs"\nbarrier_timeout = {barrier_timeout}\n')
    try:
        layer = 'layer_size = "1G"\n' if engine == "kernel" else ""
        if spank:
            # slurmd's spool is on the deny list, as a site's is (DEFAULT_DENY): the plugin
            # must bring the batch script in
            # (and a glob that new files can match: tests/cluster/test_jobstart.py)
            deny = json.dumps([*DEFAULT_DENY, f"{base}/cluster/spool", f"{base}/denied-*"])
            layer += f'sockets = ["{base}/cluster/munge"]\ndeny = {deny}\n'
        with open_site(engine, layer + extra) as site:
            plugstack = ""
            if spank:  # the admin's documented command (docs/admin.md)
                subprocess.run([str(VENV_BIN / "sdeefs"), "install-slurm", "--plugstack-dir",
                                str(base / "plugstack.conf.d")], check=True, capture_output=True,
                               env={**os.environ, "SDEEFS_CONFIG": str(site.config)})
                plugstack = f"include {base}/plugstack.conf.d/*.conf"
            for which in ("prolog", "epilog"):
                (base / f"{which}.sh").write_text(
                    f"#!/bin/sh\nSDEEFS_CONFIG={site.config} exec {VENV_BIN}/sdeefs-{which} "
                    f"2>>{base}/{which}-$SLURMD_NODENAME.log\n")
                os.chmod(base / f"{which}.sh", 0o755)
            user = site.add_user()
            for i in range(1, nodes + 1):  # each node's local disk: not the host root's fs
                mount_node_fs(base, i, node_fs)
            with cluster(str(base / "cluster"), nodes=nodes, prolog=str(base / "prolog.sh"),
                         epilog=str(base / "epilog.sh"), extra_conf=extra_conf,
                         plugstack=plugstack) as slurm:
                g = Grid(site, slurm, base, user, key, nodes)
                for i in range(nodes + 1):
                    g.start_replicad(i)
                try:
                    yield g
                finally:
                    if spank:  # the login environments name the cluster's munge directory
                        for name in site.users:  # (sockets): end them before it goes
                            subprocess.run([str(VENV_BIN / "sdeefs"), "stop", name],
                                           env=site.env(), capture_output=True)
                    for i in list(g.replicads):
                        g.kill_replicad(i)
                    for i in range(1, nodes + 1):  # a failed test may leave job environments
                        for run in (base / f"n{i}" / "jobs").glob("*.run"):
                            with contextlib.suppress(Exception):
                                from sdeefs import config as config_mod
                                from sdeefs.launcher.compute import job as job_mod

                                job_mod.epilog(config_mod.load(str(site.config)), f"n{i}",
                                               run.name.removesuffix(".run"))
    finally:
        for i in range(1, nodes + 1):
            subprocess.run(["umount", "-l", str(base / f"n{i}")], capture_output=True)
            loop = base / f"n{i}.loop"
            if loop.exists():  # detached when its last user (a lazy umount) lets go
                subprocess.run(["losetup", "-d", loop.read_text().strip()], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def mount_node_fs(base: Path, i: int, kind: str) -> None:
    """BASE/nI: node I's own filesystem (open_grid's ``node_fs``); an ext4 image's loop
    device is named in BASE/nI.loop for the clean-up."""
    target = base / f"n{i}"
    target.mkdir()
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=2g", "tmpfs", str(target)],
                       check=True)
        return
    if kind != "ext4":
        raise ValueError(f"node_fs: tmpfs or ext4, not {kind!r}")
    image = base / f"n{i}.img"
    subprocess.run(["truncate", "-s", "4G", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                    str(image)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(image)],
                          check=True, capture_output=True, text=True).stdout.strip()
    (base / f"n{i}.loop").write_text(loop)
    subprocess.run(["mount", loop, str(target)], check=True)
    os.chmod(target, 0o755)


def install_software(g: Grid) -> None:
    """What a user does at login: a shared library, a program linked to it, a Python module."""
    src = g.site.home(g.user) / "src"
    g.site.run(g.user, f"mkdir -p {src}")
    (src / "greet.c").write_text(LIB_C)
    (src / "main.c").write_text(PROG_C)
    g.site.run(g.user, " && ".join([
        "mkdir -p /usr/local/lib/greet /usr/local/lib/python3/dist-packages",
        f"gcc -shared -fPIC -o /usr/local/lib/greet/libgreet.so {src}/greet.c",
        f"gcc -o /usr/local/bin/greet {src}/main.c -L/usr/local/lib/greet -lgreet "
        "-Wl,-rpath,/usr/local/lib/greet",
        "echo 'VALUE = 42' > /usr/lib/python3/dist-packages/sdeefs_demo.py",
    ]))


JOB = """#!/bin/sh
srun -N{nodes} {run} -- sh -c 'echo "$(hostname) $(id -u) $(greet) \\
  $(python3 -c "import sdeefs_demo; print(sdeefs_demo.VALUE)") $(cat /etc/sdeefs-demo)"'
"""


def job_lines(text: str) -> list[str]:
    return sorted(" ".join(line.split()) for line in text.splitlines() if line.startswith("n"))


@requires_slurm
@requires_launcher
def test_jobs_run_in_the_users_environment_on_every_node(grid: Grid) -> None:
    g = grid
    g.site.start(g.user)
    install_software(g)
    g.site.run(g.user, "echo v1 > /etc/sdeefs-demo")
    assert not Path("/usr/local/bin/greet").exists()  # the host did not change
    run = VENV_BIN / "sdeefs-run"

    text = g.submit(JOB.format(nodes=3, run=run), "-N3")
    assert job_lines(text) == [f"n{i} 0 hello from libgreet 42 v1" for i in (1, 2, 3)], text
    g.assert_converged()
    # The job environments are gone after the job: no scratch upper, no processes (the
    # scratch upper is removed in the background); the user's next one waits, never used.
    spare = [f".layers-{g.user}", f".spare-{g.user}", f".spare-{g.user}.run"]
    for i in (1, 2, 3):
        deadline = time.monotonic() + 20
        while sorted(os.listdir(g.base / f"n{i}" / "jobs")) != spare:
            assert time.monotonic() < deadline, os.listdir(g.base / f"n{i}" / "jobs")
            time.sleep(0.1)

    # Steps of one job on a node share one environment (started once by the prolog).
    steps = (f"#!/bin/sh\nsrun -N3 {run} -- sh -c 'echo $$ > /tmp/step1'\n"
             f"srun -N3 {run} -- sh -c 'echo $(hostname) step2 sees $(cat /tmp/step1 | wc -l)'\n")
    text = g.submit(steps, "-N3")
    assert job_lines(text) == [f"n{i} step2 sees 1" for i in (1, 2, 3)], text

    # srun -N2 straight from the login node.
    out = g.slurm.run(["srun", "-N2", str(run), "--", "sh", "-c", "hostname; cat /etc/sdeefs-demo"],
                      user=g.user, env={"SDEEFS_CONFIG": str(g.site.config)},
                      cwd=str(g.site.home(g.user)))
    assert out.stdout.count("v1") == 2, out.stdout + out.stderr

    # One byte changes: only that record travels, and the next job sees it.
    before = {i: g.received(i) for i in (1, 2, 3)}
    g.site.run(g.user, "printf 2 | dd of=/etc/sdeefs-demo bs=1 seek=1 conv=notrunc status=none")
    text = g.submit(JOB.format(nodes=3, run=run), "-N3")
    assert job_lines(text) == [f"n{i} 0 hello from libgreet 42 v2" for i in (1, 2, 3)], text
    for i in (1, 2, 3):
        delta = g.received(i) - before[i]
        assert 0 < delta < 4096, (i, delta)


@requires_slurm
@requires_launcher
def test_with_the_kernel_engine_a_job_submitted_right_after_an_install_sees_all_of_it() -> None:
    """The kernel engine journals after the fact (sdeefs.fs.capture): a job submitted the
    moment the install returned still sees every file, because the barrier drains the
    capture before it answers the head."""
    with open_grid(NODES, engine="kernel") as g:
        g.site.start(g.user)
        install_software(g)
        g.site.run(g.user, "mkdir /opt/many && for i in $(seq 1 500); do echo $i > /opt/many/f$i;"
                           " done && echo v1 > /etc/sdeefs-demo")
        run = VENV_BIN / "sdeefs-run"
        job = (f"#!/bin/sh\nsrun -N3 {run} -- sh -c 'echo \"$(hostname) $(ls /opt/many | wc -l) "
               f"$(cat /opt/many/f500) $(greet) $(cat /etc/sdeefs-demo)\"'\n")
        text = g.submit(job, "-N3")
        assert job_lines(text) == [f"n{i} 500 500 hello from libgreet v1" for i in (1, 2, 3)], \
            text
        g.assert_converged()
        g.site.run(g.user, "rm -r /opt/many && echo v2 > /etc/sdeefs-demo")
        text = g.submit(job, "-N3")
        assert job_lines(text) == [f"n{i} 0 hello from libgreet v2" for i in (1, 2, 3)], text
        g.assert_converged()


@requires_slurm
@requires_launcher
def test_replicas_converge_through_failures(grid: Grid) -> None:
    g = grid
    g.site.start(g.user)
    g.site.run(g.user, "mkdir -p /opt/data && echo start > /etc/sdeefs-demo")
    for i in (1, 2, 3):
        g.sync(i)

    # A replica daemon killed mid-stream and restarted resumes where it was.
    writer = subprocess.Popen(["runuser", "-u", g.user, "--", "env",
                               f"SDEEFS_RUN_DIR={g.site.run_dir}", str(VENV_BIN / "sdeefs-shell"),
                               "-c", "for i in $(seq 40); do head -c 1048576 /dev/urandom "
                               "> /opt/data/f$i; done"])
    time.sleep(0.5)
    g.kill_replicad(2)
    writer.wait(120)
    g.start_replicad(2)
    g.assert_converged()

    # A node's link goes down while the user works; it catches up when it returns.
    g.slurm.link_down(3)
    g.site.run(g.user, "rm -rf /opt/data/f1* && mv /opt/data/f2 /opt/data/renamed && "
               "echo during-outage > /etc/sdeefs-demo")
    time.sleep(1)
    g.slurm.link_up(3)
    g.assert_converged()

    # The login node's journaling daemon is killed -9 in the middle of a write; the next
    # login recovers it from the journal and the replicas converge on the result.
    pid = daemon_pid(str(g.site.root / g.user / "state"))
    assert pid is not None
    spin = subprocess.Popen(["runuser", "-u", g.user, "--", "env",
                             f"SDEEFS_RUN_DIR={g.site.run_dir}", str(VENV_BIN / "sdeefs-shell"),
                             "-c", "while :; do echo x >> /opt/data/spin; done"],
                            stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    os.kill(pid, signal.SIGKILL)
    g.site.stop(g.user)  # ends the writer too: it is in the environment's tree
    spin.wait(30)
    g.site.start(g.user)
    g.site.run(g.user, "echo after-crash > /etc/sdeefs-demo")
    g.assert_converged()
    text = g.submit(JOB.format(nodes=3, run=VENV_BIN / "sdeefs-run").replace(
        "$(greet) ", ""), "-N3")
    assert [line.split()[-1] for line in job_lines(text)] == ["after-crash"] * 3, text

    # Status on the login node shows every replica, with its lag.
    status = g.control(0, {"op": "status"})
    followers = status["origin"][g.user]["followers"]  # type: ignore[index]
    assert set(followers) == {"n1", "n2", "n3"}, followers
    out = subprocess.run([str(VENV_BIN / "sdeefs"), "status"], capture_output=True, text=True,
                         env={**g.site.env(), "SLURMD_NODENAME": LOGIN_NODE}, check=True).stdout
    for node in ("n1", "n2", "n3"):
        assert f"replica on {node}: acked" in out, out


@requires_slurm
@requires_launcher
def test_two_users_jobs_share_nodes_without_cross_talk(grid: Grid) -> None:
    g = grid
    other = g.site.add_user()
    for user, tag in ((g.user, "alpha"), (other, "beta")):
        g.site.start(user)
        g.site.run(user, f"echo {tag} > /etc/sdeefs-demo && mkdir -p /opt/{tag}")
    script = (f"#!/bin/sh\nsrun -N2 {VENV_BIN / 'sdeefs-run'} -- sh -c 'echo $(hostname) "
              "$(cat /etc/sdeefs-demo) $(ls -d /opt/alpha /opt/beta 2>/dev/null) $(id -u)'; "
              "sleep 1\n")
    jobs = [g.start_job(script, "-N2", "-w", "n1,n2", user=user) for user in (g.user, other)]
    texts = [g.wait(job) for job in jobs]
    assert job_lines(texts[0]) == [f"n{i} alpha /opt/alpha 0" for i in (1, 2)], texts
    assert job_lines(texts[1]) == [f"n{i} beta /opt/beta 0" for i in (1, 2)], texts
    for i in (1, 2):
        assert sorted(p.name for p in (g.base / f"n{i}" / "rep").iterdir()) == \
            sorted([g.user, other])


def wait_quiet_journal(journal: Path) -> int:
    """Until the user's journal ends in Done and Sync markers (a metadata change was the
    user's last) and stops growing: the user went idle.  Returns its head."""
    from sdeefs import records as rec
    from sdeefs.journal import JournalTail

    def entries() -> list[object]:
        tail = JournalTail(str(journal), 1)
        try:
            found: list[object] = []
            while batch := tail.poll():
                found.extend(batch)
            return found
        finally:
            tail.close()

    deadline = time.monotonic() + 30
    while True:
        now = entries()
        if [type(e.record) for e in now[-2:]] == [rec.Done, rec.Sync]:  # type: ignore[attr-defined]
            time.sleep(1)
            if len(entries()) == len(now):
                return int(now[-1].seq)  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, now[-3:]
        time.sleep(0.3)


@requires_slurm
@requires_launcher
def test_a_job_on_more_nodes_than_the_fanout_after_the_user_went_idle(grid5: Grid) -> None:
    """The prologs of a 5-node job start after the user stopped writing: the journal ends
    in marker records and nothing follows them.  The two nodes below the login node and
    the three below them must all pass the barrier (the relayed ones once never did, and
    the prolog timed out); again after an edit, with the tree already there."""
    g = grid5
    g.site.start(g.user)
    g.site.run(g.user, "mkdir -p /opt/x && head -c 4000000 /dev/urandom > /opt/x/blob && "
               "echo cold > /etc/sdeefs-demo && mkdir /opt/x/last")  # metadata, then idle
    journal = g.site.root / g.user / "state" / "journal"
    wait_quiet_journal(journal)
    job = (f"#!/bin/sh\nsrun -N5 {VENV_BIN / 'sdeefs-run'} -- sh -c "
           "'echo $(hostname) $(cat /etc/sdeefs-demo) $(md5sum < /opt/x/blob)'\n")
    blob = subprocess.run(["md5sum"], input=(g.site.upper(g.user) / "opt/x/blob").read_bytes(),
                          capture_output=True, check=True).stdout.decode().split()[0]
    text = g.submit(job, "-N5")
    assert job_lines(text) == [f"n{i} cold {blob} -" for i in range(1, 6)], text
    # relayed followers reach the login node's status through their relay's report, sent at
    # most every REPORT_INTERVAL: a job as short as this one can end before it arrives
    deadline = time.monotonic() + 10 * REPORT_INTERVAL
    while True:
        followers = g.control(0, {"op": "status"})["origin"][g.user]["followers"]  # type: ignore[index]
        if set(followers) == {f"n{i}" for i in range(1, 6)} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(followers) == {f"n{i}" for i in range(1, 6)}, followers
    assert sum(1 for f in followers.values() if f["direct"]) <= 2, followers

    g.site.run(g.user, "echo warm > /etc/sdeefs-demo && chmod 600 /opt/x/blob")
    wait_quiet_journal(journal)
    text = g.submit(job, "-N5")
    assert job_lines(text) == [f"n{i} warm {blob} -" for i in range(1, 6)], text
    g.assert_converged()
