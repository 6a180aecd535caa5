"""User tools over an upper directory and its journal: ``diff``, ``log`` and ``check``.

They walk trees through directory fds, never by path, so an upper of any depth works.
:func:`format_size` is how every sdeefs command shows a size.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat

import attrs

from . import records as rec
from .errors import ExitCode, QuietError
from .journal import Journal
from .statedir import StateDir
from .sysio import is_whiteout, open_at
from .trees import Visit, walk

OPAQUE_NAMES = (b"trusted.overlay.opaque", b"user.overlay.opaque")
REDIRECT_NAMES = (b"trusted.overlay.redirect", b"user.overlay.redirect")
SETATTR_BITS = ((rec.SET_MODE, "mode"), (rec.SET_OWNER, "owner"), (rec.SET_SIZE, "size"),
                (rec.SET_ATIME, "atime"), (rec.SET_MTIME, "mtime"))


@attrs.frozen
class Change:
    """One line of ``sdeefs diff``: kind is added, changed, deleted or replaced."""

    kind: str
    path: bytes
    detail: str = ""

    def line(self) -> str:
        mark = {"added": "A", "changed": "C", "deleted": "D", "replaced": "R"}[self.kind]
        tail = f"  ({self.detail})" if self.detail else ""
        return f"{mark} /{os.fsdecode(self.path)}{tail}"

    def as_json(self) -> dict[str, str]:
        return {"kind": self.kind, "path": "/" + os.fsdecode(self.path), "detail": self.detail}


def _opaque(path: bytes) -> bool:
    for name in OPAQUE_NAMES:
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _redirect(path: bytes, parent_lower: bytes) -> bytes | None:
    """The lower path a renamed directory's redirect names (kernel format: relative to the
    parent's lower directory, or absolute from the lower root), or None."""
    for name in REDIRECT_NAMES:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        if value.startswith(b"/"):
            return value.strip(b"/")
        return parent_lower + b"/" + value if parent_lower else value
    return None


def diff(upper: bytes, lower: bytes) -> list[Change]:
    """What the upper adds, changes and deletes relative to the lower, in path order.

    The upper is walked through directory fds (``sdeefs.trees``: any depth), and
    the lower directory matching each upper directory is opened once, in pieces.
    """
    changes: list[Change] = []
    upper_fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    lower_fd = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    # Upper directories merged with a lower directory, by inode -> its lower path where
    # that is not its own (a renamed directory's redirect, and what is below it; paths of
    # every directory of a deep tree would cost memory with the square of its depth);
    # below any other directory, all is added.
    merged: dict[int, bytes | None] = {}
    batch: tuple[bytes | None, bool, int] = (None, False, -1)  # (dir, merged, lower dir fd)
    try:
        for visit in walk(upper_fd):
            if not visit.path:
                merged[visit.st.st_ino] = None
                continue
            parent = visit.path.rpartition(b"/")[0]
            if parent != batch[0]:  # the entries of one directory come together
                if batch[2] >= 0:
                    os.close(batch[2])
                batch = _diff_batch(visit, parent, merged, lower_fd)
            change = _diff_entry(visit, batch[1], batch[2], merged)
            if change is not None:
                changes.append(change)
    finally:
        if batch[2] >= 0:
            os.close(batch[2])
        os.close(upper_fd)
        os.close(lower_fd)
    changes.sort(key=lambda c: c.path.split(b"/"))  # a parent first, siblings by name
    return changes


def _diff_batch(visit: Visit, parent: bytes, merged: dict[int, bytes | None], lower_fd: int
                ) -> tuple[bytes, bool, int]:
    """(directory, merged with the lower, its lower directory fd or -1) for a new one."""
    ino = os.fstat(visit.dir_fd).st_ino
    if ino not in merged:
        return parent, False, -1
    lower = merged[ino]
    try:
        return parent, True, open_at(lower_fd, (parent if lower is None else lower) or b".",
                                     os.O_PATH | os.O_DIRECTORY)
    except OSError:  # the lower changed meanwhile: nothing there to compare with
        return parent, True, -1


