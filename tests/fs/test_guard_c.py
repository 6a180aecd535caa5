"""The guard daemons against the model: sdeefs-guard (C) and the pyfuse3 guard, mounted, answer
what sdeefs.fs.guard.GuardView (the reference model, in process) answers, over a tree of many
mode/owner/group/glob combinations, before and after the host changes it."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import signal
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sdeefs.config import GuardDaemon
from sdeefs.fs.daemon import keeper_pids
from sdeefs.fs.guard import ROOT_INO, DenyPatterns, GuardView, Policy, guard_binary
from sdeefs.fs.mount import GuardRequest, mount_guard
from sdeefs.identity import Identity

from ..conftest import fuse_skip_reason, mounted
from .test_guard import guard_dirs

# the user 4242:4343 in group 4444; system ids below 1000 (42: a system account)
IDS = Identity.build(4242, 4343, (4444,), (200000, 65536), (300000, 65536), 1000)
OWNERS = (0, 42, 4242, 5000, 200001)
GROUPS = (0, 42, 4343, 4444, 5000)
FILE_MODES = (0o000, 0o004, 0o040, 0o044, 0o400, 0o404, 0o440, 0o444, 0o600, 0o604, 0o640,
              0o644, 0o660, 0o664, 0o4755, 0o2711)
DIR_MODES = (0o700, 0o701, 0o705, 0o711, 0o750, 0o751, 0o755, 0o770, 0o775, 0o057, 0o1777,
             0o500, 0o550, 0o555, 0o005, 0o050, 0o744, 0o754, 0o704, 0o740, 0o644)
NAMES = ("a", "b.key", ".hidden", "ssh_host_x_key", "x]y", "[z", "^c", "back\\slash", "f0",
         "f7", "deep")
DENY = ("/d*/f[0-3]*", "/*/*.key", "/d1/.h*", "/d2/*", "/*/*/deep", "/d3/[!a-m]*",
        "/d4/[^c]*", "/d5/x]y", "/d5/[[]z", "/*/back\\slash", "/d6/?", "/nothing/here")


def build(lower: Path, seed: int) -> None:
    """Three levels of directories, every kind of entry, modes and owners drawn at random."""
    rng = random.Random(seed)
    dirs = [lower]
    for top in ("d1", "d2", "d3", "d4", "d5", "d6", "pub"):
        dirs.append(lower / top)
        for sub in ("s0", "s1", ".s2"):
            dirs.append(lower / top / sub)
    for directory in dirs:
        directory.mkdir(exist_ok=True)
    for directory in dirs:
        for name in NAMES:
            path = directory / name
            kind = rng.choice(("file", "file", "dir", "link"))
            if kind == "dir" and directory != lower:
                path.mkdir()
                path.chmod(rng.choice(DIR_MODES))
            elif kind == "link":
                os.symlink(rng.choice(("a", "/etc/passwd", "../x")), path)
                continue
            else:
                path.write_text(name)
                path.chmod(rng.choice(FILE_MODES))
            os.lchown(path, rng.choice(OWNERS), rng.choice(GROUPS))
    for directory in dirs[1:]:
        if directory.parent == lower:  # the top level visible: more below to compare
            directory.chmod(0o755)
            os.lchown(directory, 0, 0)
        else:
            directory.chmod(rng.choice((0o755, 0o755, 0o711, 0o750, 0o775)))
            os.lchown(directory, rng.choice(OWNERS), rng.choice(GROUPS))


Answer = tuple[object, ...]


def model_answers(lower: Path) -> tuple[dict[str, Answer], dict[str, list[str]]]:
    """What the model says of every host path (below visible directories) and each visible
    directory's listing."""
    fd = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        view = GuardView(fd, Policy(DenyPatterns.of(DENY), IDS))
        answers: dict[str, Answer] = {}
        listings: dict[str, list[str]] = {}

        def walk(ino: int, rel: str) -> None:
            listings[rel] = sorted(os.fsdecode(name) for name, _, _ in view.scan_hidden(ino))
            for name in sorted(os.listdir(lower / rel if rel else lower)):
                path = f"{rel}/{name}" if rel else name
                try:
                    attr = view.lookup(ino, os.fsencode(name))
                except FileNotFoundError:
                    answers[path] = ("absent",)
                    continue
                st = attr.st
                if stat.S_ISCHR(st.st_mode):
                    answers[path] = ("whiteout", st.st_mode, st.st_uid, st.st_gid, st.st_rdev)
                    continue
                uid, gid = attr.owner or (st.st_uid, st.st_gid)
                answers[path] = ("dir", attr.ino, st.st_mode, uid, gid, st.st_mtime_ns)
                walk(attr.ino, path)

        walk(ROOT_INO, "")
        return answers, listings
    finally:
        os.close(fd)


