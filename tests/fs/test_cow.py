"""Overlay semantics of ``sdeefs.fs.cow.CowFS`` on plain directories (no FUSE, no mount).

Every test builds a lower tree, opens a CowFS with a real journal on it, and
ends with :func:`assert_consistent`: the upper is in kernel overlayfs format,
replaying the journal into an empty layer root reproduces the upper, and the
lower tree was not changed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sdeefs import records as rec
from sdeefs.check import check_journal_readable, check_upper_format, run_checks
from sdeefs.fs import cow
from sdeefs.fs.cow import AttrChange, CowFS, OverlayXattrs, ViewConfig
from sdeefs.fs.inodes import ROOT_INO, Attr
from sdeefs.identity import Identity
from sdeefs.journal import Journal
from sdeefs.sysio import RENAME_EXCHANGE, RENAME_NOREPLACE, is_whiteout, name_to_handle
from sdeefs.trees import walk

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, trusted.* xattrs)")

OPAQUE = b"trusted.overlay.opaque"
ORIGIN = b"trusted.overlay.origin"
MTIME_NS = 1_234_567_890_123_456_789


# --------------------------------------------------------------------------
# environment


def fsb(path: Path) -> bytes:
    return os.fsencode(str(path))


def tree_snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, uid, gid, size, mtime_ns, content / target, xattrs, st_ino).

    Walked through directory fds (trees deeper than PATH_MAX too)."""
    snap: dict[str, tuple[object, ...]] = {}
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for visit in walk(top):
            if not visit.path:
                continue
            st, where = visit.st, visit.at()
            if stat.S_ISREG(st.st_mode):
                fd = os.open(visit.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=visit.dir_fd)
                with os.fdopen(fd, "rb") as f:
                    body: object = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                body = os.fsdecode(os.readlink(visit.name, dir_fd=visit.dir_fd))
            else:
                body = None
            try:
                xattrs = tuple(sorted((n, os.getxattr(where, n, follow_symlinks=False))
                                      for n in os.listxattr(where, follow_symlinks=False)))
            except OSError:
                xattrs = ()
            mtime = st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else None
            snap[os.fsdecode(visit.path)] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0, mtime, body, xattrs,
                st.st_ino,
            )
    finally:
        os.close(top)
    return snap


class Env:
    """lower/, upper/, state/{journal,work} below tmp_path, and a CowFS over them."""

    def __init__(self, tmp_path: Path, mode: str = "merged", ids: Identity | None = None,
                 prefix: bytes = b"trusted.overlay.") -> None:
        self.ids = ids
        self.tmp = tmp_path
        self.lower = tmp_path / "lower"
        self.upper = tmp_path / "upper"
        self.state = tmp_path / "state"
        self.work = self.state / "work"
        self.outside = tmp_path / "outside"
        for d in (self.lower, self.upper, self.work, self.outside):
            d.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.prefix = prefix
        self.journal: Journal | None = None
        self._fs: CowFS | None = None
        self.lower_before: dict[str, tuple[object, ...]] | None = None

    @property
    def fs(self) -> CowFS:
        if self._fs is None:
            self.start()
        assert self._fs is not None
        return self._fs

    def start(self) -> CowFS:
        """Open the view (snapshotting the lower tree the first time)."""
        if self.lower_before is None:
            self.lower_before = tree_snapshot(self.lower)
        self.journal = Journal.open(str(self.state / "journal"))
        config = ViewConfig(upper=fsb(self.upper), work=fsb(self.work),
                        lower=fsb(self.lower) if self.mode == "merged" else None,
                        mode=self.mode, ids=self.ids,  # type: ignore[arg-type]
                        xattrs=OverlayXattrs(self.prefix))
        self._fs = CowFS.open(config, self.journal)
        return self._fs

    def close(self) -> None:
        if self._fs is not None:
            self._fs.close()
            self._fs = None
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def remount(self) -> CowFS:
        self.close()
        return self.start()

    def admin_changed_lower(self) -> None:
        self.lower_before = tree_snapshot(self.lower)

    # -- view helpers ------------------------------------------------------------------

    def walk(self, path: bytes) -> Attr:
        """lookup() each component of a view path from the root."""
        ino = ROOT_INO
        attr = self.fs.getattr(ROOT_INO)
        for part in path.split(b"/"):
            attr = self.fs.lookup(ino, part)
            ino = attr.ino
        return attr

    def ino(self, path: bytes) -> int:
        return self.walk(path).ino

    def read(self, path: bytes) -> bytes:
        fd = self.fs.open_fd(self.ino(path), os.O_RDONLY)
        try:
            return os.pread(fd, 1 << 20, 0)
        finally:
            os.close(fd)

    def write(self, path: bytes, data: bytes, offset: int = 0) -> None:
        """What ops.py does for write(2): copy up, write the backing file, journal the range."""
        ino = self.ino(path)
        node = self.fs.node(ino)
        self.fs.copy_up(node)
        fd = self.fs.open_fd(ino, os.O_WRONLY)
        try:
            # as ops.Operations.write: journal the range, then write it
            self.fs.journal_write(node, name_to_handle(fd), offset, len(data))
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def create_file(self, parent: bytes, name: bytes, data: bytes = b"",
                    mode: int = 0o644) -> Attr:
        parent_ino = self.ino(parent) if parent else ROOT_INO
        attr = self.fs.create(parent_ino, name, mode, 0, 0)
        if data:
            self.write(parent + b"/" + name if parent else name, data)
        return attr

    def parent_ino(self, path: bytes) -> tuple[int, bytes]:
        head, _, tail = path.rpartition(b"/")
        return (self.ino(head) if head else ROOT_INO), tail

    def names(self, path: bytes = b"") -> list[bytes]:
        return self.fs.listdir(self.ino(path) if path else ROOT_INO)

    # -- upper helpers -------------------------------------------------------------------

    def ust(self, rel: str) -> os.stat_result:
        return os.lstat(self.upper / rel)

    def upper_names(self) -> set[str]:
        return {os.path.relpath(os.path.join(d, n), self.upper)
                for d, dirs, files in os.walk(self.upper) for n in dirs + files}


def assert_consistent(env: Env, replay: bool = True) -> None:
    """The invariants every test ends with (closes the view).

    ``replay=False`` only for tests that changed the upper behind the journal's back
    in a way the journal cannot know about: then only the format and the journal's
    readability are checked, not that replaying it rebuilds the upper.
    """
    env.close()
    if replay:
        problems = run_checks(str(env.upper), str(env.state))
    else:
        journal = Journal(directory=str(env.state / "journal"))
        problems = check_upper_format(str(env.upper)) + check_journal_readable(journal)
    assert problems == []
    for name in env.upper_names():
        assert not os.path.basename(name).startswith(".wh."), name
    if env.lower_before is not None:
        assert tree_snapshot(env.lower) == env.lower_before, "the lower tree changed"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


@pytest.fixture
def raw_env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path, mode="raw")
    yield e
    e.close()


@contextlib.contextmanager
def raises_errno(*codes: int) -> Iterator[None]:
    """Like pytest.raises(OSError), for one of the given errno values."""
    with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is checked below
        yield
    expected = [errno.errorcode[c] for c in codes]
    assert info.value.errno in codes, f"{info.value!r}: expected {expected}"


