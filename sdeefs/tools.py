"""User tools over an upper directory and its journal: ``diff``, ``log`` and ``check``."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator

import attrs

from . import records as rec
from .journal import Journal
from .sysio import is_whiteout

OPAQUE_NAMES = (b"trusted.overlay.opaque", b"user.overlay.opaque")
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


def diff(upper: bytes, lower: bytes) -> list[Change]:
    """What the upper adds, changes and deletes relative to the lower, in path order."""
    return list(_diff_dir(upper, lower, b""))


def _diff_dir(upper: bytes, lower: bytes, rel: bytes) -> Iterator[Change]:
    udir = os.path.join(upper, rel) if rel else upper
    for name in sorted(os.listdir(udir)):
        path = os.path.join(rel, name) if rel else name
        ust = os.lstat(os.path.join(upper, path))
        try:
            lst: os.stat_result | None = os.lstat(os.path.join(lower, path))
        except OSError:
            lst = None
        if is_whiteout(ust):
            if lst is not None:
                yield Change("deleted", path)
            continue
        if lst is None:
            yield Change("added", path, _kind(ust))
            if stat.S_ISDIR(ust.st_mode):
                yield from _added_tree(upper, path)
            continue
        if stat.S_ISDIR(ust.st_mode) and stat.S_ISDIR(lst.st_mode):
            if _opaque(os.path.join(upper, path)):
                yield Change("replaced", path, "directory contents replaced")
                yield from _added_tree(upper, path)
            else:
                if (ust.st_mode, ust.st_uid, ust.st_gid) != (lst.st_mode, lst.st_uid, lst.st_gid):
                    yield Change("changed", path, "metadata")
                yield from _diff_dir(upper, lower, path)
            continue
        if stat.S_IFMT(ust.st_mode) != stat.S_IFMT(lst.st_mode):
            yield Change("replaced", path, f"{_kind(lst)} -> {_kind(ust)}")
            if stat.S_ISDIR(ust.st_mode):
                yield from _added_tree(upper, path)
            continue
        yield Change("changed", path, _what_changed(upper, lower, path, ust, lst))


def _added_tree(upper: bytes, rel: bytes) -> Iterator[Change]:
    for name in sorted(os.listdir(os.path.join(upper, rel))):
        path = os.path.join(rel, name)
        st = os.lstat(os.path.join(upper, path))
        if is_whiteout(st):
            continue
        yield Change("added", path, _kind(st))
        if stat.S_ISDIR(st.st_mode):
            yield from _added_tree(upper, path)


def _kind(st: os.stat_result) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symlink",
            stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(st.st_mode), "special")


def _what_changed(upper: bytes, lower: bytes, path: bytes, ust: os.stat_result,
                  lst: os.stat_result) -> str:
    parts = []
    if stat.S_ISREG(ust.st_mode) and (ust.st_size != lst.st_size or not _same_content(
            os.path.join(upper, path), os.path.join(lower, path))):
        parts.append("content")
    if stat.S_ISLNK(ust.st_mode) and os.readlink(os.path.join(upper, path)) != os.readlink(
            os.path.join(lower, path)):
        parts.append("target")
    if stat.S_IMODE(ust.st_mode) != stat.S_IMODE(lst.st_mode):
        parts.append("mode")
    if (ust.st_uid, ust.st_gid) != (lst.st_uid, lst.st_gid):
        parts.append("owner")
    return ", ".join(parts) or "metadata"


def _same_content(a: bytes, b: bytes) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def describe(record: rec.Record) -> str:
    """One human-readable line for a record."""
    fields = []
    for name, kind in record.FIELDS:
        value = getattr(record, name)
        if kind in ("path", "name"):
            fields.append(f"{name}={os.fsdecode(value)}")
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
    journal_dir = os.path.join(state, "journal")
    if not os.path.isdir(journal_dir):
        from .errors import QuietError

        raise QuietError(f"no journal in {state}", 2)
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