def mount_answers(guard: Path, paths: list[str], listed: list[str]
                  ) -> tuple[dict[str, Answer], dict[str, list[str]]]:
    answers: dict[str, Answer] = {}
    for path in paths:
        try:
            st = os.lstat(guard / path)
        except FileNotFoundError:
            answers[path] = ("absent",)
            continue
        except NotADirectoryError:  # its directory is a whiteout here, not in the model
            answers[path] = ("unreachable",)
            continue
        if stat.S_ISCHR(st.st_mode):
            answers[path] = ("whiteout", st.st_mode, st.st_uid, st.st_gid, st.st_rdev)
        else:
            assert stat.S_ISDIR(st.st_mode), path
            answers[path] = ("dir", st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    listings = {rel: sorted(os.listdir(guard / rel if rel else guard)) for rel in listed}
    return answers, listings


@pytest.fixture(params=["c", "c-unwatched", "c-prefetch", "c-asking", "python"])
def guard(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[tuple[Path, Path, bool]]:
    """(host lower, guard mountpoint, watched) with the daemon of the parameter serving it
    (c-unwatched: sdeefs-guard as when inotify watches run out: short timeouts; c-prefetch:
    looking names up ahead of the walker, guard.c "looking ahead"; c-asking: every lookup
    asks the host, none is answered from a listing).  watched: the daemon drops the kernel's
    answers when the host changes (sdeefs-guard, watching)."""
    reason = fuse_skip_reason()
    if reason or os.geteuid() != 0:
        pytest.skip(reason or "mounting needs root")
    if request.param == "c-unwatched":
        monkeypatch.setenv("SDEEFS_GUARD_NO_INOTIFY", "1")
    if request.param == "c-prefetch":
        monkeypatch.setenv("SDEEFS_GUARD_PREFETCH", "3")
    if request.param == "c-asking":
        monkeypatch.setenv("SDEEFS_GUARD_LISTED_LOOKUPS", "0")
    daemon = GuardDaemon.PYTHON if request.param == "python" else GuardDaemon.C
    lower, mountpoint = tmp_path / "lower", tmp_path / "guard"
    lower.mkdir()
    mountpoint.mkdir()
    build(lower, seed=16)
    try:
        mount_guard(GuardRequest(str(mountpoint), str(lower), IDS, deny=DENY,
                                 log=str(tmp_path / "guard.log"), daemon=daemon))
        yield lower, mountpoint, request.param in ("c", "c-prefetch", "c-asking")
    finally:
        if mounted(mountpoint):
            subprocess.run(["umount", str(mountpoint)], check=False)
        assert not mounted(mountpoint)


def compare(lower: Path, mountpoint: Path) -> int:
    answers, listings = model_answers(lower)
    got_answers, got_listings = mount_answers(mountpoint, sorted(answers), sorted(listings))
    wrong = {p: (answers[p], got_answers[p]) for p in answers if answers[p] != got_answers[p]}
    assert not wrong, f"{len(wrong)} of {len(answers)} differ, e.g. {sorted(wrong.items())[:5]}"
    assert got_listings == listings
    return len(answers)


def test_the_daemons_answer_as_the_model(guard: tuple[Path, Path, bool]) -> None:
    lower, mountpoint, _ = guard
    checked = compare(lower, mountpoint)
    kinds = {a[0] for a in model_answers(lower)[0].values()}
    assert checked > 200
    assert kinds == {"absent", "whiteout", "dir"}
    compare(lower, mountpoint)  # again, from the kernel's caches


def test_the_daemons_follow_the_host(guard: tuple[Path, Path, bool]) -> None:
    """After everything was looked up and listed once (cached by the kernel), the host
    changes: new entries, a directory moved and replaced, and (C) chmod/chown both ways of
    entries the kernel already holds.  The next answers are the model's, at once.

    The Python guard lets the kernel keep what it answered for cache_timeout (10 s): an
    entry the kernel holds changes there only after that; sdeefs-guard invalidates it when
    the host's change notification arrives."""
    lower, mountpoint, watched = guard
    compare(lower, mountpoint)
    if not watched:
        late_entries(lower, mountpoint)
        return
    rng = random.Random(7)
    every = sorted(p for p in lower.rglob("*") if not p.is_symlink())
    for path in rng.sample(every, 60):
        if path.exists():
            path.chmod(rng.choice(DIR_MODES if path.is_dir() else FILE_MODES))
            os.lchown(path, rng.choice(OWNERS), rng.choice(GROUPS))
    for directory in ("d1", "pub", "d2/s0", "pub/s1"):
        if (lower / directory).is_dir():
            late = lower / directory / "late"
            late.write_text("late")
            late.chmod(0o600)
            (lower / directory / "late.key").write_text("late")
            (lower / directory / "late-public").write_text("public")
    (lower / "pub").rename(lower / "pub.old")
    (lower / "pub").mkdir()
    (lower / "pub/a").write_text("another directory's")
    (lower / "pub/a").chmod(0o600)
    time.sleep(0.05)  # the C daemon reads the host's change notifications: give it that long
    compare(lower, mountpoint)


def late_entries(lower: Path, mountpoint: Path) -> None:
    """Entries the host makes after the kernel listed their directory: decided when first
    looked up, whatever the daemon (the promise of sdeefs.fs.guard's docstring)."""
    for directory in ("d1", "pub", "d2/s0", "pub/s1"):
        if (lower / directory).is_dir() and (mountpoint / directory).is_dir():
            for name, mode in (("late", 0o600), ("late.key", 0o644), ("late-public", 0o644),
                               ("late-group", 0o640)):
                (lower / directory / name).write_text("late")
                (lower / directory / name).chmod(mode)
    answers, listings = model_answers(lower)
    late = sorted(p for p in answers if p.rsplit("/", 1)[-1].startswith("late"))
    assert len(late) >= 8
    got_answers, got_listings = mount_answers(mountpoint, late, sorted(listings))
    assert {p: answers[p] for p in late} == got_answers
    assert got_listings == listings


def test_a_moved_directory_fails_closed(guard: tuple[Path, Path, bool]) -> None:
    """A directory the kernel holds (an open descriptor) that the host moves away: every name
    looked up in it is hidden (the shared stale whiteout), also one that exists."""
    lower, mountpoint, _ = guard
    (lower / "pub").chmod(0o755)
    (lower / "pub/s0").chmod(0o755)
    (lower / "pub/s0/visible").write_text("x")
    held = os.open(mountpoint / "pub/s0", os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(FileNotFoundError):
            os.stat("visible", dir_fd=held, follow_symlinks=False)  # shown: in the layer below
        os.rename(lower / "pub/s0", lower / "pub/s0.old")
        (lower / "pub/s0").mkdir()
        time.sleep(0.05)
        for name in ("visible", "other"):
            st = os.stat(name, dir_fd=held, follow_symlinks=False)
            assert stat.S_ISCHR(st.st_mode), name
            assert st.st_rdev == 0, name
    finally:
        os.close(held)
    assert os.listdir(mountpoint / "pub/s0") == []  # the new directory, looked up afresh


def test_errors_are_one_line(tmp_path: Path) -> None:
    """sdeefs-guard's errors: one line, and the exit code (2: bad arguments)."""
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        result = subprocess.run([guard_binary(), "--lower-fd", str(fd), "--mountpoint",
                                 str(tmp_path), "--uid", "1"],
                                capture_output=True, text=True, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("sdeefs-guard: ")


def test_a_directory_tightened_on_the_host_is_hidden_in_the_view(tmp_path: Path) -> None:
    """Under kernel overlayfs, as the launcher stacks it: a directory the view already walked
    into becomes unreadable on the host (chmod 700): sdeefs-guard drops the kernel's answer,
    overlayfs revalidates its dentry and refuses it (ESTALE: it holds the old one until it
    forgets it; the Python guard did so only after cache_timeout, 10 s)."""
    dirs = guard_dirs(tmp_path)
    (dirs["lower"] / "pub/sub").mkdir(parents=True)
    (dirs["lower"] / "pub/sub/f").write_text("x")
    for path in (dirs["lower"], dirs["lower"] / "pub", dirs["lower"] / "pub/sub"):
        path.chmod(0o755)
    view = dirs["view"]
    try:
        mount_guard(GuardRequest(str(dirs["guard"]), str(dirs["lower"]), IDS,
                                 log=str(tmp_path / "guard.log"), daemon=GuardDaemon.C))
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={dirs['guard']}:{dirs['lower']},upperdir={dirs['upper']},"
                        f"workdir={dirs['work']},xino=on", str(view)], check=True)
        assert (view / "pub/sub/f").read_text() == "x"
        assert os.listdir(view / "pub") == ["sub"]
        assert os.listxattr(view / "pub") == []  # what cp -a, rsync -X, tar ask: nothing
        (view / "pub/mine").write_text("copied up")  # its directory copied up: no xattrs
        assert (dirs["upper"] / "pub/mine").read_text() == "copied up"
        (dirs["lower"] / "pub/sub").chmod(0o700)
        (dirs["lower"] / "pub/late").write_text("root only")
        (dirs["lower"] / "pub/late").chmod(0o600)
        time.sleep(0.05)
        assert os.listdir(view / "pub") == ["mine"]
        for hidden in ("pub/sub/f", "pub/late"):
            with pytest.raises(OSError, match="No such file|Stale file handle") as exc:
                (view / hidden).read_text()
            assert exc.value.errno in (errno.ENOENT, errno.ESTALE), hidden
    finally:
        for name in ("view", "guard"):
            if mounted(dirs[name]):
                subprocess.run(["umount", str(dirs[name])], check=False)
        assert not mounted(dirs["guard"])


# -- what a walk costs (issue 16, "reads through the guard")

# sdeefs-guard's request counters ($SDEEFS_GUARD_COUNTS, guard.c enum count_kind)
COUNT_KINDS = ("lookup", "getattr", "readdir", "readdirplus", "opendir", "releasedir",
               "getxattr", "listxattr", "statfs", "forget", "negative", "listed")
COUNTS = struct.Struct("<12Q")


def read_counts(path: Path) -> dict[str, int]:
    return dict(zip(COUNT_KINDS, COUNTS.unpack(path.read_bytes()), strict=True))


def spent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {kind: after[kind] - before[kind] for kind in COUNT_KINDS if after[kind] != before[kind]}


@contextlib.contextmanager
def counted_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                 ) -> Iterator[tuple[Path, Path, Callable[[], dict[str, int]]]]:
    """(host lower, view, the guard's request counts): sdeefs-guard under kernel overlayfs
    as the launcher mounts a login view (userxattr, no xino), over a tree of 10 directories
    of 20 visible files, a root-only one and a subdirectory of 5 files each."""
    dirs = guard_dirs(tmp_path)
    lower = dirs["lower"]
    lower.chmod(0o755)
    for i in range(10):
        (lower / f"pub/d{i}/sub").mkdir(parents=True)
        for j in range(20):
            (lower / f"pub/d{i}/f{j}").write_text("x")
        for j in range(5):
            (lower / f"pub/d{i}/sub/g{j}").write_text("x")
        (lower / f"pub/d{i}/secret").write_text("root only")
        (lower / f"pub/d{i}/secret").chmod(0o600)
    counts = tmp_path / "counts"
    monkeypatch.setenv("SDEEFS_GUARD_COUNTS", str(counts))
    try:
        mount_guard(GuardRequest(str(dirs["guard"]), str(lower), IDS,
                                 log=str(tmp_path / "guard.log"), daemon=GuardDaemon.C))
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={dirs['guard']}:{lower},upperdir={dirs['upper']},"
                        f"workdir={dirs['work']},userxattr", str(dirs["view"])], check=True)
        yield lower, dirs["view"], lambda: read_counts(counts)
    finally:
        for name in ("view", "guard"):
            if mounted(dirs[name]):
                subprocess.run(["umount", str(dirs[name])], check=False)
        assert not mounted(dirs["guard"])