def mkfile(path: Path, data: bytes = b"", mode: int = 0o644, owner: tuple[int, int] = (0, 0),
           mtime_ns: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chown(path, *owner)
    os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


# --------------------------------------------------------------------------
# lookup and listing


def test_lookup_upper_then_lower(env: Env) -> None:
    mkfile(env.lower / "a", b"lower a")
    mkfile(env.lower / "only_lower", b"L")
    mkfile(env.lower / "d" / "x", b"dx")
    mkfile(env.lower / "t", b"lower t")  # lower file, upper directory of the same name
    fs = env.start()
    layers = fs.layers
    # an upper entry of the same name, written behind no one's back (journaled)
    layers.mknod(b"upper/a", stat.S_IFREG | 0o600, 0, 0)
    fd = layers.open(b"upper/a", os.O_WRONLY)
    os.write(fd, b"upper a")
    layers.journal.append(rec.Write(b"upper/a", b"", 0, 7))
    os.close(fd)
    layers.mkdir(b"upper/d", 0o755, 0, 0)
    layers.mknod(b"upper/d/u", stat.S_IFREG | 0o644, 0, 0)
    layers.mkdir(b"upper/t", 0o700, 0, 0)

    assert env.read(b"a") == b"upper a"
    assert env.read(b"only_lower") == b"L"
    assert stat.S_ISDIR(env.walk(b"t").st.st_mode)
    assert stat.S_IMODE(env.walk(b"t").st.st_mode) == 0o700
    # a merged directory: children of both layers
    assert sorted(env.names(b"d")) == [b"u", b"x"]
    assert env.read(b"d/x") == b"dx"
    with pytest.raises(FileNotFoundError):
        env.walk(b"missing")
    # a merged directory keeps the lower directory's inode number
    assert env.ino(b"d") == os.stat(env.lower / "d").st_ino
    assert_consistent(env)


def test_whiteout_hides_lower_entry(env: Env) -> None:
    mkfile(env.lower / "a", b"A")
    mkfile(env.lower / "b", b"B")
    mkfile(env.lower / "d" / "x")
    fs = env.start()
    fs.layers.mknod(b"upper/a", stat.S_IFCHR, 0, 0)
    fs.layers.mknod(b"upper/d", stat.S_IFCHR, 0, 0)
    assert is_whiteout(env.ust("a"))
    with pytest.raises(FileNotFoundError):
        fs.lookup(ROOT_INO, b"a")
    with pytest.raises(FileNotFoundError):
        fs.lookup(ROOT_INO, b"d")
    assert env.names() == [b"b"]
    # a name that is whited out can be created again
    env.create_file(b"", b"a", b"new")
    assert env.read(b"a") == b"new"
    assert stat.S_ISREG(env.ust("a").st_mode)
    assert sorted(env.names()) == [b"a", b"b"]
    assert_consistent(env)


def test_opaque_directory_hides_lower_children(env: Env) -> None:
    mkfile(env.lower / "d" / "x")
    mkfile(env.lower / "d" / "y")
    mkfile(env.lower / "m" / "x")
    fs = env.start()
    fs.layers.mkdir(b"upper/d", 0o755, 0, 0)
    fs.layers.setxattr(b"upper/d", OPAQUE, b"y")
    fs.layers.mknod(b"upper/d/z", stat.S_IFREG | 0o644, 0, 0)
    fs.layers.mkdir(b"upper/m", 0o755, 0, 0)  # not opaque: merged
    fs.layers.mknod(b"upper/m/z", stat.S_IFREG | 0o644, 0, 0)
    assert env.names(b"d") == [b"z"]
    with pytest.raises(FileNotFoundError):
        env.walk(b"d/x")
    assert sorted(env.names(b"m")) == [b"x", b"z"]
    env.walk(b"m/x")
    # the opaque marker is private to the overlay
    assert OPAQUE not in fs.listxattr(env.ino(b"d"))
    with raises_errno(errno.ENODATA):
        fs.getxattr(env.ino(b"d"), OPAQUE)
    assert_consistent(env)


def test_listdir_merged_no_duplicates_no_whiteouts_stable(env: Env) -> None:
    for name in ("a", "b", "c", "f"):
        mkfile(env.lower / name, name.encode())
    mkfile(env.lower / "d" / "x")
    mkfile(env.lower / "d" / "y")
    env.start()
    env.write(b"a", b"changed")  # copied up: in both layers
    env.fs.unlink(ROOT_INO, b"b")  # whiteout
    env.create_file(b"", b"n", b"new")  # upper only
    env.fs.mkdir(ROOT_INO, b"nd", 0o755, 0, 0)
    env.fs.unlink(env.ino(b"d"), b"x")  # d copied up with a whiteout inside
    env.create_file(b"d", b"z")

    first = env.names()
    assert len(first) == len(set(first))
    assert set(first) == {b"a", b"c", b"d", b"f", b"n", b"nd"}
    assert env.names() == first
    assert env.names() == first
    d = env.names(b"d")
    assert len(d) == len(set(d))
    assert set(d) == {b"y", b"z"}
    env.remount()
    assert set(env.names()) == set(first)
    assert len(env.names()) == len(first)
    assert set(env.names(b"d")) == {b"y", b"z"}
    assert_consistent(env)


# --------------------------------------------------------------------------
# removing entries


def test_unlink_lower_file_creates_whiteout(env: Env) -> None:
    mkfile(env.lower / "a", b"A")
    mkfile(env.lower / "d" / "x", b"X")
    env.start()
    env.fs.unlink(ROOT_INO, b"a")
    st = env.ust("a")
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == 0
    with pytest.raises(FileNotFoundError):
        env.fs.lookup(ROOT_INO, b"a")
    # in a lower directory: the directory is copied up first
    env.fs.unlink(env.ino(b"d"), b"x")
    assert stat.S_ISDIR(env.ust("d").st_mode)
    assert is_whiteout(env.ust("d/x"))
    assert env.names(b"d") == []
    # a copied-up lower file: the upper copy is replaced by a whiteout
    mkfile(env.lower / "c", b"C")
    env.admin_changed_lower()
    env.write(b"c", b"changed")
    env.fs.unlink(ROOT_INO, b"c")
    assert is_whiteout(env.ust("c"))
    assert sorted(env.names()) == [b"d"]
    assert_consistent(env)


def test_unlink_upper_only_file_leaves_nothing(env: Env) -> None:
    mkfile(env.lower / "keep")
    env.start()
    env.create_file(b"", b"n", b"data")
    env.fs.mkdir(ROOT_INO, b"nd", 0o755, 0, 0)
    env.create_file(b"nd", b"f")
    assert "n" in env.upper_names()
    env.fs.unlink(ROOT_INO, b"n")
    env.fs.unlink(env.ino(b"nd"), b"f")
    env.fs.rmdir(ROOT_INO, b"nd")
    with pytest.raises(FileNotFoundError):
        env.fs.lookup(ROOT_INO, b"n")
    assert not (env.upper / "n").exists()
    assert not os.path.lexists(env.upper / "n")
    assert not os.path.lexists(env.upper / "nd")
    assert env.names() == [b"keep"]
    assert_consistent(env)


def test_rmdir_lower_then_mkdir_is_opaque(env: Env) -> None:
    mkfile(env.lower / "d" / "x", b"X")
    mkfile(env.lower / "d" / "sub" / "y", b"Y")
    (env.lower / "e").mkdir()
    env.start()
    with raises_errno(errno.ENOTEMPTY):
        env.fs.rmdir(ROOT_INO, b"d")
    d = env.ino(b"d")
    env.fs.unlink(d, b"x")
    env.fs.unlink(env.ino(b"d/sub"), b"y")
    env.fs.rmdir(d, b"sub")
    env.fs.rmdir(ROOT_INO, b"d")
    env.fs.rmdir(ROOT_INO, b"e")
    assert is_whiteout(env.ust("d"))
    assert is_whiteout(env.ust("e"))
    assert env.names() == []

    env.fs.mkdir(ROOT_INO, b"d", 0o750, 0, 0)
    assert stat.S_ISDIR(env.ust("d").st_mode)
    assert os.getxattr(env.upper / "d", OPAQUE) == b"y"
    assert env.names(b"d") == []
    with pytest.raises(FileNotFoundError):
        env.walk(b"d/x")
    with pytest.raises(FileNotFoundError):
        env.walk(b"d/sub")
    assert stat.S_IMODE(env.walk(b"d").st.st_mode) == 0o750
    env.create_file(b"d", b"new", b"n")
    assert env.names(b"d") == [b"new"]
    env.remount()
    assert env.names(b"d") == [b"new"]
    with pytest.raises(FileNotFoundError):
        env.walk(b"d/x")
    assert sorted(env.names()) == [b"d"]
    assert_consistent(env)


def test_mkdir_over_lower_file_whiteout_is_opaque(env: Env) -> None:
    mkfile(env.lower / "f", b"F")
    env.start()
    env.fs.unlink(ROOT_INO, b"f")
    env.fs.mkdir(ROOT_INO, b"f", 0o755, 0, 0)
    assert stat.S_ISDIR(env.ust("f").st_mode)
    assert env.names(b"f") == []
    assert_consistent(env)


# --------------------------------------------------------------------------
# copy-up


def test_copy_up_preserves_metadata_and_inode(env: Env) -> None:
    mkfile(env.lower / "f", b"content", mode=0o4751, owner=(1234, 5678), mtime_ns=MTIME_NS)
    os.setxattr(env.lower / "f", b"user.one", b"1")
    os.setxattr(env.lower / "f", b"user.two", b"\x00binary\xff")
    mkfile(env.lower / "d" / "g", b"G", owner=(1234, 5678))
    os.chown(env.lower / "d", 1234, 5678)
    os.chmod(env.lower / "d", 0o2755)
    os.setxattr(env.lower / "d", b"user.dir", b"D")
    os.utime(env.lower / "d", ns=(MTIME_NS, MTIME_NS))
    os.symlink("target/of/link", env.lower / "l")
    os.chown(env.lower / "l", 1234, 5678, follow_symlinks=False)
    fs = env.start()

    f = env.walk(b"f")
    ino = f.ino
    assert ino == os.stat(env.lower / "f").st_ino
    fs.copy_up(fs.node(ino))
    st = env.ust("f")
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o4751
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == MTIME_NS
    assert (env.upper / "f").read_bytes() == b"content"
    assert os.getxattr(env.upper / "f", b"user.one") == b"1"
    assert os.getxattr(env.upper / "f", b"user.two") == b"\x00binary\xff"
    assert os.getxattr(env.upper / "f", ORIGIN)  # a kernel file handle of the lower
    # the view: same inode, same attributes, private xattrs hidden
    assert fs.getattr(ino).ino == ino
    assert env.walk(b"f").ino == ino
    assert sorted(fs.listxattr(ino)) == [b"user.one", b"user.two"]
    assert fs.getxattr(ino, b"user.two") == b"\x00binary\xff"

    # the parent directory of a copied-up file is copied up with its metadata
    g = env.walk(b"d/g").ino
    fs.copy_up(fs.node(g))
    dst = env.ust("d")
    assert stat.S_IMODE(dst.st_mode) == 0o2755
    assert (dst.st_uid, dst.st_gid) == (1234, 5678)
    assert os.getxattr(env.upper / "d", b"user.dir") == b"D"
    assert (env.ust("d/g").st_uid, env.ust("d/g").st_gid) == (1234, 5678)
    d_ino = env.ino(b"d")
    assert d_ino == os.stat(env.lower / "d").st_ino

    # symlinks: target and owner
    lino = env.ino(b"l")
    fs.copy_up(fs.node(lino))
    assert os.readlink(env.upper / "l") == "target/of/link"
    lst = env.ust("l")
    assert stat.S_ISLNK(lst.st_mode)
    assert (lst.st_uid, lst.st_gid) == (1234, 5678)
    assert fs.readlink(lino) == b"target/of/link"

    env.remount()
    assert env.ino(b"f") == ino
    assert env.ino(b"d/g") == g
    assert env.ino(b"d") == d_ino
    assert env.read(b"f") == b"content"
    assert env.walk(b"f").st.st_mtime_ns == MTIME_NS
    assert_consistent(env)


def test_inode_number_stable_across_copy_up_write_and_remount(env: Env) -> None:
    mkfile(env.lower / "f", b"old")
    env.start()
    before = env.ino(b"f")
    env.write(b"f", b"new contents")
    assert env.ino(b"f") == before
    assert env.fs.getattr(before).st.st_size == len(b"new contents")
    env.remount()
    assert env.ino(b"f") == before
    assert env.read(b"f") == b"new contents"
    assert_consistent(env)


def test_copy_up_of_a_large_file(env: Env) -> None:
    data = os.urandom(3 << 20)
    mkfile(env.lower / "big", data, mode=0o600, owner=(1234, 5678), mtime_ns=MTIME_NS)
    env.start()
    env.write(b"big", b"XYZ", 1 << 20)
    want = data[: 1 << 20] + b"XYZ" + data[(1 << 20) + 3 :]
    assert env.read(b"big") == want[: 1 << 20]  # read() helper reads 1 MiB
    assert (env.upper / "big").read_bytes() == want
    assert (env.ust("big").st_uid, env.ust("big").st_gid) == (1234, 5678)
    assert_consistent(env)


def test_copy_up_on_setattr_and_truncate(env: Env) -> None:
    mkfile(env.lower / "f", b"0123456789", mode=0o644, owner=(1234, 5678), mtime_ns=MTIME_NS)
    mkfile(env.lower / "g", b"0123456789")
    env.start()
    f = env.ino(b"f")
    env.fs.setattr(f, AttrChange(mode=0o600))
    st = env.ust("f")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert st.st_mtime_ns == MTIME_NS
    assert (env.upper / "f").read_bytes() == b"0123456789"
    g = env.ino(b"g")
    env.fs.setattr(g, AttrChange(size=0))
    assert env.read(b"g") == b""
    env.fs.setattr(g, AttrChange(size=3, mtime_ns=MTIME_NS + 1))
    assert env.read(b"g") == b"\0\0\0"
    assert env.walk(b"g").st.st_mtime_ns == MTIME_NS + 1
    assert_consistent(env)


def test_user_xattrs_set_and_remove_copy_up(env: Env) -> None:
    mkfile(env.lower / "f", b"F")
    os.setxattr(env.lower / "f", b"user.keep", b"k")
    os.setxattr(env.lower / "f", b"user.drop", b"d")
    env.start()
    f = env.ino(b"f")
    with raises_errno(errno.ENODATA):
        env.fs.removexattr(f, b"user.absent")
    assert not os.path.lexists(env.upper / "f")  # no copy-up for a failing removexattr
    env.fs.removexattr(f, b"user.drop")
    env.fs.setxattr(f, b"user.new", b"n")
    assert sorted(env.fs.listxattr(f)) == [b"user.keep", b"user.new"]
    assert os.getxattr(env.lower / "f", b"user.drop") == b"d"
    env.remount()
    assert sorted(env.fs.listxattr(env.ino(b"f"))) == [b"user.keep", b"user.new"]
    assert_consistent(env)


# --------------------------------------------------------------------------
# hard links


def test_hardlinked_lower_file_copy_up_keeps_links(env: Env) -> None:
    mkfile(env.lower / "a", b"shared")
    mkfile(env.lower / "sub" / "placeholder")
    os.link(env.lower / "a", env.lower / "b")
    os.link(env.lower / "a", env.lower / "sub" / "c")
    env.start()
    ino_a, ino_b, ino_c = env.ino(b"a"), env.ino(b"b"), env.ino(b"sub/c")
    assert ino_a == ino_b == ino_c

    env.write(b"b", b"SHARED")  # copy-up through the second name
    ua, ub, uc = env.ust("a"), env.ust("b"), env.ust("sub/c")
    assert ua.st_ino == ub.st_ino == uc.st_ino
    assert ua.st_nlink == 3
    for name in (b"a", b"b", b"sub/c"):
        assert env.read(name) == b"SHARED"
        assert env.ino(name) == ino_a
    env.write(b"a", b"!", 6)
    assert env.read(b"sub/c") == b"SHARED!"

    env.remount()
    assert env.ino(b"a") == env.ino(b"b") == env.ino(b"sub/c") == ino_a
    for name in (b"a", b"b", b"sub/c"):
        assert env.read(name) == b"SHARED!"
    env.write(b"sub/c", b"x")
    assert env.read(b"a") == b"xHARED!"
    assert (env.lower / "a").read_bytes() == b"shared"
    assert_consistent(env)


def test_link_in_view(env: Env) -> None:
    mkfile(env.lower / "a", b"A")
    env.start()
    env.fs.link(env.ino(b"a"), ROOT_INO, b"b")
    assert env.ust("a").st_ino == env.ust("b").st_ino
    env.write(b"b", b"B")
    assert env.read(b"a") == b"B"
    with pytest.raises(FileExistsError):
        env.fs.link(env.ino(b"a"), ROOT_INO, b"b")
    env.fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    with raises_errno(errno.EPERM):
        env.fs.link(env.ino(b"d"), ROOT_INO, b"d2")
    assert_consistent(env)


# Regression (was a bug): link() of a lower file: the new name reports the upper st_ino, the old
# name the lower (origin) st_ino; kernel overlayfs shows the origin's inode number under both
def test_link_of_lower_file_keeps_one_inode_number(env: Env) -> None:
    mkfile(env.lower / "a", b"A")
    env.start()
    before = env.ino(b"a")
    attr = env.fs.link(before, ROOT_INO, b"b")
    assert attr.ino == before
    assert env.ino(b"b") == env.ino(b"a") == before
    env.remount()
    assert env.ino(b"b") == env.ino(b"a") == before
    assert_consistent(env)


def _write_through(env: Env, ino: int, data: bytes, offset: int = 0) -> None:
    """What ops.py does for write(2) on an open file: journal the range, then write it."""
    fd = env.fs.open_fd(ino, os.O_WRONLY)
    try:
        env.fs.journal_write(env.fs.node(ino), name_to_handle(fd), offset, len(data))
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


# Regression (was a bug): the last name this daemon knew of a hard-linked file was removed
# while the kernel still held the node (an open file): the node counted as unlinked, so
# writes and truncations through it were not journaled although the file lives on under
# its other name (replay != upper, and replicas kept the old content)
@pytest.mark.parametrize("searched", ["in cow", "before, as ops.py does"])
@pytest.mark.parametrize("kind", ["unlink", "rename over"])
@pytest.mark.parametrize("mode", ["merged", "raw"])
def test_writes_after_the_known_name_of_a_hard_link_went_are_journaled(
        tmp_path: Path, mode: str, kind: str, searched: str) -> None:
    env = Env(tmp_path, mode)
    try:
        mkfile(env.lower / "keep")
        fs = env.start()
        top = fs.lookup(ROOT_INO, b"upper").ino if mode == "raw" else ROOT_INO
        prefix = b"upper/" if mode == "raw" else b""
        sub = fs.mkdir(fs.mkdir(top, b"s", 0o755, 0, 0).ino, b"t", 0o755, 0, 0).ino
        fs.create(top, b"a", 0o644, 0, 0)
        fs.link(fs.lookup(top, b"a").ino, sub, b"b")
        env.remount()  # a fresh daemon knows only the names the kernel asks for
        fs = env.fs
        top = fs.lookup(ROOT_INO, b"upper").ino if mode == "raw" else ROOT_INO
        ino = fs.lookup(top, b"a").ino  # an open file: the kernel holds this node
        if kind == "rename over":
            fs.create(top, b"new", 0o600, 0, 0)
        if searched != "in cow":  # the scan in a worker thread, its result handed over
            needed = fs.other_name_needed(top, b"a")
            assert needed is not None
            found = fs.find_other_name(*needed)
            assert found == prefix + b"s/t/b"
            fs.hint_other_name(needed[0], found)
        assert fs.other_name_needed(top, b"new" if kind == "rename over" else b"keep") is None
        if kind == "unlink":
            fs.unlink(top, b"a")
        else:
            fs.rename(top, b"new", top, b"a", 0)
        _write_through(env, ino, b"written later")
        fs.setattr(ino, AttrChange(size=7))
        assert fs.getattr(ino).st.st_nlink == 1
        assert (env.upper / "s" / "t" / "b").read_bytes() == b"written"
        assert fs.node(ino).paths == [prefix + b"s/t/b"]
        assert_consistent(env)
    finally:
        env.close()


# Regression (was a bug): a node that had lost its last name kept that name when the kernel
# found it again under another one, so when that one went too the node still counted as
# named (not unlinked) and kept serving the removed lower file
def test_a_node_found_under_another_name_drops_the_removed_one(env: Env) -> None:
    mkfile(env.lower / "b", b"shared")
    mkfile(env.lower / "d" / "keep")
    os.link(env.lower / "b", env.lower / "d" / "b")
    env.start()
    ino = env.ino(b"b")
    env.fs.unlink(ROOT_INO, b"b")
    assert env.fs.node(ino).unlinked
    assert env.ino(b"d/b") == ino
    assert env.fs.node(ino).paths == [b"d/b"]
    env.fs.unlink(env.ino(b"d"), b"b")
    assert env.fs.node(ino).unlinked
    with raises_errno(errno.ENOENT):
        env.fs.getattr(ino)
    assert_consistent(env)


# --------------------------------------------------------------------------
# rename


def test_rename_plain(env: Env) -> None:
    mkfile(env.lower / "keep")
    env.start()
    env.create_file(b"", b"n", b"N")
    ino = env.ino(b"n")
    env.fs.rename(ROOT_INO, b"n", ROOT_INO, b"m", 0)
    with pytest.raises(FileNotFoundError):
        env.fs.lookup(ROOT_INO, b"n")
    assert env.read(b"m") == b"N"
    assert env.ino(b"m") == ino
    assert not os.path.lexists(env.upper / "n")  # upper-only: no whiteout needed
    # over an existing upper file
    env.create_file(b"", b"o", b"O")
    env.fs.rename(ROOT_INO, b"m", ROOT_INO, b"o", 0)
    assert env.read(b"o") == b"N"
    assert sorted(env.names()) == [b"keep", b"o"]
    assert_consistent(env)


def test_rename_noreplace(env: Env) -> None:
    mkfile(env.lower / "a", b"A")
    mkfile(env.lower / "b", b"B")
    env.start()
    env.create_file(b"", b"n", b"N")
    for src, dst in ((b"a", b"b"), (b"n", b"a"), (b"a", b"n")):
        with pytest.raises(FileExistsError):
            env.fs.rename(ROOT_INO, src, ROOT_INO, dst, RENAME_NOREPLACE)
    assert env.read(b"a") == b"A"
    assert env.read(b"b") == b"B"
    assert env.read(b"n") == b"N"
    assert not os.path.lexists(env.upper / "a")  # nothing was copied up
    env.fs.rename(ROOT_INO, b"n", ROOT_INO, b"fresh", RENAME_NOREPLACE)
    assert env.read(b"fresh") == b"N"
    assert_consistent(env)


def test_rename_exchange(env: Env) -> None:
    mkfile(env.lower / "a", b"A")
    mkfile(env.lower / "d" / "x", b"X")
    env.start()
    env.create_file(b"", b"n", b"N")
    env.fs.rename(ROOT_INO, b"a", ROOT_INO, b"n", RENAME_EXCHANGE)
    assert env.read(b"a") == b"N"
    assert env.read(b"n") == b"A"
    with pytest.raises(FileNotFoundError):
        env.fs.rename(ROOT_INO, b"a", ROOT_INO, b"nothing", RENAME_EXCHANGE)
    # a new directory exchanged with a file
    env.fs.mkdir(ROOT_INO, b"nd", 0o755, 0, 0)
    env.create_file(b"nd", b"inner", b"I")
    env.fs.rename(ROOT_INO, b"nd", ROOT_INO, b"a", RENAME_EXCHANGE)
    assert env.read(b"a/inner") == b"I"
    assert env.read(b"nd") == b"N"
    # a lower directory exchanged with a file: it carries a redirect (same directory)
    env.fs.rename(ROOT_INO, b"n", ROOT_INO, b"d", RENAME_EXCHANGE)
    assert env.read(b"n/x") == b"X"
    assert os.getxattr(env.upper / "n", "trusted.overlay.redirect") == b"d"
    env.remount()
    assert env.read(b"a/inner") == b"I"
    assert env.read(b"nd") == b"N"
    assert env.read(b"d") == b"A"
    assert env.read(b"n/x") == b"X"
    assert_consistent(env)


def test_rename_lower_file_leaves_whiteout(env: Env) -> None:
    mkfile(env.lower / "a", b"A", mode=0o640, owner=(1234, 5678))
    mkfile(env.lower / "d" / "x", b"X")
    env.start()
    env.fs.rename(ROOT_INO, b"a", ROOT_INO, b"z", 0)
    assert is_whiteout(env.ust("a"))
    with pytest.raises(FileNotFoundError):
        env.fs.lookup(ROOT_INO, b"a")
    assert env.read(b"z") == b"A"
    assert (env.ust("z").st_uid, env.ust("z").st_gid) == (1234, 5678)
    # into a lower directory, over a lower file
    env.create_file(b"", b"n", b"N")
    env.fs.rename(ROOT_INO, b"z", env.ino(b"d"), b"x", 0)
    assert env.read(b"d/x") == b"A"
    assert sorted(env.names()) == [b"d", b"n"]
    # the name can be reused
    env.create_file(b"", b"a", b"again")
    assert env.read(b"a") == b"again"
    env.remount()
    assert env.read(b"d/x") == b"A"
    assert sorted(env.names()) == [b"a", b"d", b"n"]
    assert_consistent(env)


# Regression (was a bug): st_ino of a renamed copied-up lower file changes on the next lookup
# (kernel overlayfs keeps the origin's inode number)
def test_rename_lower_file_keeps_inode_number(env: Env) -> None:
    mkfile(env.lower / "a", b"A")
    env.start()
    before = env.ino(b"a")
    env.fs.rename(ROOT_INO, b"a", ROOT_INO, b"z", 0)
    assert env.ino(b"z") == before
    env.remount()
    assert env.ino(b"z") == before
    assert_consistent(env)


def test_rename_lower_directory_redirects(env: Env) -> None:
    """The kernel's redirect_dir=on format: the directory keeps merging with its lower one
    wherever it moves, and its old name is a whiteout."""
    mkfile(env.lower / "d" / "x", b"X")
    mkfile(env.lower / "d" / "sub" / "y", b"Y")
    (env.lower / "e").mkdir()
    env.start()
    env.create_file(b"d", b"new", b"N")
    env.fs.rename(ROOT_INO, b"d", ROOT_INO, b"d2", 0)
    assert os.getxattr(env.upper / "d2", "trusted.overlay.redirect") == b"d"
    assert is_whiteout(env.ust("d"))
    env.fs.rename(env.ino(b"d2"), b"sub", env.ino(b"e"), b"s", 0)
    assert os.getxattr(env.upper / "e" / "s", "trusted.overlay.redirect") == b"/d/sub"
    env.fs.rename(ROOT_INO, b"d2", env.ino(b"e"), b"d3", 0)  # a relative one becomes absolute
    assert os.getxattr(env.upper / "e" / "d3", "trusted.overlay.redirect") == b"/d"
    assert sorted(env.names(b"e/d3")) == [b"new", b"x"]
    assert env.read(b"e/s/y") == b"Y"
    env.remount()
    assert sorted(env.names()) == [b"e"]
    assert sorted(env.names(b"e")) == [b"d3", b"s"]
    assert env.read(b"e/d3/x") == b"X"
    assert env.read(b"e/s/y") == b"Y"
    assert_consistent(env)


def test_rename_lower_directory_is_exdev_under_userxattr(tmp_path: Path) -> None:
    """user.overlay. (user-namespace overlays): the kernel has no redirects there."""
    env = Env(tmp_path, prefix=b"user.overlay.")
    mkfile(env.lower / "d" / "x")
    (env.lower / "e").mkdir()
    env.start()
    for dst in (b"new", b"e"):
        with raises_errno(errno.EXDEV):
            env.fs.rename(ROOT_INO, b"d", ROOT_INO, dst, 0)
    # also once it has been copied up (it is still a merged directory)
    env.create_file(b"d", b"y")
    with raises_errno(errno.EXDEV):
        env.fs.rename(ROOT_INO, b"d", ROOT_INO, b"new", 0)
    assert sorted(env.names(b"d")) == [b"x", b"y"]
    assert_consistent(env)
    env.close()


def test_rename_upper_only_directory(env: Env) -> None:
    mkfile(env.lower / "d" / "x")
    (env.lower / "gone").mkdir()
    env.start()
    env.fs.mkdir(ROOT_INO, b"n", 0o755, 0, 0)
    env.create_file(b"n", b"f", b"F")
    env.fs.mkdir(env.ino(b"n"), b"sub", 0o700, 0, 0)
    env.fs.rename(ROOT_INO, b"n", ROOT_INO, b"m", 0)
    assert env.read(b"m/f") == b"F"
    assert sorted(env.names(b"m")) == [b"f", b"sub"]
    assert not os.path.lexists(env.upper / "n")
    # into a lower directory
    env.fs.rename(ROOT_INO, b"m", env.ino(b"d"), b"m2", 0)
    assert env.read(b"d/m2/f") == b"F"
    # over the whiteout of a removed lower directory: must become opaque
    env.fs.rmdir(ROOT_INO, b"gone")
    env.fs.rename(env.ino(b"d"), b"m2", ROOT_INO, b"gone", 0)
    assert sorted(env.names(b"gone")) == [b"f", b"sub"]
    assert stat.S_ISDIR(env.ust("gone").st_mode)
    env.remount()
    assert sorted(env.names(b"gone")) == [b"f", b"sub"]
    assert env.read(b"gone/f") == b"F"
    assert sorted(env.names(b"d")) == [b"x"]
    assert_consistent(env)


def test_rename_directory_over_empty_directory(env: Env) -> None:
    mkfile(env.lower / "keep")
    env.start()
    env.fs.mkdir(ROOT_INO, b"a", 0o755, 0, 0)
    env.fs.mkdir(ROOT_INO, b"b", 0o755, 0, 0)
    env.create_file(b"a", b"f")
    env.create_file(b"b", b"g")
    with raises_errno(errno.ENOTEMPTY):
        env.fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)
    env.fs.unlink(env.ino(b"b"), b"g")
    env.fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)
    assert env.names(b"b") == [b"f"]
    with raises_errno(errno.EINVAL):
        env.fs.rename(ROOT_INO, b"b", env.ino(b"b"), b"inside", 0)
    assert_consistent(env)


