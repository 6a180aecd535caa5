"""A real SLURM cluster on this one machine, for tests that need jobs, prologs and compute nodes.

Topology (see /work/shared/notes/slurm-on-one-machine.md for the recipe and its pitfalls)::

    netns <p>hub : lo, bridge br0 10.S.0.1/24; slurmctld; clients (sbatch/srun/squeue) run here,
                   so it plays the login node
    netns <p>nI  : lo, eth0 10.S.0.(10+I)/24 (veth, peer <p>hI on br0 in the hub);
                   slurmd -N nI in its own UTS namespace with hostname nI
    root netns   : munged only (its unix socket lives in DIR; pathname sockets work across netns)

``<p>`` and ``S`` come from a hash of DIR, so clusters in different directories never share a
name. Every file the cluster makes lives under DIR; the only outside artefacts are the
``/run/netns/<p>*`` entries, which ``stop()`` removes. /etc/slurm, /etc/munge and /run/munge
are never touched.

A non-root submitter (``run(..., user=...)``) must be able to reach DIR/munge/munge.sock and
read DIR/etc/slurm.conf, so DIR and its parents must be searchable by that user (pytest's
``tmp_path`` is not: it lives under a 0700 directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest

# slurmctld and slurmd each live in their own netns, so fixed ports never clash between clusters.
CTLD_PORT = 16817
SLURMD_PORT = 16818

# Job states after which nothing more happens to a job (COMPLETING is deliberately absent:
# the epilog still runs then).
TERMINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT", "REVOKED",
})

_TOOLS = ("slurmctld", "slurmd", "munged", "nsenter", "unshare", "ip", "runuser", "srun",
          "sbatch", "squeue", "sinfo", "scontrol", "scancel")


def slurm_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "a SLURM cluster needs root (network namespaces, munged, slurmd)"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (run scripts/setup.sh)"
    return None


requires_slurm = pytest.mark.skipif(slurm_skip_reason() is not None,
                                    reason=slurm_skip_reason() or "")


class ClusterError(RuntimeError):
    """The cluster could not start or stop cleanly, or a client command failed."""


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} is missing)"
    return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; only its parent's wait() is missing.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ancestors() -> set[int]:
    """This process and its ancestors: never ours to kill, whatever their cwd."""
    found: set[int] = set()
    pid = os.getpid()
    while pid > 0 and pid not in found:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


@attrs.define(eq=False)
class Cluster:
    """One cluster rooted at ``directory``; build it with ``start_cluster`` or ``cluster``.

    ``procs`` holds the extra daemons started with ``hub_popen``/``node_popen``; each leads its
    own process group, which ``stop()`` kills.
    """

    directory: Path
    nodes: int
    prefix: str
    octet: int
    prolog: str | None = None
    epilog: str | None = None
    extra_conf: str = ""
    cpus: int = 2
    plugstack: str = ""
    procs: list[subprocess.Popen[Any]] = attrs.field(factory=list)

    @classmethod
    def create(cls, directory: str | os.PathLike[str], nodes: int = 3, *,
               prolog: str | None = None, epilog: str | None = None, extra_conf: str = "",
               cpus: int = 2, plugstack: str = "") -> Cluster:
        root = Path(os.path.realpath(directory))
        digest = hashlib.md5(str(root).encode()).hexdigest()
        # "sc" + 6 hex keeps "<p>h<NNN>" within IFNAMSIZ (15) for up to 999 nodes.
        return cls(root, nodes, "sc" + digest[:6], 100 + int(digest[6:14], 16) % 100,
                   prolog, epilog, extra_conf, cpus, plugstack)

    # -- names and paths ------------------------------------------------------------------

    @property
    def hub(self) -> str:
        return f"{self.prefix}hub"

    def node_netns(self, i: int) -> str:
        return f"{self.prefix}n{i}"

    def hub_port(self, i: int) -> str:
        """The hub-side end of node i's veth, enslaved to br0."""
        return f"{self.prefix}h{i}"

    @property
    def hub_addr(self) -> str:
        return f"10.{self.octet}.0.1"

    def node_addr(self, i: int) -> str:
        return f"10.{self.octet}.0.{10 + i}"

    @property
    def node_names(self) -> list[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    @property
    def conf(self) -> Path:
        return self.directory / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment client commands get: ours plus SLURM_CONF."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _path(self, *parts: str) -> Path:
        return self.directory.joinpath(*parts)

    def log(self, name: str) -> str:
        """The text of DIR/log/<name>.log (slurmctld, slurmd-n1, munged), or "" if missing."""
        try:
            return self._path("log", f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def _logs_tail(self, names: Sequence[str], lines: int = 25) -> str:
        return "\n".join(f"--- tail of {name}.log ---\n"
                         + _tail(self._path("log", f"{name}.log"), lines) for name in names)

    # -- command wrappers -----------------------------------------------------------------

    def _in_hub(self, argv: Sequence[str], user: str | None) -> list[str]:
        # setns needs root, so the namespace is entered first and privileges dropped after.
        drop = ["runuser", "-u", user, "--"] if user else []
        return ["nsenter", f"--net=/run/netns/{self.hub}", "--", *drop, *argv]

    def _in_node(self, i: int, argv: Sequence[str], user: str | None) -> list[str]:
        if not 1 <= i <= self.nodes:
            raise ValueError(f"no node {i} in a {self.nodes}-node cluster")
        # Same shape as slurmd's own start, so the process sees hostname nI like a job does.
        drop = ["runuser", "-u", user, "--"] if user else []
        return ["nsenter", f"--net=/run/netns/{self.node_netns(i)}", "--", "unshare", "--uts",
                "--", "sh", "-c", 'hostname "$0" && exec "$@"', f"n{i}", *drop, *argv]

    def _run(self, argv: list[str], *, env: Mapping[str, str] | None, timeout: float,
             check: bool, input: str | None, cwd: str | os.PathLike[str] | None,
             shown: Sequence[str]) -> subprocess.CompletedProcess[str]:
        full_env = {**self.env, **(env or {})}
        # Own session, so a timeout kills runuser's child (srun) too, not only runuser.
        proc = subprocess.Popen(argv, env=full_env, cwd=cwd if cwd is not None else self.directory,
                                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise ClusterError(f"{' '.join(shown)} timed out after {timeout} s\n"
                               f"stdout: {out.strip()}\nstderr: {err.strip()}") from None
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and result.returncode != 0:
            raise ClusterError(f"{' '.join(shown)} failed ({result.returncode})\n"
                               f"stdout: {out.strip()}\nstderr: {err.strip()}")
        return result

    def run(self, argv: Sequence[str], user: str | None = None,
            env: Mapping[str, str] | None = None, timeout: float = 120, check: bool = True, *,
            input: str | None = None, cwd: str | os.PathLike[str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run a client command on the login node (the hub), as root or as ``user``.

        ``env`` is added to ours; sbatch/srun export it to the job. The default cwd is DIR, so
        job leftovers are recognisable by their cwd.
        """
        return self._run(self._in_hub(argv, user), env=env, timeout=timeout, check=check,
                         input=input, cwd=cwd, shown=argv)

    def node_run(self, i: int, argv: Sequence[str], user: str | None = None,
                 env: Mapping[str, str] | None = None, timeout: float = 120, check: bool = True,
                 *, input: str | None = None, cwd: str | os.PathLike[str] | None = None,
                 ) -> subprocess.CompletedProcess[str]:
        """Run a command in node i's network namespace (hostname nI) and wait for it."""
        return self._run(self._in_node(i, argv, user), env=env, timeout=timeout, check=check,
                         input=input, cwd=cwd, shown=[f"n{i}:", *argv])

    def _popen(self, argv: list[str], kwargs: dict[str, Any]) -> subprocess.Popen[Any]:
        kwargs["env"] = {**self.env, **(kwargs.get("env") or {})}
        kwargs.setdefault("cwd", self.directory)
        # The process leads its own group, so stop() can kill it and everything it forked.
        kwargs["start_new_session"] = True
        proc: subprocess.Popen[Any] = subprocess.Popen(argv, **kwargs)
        self.procs.append(proc)
        return proc

    def hub_popen(self, argv: Sequence[str], *, user: str | None = None,
                  **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running process on the login node; ``stop()`` kills its group.

        ``kwargs`` go to ``subprocess.Popen``; an ``env`` there is added to ours.
        """
        return self._popen(self._in_hub(argv, user), kwargs)

    def node_popen(self, i: int, argv: Sequence[str], *, user: str | None = None,
                   **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a long-running process on node i (its netns, hostname nI)."""
        return self._popen(self._in_node(i, argv, user), kwargs)

    def _ip(self, *args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise ClusterError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")

    def link_down(self, i: int) -> None:
        """Cut node i off the network (its cable, i.e. the hub-side end of its veth)."""
        self._ip("-n", self.hub, "link", "set", self.hub_port(i), "down")

    def link_up(self, i: int) -> None:
        self._ip("-n", self.hub, "link", "set", self.hub_port(i), "up")

    # -- jobs -----------------------------------------------------------------------------

    def sbatch(self, script: str, args: Sequence[str] = (), user: str | None = None,
               env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike[str] | None = None) -> int:
        """Submit ``script`` (its text, with a #! line) and return the job id.

        slurmctld schedules batch jobs from a once-a-second loop, and reads batch_sched_delay
        only on its first pass, so a batch job waits ~1 s to start (~3 s just after start).
        srun/salloc allocations are scheduled at once.
        """
        result = self.run(["sbatch", "--parsable", *args], user=user, env=env, input=script,
                          cwd=cwd, timeout=60)
        return int(result.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> str | None:
        """The job's state as slurmctld sees it, or None once it has forgotten the job."""
        result = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False,
                          timeout=30)
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:
                return None
            raise ClusterError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
        match = re.search(r"\bJobState=(\S+)", result.stdout)
        if match is None:
            raise ClusterError(f"no JobState in: {result.stdout.strip()}")
        return match.group(1)

    def wait_job(self, job_id: int, timeout: float = 120) -> str:
        """Wait until the job is over (epilog included) and return its final state.

        Returns "UNKNOWN" if slurmctld purged the record before a final state was seen; with
        MinJobAge and slurmctld's purge interval that takes far longer than one poll.
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state is None:
                return "UNKNOWN"
            if state in TERMINAL_STATES:
                return state
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} still {state} after {timeout} s\n"
                                   + self._logs_tail(["slurmctld"]))
            time.sleep(0.1)

    def node_states(self) -> dict[str, str]:
        result = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=30)
        return dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until every node is idle (registered, and no job on it)."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while True:
            with contextlib.suppress(ClusterError):
                states = self.node_states()
                if all(states.get(name) == "idle" for name in self.node_names):
                    return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"nodes not idle after {timeout} s: {states}\n"
                    + self._logs_tail(["slurmctld", *(f"slurmd-{n}" for n in self.node_names)]))
            time.sleep(0.05)

    # -- start ----------------------------------------------------------------------------

    def _slurm_conf(self) -> str:
        d = self.directory
        lines = [
            "# generated by tests/cluster/slurm_cluster.py",
            "ClusterName=sdtest",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}({self.hub_addr})",
            f"SlurmctldPort={CTLD_PORT}",
            f"SlurmdPort={SLURMD_PORT}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={d}/munge/munge.sock",
            "CredType=cred/munge",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/run/slurmctld.pid",
            f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            # batch_sched_delay defaults to 3 s: every sbatch would wait that long to start.
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # Silences "configuration differs from hardware" and allows more CPUs than we have.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            "MinJobAge=5",
            "MessageTimeout=10",
            f"PlugStackConfig={d}/etc/plugstack.conf",
        ]
        if self.prolog:
            lines += [f"Prolog={self.prolog}", "PrologFlags=Alloc"]
        if self.epilog:
            lines.append(f"Epilog={self.epilog}")
        lines += [f"NodeName=n{i} NodeHostname=n{i} NodeAddr={self.node_addr(i)} "
                  f"CPUs={self.cpus} State=UNKNOWN" for i in range(1, self.nodes + 1)]
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        if self.extra_conf:
            lines.append(self.extra_conf.rstrip("\n"))
        return "\n".join(lines) + "\n"

    def _write_files(self) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        # Non-root submitters need the munge socket and slurm.conf.
        d.chmod(0o755)
        for sub in ("etc", "munge", "run", "log", "state", "spool"):
            (d / sub).mkdir(exist_ok=True)
            (d / sub).chmod(0o755)
        for name in self.node_names:
            (d / "spool" / name).mkdir(exist_ok=True)
        # A fresh state dir plus `slurmctld -i` gives a clean start every time.
        for old in (d / "state").iterdir():
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        self.conf.write_text(self._slurm_conf())
        (d / "etc" / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        (d / "etc" / "plugstack.conf").write_text(self.plugstack.rstrip("\n") + "\n"
                                                  if self.plugstack else "")
        key = d / "munge" / "munge.key"
        with contextlib.suppress(FileNotFoundError):
            key.unlink()
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))

    def _start_munged(self) -> None:
        d = self.directory
        sock = d / "munge" / "munge.sock"
        result = subprocess.run(
            ["munged", "--force", f"--key-file={d}/munge/munge.key", f"--socket={sock}",
             f"--pid-file={d}/run/munged.pid", f"--log-file={d}/log/munged.log",
             f"--seed-file={d}/munge/munged.seed"],
            capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise ClusterError(f"munged failed ({result.returncode}): {result.stderr.strip()}\n"
                               + self._logs_tail(["munged"]))
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline:
                raise ClusterError("munged socket never appeared\n" + self._logs_tail(["munged"]))
            time.sleep(0.01)

    def _make_network(self) -> None:
        cidr = f"10.{self.octet}.0.1/24"
        self._ip("netns", "add", self.hub)
        self._ip("-n", self.hub, "link", "set", "lo", "up")
        self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.hub, "addr", "add", cidr, "dev", "br0")
        self._ip("-n", self.hub, "link", "set", "br0", "up")
        for i in range(1, self.nodes + 1):
            ns = self.node_netns(i)
            self._ip("netns", "add", ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("link", "add", self.hub_port(i), "netns", self.hub, "type", "veth",
                     "peer", "name", "eth0", "netns", ns)
            self._ip("-n", self.hub, "link", "set", self.hub_port(i), "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{self.node_addr(i)}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")

    def _start_daemons(self) -> None:
        conf = str(self.conf)
        # nsenter, not `ip netns exec`: the latter remounts /sys, hiding the cgroup fs that
        # slurmd 22.05 insists on initialising. Both daemons fork into the background.
        starters = [("slurmctld", subprocess.Popen(
            self._in_hub(["slurmctld", "-f", conf, "-i"], None), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))]
        starters += [(f"slurmd-n{i}", subprocess.Popen(
            self._in_node(i, ["slurmd", "-f", conf, "-N", f"n{i}"], None),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)) for i in range(1, self.nodes + 1)]
        failed = []
        for name, proc in starters:
            out, _ = proc.communicate(timeout=60)
            if proc.returncode != 0:
                failed.append(f"{name} exited {proc.returncode}: {out.strip()}\n"
                              + self._logs_tail([name]))
        if failed:
            raise ClusterError("\n".join(failed))

    def start(self) -> None:
        """Start everything; on failure clean up and raise with the relevant log tails."""
        # Checked before touching anything, so a live cluster (ours, or one whose DIR hashes
        # the same) is neither disturbed nor torn down by the cleanup below.
        existing = self._our_netns()
        if existing or self._pidfile_pid("slurmctld") or self._pidfile_pid("munged"):
            raise ClusterError(f"a cluster in {self.directory} (or netns {existing}) is running "
                               f"or was not stopped; Cluster.create(DIR).stop() cleans it up")
        try:
            self._write_files()
            self._start_munged()
            self._make_network()
            self._start_daemons()
            self.wait_idle()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.stop()
            if isinstance(exc, ClusterError):
                raise ClusterError(f"cluster in {self.directory} failed to start: {exc}") from exc
            raise

    # -- stop -----------------------------------------------------------------------------

    def _pidfile_pid(self, name: str) -> int | None:
        """The pid in DIR/run/<name>.pid if that process is alive and really ours."""
        try:
            pid = int(self._path("run", f"{name}.pid").read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except (OSError, ValueError):
            return None
        # Guards against a recycled pid: our daemons name DIR on their command line.
        return pid if str(self.directory) in cmdline and _alive(pid) else None

    def _our_netns(self) -> list[str]:
        try:
            names = os.listdir("/run/netns")
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(self.prefix))

    def _under(self, path: str) -> bool:
        root = str(self.directory)
        return path == root or path.startswith(root + "/")

    def _processes(self) -> dict[int, str]:
        """Processes whose cwd is under DIR or whose command line names DIR, with a reason."""
        found: dict[int, str] = {}
        skip = _ancestors()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in skip:
                continue
            pid = int(entry)
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)")
            except OSError:
                cwd = ""
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if not _alive(pid):
                continue
            if self._under(cwd):
                found[pid] = f"pid {pid} cwd={cwd} cmd={cmdline}"
            elif str(self.directory) + "/" in cmdline:
                found[pid] = f"pid {pid} cmd={cmdline}"
        return found

    def _strays(self) -> set[int]:
        """What stop() may KILL: processes in DIR, slurm daemons of a half-started cluster, and
        the job tasks below an orphaned slurmstepd (which would outlive a KILLed slurmstepd).

        Anything else naming DIR (a test's own helper, say) is only reported by leftovers().
        """
        conf = str(self.conf)
        found: set[int] = set()
        for pid in self._processes():
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)")
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
            except OSError:
                continue
            if self._under(cwd) or conf in cmdline:
                found.add(pid)
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError), \
                        open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry))
        todo = list(found)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found - _ancestors()

    def _jobs(self) -> list[str]:
        result = self.run(["squeue", "-h", "-o", "%i"], timeout=15, check=False)
        if result.returncode != 0:
            return []
        return result.stdout.split()

    def cancel_jobs(self) -> None:
        """Cancel every job and wait (10 s at most) until none is left."""
        if self._pidfile_pid("slurmctld") is None:
            return
        with contextlib.suppress(ClusterError):
            jobs = self._jobs()
            if jobs:
                self.run(["scancel", *jobs], timeout=15, check=False)
            deadline = time.monotonic() + 10
            while jobs and time.monotonic() < deadline:
                time.sleep(0.1)
                jobs = self._jobs()

    @staticmethod
    def _terminate(pids: Sequence[int], groups: Sequence[int], grace: float) -> None:
        """TERM pids and process groups together, then KILL whatever outlives ``grace``."""
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pgid in groups:
            # Also catches members that outlived their leader.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)

    def leftovers(self) -> list[str]:
        """What of this cluster still exists outside DIR's files: processes and netns."""
        return ([*self._processes().values()]
                + [f"netns {name}" for name in self._our_netns()])

    def stop(self) -> None:
        """Take everything down. Idempotent, and safe after a partially failed start."""
        self.cancel_jobs()
        # Globbed rather than derived from node_names, so a Cluster.create() with the wrong
        # node count still stops a stale cluster in the same DIR.
        names = ["slurmctld", *(p.stem for p in self._path("run").glob("slurmd-*.pid"))]
        daemons = [pid for pid in map(self._pidfile_pid, names) if pid is not None]
        extras = [proc for proc in self.procs if proc.returncode is None]
        self._terminate(daemons, [proc.pid for proc in extras], grace=10)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self.procs.clear()
        # slurmstepd outlives slurmd; it and any job leftovers sit in DIR (slurmd's log dir or
        # the default job cwd). Daemons of a half-started cluster name DIR on their command line.
        deadline = time.monotonic() + 10
        while True:
            stray = self._strays()
            if not stray or time.monotonic() > deadline:
                break
            for pid in stray:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        munged = self._pidfile_pid("munged")
        if munged is not None:
            self._terminate([munged], [], grace=5)
        for name in self._our_netns():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        left = self.leftovers()
        if left:
            raise ClusterError(f"cluster in {self.directory} left behind:\n" + "\n".join(left))


def start_cluster(directory: str | os.PathLike[str], nodes: int = 3, prolog: str | None = None,
                  epilog: str | None = None, extra_conf: str = "", cpus: int = 2, *,
                  plugstack: str = "") -> Cluster:
    """Start a cluster in ``directory`` (created if needed, private to the cluster).

    ``prolog``/``epilog`` are absolute paths of executables; ``extra_conf`` is appended to
    slurm.conf; ``plugstack`` becomes DIR/etc/plugstack.conf (e.g. "required /abs/x.so").
    """
    result = Cluster.create(directory, nodes, prolog=prolog, epilog=epilog,
                            extra_conf=extra_conf, cpus=cpus, plugstack=plugstack)
    result.start()
    return result


@contextlib.contextmanager
def cluster(directory: str | os.PathLike[str], nodes: int = 3, prolog: str | None = None,
            epilog: str | None = None, extra_conf: str = "", cpus: int = 2, *,
            plugstack: str = "") -> Iterator[Cluster]:
    """``start_cluster`` whose cluster is always stopped, even if the body raises."""
    running = start_cluster(directory, nodes, prolog, epilog, extra_conf, cpus,
                            plugstack=plugstack)
    try:
        yield running
    finally:
        running.stop()