def walk(view: Path) -> int:
    """What find does: list every directory, lstat every entry; the entries seen."""
    seen = 0
    for top, subdirs, files in os.walk(view):
        for name in subdirs + files:
            os.lstat(os.path.join(top, name))
            seen += 1
    return seen


def test_a_walk_costs_one_lookup_per_entry_and_asks_the_host_for_directories_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first walk: one READDIRPLUS per directory (the whiteouts come with it), one LOOKUP
    per other entry (overlayfs asks the guard's layer first: no kernel cache can answer a name
    not asked yet), each visible file's answered from its directory's listing (no syscall on
    the host; before, every one was an openat2, fstat, fstatat and close).  A repeated walk:
    no request at all."""
    with counted_view(tmp_path, monkeypatch) as (_, view, counts):
        before = counts()
        assert walk(view) == 1 + 10 * (1 + 1 + 20 + 5)  # pub, d*, sub, f*, g* (no secret)
        first = spent(before, counts())
        dirs, files = 1 + 10 + 10, 10 * 20 + 10 * 5
        # one per directory (the root too), one more where it got whiteouts (until empty)
        assert first["readdirplus"] == 1 + dirs + 10, first
        assert first["lookup"] == dirs + files, first
        assert first["negative"] == files
        assert first["listed"] == files
        again = counts()
        assert walk(view) == 1 + 10 * 27
        assert spent(again, counts()) == {}


def test_a_listed_file_tightened_on_the_host_is_hidden(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers from a listing stand while the host does not change the name: a file the view
    listed (but did not look up) that the host makes root-only, or removes and makes anew
    root-only, is hidden once the guard reads the change notification; a new root-only file
    is hidden at its first lookup, at once (not in any listing: the host is asked)."""
    with counted_view(tmp_path, monkeypatch) as (lower, view, _):
        assert "f5" in os.listdir(view / "pub/d0")
        (lower / "pub/d0/f5").chmod(0o600)
        (lower / "pub/d0/f6").unlink()
        (lower / "pub/d0/f6").write_text("root only")
        (lower / "pub/d0/f6").chmod(0o600)
        late = lower / "pub/d0/late"
        late.write_text("root only")
        late.chmod(0o600)
        with pytest.raises(FileNotFoundError):
            os.lstat(view / "pub/d0/late")
        for name in ("f5", "f6"):
            wait_until(f"{name} hidden", absent(view / "pub/d0" / name), timeout=5)
        assert "f5" not in os.listdir(view / "pub/d0")
        assert stat.S_ISREG(os.lstat(view / "pub/d0/f7").st_mode)  # the rest still shows