# Regression (was a bug): an opaque directory that replaced a removed lower directory cannot be
# renamed (EXDEV); kernel overlayfs renames it (it is a pure upper directory) and leaves a
# whiteout at the old name
def test_rename_opaque_directory(env: Env) -> None:
    mkfile(env.lower / "d" / "x", b"X")
    env.start()
    env.fs.unlink(env.ino(b"d"), b"x")
    env.fs.rmdir(ROOT_INO, b"d")
    env.fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)  # opaque: nothing below it from the lower
    env.create_file(b"d", b"new", b"N")
    env.fs.rename(ROOT_INO, b"d", ROOT_INO, b"e", 0)
    assert env.names() == [b"e"]
    assert env.names(b"e") == [b"new"]
    assert is_whiteout(env.ust("d"))
    env.remount()
    assert env.names() == [b"e"]
    assert env.names(b"e") == [b"new"]
    assert_consistent(env)


def test_rename_new_directory_over_empty_lower_directory(env: Env) -> None:
    (env.lower / "e").mkdir()
    mkfile(env.lower / "m" / "gone", b"G")
    env.start()
    env.fs.mkdir(ROOT_INO, b"n", 0o755, 0, 0)
    env.create_file(b"n", b"f", b"F")
    env.fs.rename(ROOT_INO, b"n", ROOT_INO, b"e", 0)
    assert env.names(b"e") == [b"f"]
    assert os.getxattr(env.upper / "e", OPAQUE) == b"y"
    # over a merged directory that is empty in the view (its lower child is whited out)
    env.fs.unlink(env.ino(b"m"), b"gone")
    env.fs.mkdir(ROOT_INO, b"n2", 0o755, 0, 0)
    env.create_file(b"n2", b"g", b"G2")
    env.fs.rename(ROOT_INO, b"n2", ROOT_INO, b"m", 0)
    assert env.names(b"m") == [b"g"]
    env.remount()
    assert sorted(env.names()) == [b"e", b"m"]
    assert env.names(b"m") == [b"g"]
    assert env.names(b"e") == [b"f"]
    with pytest.raises(FileNotFoundError):
        env.walk(b"m/gone")
    assert_consistent(env)


