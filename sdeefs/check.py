"""``sdeefs check``: invariants of an upper directory and its journal, one function each.

Every check returns a list of one-line problems; an empty list means the
invariant holds.  The strongest check replays the whole journal into a scratch
layer root and compares it with the upper: if they differ, a replica would
diverge from the user's layer.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator

from .apply import replay
from .errors import BadRecord, JournalCorrupt
from .journal import Journal
from .layers import open_layer_root
from .sysio import is_whiteout
from .treewalk import Visit, rmtree, walk

PRIVATE_XATTRS = (b"trusted.overlay.", b"user.overlay.")


def check_journal_readable(journal: Journal) -> list[str]:
    try:
        expected = journal.first_seq()
        for entry in journal.read(expected):
            if entry.seq != expected:
                return [f"journal: sequence jumps from {expected - 1} to {entry.seq}"]
            expected += 1
    except (JournalCorrupt, BadRecord) as exc:
        return [f"journal: {exc}"]
    return []


def _walk(root: str) -> Iterator[Visit]:
    """The entries below ``root`` (not the root itself), by directory fds: any depth."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for visit in walk(fd):
            if visit.path:
                yield visit
    finally:
        os.close(fd)


def check_upper_format(upper: str) -> list[str]:
    """Kernel overlayfs format only: 0/0 whiteouts, opaque = "y", no aufs leftovers, no devices."""
    problems = []
    for visit in _walk(upper):
        st, rel = visit.st, os.fsdecode(visit.path)
        if visit.name.startswith(b".wh."):
            problems.append(f"upper: aufs-style whiteout name {rel}")
        if stat.S_ISCHR(st.st_mode) and not is_whiteout(st) or stat.S_ISBLK(st.st_mode):
            problems.append(f"upper: device node {rel}")
        if stat.S_ISDIR(st.st_mode):
            for prefix in PRIVATE_XATTRS:
                try:
                    value = os.getxattr(visit.at(), prefix + b"opaque", follow_symlinks=False)
                except OSError:
                    continue
                if value not in (b"y", b"x"):
                    problems.append(f"upper: {rel} has opaque={value!r}")
    return problems


def _tree_signature(root: str) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, uid, gid, size, symlink target, sorted xattrs) for a tree."""
    sig: dict[str, tuple[object, ...]] = {}
    for visit in _walk(root):
        st, where = visit.st, visit.at()
        target = os.fsdecode(os.readlink(visit.name, dir_fd=visit.dir_fd)) \
            if stat.S_ISLNK(st.st_mode) else None
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        try:
            names = sorted(os.listxattr(where, follow_symlinks=False))
            xattrs = tuple((n, os.getxattr(where, n, follow_symlinks=False)) for n in names)
        except OSError:
            xattrs = ()
        sig[os.fsdecode(visit.path)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                        st.st_uid, st.st_gid, size, target, xattrs)
    return sig


def check_replay_matches(journal: Journal, upper: str, work: str) -> list[str]:
    """Replaying the journal from empty must rebuild the upper (skipped once trimmed)."""
    if journal.first_seq() != 1:
        return []
    first = next(iter(journal.read(1)), None)
    if first is None:
        return [] if not os.listdir(upper) else ["journal is empty but the upper is not"]
    scratch = tempfile.mkdtemp(prefix=".sdeefs-check-", dir=os.path.dirname(upper))
    try:
        os.mkdir(os.path.join(scratch, "upper"))
        os.mkdir(os.path.join(scratch, "work"))
        # Closing the layer roots also closes the mount fd that reading Write data opened:
        # left open, it keeps the upper's filesystem busy (a layer image cannot be unmounted)
        with open_layer_root(upper, work) as source, \
                open_layer_root(os.path.join(scratch, "upper"),
                                os.path.join(scratch, "work")) as target:
            replay(journal, source, target)
        want = _tree_signature(upper)
        got = _tree_signature(os.path.join(scratch, "upper"))
        problems = []
        for path in sorted(set(want) | set(got)):
            if want.get(path) != got.get(path):
                problems.append(f"replay differs at {path}: upper {want.get(path)} "
                                f"journal {got.get(path)}")
        return problems[:50]
    finally:
        with contextlib.suppress(OSError):
            rmtree(scratch)  # the replayed tree may be deeper than shutil.rmtree goes


def run_checks(upper: str, state: str) -> list[str]:
    journal_dir = os.path.join(state, "journal")
    problems = check_upper_format(upper)
    if not os.path.isdir(journal_dir):
        return problems + [f"no journal in {state}"]
    journal = Journal(directory=journal_dir)
    readable = check_journal_readable(journal)
    problems += readable
    if not readable:
        problems += check_replay_matches(journal, upper, os.path.join(state, "work"))
    return problems

