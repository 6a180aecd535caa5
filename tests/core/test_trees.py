"""Trees of any depth walked and removed through directory fds (``sdeefs.trees``), and the
tools built on them: ``sdeefs diff`` and the chunked resolution of long paths (``sysio``)."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs import trees
from sdeefs.sysio import PATH_CHUNK, open_at, openat2_beneath, path_chunks
from sdeefs.tools import Change, diff

WHITEOUT = stat.S_IFCHR


@contextlib.contextmanager
def few_fds(spare: int = trees.WINDOW + 20) -> Iterator[None]:
    """RLIMIT_NOFILE just above what is open now: a walk holding an fd per level fails."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + spare, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def deep_chain(root: Path, levels: int, name: bytes = b"n") -> list[bytes]:
    """``levels`` nested directories, each also holding a file, a subdirectory and a
    symlink to ``/`` (which no walk may follow)."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for i in range(levels):
            os.mkdir(name, dir_fd=fd)
            os.mkdir(b"side", dir_fd=fd)
            os.symlink(b"/", b"escape", dir_fd=fd)
            leaf = os.open(b"f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
            os.write(leaf, b"%d" % i)
            os.close(leaf)
            step = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = step
    finally:
        os.close(fd)
    return [name] * levels


def expected_paths(levels: int, name: bytes = b"n") -> set[bytes]:
    found = {b""}
    prefix = b""
    for _ in range(levels):
        for leaf in (name, b"side", b"escape", b"f"):
            found.add(prefix + leaf)
        prefix += name + b"/"
    return found


@pytest.fixture
def deep_tmp(tmp_path: Path) -> Iterator[Path]:
    """A directory removed by the test (pytest's own clean-up recurses: too deep for it)."""
    path = tmp_path / "deep"
    path.mkdir()
    yield path
    trees.rmtree(str(path))


def test_walk_goes_3000_levels_deep_with_few_fds_and_follows_no_symlink(deep_tmp: Path) -> None:
    deep_chain(deep_tmp, 3000)
    fd = os.open(deep_tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with few_fds():
            visits = [(v.path, stat.S_IFMT(v.st.st_mode)) for v in trees.walk(fd)]
    finally:
        os.close(fd)
    paths = [p for p, _ in visits]
    assert set(paths) == expected_paths(3000)
    assert len(paths) == len(set(paths))
    assert max(len(p) for p in paths) > 5999
    assert all(kind == stat.S_IFLNK for p, kind in visits if p.endswith(b"escape"))
    # a directory before what it holds, and a directory's entries together
    position = {p: i for i, p in enumerate(paths)}
    assert all(position[p.rpartition(b"/")[0]] < position[p] for p in paths if b"/" in p)


def test_walk_order_and_entries_match_os_walk(tmp_path: Path) -> None:
    for rel in ("a/b/c", "a/d", "e", "f/g/h/i"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "file").write_text(rel)
    (tmp_path / "a" / "link").symlink_to("/etc")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got = {os.fsdecode(v.path): v.st.st_ino for v in trees.walk(fd) if v.path}
        walk = trees.walk(fd)
        visit = next(v for v in walk if v.path == b"a/d/file")
        assert os.readlink(b"/proc/self/fd/%d" % visit.dir_fd) == os.fsencode(tmp_path / "a/d")
        assert os.path.samefile(visit.at(), tmp_path / "a/d/file")
        walk.close()
    finally:
        os.close(fd)
    want = {}
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            want[os.path.relpath(path, tmp_path)] = os.lstat(path).st_ino
    assert got == want


def test_walk_refuses_to_go_on_when_a_directory_moved_under_it(tmp_path: Path) -> None:
    deep_chain(tmp_path, 200)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    walk = trees.walk(fd)
    try:
        for visit in walk:
            if visit.path.count(b"/") == 150:  # far below the window of open ancestors
                break
        # the directory 100 levels down moves to the top: ".." no longer leads back
        old = b"/".join([b"n"] * 100)
        os.rename(open_path(fd, old), b"moved", dst_dir_fd=fd)
        with pytest.raises(trees.TreeChanged):
            for _ in walk:
                pass
    finally:
        walk.close()
        os.close(fd)


def open_path(fd: int, path: bytes) -> bytes:
    """A /proc path reaching ``path`` below ``fd`` (its parent opened in pieces)."""
    head, _, name = path.rpartition(b"/")
    parent = open_at(fd, head, os.O_PATH | os.O_DIRECTORY)
    return b"/proc/self/fd/%d/%s" % (parent, name)  # the fd lives until the test ends


def test_remove_tree_of_any_depth_never_follows_a_symlink(deep_tmp: Path) -> None:
    outside = deep_tmp / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    tree = deep_tmp / "tree"
    tree.mkdir()
    deep_chain(tree, 2500)
    fd = os.open(tree, os.O_PATH | os.O_DIRECTORY)
    try:
        os.symlink(outside, b"out", dir_fd=open_at(fd, b"/".join([b"n"] * 1200),
                                                   os.O_PATH | os.O_DIRECTORY))
    finally:
        os.close(fd)
    with few_fds():
        trees.rmtree(str(tree))
    assert not tree.exists()
    assert (outside / "keep").read_text() == "keep"
    trees.rmtree(str(tree))  # gone already: nothing to do
    trees.rmtree(str(deep_tmp / "no" / "such"))


# -- long paths in one piece per syscall -------------------------------------------------------


def test_path_chunks_cut_at_slashes() -> None:
    path = b"/".join([b"x" * 255] * 100)
    pieces = path_chunks(path)
    assert b"/".join(pieces) == path
    assert all(0 < len(p) <= PATH_CHUNK for p in pieces)
    assert path_chunks(b"short/path") == [b"short/path"]
    assert path_chunks(b"a" * 5000 + b"/b", 4000) == [b"a" * 5000, b"b"]


def test_openat2_beneath_walks_long_paths_and_still_refuses_symlinks_and_dotdot(
        tmp_path: Path) -> None:
    parts = [b"%03d" % i + b"d" * 200 for i in range(60)]  # 12 KB
    deep = tmp_path / os.fsdecode(parts[0])
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = os.dup(root)
        for part in parts:
            os.mkdir(part, dir_fd=fd)
            step = os.open(part, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = step
        os.close(os.open(b"f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
        os.symlink(b"/etc", b"sym", dir_fd=fd)
        os.close(fd)
        long = b"/".join(parts)
        opened = openat2_beneath(root, long + b"/f", os.O_RDONLY)
        os.close(opened)
        for bad, code in ((long + b"/sym/passwd", errno.ELOOP),
                          (long + b"/../../" + b"/".join([b".."] * 70) + b"/etc",
                           errno.EXDEV)):
            with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is checked
                openat2_beneath(root, bad, os.O_RDONLY)
            assert info.value.errno == code
        # a symlink in the middle of a long path is refused too
        middle = b"/".join(parts[:30])
        os.rename(open_path(root, middle + b"/" + parts[30]), parts[30] + b"-real",
                  dst_dir_fd=open_at(root, middle, os.O_PATH | os.O_DIRECTORY))
        os.symlink(parts[30] + b"-real", open_path(root, middle + b"/" + parts[30]))
        with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is checked
            openat2_beneath(root, long + b"/f", os.O_RDONLY)
        assert info.value.errno == errno.ELOOP
        os.close(open_at(root, long + b"/f", os.O_RDONLY))  # trusted trees follow it
    finally:
        os.close(root)
    assert deep.is_dir()


# -- sdeefs diff -------------------------------------------------------------------------------


def mknod_whiteout(path: Path) -> None:
    os.mknod(path, WHITEOUT, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts (mknod) and trusted.* need root")
def test_diff_reports_in_path_order(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for top in (lower, upper):
        (top / "etc").mkdir(parents=True)
        (top / "usr" / "lib").mkdir(parents=True)
    (lower / "etc" / "profile").write_text("A=1\n")
    (lower / "etc" / "hosts").write_text("h\n")
    (lower / "etc" / "mode").write_text("m\n")
    (lower / "usr" / "lib" / "x").mkdir()
    (lower / "usr" / "lib" / "x" / "old").write_text("old\n")
    (lower / "link").symlink_to("etc")
    (lower / "gone").write_text("bye\n")
    (upper / "etc" / "profile").write_text("A=2\n")
    (upper / "etc" / "mode").write_text("m\n")
    os.chmod(upper / "etc" / "mode", 0o600)
    os.chmod(lower / "etc" / "mode", 0o644)
    (upper / "etc" / "new").write_text("new\n")
    (upper / "usr" / "lib" / "x").mkdir()
    os.setxattr(upper / "usr" / "lib" / "x", "trusted.overlay.opaque", b"y")
    (upper / "usr" / "lib" / "x" / "fresh").write_text("f\n")
    (upper / "link").mkdir()
    (upper / "link" / "inside").write_text("i\n")
    mknod_whiteout(upper / "gone")
    mknod_whiteout(upper / "never-was")
    os.chmod(upper / "usr", 0o700)
    os.chmod(lower / "usr", 0o755)
    got = [c.line() for c in diff(bytes(upper), bytes(lower))]
    assert got == [
        "C /etc/mode  (mode)",
        "A /etc/new  (file)",
        "C /etc/profile  (content)",
        "D /gone",
        "R /link  (symlink -> directory)",
        "A /link/inside  (file)",
        "C /usr  (metadata)",
        "R /usr/lib/x  (directory contents replaced)",
        "A /usr/lib/x/fresh  (file)",
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts (mknod) need root")
def test_diff_of_trees_deeper_than_path_max(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    parts = [b"%02d" % i + b"p" * 198 for i in range(40)]  # 8 KB
    long = b"/".join(parts)
    for top in (lower, upper):
        top.mkdir()
        fd = os.open(top, os.O_PATH | os.O_DIRECTORY)
        for part in parts:
            os.mkdir(part, dir_fd=fd)
            step = os.open(part, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = step
        os.close(fd)
    lfd = os.open(lower, os.O_PATH | os.O_DIRECTORY)
    ufd = os.open(upper, os.O_PATH | os.O_DIRECTORY)
    try:
        ldir = open_at(lfd, long, os.O_PATH | os.O_DIRECTORY)
        udir = open_at(ufd, long, os.O_PATH | os.O_DIRECTORY)
        for name, data in ((b"same", b"s"), (b"changed", b"old"), (b"deleted", b"d")):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=ldir)
            os.write(fd, data)
            os.close(fd)
        for name, data in ((b"same", b"s"), (b"changed", b"new"), (b"added", b"a")):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=udir)
            os.write(fd, data)
            os.close(fd)
        os.mknod(b"deleted", WHITEOUT, 0, dir_fd=udir)
        os.mkdir(b"newdir", dir_fd=udir)
        os.mkdir(b"newdir/" + b"q" * 255, dir_fd=udir)
        os.chmod(open_path(lfd, long + b"/same"), 0o644)
        os.chmod(open_path(ufd, long + b"/same"), 0o644)
    finally:
        os.close(lfd)
        os.close(ufd)
    prefix = os.fsdecode(long)
    assert [c.line() for c in diff(bytes(upper), bytes(lower))] == [
        f"A /{prefix}/added  (file)",
        f"C /{prefix}/changed  (content)",
        f"D /{prefix}/deleted",
        f"A /{prefix}/newdir  (directory)",
        f"A /{prefix}/newdir/{'q' * 255}  (directory)",
        f"C /{prefix}/same  (metadata)",  # copied up, nothing differs: still in the upper
    ]
    assert Change("added", long).as_json()["path"] == "/" + prefix
