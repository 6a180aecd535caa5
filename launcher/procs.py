"""What ``/proc`` says about an environment's processes: start times, liveness, members.

A pid alone can be recycled; a pid and its start time (field 22 of ``/proc/PID/stat``,
in clock ticks since boot) name one process for as long as the machine runs.
"""

from __future__ import annotations

import contextlib
import os

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
    """How many processes live in the PID namespace of ``pid``."""
    try:
        target = os.readlink(f"/proc/{pid}/ns/pid_for_children")
        own = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return 0
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") in (own, target):
                    count += 1
    return count
