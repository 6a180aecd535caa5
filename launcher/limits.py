"""Per-user limits of a login environment: one cgroup per environment (``sdeefs/U``).

What it bounds (site config, ``[sdeefs]``; ``sdeefs.config`` has the defaults):

    pids_max     processes and threads of the environment (a fork bomb stops there)
    memory_max   its memory, the private ``/tmp`` included (tmpfs pages are charged to
                 the cgroup of the process that writes them), as bytes or a share of RAM
    cpu_weight   its share of the CPUs against other environments (100 = everyone equal)

Who is in it: the environment's init and holder (so everything the init forks), and every
session: the PAM hook moves the login process it serves (its parent: sshd's or login's
session process, which then runs ``sdeefs-shell``), ``sdeefs-launchd`` the process that
asks it.  A process only joined by ``sdeefs-enter join`` from elsewhere stays where it was.

Jobs are not put here: their tasks join the job's environment by ``setns`` from the
cgroups SLURM made for the job's steps (task/cgroup), so SLURM's limits are theirs.

Two layouts, found at run time: the unified hierarchy (cgroup v2: ``memory.max``,
``pids.max``, ``cpu.weight`` in ``/sys/fs/cgroup/sdeefs/U``, the controllers enabled in
``sdeefs``' parent) or, on hosts that still mount cgroup v1 controllers separately
(``memory``, ``pids``, ``cpu``), one ``sdeefs/U`` directory in each
(``memory.limit_in_bytes``, ``pids.max``, ``cpu.shares`` = weight * 1024 / 100).
A host with neither gets no limits and one warning in the log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re

import attrs

from sdeefs import mountinfo
from sdeefs.config import SiteConfig
from sdeefs.errors import ExitCode, QuietError

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
GROUP = "sdeefs"


@attrs.frozen
class Limits:
    """The limits of one environment, resolved to numbers."""

    pids_max: int
    memory_max: int
    cpu_weight: int

    @classmethod
    def of(cls, config: SiteConfig) -> Limits:
        return cls(config.pids_max, memory_bytes(config.memory_max), config.cpu_weight)


def memory_bytes(spec: str) -> int:
    """``"8G"``, ``"512M"``, ``"50%"`` (of RAM) ... as bytes."""
    match = re.fullmatch(r"(\d+)([kmgtKMGT%]?)", spec)
    if match is None:
        raise QuietError(f"config: memory_max must look like 50% or 8G, not {spec!r}",
                         ExitCode.USAGE)
    number, unit = int(match[1]), match[2].lower()
    if unit == "%":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * number // 100
    return number << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[unit]


@attrs.frozen
class Hierarchy:
    """Where an environment's cgroup lives: one directory per controller mount (v1), or
    the one unified directory (v2, ``unified`` true)."""

    unified: bool
    mounts: dict[str, str]  # controller -> its hierarchy's root ("" key for v2)

    @classmethod
    def find(cls) -> Hierarchy | None:
        controllers = os.path.join(CGROUP_ROOT, "cgroup.controllers")
        if os.path.exists(controllers):
            with open(controllers) as f:
                have = f.read().split()
            if {"memory", "pids"} <= set(have):
                return cls(True, {"": CGROUP_ROOT})
        mounts: dict[str, str] = {}
        for mount in mountinfo.mounts():
            if mount.fstype != "cgroup":
                continue
            for controller in ("memory", "pids", "cpu"):
                if controller in mount.super_options:
                    mounts[controller] = mount.point
        return cls(False, mounts) if {"memory", "pids"} <= set(mounts) else None

    def dirs(self, user: str) -> list[str]:
        return [os.path.join(root, GROUP, user) for root in self.mounts.values()]


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _settings(hierarchy: Hierarchy, limits: Limits) -> dict[str, str]:
    if hierarchy.unified:
        return {"pids.max": str(limits.pids_max), "memory.max": str(limits.memory_max),
                "memory.swap.max": "0", "cpu.weight": str(limits.cpu_weight)}
    return {"pids.max": str(limits.pids_max),
            "memory.limit_in_bytes": str(limits.memory_max),
            "cpu.shares": str(max(2, limits.cpu_weight * 1024 // 100))}


def apply(config: SiteConfig, user: str, pids: list[int]) -> None:
    """Make ``user``'s cgroup with the site's limits (or set them anew) and move ``pids``
    into it.  No cgroups on this host: a warning, and the environment runs unlimited."""
    hierarchy = Hierarchy.find()
    if hierarchy is None:
        log.warning("no cgroup memory/pids controllers: %s's environment has no limits", user)
        return
    settings = _settings(hierarchy, Limits.of(config))
    if hierarchy.unified:
        parent = os.path.join(CGROUP_ROOT, GROUP)
        os.makedirs(parent, exist_ok=True)
        with contextlib.suppress(OSError):  # cpu may be unavailable; memory/pids are not
            _write(os.path.join(CGROUP_ROOT, "cgroup.subtree_control"), "+memory +pids +cpu")
        _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids +cpu")
    for directory in hierarchy.dirs(user):
        os.makedirs(directory, exist_ok=True)
        for name, value in settings.items():
            path = os.path.join(directory, name)
            if os.path.exists(path):
                _write(path, value)
    move(hierarchy, user, pids)


def move(hierarchy: Hierarchy, user: str, pids: list[int]) -> None:
    for directory in hierarchy.dirs(user):
        for pid in pids:
            try:
                _write(os.path.join(directory, "cgroup.procs"), str(pid))
            except OSError as exc:
                if exc.errno != errno.ESRCH:  # gone meanwhile: nothing to limit
                    raise


def join(user: str, pid: int) -> None:
    """Move one more process (a session) into the user's cgroup, if it exists."""
    hierarchy = Hierarchy.find()
    if hierarchy is not None and all(os.path.isdir(d) for d in hierarchy.dirs(user)):
        move(hierarchy, user, [pid])


def remove(user: str) -> None:
    """Remove the user's cgroup once its processes are gone (an rmdir of each directory)."""
    hierarchy = Hierarchy.find()
    if hierarchy is None:
        return
    for directory in hierarchy.dirs(user):
        with contextlib.suppress(FileNotFoundError):
            try:
                os.rmdir(directory)
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                log.warning("%s: still has processes; left in place", directory)


def usage(user: str) -> dict[str, int]:
    """Current memory (bytes) and processes of the user's cgroup ({} if it has none)."""
    hierarchy = Hierarchy.find()
    if hierarchy is None:
        return {}
    found = {}
    names = (("memory", "memory.current" if hierarchy.unified else "memory.usage_in_bytes"),
             ("pids", "pids.current"))
    for key, name in names:
        root = hierarchy.mounts.get("" if hierarchy.unified else key)
        if root is None:
            continue
        with contextlib.suppress(OSError, ValueError), \
                open(os.path.join(root, GROUP, user, name)) as f:
            found[key] = int(f.read())
    return found
