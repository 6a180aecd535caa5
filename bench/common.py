"""Shared helpers for the sdeefs benchmarks (stdlib only).

This module holds everything a benchmark harness needs that is not specific
to one set of workloads:

* running commands with a timeout while tracking every process we start
  (:class:`ProcessTracker`, :func:`run_command`, :func:`timed_command`);
* reading ``/proc/self/mountinfo`` and forcing mounts away
  (:func:`mount_at`, :func:`force_unmount`);
* the contenders compared by the benchmarks (native directory, kernel
  overlayfs, fuse-overlayfs, sdeefs engines) behind one :class:`Contender`
  interface, and a :class:`MountManager` that remembers every mount it made;
* a :class:`BenchSession` context manager that owns a scratch directory under
  ``/var/tmp`` and guarantees cleanup (unmount, kill our processes, remove the
  scratch directory) on normal exit, on errors and on Ctrl-C / SIGTERM;
* result bookkeeping with medians and ratios to a baseline, rendered as a
  plain-text or Markdown table (:class:`ResultTable`).

The harnesses run as root (mounting needs it).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from sdeefs import mountinfo

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SDEEFS_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
SCRATCH_PARENT = Path("/var/tmp")
FUSECTL_DIR = Path("/sys/fs/fuse/connections")


_STARTED = time.monotonic()


def log(message: str) -> None:
    """Progress output, stamped with seconds since start, goes to stderr so
    stdout stays clean for the table."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def load_sodium() -> ctypes.CDLL | None:
    """libsodium, initialised, for a benchmark's comparison with it (None: not installed;
    sdeefs itself no longer uses it)."""
    path = ctypes.util.find_library("sodium")
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    return lib if lib.sodium_init() >= 0 else None


def one_line(text: str, limit: int = 200) -> str:
    """The last non-empty line of ``text``, shortened to ``limit`` characters."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------


class BenchInterrupted(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives."""