def test_rename_and_exchange_between_lower_entries(env: Env) -> None:
    mkfile(env.lower / "a", b"A")
    mkfile(env.lower / "b", b"B")
    mkfile(env.lower / "d" / "e" / "x", b"X")
    os.symlink("target", env.lower / "l")
    env.start()
    env.fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", RENAME_EXCHANGE)
    assert env.read(b"a") == b"B"
    assert env.read(b"b") == b"A"
    env.fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)  # over a (copied-up) lower file
    assert env.read(b"b") == b"B"
    assert is_whiteout(env.ust("a"))
    env.fs.rename(ROOT_INO, b"l", env.ino(b"d/e"), b"l2", 0)  # a lower symlink, two levels down
    assert env.fs.readlink(env.ino(b"d/e/l2")) == b"target"
    assert sorted(env.names(b"d/e")) == [b"l2", b"x"]
    env.remount()
    assert sorted(env.names()) == [b"b", b"d"]
    assert env.read(b"b") == b"B"
    assert_consistent(env)


def test_unlink_two_levels_down_copies_up_the_parents(env: Env) -> None:
    mkfile(env.lower / "d" / "e" / "x", b"X", owner=(1234, 5678))
    mkfile(env.lower / "d" / "e" / "y", b"Y")
    os.chown(env.lower / "d", 1234, 5678)
    os.chmod(env.lower / "d" / "e", 0o700)
    env.start()
    env.fs.unlink(env.ino(b"d/e"), b"x")
    assert is_whiteout(env.ust("d/e/x"))
    assert (env.ust("d").st_uid, env.ust("d").st_gid) == (1234, 5678)
    assert stat.S_IMODE(env.ust("d/e").st_mode) == 0o700
    assert env.names(b"d/e") == [b"y"]
    assert_consistent(env)


