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

from .apply import replay
from .errors import BadRecord, JournalCorrupt
from .journal import Journal
from .layers import open_layer_root
from .statedir import StateDir
from .trees import entries_below, rmtree, signature

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


def check_upper_format(upper: str) -> list[str]:
    """Kernel overlayfs format only: opaque = "y", no aufs leftovers (device nodes are
    allowed: host root may make them, ``records.Mkdev``; a 0/0 one is a whiteout)."""
    problems = []
    for visit in entries_below(upper):
        st, rel = visit.st, os.fsdecode(visit.path)
        if visit.name.startswith(b".wh."):
            problems.append(f"upper: aufs-style whiteout name {rel}")
        if stat.S_ISDIR(st.st_mode):
            for prefix in PRIVATE_XATTRS:
                try:
                    value = os.getxattr(visit.at(), prefix + b"opaque", follow_symlinks=False)
                except OSError:
                    continue
                if value not in (b"y", b"x"):
                    problems.append(f"upper: {rel} has opaque={value!r}")
    return problems


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
        want = signature(upper)
        got = signature(os.path.join(scratch, "upper"))
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
    dirs = StateDir(state)
    problems = check_upper_format(upper)
    if not os.path.isdir(dirs.journal):
        return problems + [f"no journal in {state}"]
    journal = Journal(directory=dirs.journal)
    readable = check_journal_readable(journal)
    problems += readable
    if not readable:
        # the layer root's work dir: beside the upper on a layer image (engine kernel)
        beside = os.path.join(os.path.dirname(os.path.abspath(upper)), "work")
        work = beside if not os.path.isdir(dirs.work) and os.path.isdir(beside) else dirs.work
        problems += check_replay_matches(journal, upper, work)
    return problems

