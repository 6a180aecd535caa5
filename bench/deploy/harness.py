"""What a deploy method implements, and what the harness hands it.

A *deploy method* moves a directory tree (a user's upper layer) from the "login node" to
the "compute node". Both nodes are network namespaces on this machine joined by a veth
pair; they share the file system, so a method's compute-side files simply live in a
directory the method owns (under the ``workdir`` it is given, which is on the file system
standing for the compute node's local disk), written by processes that run inside the
compute namespace and receive the data over TCP. Before each timed deploy the harness reads
``src`` and ``dest`` once (warm page cache) and runs ``sync``.

To add a method without touching ``run.py``, create ``bench/deploy/<anything>_method.py``
defining ``METHODS: list[DeployMethod]``; ``run.py`` imports every such module (an import
error marks its methods unavailable, with the reason, instead of stopping the run)::

    from bench.deploy.harness import DeployMethod, Measurement, Net

    class MyMethod:
        name = "mine"
        description = "what it runs, with flags"   # optional, shown in the report
        dest = ""                                  # optional, see below

        def setup(self, net: Net, workdir: str) -> None: ...
        def deploy(self, src: str, scenario: str) -> Measurement: ...
        def teardown(self) -> None: ...

    METHODS: list[DeployMethod] = [MyMethod()]

The contract (the harness relies on it):

* ``setup`` runs once per benchmark run, before any deploy; start daemons there (with
  :meth:`Net.spawn`, inside ``net.compute_ns`` / ``net.login_ns``). Raise
  :class:`MethodUnavailable` with a one-line reason if the method cannot work here.
* ``deploy(src, scenario)`` makes the compute side hold an exact copy of ``src`` and returns
  the wall-clock seconds of the transfer and the payload bytes it sent (its own count, e.g.
  from the tool's statistics). The clock starts when the transfer starts and stops when the
  data is on the compute side (written into the page cache there: no fsync, for every
  method). Untimed preparation (clearing the destination, starting a receiver) may happen
  inside ``deploy`` before the clock starts; call :func:`settle` right before starting it.
* ``scenario`` is one of :data:`SCENARIOS` or :data:`SYNC`. Only ``"full"`` changes what
  must happen: the destination must be emptied first (untimed), so the transfer starts
  from nothing. ``"sync"`` is an untimed catch-up the harness uses to put a destination
  back to the base tree; every other value is an ordinary resubmission. A method must not
  use the name to skip work: the harness checks the destination after every deploy.
* ``src`` is read-only: its files are hard links into the cached data set. Between
  deploys the harness replaces files in ``src`` (new inodes, new mtimes), never edits
  them in place. Successive ``deploy`` calls of one method see one ``src`` path per data
  set, in this order: ``full``, ``nothing``, ``1pct``, ``edit64`` (those selected), with
  ``sync`` calls in between when a destination has to be brought back.
* ``dest`` (optional): after ``setup``, the path of the compute side's copy of the tree.
  When present, the harness compares it with ``src`` after every deploy (names, types,
  modes, owners, sizes, mtimes to the second, symlink targets, and the content of changed
  files); without it the results are marked unverified.
* ``teardown`` stops everything the method started (the harness also kills, by pid,
  whatever is still tracked or still inside the namespaces).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol

from bench.common import (
    CommandResult,
    ProcessTracker,
    TrackedProcess,
    log,
    one_line,
    run_command,
    wait_until,
)

FULL = "full"
NOTHING = "nothing"
ONE_PCT = "1pct"
EDIT64 = "edit64"
SCENARIOS: tuple[str, ...] = (FULL, NOTHING, ONE_PCT, EDIT64)
SYNC = "sync"  # untimed catch-up to the base tree, not a measured scenario

LOGIN_ADDR = "10.250.0.1"
COMPUTE_ADDR = "10.250.0.2"
PREFIX_LEN = 24

Side = Literal["login", "compute"]


class MethodUnavailable(RuntimeError):
    """``setup`` cannot work on this machine; the message is a one-line reason."""


class DeployFailed(RuntimeError):
    """One deploy went wrong; the message is a one-line reason."""


@dataclass(frozen=True)
class Measurement:
    """What one timed ``deploy`` reports.

    ``bytes_sent`` is the payload the method pushed from the login side (its own count,
    e.g. rsync's "Total bytes sent"); ``bytes_received`` what came back. The harness adds
    the bytes seen on the veth itself, headers included, so methods compare on the wire.
    """

    seconds: float
    bytes_sent: int
    bytes_received: int = 0
    detail: str = ""


class DeployMethod(Protocol):
    """One way of deploying an upper layer (see the module docstring for the contract).

    Optional attributes, read with ``getattr``: ``description: str`` (report text) and
    ``dest: str`` (compute-side copy of the tree, checked after every deploy).
    """

    name: str

    def setup(self, net: Net, workdir: str) -> None: ...

    def deploy(self, src: str, scenario: str) -> Measurement: ...

    def teardown(self) -> None: ...


SETTLE_MEMORY = "SDEEFS_DEPLOY_SETTLE_MEMORY"  # seconds settle() waits after its sync


def settle() -> None:
    """Flush dirty pages before a clock starts.

    The page cache stays warm (nothing is dropped), but without this the write-back of
    the previous deploy's gigabytes would run during the next measurement.

    With ``$SDEEFS_DEPLOY_SETTLE_MEMORY`` seconds (``run.py --settle-memory``) it then
    waits that long, so that every method's page cache comes from the same kind of free
    memory.  On this harness's VM, memory freed a few seconds earlier is handed back to the
    host (the virtio balloon's free page reporting), and the first write to each page of it
    faults on the host: a method that deleted its previous copy right before its clock
    (tar's ``empty_dir``) writes into memory still mapped, one whose copy went earlier
    (sdeefs, before the user's untimed rsync) into memory handed back, at 2-5x the CPU per
    byte (bench/RESULTS.md, branch applyext4).
    """
    os.sync()
    wait = float(os.environ.get(SETTLE_MEMORY) or 0)
    if wait > 0:
        time.sleep(wait)


def empty_dir(path: str | os.PathLike[str]) -> None:
    """Remove everything inside ``path`` (created if missing), keeping the directory."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


# --------------------------------------------------------------------------
# Processes inside the namespaces
# --------------------------------------------------------------------------


@dataclass(eq=False)
class Spawned:
    """A long-running process the harness or a method started inside a namespace.

    It leads its own process group, so :meth:`stop` ends exactly it and its children.
    """

    popen: subprocess.Popen[bytes]
    tracked: TrackedProcess | None
    tracker: ProcessTracker
    label: str
    _buffer: bytes = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def write_line(self, text: str) -> None:
        if self.popen.stdin is None:
            raise DeployFailed(f"{self.label}: stdin is not a pipe")
        self.popen.stdin.write(text.encode() + b"\n")
        self.popen.stdin.flush()

    def readline(self, timeout: float) -> str:
        """Next line of stdout (without the newline); raises DeployFailed on EOF or timeout.

        Reads the raw fd with select so a silent process cannot hang the benchmark.
        """
        stream = self.popen.stdout
        if stream is None:
            raise DeployFailed(f"{self.label}: stdout is not a pipe")
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeployFailed(f"{self.label}: no output within {timeout:.0f}s")
            ready, _, _ = select.select([stream.fileno()], [], [], left)
            if not ready:
                continue
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                code = self.popen.poll()
                raise DeployFailed(f"{self.label}: exited ({code}) before answering")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise DeployFailed(f"{self.label}: did not exit within {timeout:.0f}s") from None
        self._forget()
        return code

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace`` seconds; reap."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=5)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._forget()

    def _forget(self) -> None:
        if self.tracked is not None:
            self.tracker.forget(self.tracked)
            self.tracked = None


@dataclass(frozen=True)
class Net:
    """Two network namespaces joined by a veth pair (login 10.250.0.1, compute .2).

    ``login_if`` / ``compute_if`` are the veth ends inside each namespace. Every process
    started through :meth:`run` or :meth:`spawn` is tracked by pid in ``tracker`` so the
    harness can end it on any exit.
    """

    login_ns: str
    compute_ns: str
    login_if: str
    compute_if: str
    tracker: ProcessTracker = field(compare=False, repr=False)
    login_addr: str = LOGIN_ADDR
    compute_addr: str = COMPUTE_ADDR
    # CPUs each side's processes may run on (taskset's list form; "" = any): two one-core
    # "nodes" on one machine, so the login side's CPU time never comes out of the compute
    # side's, as it does not between two real nodes.
    login_cpus: str = ""
    compute_cpus: str = ""

    def namespace(self, side: Side) -> str:
        return self.login_ns if side == "login" else self.compute_ns

    def argv(self, side: Side, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` wrapped to run inside the namespace of ``side`` (on its CPUs)."""
        cpus = self.login_cpus if side == "login" else self.compute_cpus
        pin = ["taskset", "--cpu-list", cpus] if cpus else []
        return [*pin, "nsenter", f"--net=/run/netns/{self.namespace(side)}", "--",
                *(os.fspath(arg) for arg in argv)]

    def run(
        self,
        side: Side,
        argv: Sequence[str | os.PathLike[str]],
        *,
        timeout: float,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> CommandResult:
        """Run to completion inside ``side``; ``.elapsed`` is its wall-clock time."""
        return run_command(self.argv(side, argv), self.tracker, timeout=timeout, env=env,
                           cwd=cwd)

    def spawn(
        self,
        side: Side,
        argv: Sequence[str | os.PathLike[str]],
        *,
        label: str,
        stdin_pipe: bool = False,
        stdout_pipe: bool = False,
        log_file: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Spawned:
        """Start a background process inside ``side`` in its own process group.

        stderr (and stdout unless piped) goes to ``log_file`` or /dev/null: never to an
        unread pipe, which would block a chatty daemon.
        """
        with contextlib.ExitStack() as stack:
            sink: int | IO[bytes] = subprocess.DEVNULL
            if log_file is not None:
                sink = stack.enter_context(open(log_file, "ab"))  # noqa: SIM115 - closed by stack
            popen = subprocess.Popen(
                self.argv(side, argv),
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else sink,
                stderr=sink,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        tracked = self.tracker.track(popen.pid, label)
        return Spawned(popen, tracked, self.tracker, label)

    def wire_bytes(self) -> tuple[int, int]:
        """Bytes the login end of the veth has sent and received so far (headers included)."""
        result = run_command(["ip", "-n", self.login_ns, "-j", "-s", "link", "show", "dev",
                              self.login_if], self.tracker, timeout=10)
        if not result.ok:
            raise DeployFailed(f"reading veth counters: {result.failure_reason()}")
        stats = json.loads(result.stdout)[0]["stats64"]
        return int(stats["tx"]["bytes"]), int(stats["rx"]["bytes"])


# --------------------------------------------------------------------------
# Creating and removing the namespaces
# --------------------------------------------------------------------------


def _ip(args: Sequence[str], tracker: ProcessTracker) -> CommandResult:
    return run_command(["ip", *args], tracker, timeout=30)


def _must(result: CommandResult, step: str) -> None:
    if not result.ok:
        raise MethodUnavailable(f"{step}: {result.failure_reason()}")


def _existing_namespaces(tracker: ProcessTracker) -> set[str]:
    result = _ip(["netns", "list"], tracker)
    return {line.split()[0] for line in result.stdout.splitlines() if line.strip()}


def _namespace_pids(name: str, tracker: ProcessTracker) -> list[int]:
    """Processes inside our namespace: all of them descend from this benchmark."""
    result = _ip(["netns", "pids", name], tracker)
    return [int(word) for word in result.stdout.split() if word.isdigit()]


def remove_net(net: Net) -> list[str]:
    """Kill, by pid, every process left inside the namespaces, then delete them.

    Idempotent. Deleting a namespace deletes the veth end inside it, and with it the
    peer. A namespace still holding a process outlives ``ip netns del``, hence the kill.
    """
    notes: list[str] = []
    tracker = net.tracker
    existing = _existing_namespaces(tracker)
    for name in (net.login_ns, net.compute_ns):
        if name not in existing:
            continue
        leftovers = [proc for pid in _namespace_pids(name, tracker)
                     if (proc := tracker.track(pid, f"left in netns {name}")) is not None]
        notes += [f"killed {desc}" for desc in tracker.terminate(leftovers, grace_seconds=3)]
        result = _ip(["netns", "del", name], tracker)
        if not result.ok:
            notes.append(f"ip netns del {name}: {result.failure_reason()}")
    return notes


def cpu_set(cpus: str) -> set[int]:
    """taskset's list form ("0", "0-1,3") as a set of CPU numbers."""
    found: set[int] = set()
    for part in cpus.split(","):
        first, _, last = part.partition("-")
        found.update(range(int(first), int(last or first) + 1))
    return found


def pin_process(pid: int, cpus: str) -> None:
    """Move every thread of a running process (one not started through :class:`Net`,
    e.g. the login view's capture daemon) onto ``cpus``; its later threads inherit it."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpu_set(cpus))


def create_net(tracker: ProcessTracker, prefix: str = "sdd") -> Net:
    """Create the two namespaces and the veth pair; raise MethodUnavailable on failure.

    Names are ``<prefix>l<suffix>`` / ``<prefix>c<suffix>`` with a pid-derived suffix
    (interface names must stay within 15 characters), bumped if a namespace of that name
    already exists, so concurrent runs and leftovers of dead runs never collide with us.
    """
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        raise MethodUnavailable("needs `ip` (iproute2) and `nsenter` (util-linux)")
    existing = _existing_namespaces(tracker)
    base = os.getpid() % 100000
    for bump in range(100):
        suffix = f"{(base + bump) % 100000:05d}"
        names = (f"{prefix}l{suffix}", f"{prefix}c{suffix}")
        if not existing.intersection(names):
            break
    else:
        raise MethodUnavailable("no free network namespace name")
    net = Net(login_ns=names[0], compute_ns=names[1], login_if=f"{prefix}vl{suffix}",
              compute_if=f"{prefix}vc{suffix}", tracker=tracker)
    try:
        for name in names:
            _must(_ip(["netns", "add", name], tracker), f"ip netns add {name}")
        _must(_ip(["link", "add", net.login_if, "netns", net.login_ns, "type", "veth", "peer",
                   "name", net.compute_if, "netns", net.compute_ns], tracker),
              "creating the veth pair")
        for ns, ifname, addr in ((net.login_ns, net.login_if, net.login_addr),
                                 (net.compute_ns, net.compute_if, net.compute_addr)):
            # No IPv6 on the link: router solicitations and neighbour discovery would
            # otherwise add stray packets to the wire counters.
            result = run_command(["nsenter", f"--net=/run/netns/{ns}", "--", "sysctl", "-q",
                                  "-w", "net.ipv6.conf.all.disable_ipv6=1",
                                  "net.ipv6.conf.default.disable_ipv6=1"], tracker, timeout=30)
            if not result.ok:
                log(f"note: could not disable IPv6 in {ns}: {result.failure_reason()}")
            _must(_ip(["-n", ns, "addr", "add", f"{addr}/{PREFIX_LEN}", "dev", ifname], tracker),
                  f"address on {ifname}")
            _must(_ip(["-n", ns, "link", "set", "lo", "up"], tracker), f"lo up in {ns}")
            _must(_ip(["-n", ns, "link", "set", ifname, "up"], tracker), f"{ifname} up")
        ping = ["ping", "-c", "1", "-W", "1", net.compute_addr]
        if shutil.which("ping") is not None and not wait_until(
            lambda: run_command(net.argv("login", ping), tracker, timeout=10).ok, 10.0, 0.2
        ):
            raise MethodUnavailable(f"{net.login_ns} cannot reach {net.compute_addr}")
    except BaseException:
        remove_net(net)
        raise
    return net


@contextlib.contextmanager
def open_net(tracker: ProcessTracker, prefix: str = "sdd") -> Iterator[Net]:
    """Namespaces for the duration of the block; removed however the block ends."""
    net = create_net(tracker, prefix)
    try:
        yield net
    finally:
        for note in remove_net(net):
            log(f"cleanup: {note}")


def describe_failure(exc: BaseException) -> str:
    """One line for a failed deploy or setup."""
    text = one_line(str(exc)) or type(exc).__name__
    return text if isinstance(exc, DeployFailed | MethodUnavailable) else (
        f"{type(exc).__name__}: {text}")