def _diff_entry(visit: Visit, in_merged: bool, lower_dir: int, merged: dict[int, bytes | None]
                ) -> Change | None:
    ust, path = visit.st, visit.path
    if not in_merged:  # inside an added or replaced directory
        return None if is_whiteout(ust) else Change("added", path, _kind(ust))
    parent_lower = merged.get(os.fstat(visit.dir_fd).st_ino)
    lst: os.stat_result | None = None
    if lower_dir >= 0:
        with contextlib.suppress(OSError):
            lst = os.stat(visit.name, dir_fd=lower_dir, follow_symlinks=False)
    if is_whiteout(ust):
        return Change("deleted", path) if lst is not None else None
    if stat.S_ISDIR(ust.st_mode) and not _opaque(visit.at()):
        moved = _redirect(visit.at(), path.rpartition(b"/")[0] if parent_lower is None
                          else parent_lower)
        if moved is not None:  # a renamed directory: its contents are the lower's at moved
            merged[ust.st_ino] = moved
            return Change("added", path, f"directory, renamed from /{os.fsdecode(moved)}")
    if lst is None:
        return Change("added", path, _kind(ust))
    if stat.S_ISDIR(ust.st_mode) and stat.S_ISDIR(lst.st_mode):
        if _opaque(visit.at()):
            return Change("replaced", path, "directory contents replaced")
        merged[ust.st_ino] = None if parent_lower is None else \
            parent_lower + b"/" + visit.name
        if (ust.st_mode, ust.st_uid, ust.st_gid) != (lst.st_mode, lst.st_uid, lst.st_gid):
            return Change("changed", path, "metadata")
        return None
    if stat.S_IFMT(ust.st_mode) != stat.S_IFMT(lst.st_mode):
        return Change("replaced", path, f"{_kind(lst)} -> {_kind(ust)}")
    return Change("changed", path, _what_changed(visit, lower_dir, lst))


def _kind(st: os.stat_result) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
            stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(st.st_mode), "special")


def _what_changed(visit: Visit, lower_dir: int, lst: os.stat_result) -> str:
    ust, name = visit.st, visit.name
    parts = []
    if stat.S_ISREG(ust.st_mode) and (ust.st_size != lst.st_size or not _same_content(
            visit.dir_fd, lower_dir, name)):
        parts.append("content")
    if stat.S_ISLNK(ust.st_mode) and os.readlink(name, dir_fd=visit.dir_fd) != os.readlink(
            name, dir_fd=lower_dir):
        parts.append("target")
    if stat.S_IMODE(ust.st_mode) != stat.S_IMODE(lst.st_mode):
        parts.append("mode")
    if (ust.st_uid, ust.st_gid) != (lst.st_uid, lst.st_gid):
        parts.append("owner")
    return ", ".join(parts) or "metadata"


def _same_content(upper_dir: int, lower_dir: int, name: bytes) -> bool:
    a = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=upper_dir)
    try:
        b = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=lower_dir)
        try:
            offset = 0
            while True:
                x, y = os.pread(a, 1 << 20, offset), os.pread(b, 1 << 20, offset)
                if x != y:
                    return False
                if not x:
                    return True
                offset += len(x)
        finally:
            os.close(b)
    finally:
        os.close(a)


def describe(record: rec.Record) -> str:
    """One human-readable line for a record."""
    fields = []
    for name, kind in record.FIELDS:
        value = getattr(record, name)
        if kind in ("path", "name"):
            fields.append(f"{name}={os.fsdecode(value)}")
        elif isinstance(record, rec.Create) and name == "xattrs":
            names = b",".join(n for n, _ in record.xattr_pairs())
            fields.append(f"xattrs={os.fsdecode(names) or '-'}")
        elif isinstance(record, rec.Create) and name == "data":
            fields.append(f"data={len(value)} bytes")
        elif kind == "blob":
            shown = value if len(value) <= 32 else value[:32] + b"..."
            fields.append(f"{name}={shown!r}")
        elif name == "mode":
            fields.append(f"{name}={value:o}")
        elif name == "mask":
            fields.append("set=" + "+".join(label for bit, label in SETATTR_BITS if value & bit))
        else:
            fields.append(f"{name}={value}")
    return f"{type(record).__name__.lower():<11} " + " ".join(fields)


def show_log(state: str, from_seq: int, limit: int, as_json: bool) -> int:
    journal_dir = StateDir(state).journal
    if not os.path.isdir(journal_dir):
        raise QuietError(f"no journal in {state}", ExitCode.USAGE)
    journal = Journal(directory=journal_dir)
    for shown, entry in enumerate(journal.read(from_seq), start=1):
        if as_json:
            print(json.dumps({"seq": entry.seq, "type": type(entry.record).__name__,
                              "text": describe(entry.record)}))
        else:
            print(f"{entry.seq:>10}  {describe(entry.record)}")
        if limit and shown >= limit:
            break
    return 0


def check(upper: str, state: str) -> list[str]:
    """fsck-style invariants; each problem is one line.  Empty list = consistent."""
    from .check import run_checks

    return run_checks(upper, state)


def format_size(n: int) -> str:
    """A byte count as the commands show it: whole units of 1024 (``1536`` -> ``1K``)."""
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n}{unit}"
        n //= 1024
    return f"{n}T"