def test_unlink_in_opaque_directory_leaves_no_whiteout(env: Env) -> None:
    mkfile(env.lower / "d" / "x", b"X")
    env.start()
    env.fs.unlink(env.ino(b"d"), b"x")
    env.fs.rmdir(ROOT_INO, b"d")
    env.fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    env.create_file(b"d", b"x", b"new x")  # same name as the hidden lower child
    env.fs.unlink(env.ino(b"d"), b"x")
    assert os.listdir(env.upper / "d") == []
    with pytest.raises(FileNotFoundError):
        env.walk(b"d/x")
    assert_consistent(env)


def test_copy_up_of_fifo_and_symlink_on_chown(env: Env) -> None:
    os.mkfifo(env.lower / "p", 0o640)
    os.chown(env.lower / "p", 1234, 5678)
    os.symlink("t", env.lower / "l")
    env.start()
    env.fs.setattr(env.ino(b"p"), AttrChange(mode=0o600))
    st = env.ust("p")
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    env.fs.setattr(env.ino(b"l"), AttrChange(uid=42, gid=43))
    assert (env.ust("l").st_uid, env.ust("l").st_gid) == (42, 43)
    assert os.readlink(env.upper / "l") == "t"
    assert_consistent(env)


def test_excluded_paths_show_empty_directories(env: Env) -> None:
    mkfile(env.lower / "proc" / "1" / "status", b"host proc")
    mkfile(env.lower / "run" / "lock", b"host run")
    env.start()
    assert env.names(b"proc") == []
    assert env.names(b"run") == []
    with pytest.raises(FileNotFoundError):
        env.walk(b"run/lock")
    env.create_file(b"run", b"mine", b"M")
    assert env.names(b"run") == [b"mine"]
    env.remount()
    assert env.names(b"run") == [b"mine"]
    assert_consistent(env)


def test_inode_numbers_reused_by_the_upper_get_new_node_ids(env: Env) -> None:
    """The kernel may still hold a deleted node; a recycled inode number must not alias it.

    (Only the first recycling of a number: see the xfail tests below for more.)
    """
    mkfile(env.lower / "keep")
    env.start()
    dead: dict[int, bytes] = {}
    for i in range(2):
        name = b"f%d" % i
        attr = env.create_file(b"", name, name)
        assert attr.ino not in dead, f"{name!r} got the node id of deleted {dead[attr.ino]!r}"
        assert env.read(name) == name
        env.fs.unlink(ROOT_INO, name)  # the kernel keeps its lookup reference
        dead[attr.ino] = name
        with raises_errno(errno.ENOENT):
            env.fs.getattr(attr.ino)
    env.create_file(b"", b"last", b"L")
    assert env.ino(b"last") not in dead
    assert env.fs.getattr(env.ino(b"last")).st.st_size == 1
    assert_consistent(env)


def _churn_reused_inode(env: Env, rounds: int) -> list[tuple[int, int, int]]:
    """create/unlink one name after another (the kernel keeps every deleted node):
    the upper filesystem recycles the freed inode number.  Returns the node ids of
    create() and two later lookups of each file."""
    ids = []
    upper_inos = []
    for i in range(rounds):
        name = b"f%d" % i
        attr = env.fs.create(ROOT_INO, name, 0o644, 0, 0)
        upper_inos.append(attr.st.st_ino)
        ids.append((attr.ino, env.fs.lookup(ROOT_INO, name).ino,
                    env.fs.lookup(ROOT_INO, name).ino))
        env.fs.unlink(ROOT_INO, name)
    if len(set(upper_inos)) > len(upper_inos) - 2:
        pytest.skip("the upper filesystem did not recycle inode numbers")
    return ids


# Regression (was a bug): CowFS._remember renumbering: once a recycled inode number has been
# renumbered twice, every lookup of the live file returns a NEW node id (renumbered maps
# real->first id only, whose node is dead)
def test_recycled_inode_number_lookups_are_stable(env: Env) -> None:
    mkfile(env.lower / "keep")
    env.start()
    for i, (created, first, second) in enumerate(_churn_reused_inode(env, 30)):
        assert created == first == second, f"round {i}: {created:#x} {first:#x} {second:#x}"
    assert_consistent(env)


# Regression (was a bug): CowFS._remember renumbering ORs a global generation counter << 56 into
# the id: after ~256 recycled numbers node ids exceed 2**64 (invalid FUSE node ids), and OR-ing
# generations into an already renumbered id can repeat an earlier id (a new file aliases a deleted
# node the kernel still holds)
def test_renumbered_node_ids_fit_in_64_bits(env: Env) -> None:
    mkfile(env.lower / "keep")
    env.start()
    ids = _churn_reused_inode(env, 200)
    created = [c for c, _, _ in ids]
    assert len(set(created)) == len(created), "a live file got the id of a deleted one"
    assert max(i for triple in ids for i in triple) < 2**64
    assert_consistent(env)


# --------------------------------------------------------------------------
# limits and policy


def test_names_longer_than_255_bytes(env: Env) -> None:
    mkfile(env.lower / "a")
    env.start()
    long = b"x" * 256
    ok = b"y" * 255
    calls = [
        lambda: env.fs.lookup(ROOT_INO, long),
        lambda: env.fs.create(ROOT_INO, long, 0o644, 0, 0),
        lambda: env.fs.mkdir(ROOT_INO, long, 0o755, 0, 0),
        lambda: env.fs.symlink(ROOT_INO, long, b"t", 0, 0),
        lambda: env.fs.mknod(ROOT_INO, long, stat.S_IFIFO | 0o644, 0, 0, 0),
        lambda: env.fs.unlink(ROOT_INO, long),
        lambda: env.fs.rmdir(ROOT_INO, long),
        lambda: env.fs.rename(ROOT_INO, b"a", ROOT_INO, long, 0),
        lambda: env.fs.link(env.ino(b"a"), ROOT_INO, long),
    ]
    for call in calls:
        with raises_errno(errno.ENAMETOOLONG):
            call()
    env.create_file(b"", ok, b"255")
    assert env.read(ok) == b"255"
    assert sorted(env.names()) == sorted([b"a", ok])
    assert_consistent(env)


