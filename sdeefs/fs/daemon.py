"""The daemon process: forked, detached, and reporting back once it serves.

``sdeefs mount`` (and the guard's mount) fork a daemon that sets the mount up and
reports on a pipe, in one line: ``ok``, or ``<exit code> <reason>``.  So the command
returns only once the mount is usable, or prints the daemon's one-line reason and
exits with its code.  The daemon detaches (its own session, stdin from /dev/null,
stdout, stderr and logging to its log file) and keeps no descriptor of its caller.

While it serves, the journaling daemon holds ``STATE/lock`` (``flock``), which also
holds its pid: one daemon per state directory, and :func:`daemon_pid` tells whether
one runs and which.  Nothing here knows FUSE (``sdeefs.fs.mount`` says what to serve).

A daemon ends when its mount's last copy is gone.  Another mount namespace that copied
the mount (a root ``unshare -m``, a service with PrivateTmp) keeps it alive after the
unmount here, and the daemon with it, holding the lock: :func:`end_after_unmount` then
asks it to finish (SIGTERM: it stops serving, syncs and closes its journal, exits), so
the next mount of that state can start.  The daemon's working directory is ``/``: it
keeps no path of its caller busy.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

from .. import mountinfo
from ..errors import ExitCode, QuietError
from ..statedir import StateDir
from ..sysio import write_file_atomic

log = logging.getLogger(__name__)

Serve = Callable[[int], int]  # serve(ready_fd) -> exit code; reports on ready_fd


@contextlib.contextmanager
def state_lock(state: str) -> Iterator[int]:
    """Hold STATE/lock for the daemon's lifetime: one daemon per state directory."""
    fd = os.open(StateDir(state).lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise QuietError(f"cannot mount: state {state} is in use by daemon pid "
                             f"{_pid_in(fd)}", ExitCode.BUSY) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def daemon_pid(state: str) -> int | None:
    """The pid holding STATE/lock, or None if no daemon runs."""
    return lock_holder(StateDir(state).lock)


def lock_holder(path: str) -> int | None:
    """The pid written into a pid file that its writer holds flock'ed, or None (no file, or
    nobody holds the lock: the writer is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = _pid_in(fd)
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _pid_in(lock_fd: int) -> str:
    """What the daemon holding STATE/lock wrote into it: its pid."""
    return os.pread(lock_fd, 32, 0).decode(errors="replace").strip()


def wait_exit(state: str, timeout: float | None) -> None:
    """Wait until no daemon holds STATE/lock (its journal is closed); None: for ever."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while daemon_pid(state) is not None:
        if deadline is not None and time.monotonic() > deadline:
            raise QuietError(f"the daemon of {state} did not exit within {timeout:.0f} s",
                             ExitCode.UNMOUNT)
        time.sleep(0.02 if deadline is not None else 0.5)


PINNED_GRACE = 1.0  # seconds an unmounted daemon gets to exit by itself before it is asked


def end_after_unmount(state: str, timeout: float) -> None:
    """Wait until the daemon of ``state``, whose mount was just unmounted here, has exited.

    One whose mount another namespace still holds never sees the unmount: after
    PINNED_GRACE it gets SIGTERM and finishes its journal as at an unmount (the copies
    in other namespaces then fail with ENOTCONN).  A daemon that still does not exit is
    reported with the namespaces that hold its mount.
    """
    deadline = time.monotonic() + timeout
    with contextlib.suppress(QuietError):
        wait_exit(state, min(PINNED_GRACE, timeout))
        return
    pid = daemon_pid(state)
    if pid is not None:
        holders = pinning_processes(f"sdeefs:{os.path.abspath(state)}")
        log.warning("the daemon of %s (pid %d) outlived its unmount: its mount is held by "
                    "pids %s in other mount namespaces; ending it", state, pid,
                    ", ".join(map(str, holders[:5])) or "unknown")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        wait_exit(state, max(0.0, deadline - time.monotonic()))
    except QuietError:
        holders = pinning_processes(f"sdeefs:{os.path.abspath(state)}")
        raise QuietError(f"the daemon of {state} (pid {pid}) did not exit within {timeout:.0f} s "
                         f"of its unmount; its mount is still held by "
                         f"{_describe(holders)}", ExitCode.UNMOUNT) from None


def write_pid_file(path: str) -> None:
    """``path``: "PID START\n" of this process (START: field 22 of /proc/PID/stat, which
    tells a recycled pid from this process)."""
    write_file_atomic(path, f"{os.getpid()} {_start_time(os.getpid())}\n".encode())


def pid_file_alive(pid_file: str) -> bool:
    """Does the process named by ``pid_file`` (write_pid_file) still run?"""
    try:
        with open(pid_file) as f:
            pid, start = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return False
    return _start_time(pid) == start


def end_process(pid_file: str, timeout: float) -> None:
    """End the daemon named by ``pid_file`` (write_pid_file) if it still runs after its
    unmount: after PINNED_GRACE, SIGTERM (a daemon that serves nothing any more loses
    nothing); the pid file goes."""
    try:
        with open(pid_file) as f:
            pid, start = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout
    signalled = False
    while _start_time(pid) == start and time.monotonic() < deadline:
        if not signalled and time.monotonic() > deadline - timeout + PINNED_GRACE:
            log.warning("daemon pid %d outlived its unmount (its mount is held in another "
                        "mount namespace): ending it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            signalled = True
        time.sleep(0.02)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pid_file)


def keeper_pids(pid_file: str) -> list[int]:
    """The daemon named by ``pid_file`` (write_pid_file) while it runs, then the processes it
    forked: sdeefs-guard's keeper and its server (guard.c "surviving a crash"); [] if gone."""
    try:
        with open(pid_file) as f:
            pid, start = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return []
    if _start_time(pid) != start:
        return []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *(int(p) for p in f.read().split())]
    except OSError:
        return [pid]


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[19]) if fields[0] != "Z" else None