@contextlib.contextmanager
def termination_signals_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into an exception so ``finally`` blocks run."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise BenchInterrupted(f"received {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


_deferral_depth = 0


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM/SIGHUP while cleanup runs so it is not cut short.

    A signal that arrives meanwhile is re-raised as an interruption when the
    outermost deferred block ends.
    """
    global _deferral_depth
    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    pending: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)
        log(f"{signal.Signals(signum).name} received; finishing cleanup first")

    if _deferral_depth > 0:
        yield
        return
    previous = {sig: signal.signal(sig, remember) for sig in watched}
    _deferral_depth += 1
    try:
        yield
    finally:
        _deferral_depth -= 1
        for sig, old in previous.items():
            signal.signal(sig, old)
    if pending:
        raise BenchInterrupted(f"received {signal.Signals(pending[0]).name}")


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------


def _process_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain ") ".
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass(frozen=True)
class TrackedProcess:
    """A process we started, identified by pid *and* start time (no pid reuse)."""

    pid: int
    start_ticks: int
    label: str

    def is_alive(self) -> bool:
        stat = _process_stat(self.pid)
        return stat is not None and stat[1] == self.start_ticks and stat[0] != "Z"

    def describe(self) -> str:
        return f"pid {self.pid} ({self.label})"


class ProcessTracker:
    """Remembers every process the benchmark started so it can end exactly those."""

    def __init__(self) -> None:
        self._tracked: dict[tuple[int, int], TrackedProcess] = {}

    def track(self, pid: int, label: str) -> TrackedProcess | None:
        stat = _process_stat(pid)
        if stat is None:
            return None
        proc = TrackedProcess(pid=pid, start_ticks=stat[1], label=label)
        self._tracked[(proc.pid, proc.start_ticks)] = proc
        return proc

    def forget(self, proc: TrackedProcess) -> None:
        self._tracked.pop((proc.pid, proc.start_ticks), None)

    def alive(self) -> list[TrackedProcess]:
        return [proc for proc in self._tracked.values() if proc.is_alive()]

    def terminate(self, procs: Sequence[TrackedProcess], grace_seconds: float = 5.0) -> list[str]:
        """SIGTERM, wait, then SIGKILL the given tracked processes.

        Returns a description of each process that had to be signalled.
        """
        signalled: list[str] = []
        for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
            remaining = [proc for proc in procs if proc.is_alive()]
            if not remaining:
                break
            for proc in remaining:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(proc.pid, sig)
                signalled.append(f"{proc.describe()} <- {sig.name}")
            wait_until(_all_exited(remaining), wait)
        for proc in procs:
            if not proc.is_alive():
                self.forget(proc)
        return signalled

    def terminate_all(self, grace_seconds: float = 5.0) -> list[str]:
        return self.terminate(list(self._tracked.values()), grace_seconds)


def _all_exited(procs: Sequence[TrackedProcess]) -> Callable[[], bool]:
    return lambda: not any(proc.is_alive() for proc in procs)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def processes_referencing(text: str, exclude: Sequence[int] = ()) -> list[int]:
    """Pids whose command line has an argument containing ``text``.

    Used with unique scratch paths (mount points, session directories) to find
    daemons that a mount command left running in the background: such a path
    only appears in the command lines of processes this benchmark started.
    """
    skip = {os.getpid(), *exclude}
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in skip:
            continue
        if any(text in arg for arg in _process_cmdline(pid)):
            found.append(pid)
    return found


def processes_in_group(pgid: int) -> list[int]:
    """Pids whose process group is ``pgid`` (a group we created)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(int(entry.name)) == pgid:
                found.append(int(entry.name))
    return found


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    pid: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def failure_reason(self) -> str:
        detail = one_line(self.stderr) or one_line(self.stdout) or "no output"
        return f"exit {self.returncode}: {detail}"


class CommandTimeout(RuntimeError):
    pass


class CommandFailed(RuntimeError):
    pass


def run_command(
    argv: Sequence[str | os.PathLike[str]],
    tracker: ProcessTracker,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    capture: bool = True,
) -> CommandResult:
    """Run ``argv`` in its own process group and wait for it.

    Output goes to anonymous temporary files rather than pipes, so a command
    that leaves a daemon behind holding stdout/stderr (``fuse-overlayfs``,
    ``sdeefs mount``) does not block us. On timeout or interruption the whole
    process group of the command (only processes we started) is killed.
    """
    args = tuple(os.fspath(arg) for arg in argv)
    out_file: IO[bytes] | None = None
    err_file: IO[bytes] | None = None
    with contextlib.ExitStack() as stack:
        if capture:
            out_file = stack.enter_context(tempfile.TemporaryFile())
            err_file = stack.enter_context(tempfile.TemporaryFile())
        start = time.perf_counter()
        popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out_file if capture else subprocess.DEVNULL,
            stderr=err_file if capture else subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
        tracked: TrackedProcess | None = None
        try:
            tracked = tracker.track(popen.pid, shlex.join(args[:3]))
            returncode = popen.wait(timeout=timeout)
        except BaseException as exc:  # timeout, Ctrl-C, SIGTERM
            _kill_group(popen)
            if isinstance(exc, subprocess.TimeoutExpired):
                name = Path(args[0]).name
                raise CommandTimeout(f"{name} timed out after {timeout:.0f}s") from None
            raise
        finally:
            if tracked is not None:
                tracker.forget(tracked)
        elapsed = time.perf_counter() - start

        def read(handle: IO[bytes] | None) -> str:
            if handle is None:
                return ""
            handle.seek(0)
            return handle.read().decode(errors="replace")

        return CommandResult(args, returncode, read(out_file), read(err_file), elapsed, popen.pid)


def _kill_group(popen: subprocess.Popen[bytes]) -> None:
    """Kill the process group led by ``popen`` (still unreaped, so the id is ours)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=10)
    # Members other than the leader (fio's job processes) may take a moment to die.
    wait_until(lambda: not processes_in_group(popen.pid), 10.0, interval=0.1)


def timed_command(
    argv: Sequence[str | os.PathLike[str]],
    tracker: ProcessTracker,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> float:
    """Wall-clock seconds taken by ``argv``; raises :class:`CommandFailed` on failure."""
    result = run_command(argv, tracker, timeout=timeout, env=env, cwd=cwd)
    if not result.ok:
        raise CommandFailed(f"{Path(result.argv[0]).name}: {result.failure_reason()}")
    return result.elapsed


# --------------------------------------------------------------------------
# Mount table
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    major: int
    minor: int
    mount_point: Path
    fs_type: str
    source: str


def read_mounts() -> list[MountEntry]:
    """This namespace's mounts (parsed, escapes undone, by ``sdeefs.mountinfo``)."""
    entries: list[MountEntry] = []
    for mount in mountinfo.mounts():
        major, _, minor = mount.device.partition(":")
        entries.append(MountEntry(mount.mount_id, int(major), int(minor), Path(mount.point),
                                  mount.fstype, mount.source))
    return entries


def mount_at(path: Path) -> MountEntry | None:
    """The top-most mount whose mount point is exactly ``path``."""
    target = Path(os.path.abspath(path))
    matches = [entry for entry in read_mounts() if entry.mount_point == target]
    return matches[-1] if matches else None


def mounts_under(path: Path) -> list[MountEntry]:
    """Mounts at ``path`` or anywhere below it."""
    target = Path(os.path.abspath(path))
    return [
        entry
        for entry in read_mounts()
        if entry.mount_point == target or target in entry.mount_point.parents
    ]


def abort_fuse_connection(entry: MountEntry) -> bool:
    """Abort a (hung) FUSE connection through fusectl; True if it was possible."""
    abort_file = FUSECTL_DIR / str(entry.minor) / "abort"
    if entry.major != 0 or not entry.fs_type.startswith("fuse") or not abort_file.exists():
        return False
    try:
        abort_file.write_text("1")
    except OSError:
        return False
    return True


def force_unmount(
    mount_point: Path, tracker: ProcessTracker, *, timeout: float = 30.0
) -> list[str]:
    """Make sure nothing is mounted at ``mount_point``, escalating as needed.

    Tries ``umount``, then aborting the FUSE connection, then ``umount -l``
    (lazy) as a last resort. Returns notes about every escalation used; the
    mount is gone afterwards unless a note says otherwise. ``umount`` runs with
    ``--no-canonicalize`` so it does not stat the path, which would hang on a
    stuck FUSE daemon.
    """
    notes: list[str] = []
    for _attempt in range(5):  # several mounts may be stacked on one point
        entry = mount_at(mount_point)
        if entry is None:
            return notes
        umount = ["umount", "--no-canonicalize", str(mount_point)]
        result = _try(umount, tracker, timeout)
        if result is not None and result.ok and mount_at(mount_point) != entry:
            continue
        if entry.fs_type.startswith("fuse") and abort_fuse_connection(entry):
            notes.append(f"aborted FUSE connection {entry.minor} of {mount_point}")
            result = _try(umount, tracker, timeout)
            if result is not None and result.ok and mount_at(mount_point) != entry:
                continue
        _try(["umount", "--no-canonicalize", "--lazy", str(mount_point)], tracker, timeout)
        notes.append(f"lazy-unmounted {mount_point}")
        if mount_at(mount_point) == entry:
            notes.append(f"could not unmount {mount_point}")
            return notes
    if mount_at(mount_point) is not None:
        notes.append(f"could not unmount {mount_point}")
    return notes


def _try(argv: Sequence[str], tracker: ProcessTracker, timeout: float) -> CommandResult | None:
    try:
        return run_command(argv, tracker, timeout=timeout)
    except CommandTimeout:
        return None


def safe_remove_tree(path: Path) -> bool:
    """``rm -rf path`` unless a mount is at or below it (never delete through a mount)."""
    if not path.exists() and not path.is_symlink():
        return True
    if mounts_under(path):
        log(f"warning: not removing {path}: something is still mounted below it")
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


# --------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------


class MountError(RuntimeError):
    """A contender could not present a view (message is a one-line reason).

    ``daemons`` lists background processes the failed attempt left running,
    so the caller can end them.
    """

    def __init__(self, reason: str, daemons: Sequence[TrackedProcess] = ()) -> None:
        super().__init__(reason)
        self.daemons = list(daemons)


@dataclass(frozen=True)
class RunDirs:
    """Fresh per-mount directories: upper layer, overlay workdir, state, mount point."""

    root: Path
    upper: Path
    work: Path
    state: Path
    mount_point: Path

    @classmethod
    def create(cls, root: Path) -> RunDirs:
        dirs = cls(
            root=root,
            upper=root / "upper",
            work=root / "work",
            state=root / "state",
            mount_point=root / "mnt",
        )
        for directory in (dirs.upper, dirs.work, dirs.state, dirs.mount_point):
            directory.mkdir(parents=True)
        return dirs


@dataclass
class MountedView:
    """A view of the lower tree presented by one contender."""

    contender: Contender
    view: Path
    dirs: RunDirs | None
    daemons: list[TrackedProcess] = field(default_factory=list)


class Contender(ABC):
    """One way of presenting the lower tree as a writable view."""

    name: str = ""
    is_baseline: bool = False

    def prepare(self, lower: Path, scratch: Path, tracker: ProcessTracker) -> None:  # noqa: B027
        """One-time setup per benchmark run (after the lower tree exists); default none."""

    @abstractmethod
    def mount(self, lower: Path, dirs: RunDirs, tracker: ProcessTracker) -> MountedView:
        """Present a view; raise :class:`MountError` with a one-line reason on failure."""

    @abstractmethod
    def unmount(self, mounted: MountedView, tracker: ProcessTracker) -> list[str]:
        """Tear the view down the contender's own way; return notes on trouble."""

    def describe(self) -> str:
        return self.name


class NativeContender(Contender):
    """A plain directory on the host file system: a copy of the lower tree.

    The copy is made once per run so workloads that write (git refreshing its
    index, fio overwriting the mixed file) never touch the real lower tree.
    Entries a workload adds at the top level are removed after each run.
    """

    name = "native"
    is_baseline = True

    def __init__(self) -> None:
        self.root: Path | None = None
        self._baseline_entries: frozenset[str] = frozenset()

    def prepare(self, lower: Path, scratch: Path, tracker: ProcessTracker) -> None:
        self.root = scratch / "native"
        result = run_command(["cp", "-a", str(lower), str(self.root)], tracker, timeout=600)
        if not result.ok:
            raise MountError(f"copying the lower tree failed: {result.failure_reason()}")
        self._baseline_entries = frozenset(os.listdir(self.root))

    def mount(self, lower: Path, dirs: RunDirs, tracker: ProcessTracker) -> MountedView:
        if self.root is None:
            raise MountError("native copy of the lower tree was not prepared")
        return MountedView(self, self.root, dirs)

    def unmount(self, mounted: MountedView, tracker: ProcessTracker) -> list[str]:
        notes: list[str] = []
        for name in set(os.listdir(mounted.view)) - self._baseline_entries:
            entry = mounted.view / name
            if entry.is_dir() and not entry.is_symlink():
                if not safe_remove_tree(entry):
                    notes.append(f"could not remove {entry}")
            else:
                entry.unlink()
        return notes

    def describe(self) -> str:
        return "plain directory on the host ext4 (copy of the lower tree)"


class _MountCommandContender(Contender):
    """A contender mounted by running a command; unmounted by another command."""

    mount_timeout = 60.0
    unmount_timeout = 30.0

    @abstractmethod
    def mount_argv(self, lower: Path, dirs: RunDirs) -> list[str]: ...

    @abstractmethod
    def unmount_argv(self, mount_point: Path) -> list[str]: ...

    def command_cwd(self) -> Path | None:
        return None

    def mount(self, lower: Path, dirs: RunDirs, tracker: ProcessTracker) -> MountedView:
        argv = self.mount_argv(lower, dirs)
        try:
            result = run_command(argv, tracker, timeout=self.mount_timeout, cwd=self.command_cwd())
        except OSError as exc:  # the mount program itself is missing or not executable
            raise MountError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        except CommandTimeout:
            daemons = self._find_daemons(dirs.mount_point, None, tracker)
            raise MountError(
                f"mount command timed out after {self.mount_timeout:.0f}s", daemons
            ) from None
        daemons = self._find_daemons(dirs.mount_point, result.pid, tracker)
        if not result.ok:
            raise MountError(result.failure_reason(), daemons)
        if not wait_until(lambda: mount_at(dirs.mount_point) is not None, 10.0):
            raise MountError(
                "mount command succeeded but nothing is mounted at the mount point", daemons
            )
        return MountedView(self, dirs.mount_point, dirs, daemons)

    def _find_daemons(
        self, mount_point: Path, group: int | None, tracker: ProcessTracker
    ) -> list[TrackedProcess]:
        """Background processes the mount command left: they name our unique
        mount point on their command line or stayed in the command's group."""
        pids = set(processes_referencing(str(mount_point)))
        if group is not None:
            pids.update(processes_in_group(group))
        daemons: list[TrackedProcess] = []
        for pid in sorted(pids):
            proc = tracker.track(pid, f"{self.name} daemon for {mount_point}")
            if proc is not None:
                daemons.append(proc)
        return daemons

    def unmount(self, mounted: MountedView, tracker: ProcessTracker) -> list[str]:
        if mount_at(mounted.view) is None:
            return []
        try:
            result = run_command(
                self.unmount_argv(mounted.view),
                tracker,
                timeout=self.unmount_timeout,
                cwd=self.command_cwd(),
            )
        except CommandTimeout as exc:
            return [str(exc)]
        if not result.ok:
            return [f"{self.name} unmount failed: {result.failure_reason()}"]
        return []


class KernelOverlayContender(_MountCommandContender):
    name = "overlay"

    def mount_argv(self, lower: Path, dirs: RunDirs) -> list[str]:
        options = f"lowerdir={lower},upperdir={dirs.upper},workdir={dirs.work}"
        return ["mount", "-t", "overlay", "overlay", "-o", options, str(dirs.mount_point)]

    def unmount_argv(self, mount_point: Path) -> list[str]:
        return ["umount", str(mount_point)]

    def describe(self) -> str:
        return "kernel overlayfs"


class FuseOverlayfsContender(_MountCommandContender):
    name = "fuse-overlayfs"

    def mount_argv(self, lower: Path, dirs: RunDirs) -> list[str]:
        options = f"lowerdir={lower},upperdir={dirs.upper},workdir={dirs.work}"
        return ["fuse-overlayfs", "-o", options, str(dirs.mount_point)]

    def unmount_argv(self, mount_point: Path) -> list[str]:
        return ["fusermount3", "-u", str(mount_point)]

    def describe(self) -> str:
        return "Debian fuse-overlayfs"


class SdeefsContender(_MountCommandContender):
    """sdeefs through its CLI: ``python -m sdeefs mount --engine E ...``."""

    def __init__(
        self, name: str, engine: str, extra_args: Sequence[str] = (), python: Path | None = None,
        tree: Path | None = None,
    ) -> None:
        self.name = name
        self.engine = engine
        self.extra_args = tuple(extra_args)
        self.python = python or (
            DEFAULT_SDEEFS_PYTHON if DEFAULT_SDEEFS_PYTHON.exists() else Path(sys.executable)
        )
        # another checkout's sdeefs (e.g. a baseline before a change), run from its tree
        self.tree = tree

    def command_cwd(self) -> Path:
        # so `-m sdeefs` finds the package even if not installed (the cwd comes first)
        return self.tree or REPO_ROOT

    def mount_argv(self, lower: Path, dirs: RunDirs) -> list[str]:
        return [
            str(self.python),
            "-m",
            "sdeefs",
            "mount",
            "--engine",
            self.engine,
            *self.extra_args,
            "--lower",
            str(lower),
            "--upper",
            str(dirs.upper),
            "--state",
            str(dirs.state),
            str(dirs.mount_point),
        ]

    def unmount_argv(self, mount_point: Path) -> list[str]:
        return [str(self.python), "-m", "sdeefs", "umount", str(mount_point)]

    def describe(self) -> str:
        tree = [f"(the tree {self.tree})"] if self.tree is not None else []
        return " ".join(["sdeefs", "--engine", self.engine, *self.extra_args, *tree])


def standard_contenders(
    python: Path | None = None, base_tree: Path | None = None
) -> dict[str, Contender]:
    """All contenders known to the benchmarks, by name, in report order; ``base_tree`` adds
    sdeefs-fuse-base: the fuse engine of the sdeefs tree there (a baseline checkout)."""
    base: list[Contender] = (
        [SdeefsContender("sdeefs-fuse-base", "fuse", python=python, tree=base_tree)]
        if base_tree is not None else []
    )
    contenders: list[Contender] = [
        NativeContender(),
        KernelOverlayContender(),
        FuseOverlayfsContender(),
        *base,
        SdeefsContender("sdeefs-fuse", "fuse", python=python),
        SdeefsContender("sdeefs-hybrid", "hybrid", python=python),
        SdeefsContender("sdeefs-fuse-nojournal", "fuse", ["--no-journal"], python=python),
    ]
    return {contender.name: contender for contender in contenders}


# --------------------------------------------------------------------------
# Session: scratch directory, mounts, processes, cleanup
# --------------------------------------------------------------------------


class MountManager:
    """Mounts contenders on fresh run directories and remembers what is live."""

    def __init__(self, scratch: Path, tracker: ProcessTracker) -> None:
        self.scratch = scratch
        self.tracker = tracker
        self._live: list[MountedView] = []
        self._counter = 0
        self.notes: list[str] = []

    def mount(self, contender: Contender, lower: Path, label: str) -> MountedView:
        """Mount on fresh directories; on failure everything is released and
        :class:`MountError` propagates."""
        self._counter += 1
        dirs = RunDirs.create(self.scratch / "runs" / f"{self._counter:04d}-{label}")
        placeholder = MountedView(contender, dirs.mount_point, dirs)
        self._live.append(placeholder)
        try:
            mounted = contender.mount(lower, dirs, self.tracker)
        except BaseException as exc:
            if isinstance(exc, MountError):
                placeholder.daemons = exc.daemons
            self.release(placeholder, quiet=True)
            raise
        self._live[self._live.index(placeholder)] = mounted
        return mounted

    def release(self, mounted: MountedView, *, quiet: bool = False) -> list[str]:
        """Unmount (escalating if needed), end its daemons, delete its directories."""
        notes: list[str] = []
        with signals_deferred():
            try:
                notes += mounted.contender.unmount(mounted, self.tracker)
            except Exception as exc:  # noqa: BLE001 - cleanup must go on
                notes.append(f"{mounted.contender.name} unmount raised {exc!r}")
            if mounted.dirs is not None:
                # Everything below the run directory, newest first (an engine may
                # stack its own mounts, e.g. an overlay on top of a FUSE mount).
                for entry in reversed(mounts_under(mounted.dirs.root)):
                    notes += force_unmount(entry.mount_point, self.tracker)
                leftovers = [
                    self.tracker.track(pid, f"leftover for {mounted.dirs.root}")
                    for pid in processes_referencing(str(mounted.dirs.root))
                ]
                candidates = [*mounted.daemons, *(proc for proc in leftovers if proc is not None)]
                unique: dict[tuple[int, int], TrackedProcess] = {}
                for proc in candidates:
                    unique.setdefault((proc.pid, proc.start_ticks), proc)
                daemons = list(unique.values())
                if daemons and not wait_until(lambda: not any(d.is_alive() for d in daemons), 10.0):
                    notes += [f"killed {desc}" for desc in self.tracker.terminate(daemons)]
                for daemon in daemons:
                    self.tracker.forget(daemon)
                if not safe_remove_tree(mounted.dirs.root):
                    notes.append(f"left {mounted.dirs.root} behind")
            if mounted in self._live:
                self._live.remove(mounted)
        if notes and not quiet:
            for note in notes:
                log(f"  note: {note}")
        self.notes += notes
        return notes

    def release_all(self) -> None:
        for mounted in list(reversed(self._live)):
            self.release(mounted)


class BenchSession:
    """Context manager owning a scratch directory under /var/tmp.

    On exit — normal, exception or Ctrl-C/SIGTERM — every mount is released,
    every process we started is ended, and the scratch directory is removed.
    """

    def __init__(self, prefix: str, *, keep_scratch: bool = False) -> None:
        self.prefix = prefix
        self.keep_scratch = keep_scratch
        self.tracker = ProcessTracker()
        self.scratch = Path()
        self.mounts: MountManager | None = None
        self._signals: contextlib.ExitStack | None = None

    def __enter__(self) -> BenchSession:
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(termination_signals_interrupt())
        self.scratch = Path(tempfile.mkdtemp(prefix=self.prefix, dir=SCRATCH_PARENT))
        self.mounts = MountManager(self.scratch, self.tracker)
        return self

    def __exit__(self, *_exc: object) -> None:
        try:
            with signals_deferred():
                self._cleanup()
        finally:
            if self._signals is not None:
                self._signals.close()

    def _cleanup(self) -> None:
        if self.mounts is not None:
            self.mounts.release_all()
        for entry in mounts_under(self.scratch)[::-1]:
            for note in force_unmount(entry.mount_point, self.tracker):
                log(f"cleanup: {note}")
        for note in self._after_unmount():
            log(f"cleanup: {note}")
        for desc in self.tracker.terminate_all():
            log(f"cleanup: killed {desc}")
        stray = [
            proc
            for pid in processes_referencing(str(self.scratch))
            if (proc := self.tracker.track(pid, "stray process using scratch")) is not None
        ]
        for desc in self.tracker.terminate(stray):
            log(f"cleanup: killed {desc}")
        if not self.keep_scratch and not safe_remove_tree(self.scratch):
            log(f"cleanup: could not remove {self.scratch}")

    def _after_unmount(self) -> list[str]:
        """What else a subclass cleans up once the scratch holds no mount (before the
        processes it started are ended): the notes to log."""
        return []


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One row of a result table."""

    key: str
    label: str
    unit: str
    higher_is_better: bool

    def format_value(self, value: float) -> str:
        if self.unit == "s":
            return f"{value:.3f} s" if value < 100 else f"{value:.1f} s"
        if value >= 100:
            return f"{value:.0f} {self.unit}"
        if value >= 1:
            return f"{value:.1f} {self.unit}"
        return f"{value:.2g} {self.unit}"


class ResultTable:
    """Samples per (metric, contender); medians and ratios to a baseline."""

    def __init__(
        self, metrics: Sequence[Metric], contenders: Sequence[str], baseline: str = "native"
    ) -> None:
        self.metrics = list(metrics)
        self.contenders = list(contenders)
        self.baseline = baseline
        self.samples: dict[tuple[str, str], list[float]] = {}
        self.errors: dict[tuple[str, str], str] = {}
        self.unavailable: dict[str, str] = {}

    def add_sample(self, metric: str, contender: str, value: float) -> None:
        self.samples.setdefault((metric, contender), []).append(value)

    def add_error(self, metric: str, contender: str, reason: str) -> None:
        self.errors.setdefault((metric, contender), reason)

    def mark_unavailable(self, contender: str, reason: str) -> None:
        self.unavailable.setdefault(contender, reason)

    def median(self, metric: str, contender: str) -> float | None:
        values = self.samples.get((metric, contender))
        return statistics.median(values) if values else None

    def ratio(self, metric: Metric, contender: str) -> float | None:
        """Relative to the baseline; > 1 means better than the baseline."""
        value = self.median(metric.key, contender)
        base = self.median(metric.key, self.baseline)
        if value is None or base is None or value <= 0 or base <= 0:
            return None
        return value / base if metric.higher_is_better else base / value

    def cell(self, metric: Metric, contender: str) -> str:
        if contender in self.unavailable and (metric.key, contender) not in self.samples:
            return "unavailable"
        if (metric.key, contender) in self.errors:
            return "failed"
        value = self.median(metric.key, contender)
        if value is None:
            return "-"
        ratio = self.ratio(metric, contender)
        ratio_text = f" ({ratio:.2f}x)" if ratio is not None else ""
        return metric.format_value(value) + ratio_text

    def rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["workload", *self.contenders]
        rows = [
            [metric.label, *(self.cell(metric, name) for name in self.contenders)]
            for metric in self.metrics
        ]
        return header, rows

    def footnotes(self) -> list[str]:
        notes = [f"{name}: unavailable: {reason}" for name, reason in self.unavailable.items()]
        labels = {metric.key: metric.label for metric in self.metrics}
        notes += [
            f"{labels.get(key, key)} / {name}: failed: {reason}"
            for (key, name), reason in self.errors.items()
        ]
        return notes


def render_text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = str(cells[0]).ljust(widths[0])
        rest = [str(cell).rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    separator = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


def render_markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def escape(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    lines = ["| " + " | ".join(escape(cell) for cell in header) + " |"]
    lines.append("|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class HostInfo:
    command: str
    date: str
    kernel: str
    cpus: int
    python: str

    @classmethod
    def collect(cls) -> HostInfo:
        return cls(
            command=shlex.join([sys.executable, *sys.argv]),
            date=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            kernel=f"{platform.system()} {platform.release()} {platform.machine()}",
            cpus=os.cpu_count() or 0,
            python=platform.python_version(),
        )


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("this benchmark mounts file systems and must run as root")


def have_program(name: str) -> bool:
    return shutil.which(name) is not None
