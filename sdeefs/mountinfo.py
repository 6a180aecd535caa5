"""The mount table, read in one place: ``/proc/PID/mountinfo`` (proc(5)).

One line a mount::

    36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2) (3)  (4)    (5)         (6)       (7)    (8) (9)     (10)      (11)

mount id, parent id, major:minor of the filesystem, its root, the mount point, the mount's
own options, optional fields (zero or more, ended by ``-``), filesystem type, source, and
the superblock's options.

Escapes: the kernel writes space, tab, newline and backslash in the root, the mount point
and the source as ``\\ooo`` (octal), so a field is split on spaces first and unescaped
after.  A filesystem shows its own options (overlayfs' ``upperdir=``) with ``,`` among the
bytes it escapes, so the superblock's options are split on ``,`` first and each is
unescaped after.  Names are decoded as the rest of sdeefs decodes file names
(``os.fsdecode``: bytes that are not UTF-8 survive the round trip through ``os.fsencode``).

A mount point is the path as the kernel resolved it: ``at`` compares it with the caller's
path resolved the same way (``os.path.realpath``), unless told not to (a stat of a hung
FUSE mount would hang).
"""

from __future__ import annotations

import os
import re

import attrs

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def unescape(field: bytes) -> str:
    """A mountinfo field with its ``\\ooo`` escapes undone, decoded as a file name."""
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


@attrs.frozen
class Mount:
    """One line of mountinfo, unescaped."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor", as /sys/class/bdi and fusectl name it
    root: str
    point: str
    options: frozenset[str]  # the mount's own (rw, nodev, nosuid, ...)
    fstype: str
    source: str
    super_options: tuple[str, ...]  # the filesystem's own, in the kernel's order

    @property
    def minor(self) -> int:
        return int(self.device.partition(":")[2])

    def super_option(self, name: str) -> str | None:
        """The value of ``name=value`` among the superblock's options (None: absent)."""
        prefix = name + "="
        for option in self.super_options:
            if option.startswith(prefix):
                return option[len(prefix):]
        return None

    @classmethod
    def parse(cls, line: bytes) -> Mount | None:
        """One line; None for a line this format does not describe (never raised on)."""
        head, sep, tail = line.rstrip(b"\n").partition(b" - ")
        fields = head.split(b" ")
        rest = tail.split(b" ")
        if not sep or len(fields) < 6 or len(rest) < 3:
            return None
        try:
            mount_id, parent_id = int(fields[0]), int(fields[1])
        except ValueError:
            return None
        return cls(mount_id, parent_id, fields[2].decode("ascii", "replace"),
                   unescape(fields[3]), unescape(fields[4]),
                   frozenset(fields[5].decode("ascii", "replace").split(",")),
                   unescape(rest[0]), unescape(rest[1]),
                   tuple(unescape(option) for option in rest[2].split(b",") if option))


def mounts(pid: int | None = None) -> list[Mount]:
    """Every mount of this process's mount namespace (or of process ``pid``'s), in the
    kernel's order: a mount comes after the one it was mounted on.  OSError if ``pid`` is
    gone or not ours to read."""
    with open(f"/proc/{'self' if pid is None else pid}/mountinfo", "rb") as f:
        parsed = (Mount.parse(line) for line in f)
        return [mount for mount in parsed if mount is not None]


def at(path: str | os.PathLike[str], *, resolve: bool = True) -> Mount | None:
    """The mount one sees at exactly ``path`` (the top one of a stack), or None.
    ``resolve=False``: ``path`` is only made absolute, never stat'ed."""
    target = os.path.realpath(path) if resolve else os.path.abspath(path)
    found = None
    for mount in mounts():
        if mount.point == target:
            found = mount
    return found


def points() -> set[str]:
    """Where something is mounted in this mount namespace."""
    return {mount.point for mount in mounts()}