def test_a_whiteout_is_not_made_through_the_merged_view(env: Env) -> None:
    mkfile(env.lower / "d" / "x")
    env.start()
    for parent in (ROOT_INO, env.ino(b"d")):
        with raises_errno(errno.EPERM):  # as kernel overlayfs (ovl_mknod)
            env.fs.mknod(parent, b"dev", stat.S_IFCHR, 0, 0, 0)
    assert env.upper_names() == set()
    assert_consistent(env)


@pytest.mark.parametrize(("mode", "rdev"), [
    (stat.S_IFCHR | 0o644, os.makedev(1, 3)),
    (stat.S_IFCHR | 0o600, os.makedev(0, 1)),
    (stat.S_IFBLK | 0o640, os.makedev(8, 0)),
    (stat.S_IFBLK, 0),
])
def test_device_nodes_are_made_and_journaled(env: Env, mode: int, rdev: int) -> None:
    """The daemon makes what the kernel let the caller ask for (CAP_MKNOD: host root);
    the record (Mkdev) carries the device number through replay (assert_consistent)."""
    mkfile(env.lower / "d" / "x")
    env.start()
    env.fs.mknod(env.ino(b"d"), b"dev", mode, rdev, 0, 0)
    st = env.ust("d/dev")
    assert (st.st_mode, st.st_rdev) == (mode, rdev)
    assert_consistent(env)


def test_fifo_and_socket_nodes_allowed(env: Env) -> None:
    mkfile(env.lower / "keep")
    env.start()
    env.fs.mknod(ROOT_INO, b"fifo", stat.S_IFIFO | 0o640, 0, 0, 0)
    env.fs.mknod(ROOT_INO, b"sock", stat.S_IFSOCK | 0o600, 0, 0, 0)
    assert stat.S_ISFIFO(env.ust("fifo").st_mode)
    assert stat.S_ISSOCK(env.ust("sock").st_mode)
    assert stat.S_IMODE(env.ust("fifo").st_mode) == 0o640
    assert_consistent(env)


@pytest.mark.parametrize("name", [b"trusted.overlay.opaque", b"trusted.overlay.origin",
                                  b"trusted.overlay.redirect", b"user.overlay.opaque"])
def test_overlay_xattrs_are_private(env: Env, name: bytes) -> None:
    mkfile(env.lower / "f", b"F")
    os.setxattr(env.lower / "f", b"user.visible", b"v")
    mkfile(env.lower / "d" / "x")
    env.start()
    env.write(b"f", b"changed")  # copy-up: the upper file now carries trusted.overlay.origin
    env.fs.unlink(env.ino(b"d"), b"x")
    env.fs.rmdir(ROOT_INO, b"d")
    env.fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)  # opaque
    for path in (b"f", b"d"):
        ino = env.ino(path)
        listed = env.fs.listxattr(ino)
        assert not [n for n in listed if n.startswith((b"trusted.overlay.", b"user.overlay."))]
        with raises_errno(errno.EPERM):
            env.fs.setxattr(ino, name, b"y")
        with raises_errno(errno.EPERM, errno.ENODATA):
            env.fs.removexattr(ino, name)
        with raises_errno(errno.ENODATA):
            env.fs.getxattr(ino, name)
    assert env.fs.listxattr(env.ino(b"f")) == [b"user.visible"]
    assert os.getxattr(env.upper / "d", OPAQUE) == b"y"
    assert os.getxattr(env.upper / "f", ORIGIN)
    # an upper-only file: setting the private names is refused before anything changes
    env.create_file(b"", b"n")
    with raises_errno(errno.EPERM):
        env.fs.setxattr(env.ino(b"n"), name, b"y")
    assert os.listxattr(env.upper / "n") == []
    assert_consistent(env)


# --------------------------------------------------------------------------
# safety: a symlink planted in the (user-owned) upper is never followed


def _plant(env: Env, rel: str) -> Path:
    """Replace upper/<rel> by a symlink to env.outside (behind the view's back)."""
    aside = env.tmp / ("aside-" + rel.replace("/", "_"))
    os.rename(env.upper / rel, aside)
    os.symlink(env.outside, env.upper / rel)
    return aside


def _unplant(env: Env, rel: str, aside: Path) -> None:
    os.unlink(env.upper / rel)
    os.rename(aside, env.upper / rel)


def test_planted_directory_symlink_is_never_followed(env: Env) -> None:
    mkfile(env.lower / "ld" / "lx", b"LX")
    mkfile(env.outside / "f", b"outside f", mode=0o600)
    mkfile(env.outside / "lx", b"outside lx", mode=0o600)
    (env.outside / "sub").mkdir()
    os.setxattr(env.outside / "f", b"user.o", b"o")
    env.start()
    fs = env.fs
    fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    env.create_file(b"d", b"f", b"inside f")
    env.fs.mkdir(env.ino(b"d"), b"sub", 0o755, 0, 0)
    env.create_file(b"ld", b"new", b"copied-up directory")  # copies ld up
    d, f = env.ino(b"d"), env.ino(b"d/f")
    ld = env.ino(b"ld")
    lx = env.ino(b"ld/lx")
    outside_before = tree_snapshot(env.outside)
    aside_d = _plant(env, "d")
    aside_ld = _plant(env, "ld")

    def attempts(dir_ino: int, file_ino: int) -> dict[str, Callable[[], object]]:
        return {
            "lookup f": lambda: fs.lookup(dir_ino, b"f"),
            "lookup lx": lambda: fs.lookup(dir_ino, b"lx"),
            "listdir": lambda: fs.listdir(dir_ino),
            "create": lambda: fs.create(dir_ino, b"planted", 0o644, 0, 0),
            "mkdir": lambda: fs.mkdir(dir_ino, b"planted", 0o755, 0, 0),
            "mknod": lambda: fs.mknod(dir_ino, b"planted", stat.S_IFIFO | 0o644, 0, 0, 0),
            "symlink": lambda: fs.symlink(dir_ino, b"planted", b"/etc/passwd", 0, 0),
            "unlink f": lambda: fs.unlink(dir_ino, b"f"),
            "unlink lx": lambda: fs.unlink(dir_ino, b"lx"),
            "rmdir": lambda: fs.rmdir(dir_ino, b"sub"),
            "rename f away": lambda: fs.rename(dir_ino, b"f", ROOT_INO, b"stolen", 0),
            "rename lx away": lambda: fs.rename(dir_ino, b"lx", ROOT_INO, b"stolen", 0),
            "rename into": lambda: fs.rename(ROOT_INO, b"stolen-src", dir_ino, b"f", 0),
            "link": lambda: fs.link(file_ino, ROOT_INO, b"stolen"),
            "link into": lambda: fs.link(env.ino(b"stolen-src"), dir_ino, b"planted"),
            "open for write": lambda: os.close(fs.open_fd(file_ino, os.O_WRONLY)),
            "open for read": lambda: os.close(fs.open_fd(file_ino, os.O_RDONLY)),
            "chmod": lambda: fs.setattr(file_ino, AttrChange(mode=0o777)),
            "truncate": lambda: fs.setattr(file_ino, AttrChange(size=0)),
            "chown": lambda: fs.setattr(file_ino, AttrChange(uid=1, gid=1)),
            "utime": lambda: fs.setattr(file_ino, AttrChange(mtime_ns=1)),
            "setxattr": lambda: fs.setxattr(file_ino, b"user.o", b"changed"),
            "removexattr": lambda: fs.removexattr(file_ino, b"user.o"),
            "getxattr": lambda: fs.getxattr(file_ino, b"user.o"),
            "copy-up": lambda: fs.copy_up(fs.node(file_ino)),
        }

    env.create_file(b"", b"stolen-src", b"S")
    # what may succeed without touching the planted path: lx is still a lower file there
    # (open_fd on a lower file is the caller's business: it copies up before writing)
    harmless = {d: {"copy-up"},  # f is already in the upper: nothing to do
                ld: {"open for read", "open for write"}}
    for dir_ino, file_ino in ((d, f), (ld, lx)):
        for what, attempt in attempts(dir_ino, file_ino).items():
            try:
                attempt()
            except OSError:
                pass
            else:
                if what not in harmless[dir_ino]:
                    pytest.fail(f"{what} through a planted symlink succeeded")
            assert tree_snapshot(env.outside) == outside_before, f"{what} changed outside"
    assert tree_snapshot(env.outside) == outside_before
    _unplant(env, "d", aside_d)
    _unplant(env, "ld", aside_ld)
    # the work directory's staging area: planted too
    aside_w = env.tmp / "aside-work"
    os.rename(env.work / "sdeefs", aside_w)
    os.symlink(env.outside, env.work / "sdeefs")
    mkfile(env.lower / "ld" / "ly", b"LY")
    env.admin_changed_lower()
    ly = env.ino(b"ld/ly")
    with raises_errno(errno.ELOOP):
        fs.copy_up(fs.node(ly))
    with raises_errno(errno.ELOOP):
        fs.mkdir(ld, b"staged", 0o755, 0, 0)  # a new directory in a merged one is staged
    assert tree_snapshot(env.outside) == outside_before
    os.unlink(env.work / "sdeefs")
    os.rename(aside_w, env.work / "sdeefs")
    assert env.read(b"d/f") == b"inside f"
    assert_consistent(env)


