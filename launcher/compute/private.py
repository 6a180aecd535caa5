"""Which lower entries only system ids may read, scanned: for job environments on compute nodes.

Login environments do not need this: their guard layer (sdeefs.fs.guard) decides the
same question for every entry as it is looked up.  Jobs run without a daemon.

The idmapped lower shows host system ids (below min_uid) as the user's subordinate
ids (docs/identity.md), so an entry readable by a system id *only through its owner or
group bits* (``/etc/ssl/private``, a 0600 root file, a 0700 _apt directory) would be
readable by root inside.  This scan finds them; the mask layer hides them (files become
whiteouts, directories empty).  Entries owned by other users need nothing: their
owners are not mapped into the user namespace, so inside-root gets no override.

The scan walks the lower's own mount, never another mounted below it: the idmapped lower
is a bind of that mount alone (launcher/enter/idmap.c: no submounts), so what is mounted
below shows inside as the empty directory beneath it; a bind of ``/`` itself below ``/``
(a container image: the same device) would otherwise be scanned again in full.  The
scan walks the lower's own filesystem (5 s for a full Debian root here), so its
result is cached in RUN_DIR/private-paths (layout.py) and reused until it is ``max_age`` old;
``sdeefs scan-private`` refreshes it (from cron, or after installing software).
Entries created after the last scan are not hidden until the next one: the deny
list in the config covers known secrets at every job start regardless.
"""

from __future__ import annotations

import fcntl
import os
import stat
import time
from collections.abc import Iterator

from sdeefs import mountinfo
from sdeefs.fs.guard import readable_only_by_root
from sdeefs.sysio import write_file_atomic

from ..layout import SiteRun


def _mountpoints_below(top: bytes) -> set[bytes]:
    """Mountpoints strictly below ``top`` in this mount namespace (/proc/self/mountinfo,
    its octal escapes undone)."""
    prefix = top.rstrip(b"/") + b"/"
    points = (os.fsencode(point) for point in mountinfo.points())
    return {point for point in points if point.startswith(prefix) and point != prefix}


def scan(lower: str, skip: tuple[str, ...], system: int = 1000) -> Iterator[bytes]:
    """Lower-relative paths (bytes) of entries only system ids (below ``system``, the
    site's min_uid) may read; does not descend into them."""
    top = os.fsencode(lower)
    skipped = {os.fsencode(s) for s in skip} | _mountpoints_below(top)
    device = os.lstat(top).st_dev
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            path = entry.path
            if path in skipped:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != device or stat.S_ISLNK(st.st_mode):
                continue
            if readable_only_by_root(st, system):
                yield os.path.relpath(path, top)
            elif stat.S_ISDIR(st.st_mode):
                stack.append(path)


def private_paths(lower: str, run_dir: str, skip: tuple[str, ...], max_age: float,
                  system: int = 1000) -> list[bytes]:
    """The cached scan, refreshed when missing or older than ``max_age`` seconds."""
    cache = SiteRun(run_dir).private_paths
    found = _fresh(cache, max_age)
    if found is not None:
        return found
    # One scan at a time: the first jobs of several nodes sharing a run directory (or
    # several users' on one node) would each scan, and the last writer's result, different
    # by whatever changed meanwhile, would invalidate the masks and spares made from the
    # others' (compute/job.py: their key holds the scan).  The others use the first's.
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    fd = os.open(cache + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        found = _fresh(cache, max_age)
        return found if found is not None else refresh(lower, run_dir, skip, system)
    finally:
        os.close(fd)


def _fresh(cache: str, max_age: float) -> list[bytes] | None:
    try:
        if time.time() - os.stat(cache).st_mtime < max_age:
            with open(cache, "rb") as f:
                return [line for line in f.read().split(b"\n") if line]
    except FileNotFoundError:
        pass
    return None


def refresh(lower: str, run_dir: str, skip: tuple[str, ...], system: int = 1000,
            ) -> list[bytes]:
    found = sorted(scan(lower, skip, system))
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    # The prologs of several jobs (or simulated nodes sharing a machine) may refresh at once:
    # each writes a temporary file of its own.
    write_file_atomic(SiteRun(run_dir).private_paths, b"\n".join(found) + b"\n")
    return found