def pinning_processes(fsname: str) -> list[int]:
    """Pids (one per mount namespace) whose namespace still holds a mount of ``fsname``.

    Reads every process's mountinfo: for error reports and logs only, never on a
    normal path."""
    found: dict[str, int] = {}
    own = os.readlink("/proc/self/ns/mnt")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            namespace = os.readlink(f"/proc/{entry}/ns/mnt")
            if namespace == own or namespace in found:
                continue
            if any(mount.source == fsname for mount in mountinfo.mounts(int(entry))):
                found[namespace] = int(entry)
        except OSError:
            continue
    return sorted(found.values())


def _describe(pids: list[int]) -> str:
    if not pids:
        return "an unknown process"
    names = []
    for pid in pids[:5]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            command = "?"
        names.append(f"pid {pid} ({command[:60]})")
    return "the mount namespace of " + ", ".join(names)


def report(fd: int | None, message: str, exitcode: int = 0) -> None:
    """Tell the waiting command how starting went: "ok" or "<exit code> <reason>".

    ``fd`` None (a daemon in the foreground): a failure goes to stderr instead.
    """
    if fd is None:
        if message != "ok":
            print(f"sdeefs: {message}", file=sys.stderr)
        return
    line = message if message == "ok" else f"{exitcode} {message}"
    with contextlib.suppress(OSError):
        os.write(fd, line.encode() + b"\n")
        os.close(fd)


def spawn(log_path: str, serve: Serve) -> None:
    """Fork a detached process running ``serve(ready_fd)``; return once it reported "ok"
    on ``ready_fd``, or raise its one-line reason."""
    fork(log_path, serve)()


def fork(log_path: str, serve: Serve) -> Callable[[], None]:
    """Fork a detached process running ``serve(ready_fd)``; the returned call waits until it
    reported "ok" on ``ready_fd``, or raises its one-line reason (two daemons can start at
    once)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: detach, then serve
        os.close(read_fd)
        # Keep nothing of the caller's but the report pipe: an inherited descriptor (a
        # caller's flock, a socket) would otherwise live as long as the daemon.
        os.closerange(3, write_fd)
        os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        os.chdir("/")  # a caller's cwd kept by a long-lived daemon would keep its mount busy
        _detach_stdio(log_path)
        code = 1
        try:
            code = serve(write_fd)
        except BaseException:
            log.exception("daemon failed")
        finally:
            os._exit(code)
    os.close(write_fd)
    os.waitpid(pid, 0)

    def wait() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            answer = pipe.readline().decode(errors="replace").strip()
        if answer == "ok":
            return
        status, _, message = answer.partition(" ")
        if not status.isdigit():
            raise QuietError(f"cannot mount: the daemon died while starting (see {log_path})",
                             ExitCode.FAILURE)
        raise QuietError(message, int(status))

    return wait


def _detach_stdio(log_path: str) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    logfile = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(logfile, 1)
    os.dup2(logfile, 2)
    os.close(logfile)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s "
                                           "%(message)s"))
    root.addHandler(handler)