def test_planted_file_symlink_is_never_followed(env: Env) -> None:
    """A file of the upper replaced by a symlink to a host file: nothing reaches the host file.

    (Found as a bug: setattr(SET_MODE) used os.chmod on a /proc/self/fd path and
    chmod'ed the host file.)  An operation may fail or do nothing; the journal may
    then describe a change the tampered upper does not show, so the replay check is
    left out here.
    """
    mkfile(env.lower / "keep")
    mkfile(env.lower / "lowerfile", b"L")
    mkfile(env.outside / "victim", b"host file", mode=0o600)
    os.setxattr(env.outside / "victim", b"user.v", b"v")
    env.start()
    f = env.create_file(b"", b"f", b"mine").ino
    env.write(b"lowerfile", b"copied")
    lf = env.ino(b"lowerfile")
    before = tree_snapshot(env.outside)
    for name in ("f", "lowerfile"):
        os.rename(env.upper / name, env.tmp / f"aside-{name}")
        os.symlink(env.outside / "victim", env.upper / name)
    attempts: dict[str, Callable[[int], object]] = {
        "chmod": lambda i: env.fs.setattr(i, AttrChange(mode=0o4777)),
        "chown": lambda i: env.fs.setattr(i, AttrChange(uid=7, gid=7)),
        "utime": lambda i: env.fs.setattr(i, AttrChange(mtime_ns=5)),
        "truncate": lambda i: env.fs.setattr(i, AttrChange(size=1)),
        "everything": lambda i: env.fs.setattr(i, AttrChange(0o777, 1, 1, 0, 1, 1)),
        "setxattr": lambda i: env.fs.setxattr(i, b"user.v", b"changed"),
        "removexattr": lambda i: env.fs.removexattr(i, b"user.v"),
        "open for write": lambda i: os.close(env.fs.open_fd(i, os.O_WRONLY)),
        "open for read": lambda i: os.close(env.fs.open_fd(i, os.O_RDONLY)),
    }
    try:
        for ino in (f, lf):
            for what, attempt in attempts.items():
                with contextlib.suppress(OSError):
                    attempt(ino)
                assert tree_snapshot(env.outside) == before, f"{what} changed the host file"
    finally:
        for name in ("f", "lowerfile"):
            os.unlink(env.upper / name)
            os.rename(env.tmp / f"aside-{name}", env.upper / name)
    assert_consistent(env, replay=False)


# --------------------------------------------------------------------------
# the lower is live: an admin may change it


def test_admin_changes_to_lower_are_visible(env: Env) -> None:
    mkfile(env.lower / "a", b"A")
    mkfile(env.lower / "d" / "x", b"X")
    mkfile(env.lower / "m" / "x", b"X")
    env.start()
    assert sorted(env.names()) == [b"a", b"d", b"m"]
    env.create_file(b"m", b"mine")  # m is copied up (merged, not opaque)
    with pytest.raises(FileNotFoundError):
        env.fs.lookup(ROOT_INO, b"new")

    mkfile(env.lower / "new", b"NEW")
    mkfile(env.lower / "d" / "y", b"Y")
    mkfile(env.lower / "m" / "y", b"Y")
    (env.lower / "a").write_bytes(b"A2")
    env.admin_changed_lower()

    assert env.read(b"new") == b"NEW"
    assert sorted(env.names()) == [b"a", b"d", b"m", b"new"]
    assert env.read(b"d/y") == b"Y"
    assert sorted(env.names(b"d")) == [b"x", b"y"]
    assert sorted(env.names(b"m")) == [b"mine", b"x", b"y"]
    assert env.read(b"m/y") == b"Y"
    assert env.read(b"a") == b"A2"
    assert_consistent(env)


# --------------------------------------------------------------------------
# raw mode: the passthrough upper for kernel overlayfs


def test_raw_mode(raw_env: Env) -> None:
    env = raw_env
    fs = env.start()
    assert fs.listdir(ROOT_INO) == [b"upper", b"work"]
    up = fs.lookup(ROOT_INO, b"upper").ino
    wk = fs.lookup(ROOT_INO, b"work").ino
    assert stat.S_ISDIR(fs.getattr(up).st.st_mode)
    with pytest.raises(FileNotFoundError):
        fs.lookup(ROOT_INO, b"other")
    for call in (lambda: fs.mkdir(ROOT_INO, b"x", 0o755, 0, 0),
                 lambda: fs.create(ROOT_INO, b"x", 0o644, 0, 0),
                 lambda: fs.rmdir(ROOT_INO, b"upper")):
        with raises_errno(errno.EPERM):
            call()

    # a whiteout (what kernel overlayfs creates via its upper)
    attr = fs.mknod(up, b"wh", stat.S_IFCHR, 0, 0, 0)
    assert stat.S_ISCHR(attr.st.st_mode)
    assert attr.st.st_rdev == 0
    assert is_whiteout(env.ust("wh"))
    assert fs.listdir(up) == [b"wh"]
    assert stat.S_ISCHR(fs.lookup(up, b"wh").st.st_mode)
    # device nodes: what host root asks for through kernel overlayfs (journaled as Mkdev)
    for i, (mode, rdev) in enumerate(((stat.S_IFCHR, os.makedev(1, 3)), (stat.S_IFBLK, 0),
                                      (stat.S_IFBLK, os.makedev(8, 0)))):
        attr = fs.mknod(up, b"dev%d" % i, mode | 0o600, rdev, 0, 0)
        assert (stat.S_IFMT(attr.st.st_mode), attr.st.st_rdev) == (mode, rdev)
        fs.unlink(up, b"dev%d" % i)

    # overlay xattrs are visible and settable
    d = fs.mkdir(up, b"d", 0o755, 0, 0).ino
    fs.setxattr(d, OPAQUE, b"y")
    assert OPAQUE in fs.listxattr(d)
    assert fs.getxattr(d, OPAQUE) == b"y"
    assert os.getxattr(env.upper / "d", OPAQUE) == b"y"
    fs.setxattr(d, ORIGIN, b"\x00\xfbhandle")
    assert fs.getxattr(d, ORIGIN) == b"\x00\xfbhandle"
    fs.removexattr(d, ORIGIN)

    # work: kernel overlayfs stages there and renames into the upper, with whiteouts
    fs.mkdir(wk, b"work", 0o000, 0, 0)
    staged = fs.create(wk, b"#1", 0o644, 0, 0).ino
    fd = fs.open_fd(staged, os.O_WRONLY)
    fs.journal_write(fs.node(staged), name_to_handle(fd), 0, 6)
    os.write(fd, b"staged")
    os.close(fd)
    fs.rename(wk, b"#1", up, b"wh", 0)
    assert (env.upper / "wh").read_bytes() == b"staged"
    fs.rename(up, b"wh", wk, b"#2", 4)  # RENAME_WHITEOUT
    assert is_whiteout(env.ust("wh"))
    assert sorted(fs.listdir(wk)) == [b"#2", b"work"]
    assert sorted(fs.listdir(up)) == [b"d", b"wh"]
    fs.unlink(wk, b"#2")
    env.remount()
    up = env.fs.lookup(ROOT_INO, b"upper").ino
    assert sorted(env.fs.listdir(up)) == [b"d", b"wh"]
    assert_consistent(env)


# --------------------------------------------------------------------------
# trees deeper than PATH_MAX, and the one limit records set (records.MAX_PATH)


def _chain(env: Env, parent: bytes, names: list[bytes]) -> bytes:
    """mkdir a chain of ``names`` below the view path ``parent``; its view path."""
    ino = env.ino(parent) if parent else ROOT_INO
    path = parent
    for name in names:
        ino = env.fs.mkdir(ino, name, 0o755, 0, 0).ino
        path = path + b"/" + name if path else name
    return path


def _levels(count: int, tag: bytes, width: int = 255) -> list[bytes]:
    return [b"%03d" % i + tag * (width - 3) for i in range(count)]


def test_a_deep_lower_tree_reads_copies_up_and_replays(env: Env) -> None:
    parts = [b"%02d" % i + b"L" * 198 for i in range(30)]  # 6 KB deep in the lower
    top = os.open(env.lower, os.O_PATH | os.O_DIRECTORY)
    for part in parts:
        os.mkdir(part, dir_fd=top)
        step = os.open(part, os.O_PATH | os.O_DIRECTORY, dir_fd=top)
        os.close(top)
        top = step
    for name, data in ((b"f", b"deep lower\n"), (b"g", b"other\n")):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=top)
        os.write(fd, data)
        os.close(fd)
    os.setxattr(f"/proc/self/fd/{top}/f", "user.tag", b"deep")
    os.symlink(b"f", b"link", dir_fd=top)
    os.close(top)
    env.start()
    deep = b"/".join(parts)
    assert sorted(env.names(deep)) == [b"f", b"g", b"link"]
    assert env.read(deep + b"/f") == b"deep lower\n"
    assert env.fs.getxattr(env.ino(deep + b"/f"), b"user.tag") == b"deep"
    assert env.fs.readlink(env.ino(deep + b"/link")) == b"f"
    ino = env.ino(deep + b"/f")
    env.write(deep + b"/f", b"DEEP")  # copy-up of the file and of 30 directories
    assert env.ino(deep + b"/f") == ino  # origin kept, as for any copy-up
    assert env.read(deep + b"/f") == b"DEEP lower\n"
    assert env.fs.getxattr(ino, b"user.tag") == b"deep"
    env.fs.unlink(env.ino(deep), b"g")  # a whiteout 6 KB deep
    assert sorted(env.names(deep)) == [b"f", b"link"]
    assert_consistent(env)