def test_looking_ahead_answers_before_the_walker_asks(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """$SDEEFS_GUARD_PREFETCH: once the kernel lists a directory, the guard looks its names
    up itself: the walker's own lookups then find the kernel's answers (0 requests), and the
    view can still be unmounted at once (the guard looks through a clone of the mount)."""
    monkeypatch.setenv("SDEEFS_GUARD_PREFETCH", "2")
    with counted_view(tmp_path, monkeypatch) as (_, view, counts):
        names = os.listdir(view / "pub/d3")
        assert len(names) == 21
        wait_until("looked ahead", lambda: counts()["lookup"] >= 1 + 21 + 1)
        before = counts()
        for name in names:
            os.lstat(view / "pub/d3" / name)
        assert spent(before, counts()).get("lookup", 0) == 0
        os.listdir(view / "pub/d4")  # queued as the view goes away


# -- a crash of the guard (issue 14 item 5: sdeefs-guard's keeper, guard.c "surviving a crash")


def server_of(keeper: int) -> int | None:
    """The serving process the keeper forked (None while it has none)."""
    try:
        with open(f"/proc/{keeper}/task/{keeper}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return None
    return children[0] if children else None


def view_answers(view: Path, paths: list[str]) -> dict[str, Answer]:
    """What a process sees through the overlay: each path's kind, mode, owner and inode
    (absent: hidden or not there), and each visible directory's listing."""
    answers: dict[str, Answer] = {}
    for path in paths:
        try:
            st = os.lstat(view / path)
        except (FileNotFoundError, NotADirectoryError):
            answers[path] = ("absent",)
            continue
        answers[path] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_uid, st.st_gid, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            answers[path + "/"] = tuple(sorted(os.listdir(view / path)))
    return answers


@contextlib.contextmanager
def guarded_view(tmp_path: Path, keeper: bool = True) -> Iterator[tuple[Path, Path, int]]:
    """(host lower, overlay view, the guard's pid file's pid): the guard under kernel
    overlayfs as the launcher stacks it."""
    reason = fuse_skip_reason()
    if reason or os.geteuid() != 0:
        pytest.skip(reason or "mounting needs root")
    dirs = {name: tmp_path / name for name in ("lower", "guard", "upper", "work", "view")}
    for path in dirs.values():
        path.mkdir(parents=True)
    build(dirs["lower"], seed=16)
    env = os.environ.copy()
    os.environ["SDEEFS_GUARD_KEEPER"] = "1" if keeper else "0"
    try:
        mount_guard(GuardRequest(str(dirs["guard"]), str(dirs["lower"]), IDS, deny=DENY,
                                 log=str(tmp_path / "guard.log"), daemon=GuardDaemon.C,
                                 pid_file=str(tmp_path / "guard.pid")))
        os.environ.clear()
        os.environ.update(env)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={dirs['guard']}:{dirs['lower']},upperdir={dirs['upper']},"
                        f"workdir={dirs['work']},xino=on", str(dirs["view"])], check=True)
        pid = int((tmp_path / "guard.pid").read_text().split()[0])
        yield dirs["lower"], dirs["view"], pid
    finally:
        os.environ.clear()
        os.environ.update(env)
        for name in ("view", "guard"):
            if mounted(dirs[name]):
                subprocess.run(["umount", "-l", str(dirs[name])], check=False)
        assert not mounted(dirs["guard"])


