"""What ``/proc`` says about an environment's processes: start times, liveness, members.

A pid alone can be recycled; a pid and its start time (field 22 of ``/proc/PID/stat``,
in clock ticks since boot) name one process for as long as the machine runs.
"""

from __future__ import annotations

import contextlib
import os
import select
import time

import attrs


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """The start time of the live (not zombie) process ``pid``, or None."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and fields[0] != "Z" else None


def started_at(pid: int) -> float | None:
    """When the live process ``pid`` started, in seconds since the epoch (its start time
    after boot, to a clock tick), or None."""
    ticks = start_time(pid)
    if ticks is None:
        return None
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def opened_by(path: str, pids: list[int] | None = None) -> list[int]:
    """The processes (of ``pids``, else all) that have ``path`` open.  Reads every
    descriptor of every process: for rare events only."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    found = []
    for pid in pids if pids is not None else [int(e) for e in os.listdir("/proc") if e.isdigit()]:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    held = os.stat(f"/proc/{pid}/fd/{fd}")
                    if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino):
                        found.append(pid)
                        break
    return found


def running(pid: int, uid: int) -> bool:
    """Is ``pid`` a live (not zombie) process of ``uid``?"""
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return False
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid
    except OSError:
        return False


def command_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


@attrs.frozen
class InitProcess:
    """An environment's init (PID 1 of its namespace, as the host sees it) and its parent,
    the helper's process outside the PID namespace that exits with it."""

    pid: int
    start: int
    holder_pid: int

    @classmethod
    def find(cls, pid: int) -> InitProcess | None:
        """``pid`` as it is now, or None if it is gone already."""
        fields = _stat_fields(pid)
        start = start_time(pid)
        if start is None or fields is None:
            return None
        return cls(pid, start, int(fields[1]))


def namespace_processes(pid: int) -> int:
    """How many processes live in the PID namespace of ``pid`` (its init included)."""
    members = namespace_members(pid)
    return len(members) + 1 if members is not None else 0


def namespace_members(init_pid: int) -> list[int] | None:
    """The live processes (host pids) of the PID namespace whose init is ``init_pid``, the
    init itself left out; None if the init is gone.  A zombie has no namespace links any
    more: it is not counted.  Reads every /proc entry: called on events, never in a loop.

    An environment without a PID namespace of its own (a job's, ``start --host-pids``):
    the processes of its mount namespace instead (the tasks the SPANK plugin moved in)."""
    try:
        target = os.readlink(f"/proc/{init_pid}/ns/pid_for_children")
        own = os.readlink(f"/proc/{init_pid}/ns/pid")
        links: tuple[str, ...] = (own, target)
        kind = "pid"
        if own == os.readlink("/proc/self/ns/pid"):
            links, kind = ((os.readlink(f"/proc/{init_pid}/ns/mnt"),), "mnt")
    except OSError:
        return None
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != init_pid:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/{kind}") in links:
                    found.append(int(entry))
    return found


def shares_our_pids(pid: int) -> bool:
    """Is ``pid`` in this process's PID namespace (a job environment's init is)?"""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def namespace_of(pid: int) -> str | None:
    """The PID namespace of ``pid`` (its ns/pid link), or None if it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def wait_all_exit(pids: list[int], also: int | None = None, member_of: str | None = None,
                  timeout: float | None = None) -> bool:
    """Block (no polling: poll(2) on pidfds) until every process of ``pids`` has exited,
    or ``also`` has, or ``timeout`` seconds passed; True if ``also`` exited first.  A pid
    already gone counts as exited, and so does one no longer in the PID namespace
    ``member_of`` once its pidfd is open (its pid was recycled meanwhile)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    fds: dict[int, int] = {}
    try:
        for pid in ([also] if also is not None else []) + pids:
            with contextlib.suppress(ProcessLookupError):
                fd = os.pidfd_open(pid)
                fds[fd] = pid
                if pid != also and member_of is not None and namespace_of(pid) != member_of:
                    del fds[fd]
                    os.close(fd)
        also_fd = next((fd for fd, pid in fds.items() if pid == also), None)
        if also is not None and also_fd is None:
            return True
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        waiting = set(fds) - {also_fd}
        while waiting or (not pids and also_fd is not None):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            for fd, _ in poller.poll(None if left is None else max(1, int(left * 1000))):
                if fd == also_fd:
                    return True
                waiting.discard(fd)
                poller.unregister(fd)
        return False
    finally:
        for fd in fds:
            os.close(fd)