def test_what_records_cannot_carry_is_refused_before_anything_is_journaled(env: Env) -> None:
    mkfile(env.lower / "lowerfile", b"lower\n")
    env.start()
    low = _chain(env, b"", [b"a", *_levels(200, b"x")])  # 51201 bytes
    deepest = _chain(env, low, _levels(55, b"z"))  # 65281: upper/ + it is 65287 bytes
    high = _chain(env, b"", _levels(60, b"y"))  # 15359
    env.fs.mkdir(env.ino(high), b"s", 0o755, 0, 0)
    fits = b"f" * (rec.MAX_PATH - len(b"upper/" + deepest) - 1)
    env.create_file(deepest, fits, b"at the cap")  # a layer path of exactly MAX_PATH bytes
    journal = env.journal
    assert journal is not None
    head = journal.head
    refused = [
        # a new name beyond the cap, for a lower file: refused before its copy-up
        lambda: env.fs.link(env.ino(b"lowerfile"), env.ino(deepest), b"n" * 255),
        lambda: env.fs.rename(ROOT_INO, b"lowerfile", env.ino(deepest), b"n" * 255, 0),
        lambda: env.fs.mkdir(env.ino(deepest), fits + b"x", 0o755, 0, 0),
        lambda: env.fs.create(env.ino(deepest), fits + b"x", 0o644, 0, 0),
        lambda: env.fs.symlink(env.ino(deepest), fits + b"x", b"t", 0, 0),
        # a directory moving 15 KB deeper would take its subtree beyond the cap
        lambda: env.fs.rename(ROOT_INO, b"a", env.ino(high), b"a", 0),
        lambda: env.fs.rename(ROOT_INO, b"a", env.ino(high), b"s", RENAME_EXCHANGE),
        lambda: env.fs.rename(env.ino(high), b"s", ROOT_INO, b"a", RENAME_EXCHANGE),
    ]
    for call in refused:
        with raises_errno(errno.ENAMETOOLONG):
            call()
    assert journal.head == head  # nothing journaled
    assert not (env.upper / "lowerfile").exists()  # nor copied up
    # moving deeper is fine where the subtree still fits
    env.fs.rename(env.ino(high), b"s", env.ino(low), b"s", 0)
    env.fs.rename(ROOT_INO, _levels(1, b"y")[0], env.ino(b"a"), _levels(1, b"y")[0], 0)
    assert env.read(deepest + b"/" + fits) == b"at the cap"
    assert_consistent(env)


# --------------------------------------------------------------------------
# the door: nothing is journaled that no replica carries (sdeefs.replicable)


def _cap_v3(rootid: int) -> bytes:
    return struct.pack("<IIIIII", 0x03000001, 1 << 13, 0, 0, 0, rootid)


def test_the_door_refuses_what_no_replica_carries_before_journaling(env: Env) -> None:
    os.chown(env.upper, 4242, 4242)  # the launcher's user owns the layer
    cap_v2 = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
    mkfile(env.lower / "ping", b"host binary", 0o755)
    os.setxattr(env.lower / "ping", "security.capability", cap_v2)  # host root's capability
    os.setxattr(env.lower / "ping", "user.note", b"kept")
    fs = env.fs
    env.create_file(b"", b"f", b"data")
    ino = env.ino(b"f")
    assert env.journal is not None
    head = env.journal.head
    for name, value in ((b"security.selinux", b"x"), (b"trusted.evil", b"1"),
                        (b"security.capability", cap_v2), (b"security.capability",
                                                           _cap_v3(4243)),
                        (b"security.capability", _cap_v3(0))):
        with raises_errno(errno.EPERM):
            fs.setxattr(ino, name, value)
    assert env.journal.head == head  # nothing journaled
    assert os.listxattr(env.upper / "f") == []
    fs.setxattr(ino, b"security.capability", _cap_v3(4242))  # `setcap` inside: the user's
    assert os.getxattr(env.upper / "f", "security.capability") == _cap_v3(4242)
    fs.removexattr(ino, b"security.capability")
    with raises_errno(errno.ENODATA):  # absent: ENODATA, before the rule
        fs.removexattr(ino, b"system.posix_acl_default")
    # A copy-up does not carry the host's privileges into the user's layer.
    fs.setattr(env.ino(b"ping"), AttrChange(mode=0o700))
    assert sorted(os.listxattr(env.upper / "ping")) == ["trusted.overlay.origin", "user.note"]
    assert (env.upper / "ping").read_bytes() == b"host binary"
    assert_consistent(env)


# --------------------------------------------------------------------------
# the id door of a user's view (docs/identity.md)

IDS = Identity.build(1001, 1001, (27,), (165536, 65536), (231072, 65536), 1000)


@pytest.mark.skipif(os.geteuid() != 0, reason="owners other than our own need root")
@pytest.mark.parametrize("mode", ["merged", "raw"])
def test_the_id_door_admits_only_the_users_ids(tmp_path: Path, mode: str) -> None:
    """What the kernel refuses inside the namespace, the daemon refuses too: a creator
    outside the user's ids (EPERM), a chown to one (EINVAL), the copy-up of another user's
    entry (EOVERFLOW), before anything is journaled."""
    env = Env(tmp_path, mode, IDS)
    try:
        if mode == "merged":
            mkfile(env.lower / "etc/conf", b"c", owner=(0, 0))
            mkfile(env.lower / "srv/theirs", b"t", mode=0o666, owner=(2000, 2000))
            # system files show (and are copied up) as inside root's: S, T
            assert (env.walk(b"etc/conf").st.st_uid, env.walk(b"etc/conf").st.st_gid) == \
                IDS.root
            env.write(b"etc/conf", b"C")
            assert (env.ust("etc/conf").st_uid, env.ust("etc/conf").st_gid) == IDS.root
            with raises_errno(errno.EOVERFLOW):
                env.write(b"srv/theirs", b"T")
        root = b"upper" if mode == "raw" else b""
        parent = env.ino(root) if root else ROOT_INO
        env.fs.mkdir(parent, b"ok", 0o755, 165536 + 42, 231072 + 42)  # _apt inside
        env.fs.mknod(parent, b"mine", stat.S_IFREG | 0o644, 0, 1001, 27)
        for uid, gid in ((0, 0), (1002, 1001), (1001, 1002), (165536 + 65536, 231072)):
            with raises_errno(errno.EPERM):
                env.fs.mkdir(parent, b"bad", 0o755, uid, gid)
        ino = env.ino(root + b"/ok" if root else b"ok")
        halves: tuple[tuple[int | None, int | None], ...] = ((0, None), (None, 0), (2000, None))
        for half_uid, half_gid in halves:
            with raises_errno(errno.EINVAL):
                env.fs.setattr(ino, AttrChange(uid=half_uid, gid=half_gid))
        env.fs.setattr(ino, AttrChange(uid=1001, gid=27))
        assert not (env.upper / "bad").exists()
        assert (env.ust("ok").st_uid, env.ust("ok").st_gid) == (1001, 27)
        assert_consistent(env)
    finally:
        env.close()


# -- the kernel's cached listings (FOPEN_CACHE_DIR): CowFS.open_listing ------------------------


def test_a_cached_listing_is_kept_only_while_the_directory_is_unchanged(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cow, "RACY_NS", 0)  # (its own test below)
    mkfile(env.lower / "d" / "a")
    mkfile(env.lower / "m" / "a")
    d = env.ino(b"d")
    assert env.fs.open_listing(d) == ([b"a"], False)  # nothing cached yet
    assert env.fs.open_listing(d) == ([b"a"], True)
    # a host change of the lower: a new name, then a name replaced by another entry
    mkfile(env.lower / "d" / "b")
    assert env.fs.open_listing(d) == ([b"a", b"b"], False)
    assert env.fs.open_listing(d)[1]
    os.unlink(env.lower / "d" / "b")
    (env.lower / "d" / "b").mkdir()
    assert env.fs.open_listing(d) == ([b"a", b"b"], False)
    assert env.fs.open_listing(d)[1]
    # a change through the view (here the directory is copied up, then merged)
    env.create_file(b"d", b"c")
    assert env.fs.open_listing(d) == ([b"c", b"a", b"b"], False)
    assert env.fs.open_listing(d)[1]
    env.fs.unlink(d, b"a")
    assert env.fs.open_listing(d) == ([b"c", b"b"], False)
    assert env.fs.open_listing(d)[1]
    # a host change of the lower under a merged directory (its upper does not change)
    mkfile(env.lower / "d" / "e")
    assert env.fs.open_listing(d) == ([b"c", b"b", b"e"], False)
    assert env.fs.open_listing(d)[1]
    # readdir found an entry gone: what the kernel cached is not this listing
    env.fs.listing_changed(d)
    assert not env.fs.open_listing(d)[1]
    # other directories keep theirs
    m = env.ino(b"m")
    env.fs.open_listing(m)
    env.create_file(b"d", b"f")
    assert env.fs.open_listing(m)[1]
    env.admin_changed_lower()
    assert_consistent(env)


def test_a_listing_of_a_directory_changed_just_now_is_not_kept(env: Env) -> None:
    # a second change within the clock's granularity could leave every timestamp as is
    mkfile(env.lower / "d" / "a")
    d = env.ino(b"d")
    assert not env.fs.open_listing(d)[1]
    assert not env.fs.open_listing(d)[1]
    assert_consistent(env)