def absent(path: Path) -> Callable[[], bool]:
    """A condition for :func:`wait_until`: nothing at ``path`` (not even a symlink)."""
    return lambda: not os.path.lexists(path)


def wait_until(what: str, condition: Callable[[], object], timeout: float = 10.0,
               poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(poll)


def test_the_view_survives_kill_9_of_the_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    """kill -9 of the serving guard, three times, while a loop lists and stats every path
    through the overlay: the loop never sees an error, every answer stays what it was (the
    hidden stay hidden, the same inode numbers), a new server serves each time; a host
    change made while no server ran is in the next answers (the kernel's were dropped).
    The node table's log is compacted after every few records (SDEEFS_GUARD_LOG_SLACK), so
    every takeover replays a compacted log."""
    monkeypatch.setenv("SDEEFS_GUARD_LOG_SLACK", "4096")
    with guarded_view(tmp_path) as (lower, view, keeper):
        paths = sorted(str(p.relative_to(lower)) for p in lower.rglob("*"))
        before = view_answers(view, paths)
        hidden = [p for p, a in before.items() if a == ("absent",)]
        assert len(hidden) > 50
        errors: list[BaseException] = []
        differ: list[str] = []
        rounds = [0]
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                try:
                    now = view_answers(view, paths)
                except BaseException as exc:  # noqa: BLE001 - the test reports it
                    errors.append(exc)
                    return
                differ.extend(p for p in before if now[p] != before[p])
                rounds[0] += 1

        def ran_twice(since: int) -> Callable[[], object]:
            return lambda: rounds[0] >= since + 2 or errors

        def replaced(server: int) -> Callable[[], bool]:
            return lambda: server_of(keeper) not in (None, server)

        walker = threading.Thread(target=loop)
        walker.start()
        try:
            for _ in range(3):
                server = server_of(keeper)
                assert server is not None
                seen = rounds[0]
                wait_until("the loop runs", ran_twice(seen))
                os.kill(server, signal.SIGKILL)
                wait_until("a new server", replaced(server))
                wait_until("the loop goes on", ran_twice(rounds[0]), timeout=30)
        finally:
            stop.set()
            walker.join(60)
        assert not errors, errors
        assert not differ, sorted(set(differ))[:10]

        # the host changes while no server runs: a directory the view holds becomes
        # root-only, a root-only file appears in a listed directory
        target = next(p for p, a in before.items()
                      if "/" in p and not p.endswith("/") and a[0] == stat.S_IFDIR)
        parent = target.rsplit("/", 1)[0]
        os.kill(keeper, signal.SIGSTOP)
        try:
            server = server_of(keeper)
            assert server is not None
            os.kill(server, signal.SIGKILL)
            wait_until("the server is dead", lambda: not alive(server))
            (lower / target).chmod(0o700)
            os.chown(lower / target, 0, 0)
            (lower / parent / "late").write_text("root only")
            (lower / parent / "late").chmod(0o600)
        finally:
            os.kill(keeper, signal.SIGCONT)
        wait_until("a new server", lambda: server_of(keeper) not in (None, server))
        for path in (target, f"{parent}/late"):
            wait_until(f"{path} hidden", absent(view / path), timeout=5)
        assert "late" not in os.listdir(view / parent)
        assert os.path.basename(target) not in os.listdir(view / parent)
        log = (tmp_path / "guard.log").read_text()
        assert log.count("a new one takes over its session") == 4, log


def test_a_request_the_killed_guard_was_answering_is_answered_by_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of the server while it answers (it lists a directory of 20,000 entries, half of
    them root-only): the kernel sends the request again to the new server (FUSE_NOTIFY_RESEND)
    and the listing that waited for it is complete and shows no hidden entry."""
    counts = tmp_path / "counts"
    monkeypatch.setenv("SDEEFS_GUARD_COUNTS", str(counts))
    with guarded_view(tmp_path) as (lower, view, keeper):
        big = lower / "pub" / "big"
        big.mkdir()
        for i in range(20_000):
            (big / f"f{i}").write_text("")
            if i % 2:
                (big / f"f{i}").chmod(0o600)
        os.listdir(view / "pub")  # the kernel learns that directories open without asking
        os.stat(view / "pub/big")  # looked up: the listing is the one request left
        server = server_of(keeper)
        assert server is not None
        listings = read_counts(counts)["readdirplus"]
        listed: list[list[str]] = []
        lister = threading.Thread(target=lambda: listed.append(os.listdir(view / "pub/big")))
        lister.start()
        try:
            # the listing's READDIRPLUS counted (at its start): the server scans the 20,000
            # (a kill between two short requests would leave nothing to send again)
            wait_until("the server answers a request",
                       lambda: read_counts(counts)["readdirplus"] > listings or listed,
                       poll=0.0005)
            os.kill(server, signal.SIGKILL)
        finally:
            lister.join(60)
        assert not lister.is_alive()
        assert sorted(listed[0]) == sorted(f"f{i}" for i in range(0, 20_000, 2))
        log = (tmp_path / "guard.log").read_text()
        # (almost always the listing, opcode 44 or 28; on a loaded machine the kill may
        # catch another request of the lister's: resent all the same)
        assert re.search(r"\(opcode [0-9]+\) the dead server had read: sent again", log), log


def test_a_guard_that_cannot_be_kept_fails_closed(tmp_path: Path) -> None:
    """Without a keeper (SDEEFS_GUARD_KEEPER=0, as before it had one) kill -9 of the guard
    ends the view (ENOTCONN); with one, a server that keeps dying (more than 5 times in 30 s:
    a request that kills each server it is resent to) and a server whose keeper was killed
    before it end the view the same way: never an answer the guard did not decide."""
    with guarded_view(tmp_path / "bare", keeper=False) as (_, view, pid):
        os.listdir(view / "pub")
        os.kill(pid, signal.SIGKILL)
        wait_until("the view fails", lambda: not _answers(view))
    with guarded_view(tmp_path / "burst") as (_, view, keeper):
        for _ in range(6):
            server = server_of(keeper)
            assert server is not None
            os.listdir(view / "pub")
            os.kill(server, signal.SIGKILL)
            wait_until("a new server or none", replaced(keeper, server))
        wait_until("the keeper gave up", lambda: not alive(keeper))
        wait_until("the view fails", lambda: not _answers(view))
        assert "the 6. time" in (tmp_path / "burst" / "guard.log").read_text()
    with guarded_view(tmp_path / "keeper") as (_, view, keeper):
        server = server_of(keeper)
        assert server is not None
        os.kill(keeper, signal.SIGKILL)
        wait_until("the keeper is gone", lambda: not alive(keeper))
        assert os.listdir(view / "pub")  # the server goes on alone
        pid_file = tmp_path / "keeper" / "guard.pid"
        wait_until("the server names itself in the pid file (sdeefs stop ends it)",
                   lambda: keeper_pids(str(pid_file)) == [server])
        os.kill(server, signal.SIGKILL)
        wait_until("the view fails", lambda: not _answers(view))


def alive(pid: int) -> bool:
    """Is ``pid`` running (not gone, not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _answers(view: Path) -> bool:
    """Does the guard answer the overlay's lookup of a name it never saw?"""
    try:
        os.lstat(view / "pub" / f"never-seen-{time.monotonic_ns()}")
    except FileNotFoundError:
        return True
    except (ConnectionAbortedError, OSError) as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise
        return False
    return True  # never: the name does not exist


def replaced(keeper: int, server: int) -> Callable[[], bool]:
    """Has the keeper another server than ``server``, or is it gone?"""
    return lambda: server_of(keeper) != server or not alive(keeper)
