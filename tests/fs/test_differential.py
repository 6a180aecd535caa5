"""Differential acceptance test: sdeefs versus kernel overlayfs.

Hypothesis generates sequences of filesystem operations on a small alphabet
of names (so they collide with the lower tree and with each other).  Every
sequence is applied to

  (a) kernel overlayfs   lowerdir=L, upperdir=U1, workdir=W1   at M1
  (b) sdeefs             --lower L --upper U2 --state S2        at M2

Each operation's outcome (result or errno) must be identical, and so must the
merged trees (names, types, modes, owners, sizes, contents, symlink targets,
user xattrs, nlink of regular files, explicitly set mtimes, no duplicate
names, "." and ".." and d_types in getdents64, and which inode numbers are
shared / kept from the lower layer).  Besides plain syscalls the sequences
hold fds across other operations, run operations as uid 1000/1001, and drop
the kernel's dentry/inode caches (FUSE FORGETs).

Then both are unmounted; ``sdeefs check`` must find U2/S2 consistent (the journal
replayed from empty rebuilds U2), sdeefs is mounted again on U2/S2, and the upper dirs
are swapped: U2 (written by sdeefs) is mounted by the kernel, U1
(written by the kernel) by sdeefs; all three must show the tree kernel
overlayfs showed.  U2 must be in overlayfs format (0/0 whiteouts, no ``.wh.``
names).  The lower layer must never change.

``test_harness_kernel_vs_kernel`` runs the same harness with the kernel on
both sides, proving the harness itself is deterministic.

Environment:
  SDEEFS_DIFF_EXAMPLES       max_examples of the sdeefs test (default 25)
  SDEEFS_DIFF_SELF_EXAMPLES  max_examples of the kernel/kernel check (default 10)
  SDEEFS_DIFF_MAX_OPS        maximum operations per sequence (default 25)
  SDEEFS_DIFF_SEED           fixed hypothesis seed
  SDEEFS_DIFF_EXPLORE=1      random search with the example database (default: a fixed,
                             derandomized set of examples, no database)
  SDEEFS_DIFF_VERBOSE        print every op and both outcomes to stderr
  SDEEFS_DIFF_SKIP_OPS=A,B   leave these operation classes out of the sequences,
                             e.g. AsUser,OpenFd (no unprivileged callers, no held fds)
  SDEEFS_DIFF_LOWER_HARDLINK=1  lower d/b is a hard link of b (default: a copy).  Off by
                             default because here sdeefs differs from kernel overlayfs on
                             purpose: a copy-up keeps all lower names of a file linked (as
                             kernel overlayfs does only with index=on), where the default
                             kernel breaks the link; tests/fs/test_mount.py and test_cow.py
                             check sdeefs' behaviour
  (one more difference on purpose, applied to kernel overlayfs by the harness: a
  truncate(2) to a file's own size leaves its mtime alone, as the FUSE kernel has it with
  the writeback cache; see overlay_model.same_size_truncate)
  SDEEFS_DIFF_IGNORE=f1,f2   leave snapshot fields out of the comparison (to look
                             past a known mismatch), e.g. ino,dir.mtime
  SDEEFS_DIFF_OP_TIMEOUT     seconds before a blocked sdeefs op aborts the
                             FUSE connection (default 30)
  SDEEFS_DIFF_ENGINE         the sdeefs engine (default fuse; hybrid fails the hard-link
                             scenarios with ESTALE: docs/hardlinks.md)
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from . import overlay_model as om

MAX_EXAMPLES = int(os.environ.get("SDEEFS_DIFF_EXAMPLES", "25"))
SELF_EXAMPLES = int(os.environ.get("SDEEFS_DIFF_SELF_EXAMPLES", "10"))
MAX_OPS = int(os.environ.get("SDEEFS_DIFF_MAX_OPS", "25"))
SKIP_OPS = frozenset(
    n.strip() for n in os.environ.get("SDEEFS_DIFF_SKIP_OPS", "").split(",") if n.strip())
LOWER_HARDLINK = os.environ.get("SDEEFS_DIFF_LOWER_HARDLINK", "0") != "0"


# --------------------------------------------------------------------------
# skips

def _overlay_in_proc_filesystems() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False


def _skip_reason(need_fuse: bool) -> str | None:
    if os.geteuid() != 0:
        return ("differential test needs root (mount -t overlay, chown, trusted.* "
                f"xattrs); euid is {os.geteuid()}")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount binaries not found in PATH"
    if not _overlay_in_proc_filesystems():
        subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
        if not _overlay_in_proc_filesystems():
            return "kernel has no overlay filesystem (/proc/filesystems; modprobe overlay failed)"
    if need_fuse and not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist (no FUSE support in this kernel/container)"
    return None


# --------------------------------------------------------------------------
# operation strategy

# biased towards names that exist in the lower tree (top level, d/*, e/*) so
# that operations hit lower entries and each other; any path up to depth 3
# (d/e/*, d/d/*, ENOTDIR paths like a/b, ...) is still possible
_top = st.sampled_from(om.NAMES)
_second = st.builds(lambda p, n: f"{p}/{n}", st.sampled_from(["d", "e"]),
                    st.sampled_from(om.NAMES))
_any = st.lists(st.sampled_from(om.NAMES), min_size=1, max_size=3).map("/".join)
paths = st.one_of(_top, _top, _second, _second, _any)

_datas = st.one_of(
    st.sampled_from([b"", b"x", b"hello\n", b"0123456789"]),
    st.binary(min_size=1, max_size=16),
    st.builds(om.Blob, st.sampled_from([4097, 70000]), st.integers(0, 3)),
)

_explicit_ns = st.builds(
    lambda s, ns: s * 1_000_000_000 + ns,
    st.integers(1_000_000_000, 1_400_000_000),
    st.sampled_from([0, 1, 500_000_000, 999_999_999]),
)

_slots = st.integers(0, 1)
# fallocate(2) modes: 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE, ZERO_RANGE|KEEP_SIZE
_fallocate_modes = st.sampled_from([0, 0x1, 0x3, 0x10, 0x11])

# operations that only take paths (these can also run as another user)
path_operations = st.one_of(
    st.builds(om.Write, paths,
              st.sampled_from(["trunc", "create", "append", "excl", "existing"]),
              st.sampled_from([0, 3, 100, 6000]), _datas),
    st.builds(om.Truncate, paths, st.sampled_from([0, 2, 5000, 100000])),
    st.builds(om.Mkdir, paths, st.sampled_from([0o755, 0o700, 0o1777])),
    st.builds(om.Rmdir, paths),
    st.builds(om.Unlink, paths),
    st.builds(om.RmTree, paths),
    st.builds(om.Rename, paths, paths,
              st.sampled_from([0, 0, om.RENAME_NOREPLACE, om.RENAME_EXCHANGE])),
    st.builds(om.Symlink, st.sampled_from(om.SYMLINK_TARGETS), paths),
    st.builds(om.Link, paths, paths),
    st.builds(om.Chmod, paths,
              st.sampled_from([0o600, 0o755, 0o4755, 0o000, 0o1777, 0o2750])),
    st.builds(om.Chown, paths, st.sampled_from([0, 1000, 1001]),
              st.sampled_from([0, 100, 1000]), st.booleans()),
    st.builds(om.Utime, paths, _explicit_ns, _explicit_ns, st.booleans()),
    st.builds(om.SetXattr, paths, st.sampled_from(om.XATTR_NAMES),
              st.sampled_from([b"", b"v1", b"value-two"]),
              st.sampled_from([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])),
    st.builds(om.RemoveXattr, paths,
              st.sampled_from((*om.XATTR_NAMES, "user.dirattr"))),
    st.builds(om.GetXattr, paths, st.sampled_from(om.XATTR_NAMES)),
    st.builds(om.Mkfifo, paths),
    st.builds(om.MknodWhiteout, paths),
    st.builds(om.Read, paths),
    st.builds(om.ListDir, st.one_of(st.just("."), paths)),
)

# (uid, gid) of unprivileged callers: 1000 owns some lower entries, 1001 none
_users = st.sampled_from([(1000, 1000), (1000, 100), (1001, 1001)])
as_user = st.builds(lambda ug, op: om.AsUser(ug[0], ug[1], op), _users, path_operations)

operations = st.one_of(
    path_operations,
    as_user,
    st.builds(om.OpenFd, _slots, paths, st.sampled_from(["r", "rw", "w-creat"])),
    st.builds(om.FdRead, _slots),
    st.builds(om.FdWrite, _slots, st.sampled_from([0, 4, 5000]), _datas),
    st.builds(om.FdTruncate, _slots, st.sampled_from([0, 3, 9000])),
    st.builds(om.FdFallocate, _slots, _fallocate_modes, st.sampled_from([0, 100, 4096]),
              st.sampled_from([1, 5000, 70000])),
    st.builds(om.FdStat, _slots),
    st.builds(om.CloseFd, _slots),
    st.just(om.Check()),
    st.just(om.DropCaches()),
)

# short scripted scenarios that random single ops would hit too rarely; they
# are mixed into the sequence as units (and shrink like everything else)
_lower_dirs = st.sampled_from(["d", "e", "d/e", "d/d"])
_deep = st.sampled_from([om.DEEP_4K, om.DEEP_20K])
_lower_nondirs = st.sampled_from(["a", "b", "x", "d/a", "d/b", "d/x", "d/e/a", "d/e/x"])
_modes = st.sampled_from([0o755, 0o700])
# names free in the lower tree, in three directories
_new_names = ("e/a", "e/b", "d/d/a", "d/d/b", "d/e/b")
_link_pairs = st.tuples(st.sampled_from(_new_names), st.sampled_from(_new_names)).filter(
    lambda pq: pq[0] != pq[1])
# the first name: a new file, or (the link copies it up) a lower file moved there
_first_names = st.sampled_from([
    lambda p, data: [om.Write(p, "excl", 0, data)],
    lambda p, data: [om.Rename("d/a", p)],
])
scenarios = st.one_of(
    # rm -r of a lower dir, then mkdir of the same name: must be opaque
    st.builds(lambda p, m: [om.RmTree(p), om.Mkdir(p, m)], _lower_dirs, _modes),
    st.builds(lambda p, m, n: [om.RmTree(p), om.Mkdir(p, m),
                               om.Write(f"{p}/{n}", "excl", 0, b"new\n"), om.ListDir(p)],
              _lower_dirs, _modes, _top),
    # a lower dir replaced by a file / symlink / fifo
    st.builds(lambda p, d: [om.RmTree(p), om.Write(p, "excl", 0, d)], _lower_dirs, _datas),
    st.builds(lambda p, t: [om.RmTree(p), om.Symlink(t, p)], _lower_dirs,
              st.sampled_from(om.SYMLINK_TARGETS)),
    # a lower file deleted and recreated (as file, dir, fifo)
    st.builds(lambda p, d: [om.Unlink(p), om.Write(p, "excl", 0, d)], _lower_nondirs, _datas),
    st.builds(lambda p, m: [om.Unlink(p), om.Mkdir(p, m)], _lower_nondirs, _modes),
    st.builds(lambda p: [om.Unlink(p), om.Mkfifo(p)], _lower_nondirs),
    # rename over a lower entry, then reuse the source name
    st.builds(lambda p, q, d: [om.Rename(p, q), om.Write(p, "excl", 0, d)],
              _lower_nondirs, _lower_nondirs, _datas),
    # a lower directory renamed (redirect_dir=on on both sides: kernel-format redirects),
    # changed inside, renamed again, its old name reused
    st.builds(lambda p, q, f, r: [om.Rename(p, q, f), om.ListDir(q),
                                  om.Write(f"{q}/new", "excl", 0, b"n"), om.Rename(q, r),
                                  om.ListDir(r), om.Mkdir(p, 0o755), om.Check()],
              _lower_dirs, paths, st.sampled_from([0, om.RENAME_NOREPLACE, om.RENAME_EXCHANGE]),
              paths),
    # a new directory tree renamed around
    st.builds(lambda p, q, f: [om.Mkdir(p, 0o755), om.Write(f"{p}/a", "excl", 0, b"z"),
                               om.Rename(p, q, f), om.ListDir(q)],
              paths, paths, st.sampled_from([0, om.RENAME_NOREPLACE, om.RENAME_EXCHANGE])),
    # copy-up of one name of the lower hard-link pair b, d/b (the other name
    # must keep showing the lower file, with the lower nlink)
    st.sampled_from(["b", "d/b"]).flatmap(lambda p: st.one_of(
        st.builds(om.Truncate, st.just(p), st.sampled_from([0, 5000])),
        st.builds(om.Chmod, st.just(p), st.just(0o644)),
        st.builds(om.Chown, st.just(p), st.just(0), st.just(0)),
        st.builds(om.Write, st.just(p), st.just("append"), st.just(0), st.just(b"+")),
        st.builds(om.SetXattr, st.just(p), st.just("user.bar"), st.just(b"v1")),
        st.builds(om.Utime, st.just(p), _explicit_ns, _explicit_ns),
        st.builds(om.Rename, st.just(p), st.sampled_from(["e/b", "a"])),
        st.builds(om.Link, st.just(p), st.sampled_from(["e/b", "d/d/b"]))))
    .map(lambda op: [op, om.Check()]),
    # trees deeper than PATH_MAX (each syscall argument below it, as on any filesystem):
    # built below any path, written, renamed within and out, moved as a whole, removed
    st.builds(lambda p, d, q, data, n: [
        om.MkdirP(f"{p}/{d}"), om.Write(f"{p}/{d}/f", "excl", 0, data),
        om.Rename(f"{p}/{d}/f", f"{p}/{d}/{n}"), om.Link(f"{p}/{d}/{n}", f"{p}/{d}/h"),
        om.Rename(f"{p}/{d}/h", n), om.ListDir(f"{p}/{d}"), om.Check(),
        om.Rename(p, q), om.Read(f"{q}/{d}/{n}"), om.RmTree(q)],
        paths, _deep, paths, _datas, _top),
    st.builds(lambda p, d: [om.MkdirP(f"{p}/{d}"), om.Chmod(f"{p}/{d}", 0o700),
                            om.SetXattr(f"{p}/{d}", "user.foo", b"v1"),
                            om.Symlink("a", f"{p}/{d}/s"), om.Mkfifo(f"{p}/{d}/ff"),
                            om.Utime(f"{p}/{d}/s", 1_200_000_000_000_000_000,
                                     1_200_000_000_000_000_000, False),
                            om.Rmdir(f"{p}/{d}")],
              paths, _deep),
    # the lower's own tree deeper than PATH_MAX: copy-ups, whiteouts, renames in and out
    st.builds(lambda op: [op, om.Check()], st.one_of(
        st.builds(om.Write, st.just(f"{om.LOWER_DEEP}/lf"), st.sampled_from(["append", "trunc"]),
                  st.just(0), _datas),
        st.builds(om.Chmod, st.just(f"{om.LOWER_DEEP}/lf"), st.just(0o600)),
        st.builds(om.SetXattr, st.just(f"{om.LOWER_DEEP}/ld"), st.just("user.bar"),
                  st.just(b"v1")),
        st.builds(om.Unlink, st.sampled_from([f"{om.LOWER_DEEP}/lf", f"{om.LOWER_DEEP}/ll"])),
        st.builds(om.Rename, st.just(f"{om.LOWER_DEEP}/lf"), _top),
        st.builds(om.Rename, _top, st.just(f"{om.LOWER_DEEP}/ld/moved")),
        st.builds(om.Link, st.just(f"{om.LOWER_DEEP}/lf"), st.just(f"{om.LOWER_DEEP}/ld/l2")),
        st.builds(om.Mkdir, st.just(f"{om.LOWER_DEEP}/ld/new"), _modes),
        st.builds(om.RmTree, st.sampled_from([f"{om.LOWER_DEEP}/ld", "z"])),
        st.builds(om.Read, st.just(f"{om.LOWER_DEEP}/ll")),
    )),
    # metadata-only change of a lower file (truncate to its own size too)
    st.builds(lambda pn, op: [op(pn[0], pn[1]), om.Check()],
              st.sampled_from([("a", 8), ("b", 5000), ("d/a", 72), ("d/e/a", 0)]),
              st.sampled_from([om.Truncate, lambda p, n: om.Chmod(p, 0o640),
                               lambda p, n: om.SetXattr(p, "user.foo", b"v1")])),
    # an open file that is unlinked (lower, copied-up or new) stays usable
    st.builds(lambda pre, p, m, d: [*pre(p), om.OpenFd(1, p, m), om.Unlink(p), om.FdStat(1),
                                    om.FdWrite(1, 0, d), om.FdRead(1), om.FdStat(1),
                                    om.CloseFd(1)],
              st.sampled_from([lambda p: [], lambda p: [om.Chmod(p, 0o644)],
                               lambda p: [om.Unlink(p), om.Write(p, "excl", 0, b"new")]]),
              st.sampled_from(["a", "b", "d/a", "d/e/a"]),
              st.sampled_from(["r", "rw"]), _datas),
    # hard links (new or copied-up files; the second name in the same or another
    # directory, looked up by the Check): the first name unlinked, renamed away, or
    # replaced by a rename over it, with an fd held through it
    st.builds(lambda pq, first, data: [*first(pq[0], data), om.Link(pq[0], pq[1]), om.Check(),
                                       om.Unlink(pq[0]), om.Read(pq[1]),
                                       om.Write(pq[1], "append", 0, b"+"), om.Check()],
              _link_pairs, _first_names, _datas),
    st.builds(lambda pq, first, r: [*first(pq[0], b"first"), om.Link(pq[0], pq[1]),
                                    om.Check(), om.Rename(pq[0], r), om.Read(pq[1]),
                                    om.Check()],
              _link_pairs, _first_names, st.sampled_from(["e/d", "d/d/d", "x"])),
    st.builds(lambda pq, first, r: [*first(pq[0], b"first"), om.Link(pq[0], pq[1]),
                                    om.Check(), om.Write(r, "excl", 0, b"over"),
                                    om.Rename(r, pq[0]), om.Read(pq[1]), om.Read(pq[0]),
                                    om.Check()],
              _link_pairs, _first_names, st.sampled_from(["e/e", "d/d/e"])),
    st.builds(lambda pq, d: [om.Write(pq[0], "excl", 0, b"first"), om.Link(pq[0], pq[1]),
                             om.Check(), om.OpenFd(0, pq[0], "rw"), om.Unlink(pq[0]),
                             om.FdWrite(0, 0, d), om.FdStat(0), om.Read(pq[1]),
                             om.CloseFd(0), om.Check()],
              _link_pairs, _datas),
    # fallocate of a lower file (copied up by the open), a copied-up and a new one, every
    # mode, then the bytes as read by path and after a remount
    st.builds(lambda p, m, off, n: [om.OpenFd(0, p, "rw"), om.FdFallocate(0, m, off, n),
                                    om.FdWrite(0, 3, b"after"), om.FdStat(0), om.CloseFd(0),
                                    om.Read(p), om.Check()],
              st.sampled_from(["a", "b", "d/e/a", "e/new"]), _fallocate_modes,
              st.sampled_from([0, 2, 4096]), st.sampled_from([3, 8192, 100000])),
    # hold a lower file open, modify it through another path, read the fd
    st.builds(lambda p, m, op: [om.OpenFd(0, p, m), op, om.FdRead(0), om.FdStat(0)],
              _lower_nondirs, st.sampled_from(["r", "rw"]),
              st.one_of(st.builds(om.Chmod, _lower_nondirs, st.just(0o600)),
                        st.builds(om.Write, _lower_nondirs, st.just("append"),
                                  st.just(0), st.just(b"+appended")),
                        st.builds(om.Unlink, _lower_nondirs),
                        st.builds(om.Truncate, _lower_nondirs, st.just(1)))),
)


def _flatten(chunks: list[list[om.Op]]) -> list[om.Op]:
    ops = [op for chunk in chunks for op in chunk
           if type(op).__name__ not in SKIP_OPS]
    return ops[:MAX_OPS]


op_sequences = st.lists(
    st.one_of(operations.map(lambda o: [o]), operations.map(lambda o: [o]), scenarios),
    max_size=MAX_OPS,
).map(_flatten)


# --------------------------------------------------------------------------
# fixtures

class LowerTree:
    """The lower layer's path and pristine snapshot (short repr: hypothesis
    prints fixture values in its failure report)."""

    def __init__(self, path: str, pristine: dict) -> None:
        self.path = path
        self.pristine = pristine

    def __repr__(self) -> str:
        return f"LowerTree({self.path!r})"


@pytest.fixture(scope="module")
def lower_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LowerTree]:
    """The lower layer, shared by every example (and proven never to change)."""
    if os.geteuid() != 0:
        pytest.skip(f"differential test needs root; euid is {os.geteuid()}")
    base = tmp_path_factory.mktemp("difflower")
    os.chmod(base, 0o755)
    lower = str(base / "lower")
    os.mkdir(lower)
    om.build_lower_tree(lower, hardlink=LOWER_HARDLINK)
    pristine = om.snapshot(lower, exact_times=True)
    yield LowerTree(lower, pristine)
    assert om.mounted_under(str(base)) == [], "mounts left below the lower tree"


# --------------------------------------------------------------------------
# the harness

T = TypeVar("T")


class Side:
    """One mounted filesystem under test (kernel or sdeefs)."""

    def __init__(self, backend: Any, ws: om.Workspace, tag: str) -> None:
        self.backend = backend
        self.tag = tag
        self.upper = ws.dir(f"upper-{tag}")
        self.aux = ws.dir(f"{'work' if backend.name == 'kernel' else 'state'}-{tag}")
        self.mnt = ws.dir(f"mnt-{tag}")
        self.ctx = om.Ctx(self.mnt)
        self.lower_inos: dict[int, str] = {}

    @property
    def label(self) -> str:
        return f"{self.backend.name}[{self.tag}]"

    def guarded(self, fn: Callable[[], T], what: str) -> T:
        return om.call_with_watchdog(fn, self.mnt, self.backend.is_fuse,
                                     f"{self.label} {what}")

    def apply(self, op: om.Op) -> om.Outcome:
        return self.guarded(lambda: om.apply_op(self.ctx, op), repr(op))

    def snap(self) -> dict:
        return self.guarded(_snapshot_of(self.mnt, self.lower_inos), "snapshot")


def _fmt_ops(ops: list[om.Op], upto: int | None = None) -> str:
    return "\n".join(f"  {i:2d}: {om.short_path(repr(op))}" for i, op in enumerate(ops[:upto]))


# distinct failure classes, so that hypothesis reports (and shrinks) each kind
# of mismatch separately instead of only the one that is easiest to reach
class OutcomeMismatch(AssertionError):
    """An operation succeeded/failed differently."""


class TreeMismatch(AssertionError):
    """The merged trees differ while mounted."""


class UpperFormatError(AssertionError):
    """The upper dir written by the backend under test is not overlayfs format."""


class JournalMismatch(AssertionError):
    """``sdeefs check`` of the upper and journal written by sdeefs finds a problem."""


class CrossMountMismatch(AssertionError):
    """An upper dir read by the other implementation shows a different tree."""


class LowerModified(AssertionError):
    """The lower layer changed."""


_failure_classes: dict[str, type[AssertionError]] = {}


def _failure_class(kind: type[AssertionError], key: str) -> type[AssertionError]:
    """``kind`` refined by ``key`` (the op type): hypothesis
    tells failures apart by exception type, so each kind of mismatch is
    shrunk and reported on its own instead of hiding behind another one."""
    if not key:
        return kind
    name = f"{kind.__name__}[{key}]"
    if name not in _failure_classes:
        _failure_classes[name] = type(name, (kind,), {"__module__": __name__})
    return _failure_classes[name]


def _op_key(op: om.Op) -> str:
    if isinstance(op, om.AsUser):
        return f"AsUser.{type(op.op).__name__}"
    return type(op).__name__


def _fail(kind: type[AssertionError], msg: str, diff: list[str], ops: list[om.Op],
          upto: int | None = None, key: str = "") -> None:
    body = msg + ("\n  " + "\n  ".join(diff) if diff else "")
    cls = _failure_class(kind, key)
    raise cls(f"{body}\nsequence:\n{_fmt_ops(ops, upto)}")


def _snapshot_of(mnt: str, lower_inos: dict[int, str]) -> Callable[[], dict]:
    return lambda: om.snapshot(mnt, lower_inos=lower_inos)


def run_differential(ops: list[om.Op], lower: str, pristine: dict,
                     backend_a: Any, backend_b: Any) -> None:
    """Apply ``ops`` to both backends over ``lower`` and compare everything.

    Side A is the reference (kernel overlayfs)."""
    # in /tmp, not below pytest's 0700 basetemp: AsUser ops must reach the mounts
    ws = om.Workspace()
    lower_inos = om.lower_inodes(lower)
    sides: list[Side] = []
    ok = False
    try:
        a = Side(backend_a, ws, "A")
        b = Side(backend_b, ws, "B")
        sides = [a, b]
        a.lower_inos = b.lower_inos = lower_inos
        ws.mount(a.backend, lower, a.upper, a.aux, a.mnt)
        ws.mount(b.backend, lower, b.upper, b.aux, b.mnt)

        # ---- 1. live: every op must have the same outcome
        untimed = a.backend.times_same_size_truncate and not b.backend.times_same_size_truncate
        for i, op in enumerate(ops):
            kept = a.guarded(functools.partial(om.same_size_truncate, a.ctx, op), "stat") \
                if untimed else None
            out_a = a.apply(op)
            if kept is not None and out_a == ("ok", None):  # the one difference on purpose
                a.guarded(functools.partial(om.keep_mtime, a.ctx, *kept), "utime")
            out_b = b.apply(op)
            om.log(f"{i:2d} {om.short_path(repr(op))}: {a.label}={out_a!r} {b.label}={out_b!r}")
            if out_a != out_b:
                _fail(OutcomeMismatch, f"outcome of op #{i} {om.short_path(repr(op))} differs:\n"
                      f"  {a.label}: {out_a!r}\n  {b.label}: {out_b!r}", [], ops, i + 1,
                      key=_op_key(op))
            if isinstance(op, om.Check):
                d = om.diff_snapshots(a.snap(), b.snap(), a.label, b.label)
                if d:
                    _fail(TreeMismatch, f"merged trees differ at Check op #{i}:", d, ops, i + 1)

        # ---- 2. live: final trees (with open fds still held)
        expected = a.snap()
        d = om.diff_snapshots(expected, b.snap(), a.label, b.label)
        if d:
            _fail(TreeMismatch, "merged trees differ after the sequence:", d, ops)
        for s in sides:
            s.ctx.close_all()
        # and once more without open files (release/flush happened)
        expected = a.snap()
        d = om.diff_snapshots(expected, b.snap(), a.label, b.label)
        if d:
            _fail(TreeMismatch, "merged trees differ after closing the open fds:", d, ops)

        ws.umount(a.backend, a.mnt)
        ws.umount(b.backend, b.mnt)

        # ---- 3. B's upper dir must be in kernel overlayfs format, and sdeefs' journal
        # consistent with it (what the daemon accepted, replay rebuilds)
        problems = om.check_overlay_upper_format(b.upper)
        if problems:
            _fail(UpperFormatError, f"{b.label} upper dir is not in overlayfs format:",
                  problems, ops)
        for s in sides:
            if isinstance(s.backend, om.Sdeefs):
                problems = s.backend.check(s.upper, s.aux)
                if problems:
                    _fail(JournalMismatch, f"{s.label}: sdeefs check finds problems:",
                          problems, ops)

        # ---- 4. remount + cross-mount: B again on its own upper and state
        # dir (persistence), then A's backend on B's upper (fresh work dir)
        # and B's backend on A's upper (fresh state dir)
        errors: list[str] = []
        for reader, upper, aux_or_none, writer in ((b.backend, b.upper, b.aux, b.label),
                                                   (a.backend, b.upper, None, b.label),
                                                   (b.backend, a.upper, None, a.label)):
            tag = f"{reader.name}-reads-{writer}".replace("[", "-").replace("]", "")
            if aux_or_none is None:
                aux = ws.dir(f"{'work' if reader.name == 'kernel' else 'state'}-{tag}")
                label = f"{reader.name} mounting the upper written by {writer}"
            else:
                aux = aux_or_none
                tag += "-again"
                label = f"{reader.name} remounting the upper (and state) of {writer}"
            mnt = ws.dir(f"mnt-{tag}")
            ws.mount(reader, lower, upper, aux, mnt)
            try:
                snap = om.call_with_watchdog(_snapshot_of(mnt, lower_inos), mnt,
                                             reader.is_fuse, f"{label}: snapshot")
            finally:
                ws.umount(reader, mnt)
            d = om.diff_snapshots(expected, snap, f"{a.label}-live", label)
            if d:
                errors.append(f"{label}: tree differs from the live tree:\n  "
                              + "\n  ".join(d))
        if errors:
            _fail(CrossMountMismatch, "cross-mount mismatch:\n" + "\n".join(errors), [], ops)

        # ---- 5. the lower layer is untouched
        d = om.diff_snapshots(pristine, om.snapshot(lower, exact_times=True),
                              "lower-before", "lower-after")
        if d:
            _fail(LowerModified, "the LOWER layer was modified:", d, ops)
        ok = True
    except AssertionError as e:
        # the daemon's own account of what happened, for whoever debugs it
        for s in sides:
            if isinstance(s.backend, om.Sdeefs):
                log = os.path.join(s.aux, "daemon.log")
                with contextlib.suppress(OSError), open(log, errors="replace") as f:
                    tail = f.readlines()[-30:]
                    if tail:
                        e.add_note(f"{s.label} {log} (last {len(tail)} lines):\n"
                                   + "".join(tail))
        raise
    finally:
        for s in sides:
            s.ctx.close_all()
        problems = ws.close()
        left = om.mounted_under(ws.root)
        if ok and (problems or left):
            raise AssertionError(f"cleanup problems: {problems}; mounts left: {left}")


# CI runs a fixed, derandomized set of examples with no example database, so a green run
# stays green, and reports a failing sequence as it was drawn (shrinking one, a mount pair
# per attempt, took CI more than five minutes); SDEEFS_DIFF_EXPLORE=1 searches randomly,
# shrinks what fails and remembers it instead.
# Known open mismatches found that way (see the closing notes): a copy-up by O_TRUNC open of
# lower "a" changing the lower's ctime; fstat of an open, unlinked lower file.
_EXPLORE = os.environ.get("SDEEFS_DIFF_EXPLORE") == "1"
_common_settings: dict[str, Any] = {
    "derandomize": not _EXPLORE,
    "database": None if not _EXPLORE else settings().database,
    "phases": tuple(Phase) if _EXPLORE else (Phase.explicit, Phase.generate),
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture,
                              HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}


def _maybe_seed(f: Callable[..., None]) -> Callable[..., None]:
    s = os.environ.get("SDEEFS_DIFF_SEED")
    return seed(int(s))(f) if s else f


@_maybe_seed
@settings(max_examples=SELF_EXAMPLES, **_common_settings)
@given(ops=op_sequences)
def test_harness_kernel_vs_kernel(ops: list[om.Op], lower_tree: LowerTree) -> None:
    """The harness is sound: kernel overlayfs against itself never differs."""
    reason = _skip_reason(need_fuse=False)
    if reason:
        pytest.skip(reason)
    lower, pristine = lower_tree.path, lower_tree.pristine
    run_differential(ops, lower, pristine, om.Kernel(), om.Kernel())


@_maybe_seed
@settings(max_examples=MAX_EXAMPLES, **_common_settings)
@given(ops=op_sequences)
def test_sdeefs_matches_kernel_overlayfs(ops: list[om.Op],
                                         lower_tree: LowerTree) -> None:
    """sdeefs behaves exactly like kernel overlayfs and shares its upper format."""
    reason = _skip_reason(need_fuse=True)
    if reason:
        pytest.skip(reason)
    lower, pristine = lower_tree.path, lower_tree.pristine
    run_differential(ops, lower, pristine, om.Kernel(), om.Sdeefs())


# The hard-link cases, always run (the random sequences reach them only now and then):
# names in one and in two directories, the first name a new or a copied-up lower file
HARD_LINK_CASES = {
    "unlink-first-name": [
        om.Write("e/a", "excl", 0, b"first"), om.Link("e/a", "e/b"), om.Check(),
        om.Unlink("e/a"), om.Read("e/b"), om.Write("e/b", "append", 0, b"+"), om.Check()],
    "unlink-first-name-across-dirs-copied-up": [
        om.Link("d/a", "e/b"), om.Check(), om.Unlink("d/a"), om.Read("e/b"),
        om.Write("e/b", "append", 0, b"+"), om.Check()],
    "rename-one-name-away": [
        om.Write("d/d/a", "excl", 0, b"first"), om.Link("d/d/a", "e/b"), om.Check(),
        om.Rename("d/d/a", "d/d/b"), om.Read("e/b"), om.Unlink("e/b"), om.Check()],
    "rename-over-one-name": [
        om.Write("e/a", "excl", 0, b"first"), om.Link("e/a", "d/d/b"), om.Check(),
        om.Write("e/x", "excl", 0, b"over"), om.Rename("e/x", "e/a"), om.Read("d/d/b"),
        om.Check()],
    "fd-held-through-the-removed-name": [
        om.Write("e/a", "excl", 0, b"first"), om.Link("e/a", "d/e/b"), om.Check(),
        om.OpenFd(0, "e/a", "rw"), om.Unlink("e/a"), om.FdWrite(0, 0, b"via fd"),
        om.FdTruncate(0, 3), om.FdStat(0), om.Read("d/e/b"), om.CloseFd(0), om.Check()],
    "three-names-two-removed-after-dropped-caches": [
        om.Write("e/a", "excl", 0, b"first"), om.Link("e/a", "e/b"), om.Link("e/b", "d/d/a"),
        om.DropCaches(), om.Read("e/a"), om.Unlink("e/a"), om.Unlink("e/b"),
        om.Read("d/d/a"), om.Check()],
}


@pytest.mark.parametrize("case", sorted(HARD_LINK_CASES))
def test_hard_links_match_kernel_overlayfs(case: str, lower_tree: LowerTree) -> None:
    reason = _skip_reason(need_fuse=True)
    if reason:
        pytest.skip(reason)
    run_differential(HARD_LINK_CASES[case], lower_tree.path, lower_tree.pristine,
                     om.Kernel(), om.Sdeefs())


# Trees deeper than PATH_MAX in one fixed sequence, so that every run covers them whatever
# the examples drawn above: an upper tree 20 KB deep below a lower directory, a lower tree
# 4.2 KB deep, copy-ups, hard links, renames in and out of them, caches dropped, rm -r.
_D4, _D20, _LD = om.DEEP_4K, om.DEEP_20K, om.LOWER_DEEP
DEEP_SEQUENCE: list[om.Op] = [
    om.MkdirP(f"d/{_D20}"),
    om.Write(f"d/{_D20}/f", "excl", 0, om.Blob(70000, 1)),
    om.Rename(f"d/{_D20}/f", f"d/{_D20}/g"),
    om.Link(f"d/{_D20}/g", "n"),
    om.Rename("a", f"d/{_D4}/a"),
    om.SetXattr(f"d/{_D20}", "user.foo", b"v1"),
    om.Symlink("g", f"d/{_D20}/s"),
    om.Chown(f"d/{_D20}/s", 1000, 100, False),
    om.Utime(f"d/{_D20}/g", 1_200_000_000_000_000_000, 1_300_000_000_000_000_000),
    om.Check(),
    om.DropCaches(),
    om.Read(f"d/{_D20}/s"),
    om.AsUser(1000, 1000, om.Read(f"d/{_D20}/g")),
    om.OpenFd(0, f"d/{_D20}/g", "rw"),
    om.Write(f"{_LD}/lf", "append", 0, b"+appended"),
    om.Unlink(f"{_LD}/ll"),
    om.Rename(f"{_LD}/ld", f"{_LD}/ld2"),
    om.Mkdir(f"{_LD}/ld/new", 0o700),
    om.Rename("x", f"{_LD}/ld/new/x"),
    om.Rename(f"{_LD}/lf", "lf"),
    om.FdWrite(0, 5, b"through a deep fd"),
    om.Check(),
    om.Rename(f"d/{om.DEEP_NAME}", "e/moved"),
    om.ListDir("e/moved"),
    om.FdStat(0),
    om.CloseFd(0),
    om.DropCaches(),
    om.Read(f"e/moved/{_D20[len(om.DEEP_NAME) + 1:]}/g"),
    om.RmTree("z"),
    om.ListDir("."),
    om.Check(),  # the 20 KB tree stays: remount and cross-mounts read it too
]


def test_deep_trees_match_kernel_overlayfs(lower_tree: LowerTree) -> None:
    """Paths deeper than PATH_MAX behave as on kernel overlayfs, through remount and
    cross-mounts, and ``sdeefs check`` accepts what the daemon journaled."""
    reason = _skip_reason(need_fuse=True)
    if reason:
        pytest.skip(reason)
    run_differential(DEEP_SEQUENCE, lower_tree.path, lower_tree.pristine, om.Kernel(),
                     om.Sdeefs())


# lower directories renamed (kernel-format redirects, redirect_dir=on), in one fixed sequence:
# within a directory (relative redirect), across (absolute), twice, exchanged, nested, with
# copy-ups and whiteouts inside, caches dropped; the cross-mounts read each other's redirects
REDIRECT_SEQUENCE: list[om.Op] = [
    om.Write("d/a", "append", 0, b"+copied up"),
    om.Rename("d", "d2"),  # relative: "d"
    om.Unlink("d2/x"),
    om.Rename("d2/e", "e/moved"),  # absolute: "/d/e"
    om.Rename("d2", "e/d3"),  # relative becomes absolute: "/d"
    om.Mkdir("d", 0o700),  # the old name again: a new, opaque directory
    om.Write("d/new", "excl", 0, b"new"),
    om.Rename("e/moved", "e/d3/back", om.RENAME_NOREPLACE),
    om.Check(),
    om.DropCaches(),
    om.ListDir("e/d3"),
    om.Read("e/d3/a"),
    om.Rename("e/d3/back", "d/new", om.RENAME_EXCHANGE),
    om.ListDir("d/new"),
    om.Check(),
]


def test_lower_directory_renames_match_kernel_overlayfs(lower_tree: LowerTree) -> None:
    reason = _skip_reason(need_fuse=True)
    if reason:
        pytest.skip(reason)
    run_differential(REDIRECT_SEQUENCE, lower_tree.path, lower_tree.pristine, om.Kernel(),
                     om.Sdeefs())


# Under userxattr (the user-namespace views: the launcher's, jobs' on replicas) the kernel
# has no redirects: renaming a directory that comes from the lower is EXDEV (mv copies);
# renaming one made in the upper, or a file, works.  sdeefs with user.overlay.* the same,
# and the two read each other's uppers (issue 9).
USERXATTR_REDIRECT_SEQUENCE: list[om.Op] = [
    om.Rename("d", "d2"),  # a lower directory: EXDEV
    om.Rename("d/e", "e/moved"),  # EXDEV across directories too
    om.Write("d/a", "append", 0, b"+copied up"),
    om.Rename("d", "d2"),  # copied up (it holds a copied-up file): still EXDEV
    om.Rename("d/d", "d/d2", om.RENAME_NOREPLACE),  # EXDEV before EEXIST/ENOENT matter
    om.Rename("d/e", "d", om.RENAME_EXCHANGE),  # an exchange of lower directories: EXDEV
    om.Mkdir("e/new", 0o700),
    om.Write("e/new/f", "excl", 0, b"new"),
    om.Rename("e/new", "e/new2"),  # made in the upper: renames
    om.Rename("d/a", "e/a"),  # a (copied-up) file: renames
    om.Rename("b", "e/b"),  # a lower file: copied up and renamed
    om.Unlink("d/x"),
    om.Rmdir("d/d"),
    om.Mkdir("d/d", 0o755),  # opaque (user.overlay.opaque)
    om.Check(),
    om.DropCaches(),
    om.ListDir("d"),
    om.Rename("d/d", "d/d3"),  # an opaque directory of the upper: renames
    om.ListDir("d"),
    om.Check(),
]


def test_lower_directory_renames_under_userxattr_match_kernel_overlayfs(
        lower_tree: LowerTree) -> None:
    reason = _skip_reason(need_fuse=True)
    if reason:
        pytest.skip(reason)
    run_differential(USERXATTR_REDIRECT_SEQUENCE, lower_tree.path, lower_tree.pristine,
                     om.KernelUserXattr(), om.SdeefsUserXattr())


# fallocate in every mode, in one fixed sequence (the random ones reach it now and then).
# Not COLLAPSE_RANGE/INSERT_RANGE: sdeefs answers EOPNOTSUPP (as tmpfs does) where an ext4
# upper shifts the data, because shifted bytes break Write records' data by reference
# (sdeefs.records, Fallocate).
FALLOCATE_SEQUENCE: list[om.Op] = [
    om.OpenFd(0, "b", "rw"),  # a lower file of 5000 bytes: copied up
    om.FdFallocate(0, 0, 4000, 20000),  # mode 0: grows
    om.FdFallocate(0, 0x1, 0, 1 << 20),  # KEEP_SIZE: same size
    om.FdFallocate(0, 0x3, 10, 100),  # PUNCH_HOLE: zeros
    om.FdFallocate(0, 0x10, 3000, 30000),  # ZERO_RANGE: zeros, grows
    om.FdFallocate(0, 0x11, 0, 50),  # ZERO_RANGE|KEEP_SIZE
    om.FdStat(0),
    om.CloseFd(0),
    om.Write("e/new", "excl", 0, b"0123456789"),
    om.OpenFd(1, "e/new", "w-creat"),
    om.FdFallocate(1, 0x3, 2, 3),
    om.CloseFd(1),
    om.Read("e/new"),
    om.Read("b"),
    om.Check(),
]


def test_fallocate_matches_kernel_overlayfs(lower_tree: LowerTree) -> None:
    reason = _skip_reason(need_fuse=True)
    if reason:
        pytest.skip(reason)
    run_differential(FALLOCATE_SEQUENCE, lower_tree.path, lower_tree.pristine, om.Kernel(),
                     om.Sdeefs())


# Open files whose name is removed: fstat() through the descriptor, in one fixed sequence.
# Kernel overlayfs answers a file still in the lower only with the lower file's attributes
# (nlink 1, not 0: nothing in the lower was unlinked) and refuses to change it (EEXIST);
# a copied-up or new file with its upper inode's (nlink 0).  The FUSE kernel drops its
# cached nlink at every unlink and asks again only when told to; sdeefs used to change the
# lower file through the descriptor (issue 9).
UNLINKED_FD_SEQUENCE: list[om.Op] = [
    om.OpenFd(0, "a", "r"),  # in the lower only
    om.OpenFd(1, "d/a", "r"),
    om.Read("d/a"),  # (cached attributes)
    om.OpenFd(2, "d/e/a", "rw"),  # copied up
    om.Write("e/new", "excl", 0, b"new"),
    om.OpenFd(3, "e/new", "r"),  # in the upper only
    om.OpenFd(4, "b", "r"),  # in the lower only
    om.Unlink("a"),
    om.Unlink("d/a"),
    om.Unlink("d/e/a"),
    om.Unlink("e/new"),
    om.Write("e/over", "excl", 0, b"over"),
    om.Rename("e/over", "b"),  # a rename over it removes the name as well
    om.FdStat(4),
    om.FdRead(4),
    om.CloseFd(4),
    om.FdStat(0),
    om.FdStat(1),
    om.FdStat(2),
    om.FdStat(3),
    om.FdChmod(0, 0o600),  # never the lower file (the kernel: EEXIST)
    om.FdChmod(2, 0o600),
    om.DropCaches(),
    om.FdStat(0),
    om.FdStat(1),
    om.FdStat(2),
    om.CloseFd(0),
    om.CloseFd(1),
    om.CloseFd(2),
    om.CloseFd(3),
    om.Check(),
]


def test_fstat_of_unlinked_files_matches_kernel_overlayfs(lower_tree: LowerTree) -> None:
    reason = _skip_reason(need_fuse=True)
    if reason:
        pytest.skip(reason)
    run_differential(UNLINKED_FD_SEQUENCE, lower_tree.path, lower_tree.pristine, om.Kernel(),
                     om.Sdeefs())


def test_no_mounts_left_behind() -> None:
    """Runs last in this module: nothing this process mounted is still mounted."""
    left = [m for root in om.WORKSPACE_ROOTS for m in om.mounted_under(root)]
    assert left == []
