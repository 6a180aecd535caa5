"""The guard layer (sdeefs.fs.guard): its decisions on plain directories, then mounted under
kernel overlayfs the way the launcher stacks it (as root, without a user namespace: the
launcher's own tests cover the full environment)."""

from __future__ import annotations

import errno
import glob
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs.fs.guard import (
    ROOT_INO,
    STALE_WHITEOUT,
    WHITEOUT_BASE,
    DenyPatterns,
    GuardView,
    Policy,
    readable_only_by_root,
)
from sdeefs.fs.mount import GuardRequest, mount_guard
from sdeefs.identity import Identity

from ..conftest import fuse_skip_reason, mounted

# the user: uid 4242, gid 4343, in group 4444; its subordinate ranges; system ids below 1000
IDS = Identity.build(4242, 4343, (4444,), (200000, 65536), (300000, 65536), 1000)
USER = IDS.root  # the host uid/gid the view shows host root as (inside root)


def guard_dirs(tmp_path: Path) -> dict[str, Path]:
    """The directories of a guard stacked under kernel overlayfs, made in ``tmp_path``:
    lower, guard, upper, work, view (the test is skipped where it cannot mount)."""
    reason = fuse_skip_reason()
    if reason or os.geteuid() != 0:
        pytest.skip(reason or "mounting needs root")
    dirs = {name: tmp_path / name for name in ("lower", "guard", "upper", "work", "view")}
    for path in dirs.values():
        path.mkdir()
    return dirs


def make_tree(lower: Path) -> None:
    for directory, mode in (("etc", 0o755), ("etc/ssh", 0o755), ("etc/ssl/private", 0o700),
                            ("pub", 0o755), ("pub/.dot", 0o755), ("root", 0o700),
                            ("search-only", 0o711)):
        (lower / directory).mkdir(parents=True, exist_ok=True)
        (lower / directory).chmod(mode)
    for name, mode in (("etc/passwd", 0o644), ("etc/shadow", 0o640), ("etc/ssh/ssh_host_a_key",
                       0o644), ("etc/ssh/ssh_config", 0o644), ("etc/sudoers", 0o440),
                       ("pub/file", 0o644), ("pub/.dot/key", 0o644), ("pub/secret", 0o600)):
        (lower / name).write_text(name)
        (lower / name).chmod(mode)
    os.symlink("secret", lower / "pub/link")


def as_root(mode: int, uid: int = 0, gid: int = 0, is_dir: bool = False) -> os.stat_result:
    kind = stat.S_IFDIR if is_dir else stat.S_IFREG
    return os.stat_result((kind | mode, 1, 1, 1, uid, gid, 0, 0, 0, 0))


def test_readable_only_by_root() -> None:
    assert readable_only_by_root(as_root(0o600))
    assert readable_only_by_root(as_root(0o640))
    assert readable_only_by_root(as_root(0o640, uid=5))  # group root may read it
    assert not readable_only_by_root(as_root(0o640, uid=5, gid=5))  # nobody mapped owns it
    assert not readable_only_by_root(as_root(0o644))
    assert not readable_only_by_root(as_root(0o200))  # root cannot read it either
    assert readable_only_by_root(as_root(0o711, is_dir=True))  # searchable, not listable
    assert readable_only_by_root(as_root(0o700, is_dir=True))
    assert not readable_only_by_root(as_root(0o755, is_dir=True))
    # the jobs' scan: every system id counts as root does (inside root owns their files)
    assert readable_only_by_root(as_root(0o700, uid=42, gid=65534, is_dir=True), system=1000)
    assert not readable_only_by_root(as_root(0o700, uid=42, is_dir=True))


def test_the_guard_hides_what_the_user_cannot_read_on_the_host() -> None:
    """Policy.hides: owner, group and other bits against the user's uid and groups."""
    policy = Policy(DenyPatterns.of(()), IDS)

    def hides(mode: int, uid: int = 0, gid: int = 0, is_dir: bool = False) -> bool:
        return policy.hides(b"x", as_root(mode, uid, gid, is_dir))

    assert hides(0o600)
    assert hides(0o640)
    assert hides(0o750, is_dir=True)
    assert hides(0o700, uid=42, gid=42, is_dir=True)  # _apt's partial/: another system id
    assert hides(0o711, is_dir=True)  # the user could search it, not list it: hidden whole
    assert hides(0o600, uid=5000, gid=5000)  # another user's private file
    assert hides(0o004, uid=4242)  # the owner class decides, even if "other" may read
    assert not hides(0o644)
    assert not hides(0o755, is_dir=True)
    assert not hides(0o640, gid=4444)
    assert not hides(0o640, gid=4343)
    assert not hides(0o400, uid=4242)  # the user's own
    assert hides(0o044, uid=4242)  # ... unless its owner bits say no
    # the user's subordinate ids are the user's own (root inside, a rootless container's)
    assert not hides(0o600, uid=200005, gid=5000)
    assert not hides(0o640, uid=5000, gid=300007)
    assert not hides(0o700, uid=200000 + 65535, is_dir=True)
    assert hides(0o600, uid=200000 + 65536)  # past the range: another's
    assert hides(0o640, uid=5000, gid=300000 + 65536)
    assert not policy.hides(b"l", os.stat_result((stat.S_IFLNK | 0o777, 1, 1, 1, 0, 0, 0, 0, 0,
                                                  0)))


@pytest.mark.parametrize("pattern", [
    "/etc/shadow", "/etc/ssh/ssh_host_*_key", "/pub/*", "/pub/.*", "/*/s*", "/etc/ss[hl]",
    "/pub/.dot/*", "/nothing/here", "/etc/ssl/private", "/*",
])
def test_deny_patterns_match_what_glob_expands(tmp_path: Path, pattern: str) -> None:
    make_tree(tmp_path)
    expanded = {os.path.relpath(p, tmp_path) for p in glob.glob(str(tmp_path) + pattern)}
    deny = DenyPatterns.of([pattern])
    every = set()
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        for name in dirnames + filenames:
            every.add(os.path.relpath(os.path.join(dirpath, name), tmp_path))
    assert {p for p in every if deny.matches(os.fsencode(p))} == expanded


def view_of(lower: Path, deny: tuple[str, ...] = ()) -> GuardView:
    fd = os.open(lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return GuardView(fd, Policy(DenyPatterns.of(deny), IDS))


def child(view: GuardView, path: str) -> int:
    ino = ROOT_INO
    for name in path.split("/"):
        ino = view.lookup(ino, name.encode()).ino
    return ino


@pytest.mark.skipif(os.geteuid() != 0, reason="root-owned test files need root")
def test_answers_whiteouts_directories_and_nothing(tmp_path: Path) -> None:
    make_tree(tmp_path)
    view = view_of(tmp_path, ("/etc/ssh/ssh_host_*_key",))
    etc = view.lookup(ROOT_INO, b"etc")
    assert stat.S_ISDIR(etc.st.st_mode)
    assert etc.owner == USER
    assert etc.ino == os.stat(tmp_path / "etc").st_ino  # host inode numbers for directories
    for hidden in ("etc/shadow", "etc/sudoers", "etc/ssl/private", "etc/ssh/ssh_host_a_key",
                   "pub/secret", "root", "search-only"):
        attr = view.getattr(child(view, hidden))
        assert stat.S_ISCHR(attr.st.st_mode), hidden
        assert attr.st.st_rdev == 0
        assert attr.ino >= WHITEOUT_BASE
    for shown in ("etc/passwd", "etc/ssh/ssh_config", "pub/file", "pub/link", "missing"):
        with pytest.raises(FileNotFoundError):
            child(view, shown)  # overlayfs finds (or misses) it in the layer below
    listing = view.scan_hidden(child(view, "etc"))
    assert [(name, rel) for name, rel, _ in listing] == [(b"shadow", b"etc/shadow"),
                                                         (b"sudoers", b"etc/sudoers")]


@pytest.mark.skipif(os.geteuid() != 0, reason="root-owned test files need root")
def test_decides_when_asked_not_when_started(tmp_path: Path) -> None:
    make_tree(tmp_path)
    view = view_of(tmp_path, ("/pub/*.key",))
    pub = child(view, "pub")
    (tmp_path / "pub/late").write_text("late")
    (tmp_path / "pub/late").chmod(0o600)
    (tmp_path / "pub/late.key").write_text("late")
    (tmp_path / "pub/late.key").chmod(0o644)
    assert stat.S_ISCHR(view.lookup(pub, b"late").st.st_mode)
    assert stat.S_ISCHR(view.lookup(pub, b"late.key").st.st_mode)
    (tmp_path / "pub/late").chmod(0o644)  # loosened: shown again on the next lookup
    with pytest.raises(FileNotFoundError):
        view.lookup(pub, b"late")


@pytest.mark.skipif(os.geteuid() != 0, reason="root-owned test files need root")
def test_a_directory_that_moved_hides_everything_in_it(tmp_path: Path) -> None:
    make_tree(tmp_path)
    view = view_of(tmp_path)
    pub = child(view, "pub")
    os.rename(tmp_path / "pub", tmp_path / "pub.old")
    (tmp_path / "pub").mkdir()
    (tmp_path / "pub/secret").write_text("another directory's secret")
    (tmp_path / "pub/secret").chmod(0o644)
    for name in (b"file", b"secret", b"anything"):
        assert view.lookup(pub, name).ino == STALE_WHITEOUT
    assert view.scan_hidden(pub) == []
    # a fresh lookup of the name finds the new directory
    assert child(view, "pub") != pub


@pytest.mark.skipif(os.geteuid() != 0, reason="root-owned test files need root")
def test_forget_drops_nodes(tmp_path: Path) -> None:
    make_tree(tmp_path)
    view = view_of(tmp_path)
    etc = child(view, "etc")
    shadow = view.lookup(etc, b"shadow").ino
    assert view.lookup(etc, b"shadow").ino == shadow  # one node per hidden host inode
    view.forget(shadow, 2)
    view.forget(etc, 1)
    assert set(view.nodes) == {ROOT_INO}
    with pytest.raises(OSError, match="unknown inode") as exc:
        view.getattr(etc)
    assert exc.value.errno == errno.ESTALE
    with pytest.raises(OSError, match="invalid name"):
        view.lookup(ROOT_INO, b"../etc")


# -- mounted -----------------------------------------------------------------------------------


@pytest.fixture
def stacked(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(host lower, overlay view) with the guard between them, as the launcher stacks it."""
    dirs = guard_dirs(tmp_path)
    make_tree(dirs["lower"])
    try:
        mount_guard(GuardRequest(str(dirs["guard"]), str(dirs["lower"]), IDS,
                                 deny=("/etc/ssh/ssh_host_*_key", "/pub/*.key"),
                                 log=str(tmp_path / "guard.log")))
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={dirs['guard']}:{dirs['lower']},upperdir={dirs['upper']},"
                        f"workdir={dirs['work']},xino=on", str(dirs["view"])], check=True)
        yield dirs["lower"], dirs["view"]
    finally:
        for name in ("view", "guard"):
            if mounted(dirs[name]):
                subprocess.run(["umount", str(dirs[name])], check=False)
        assert not mounted(dirs["view"])
        assert not mounted(dirs["guard"])


def test_mounted_under_overlayfs(stacked: tuple[Path, Path]) -> None:
    lower, view = stacked
    assert sorted(os.listdir(view / "etc")) == ["passwd", "ssh", "ssl"]
    assert os.listdir(view / "etc/ssl") == []
    assert os.listdir(view / "etc/ssh") == ["ssh_config"]
    assert (view / "etc/passwd").read_text() == "etc/passwd"
    st = os.stat(view / "etc")
    assert (st.st_uid, st.st_gid) == USER  # host root shows as the user, as the idmap does
    assert not (view / "pub/link").exists()  # a symlink to a hidden file leads nowhere
    # created on the host after the mount: decided when first looked up
    (lower / "pub/late").write_text("late")
    (lower / "pub/late").chmod(0o600)
    (lower / "pub/late.key").write_text("late")
    (lower / "pub/late.key").chmod(0o644)
    (lower / "pub/late-public").write_text("public")
    assert sorted(os.listdir(view / "pub")) == [".dot", "file", "late-public", "link"]
    for name in ("late", "late.key", "secret"):
        with pytest.raises(FileNotFoundError):
            (view / "pub" / name).read_text()
    assert (view / "pub/late-public").read_text() == "public"
    # a hidden name is free: what the user makes of it lands in the upper only
    (view / "pub/secret").write_text("mine")
    assert (view / "pub/secret").read_text() == "mine"
    assert (lower / "pub/secret").read_text() == "pub/secret"
    # read-only, whatever asks
    with pytest.raises(OSError, match="Read-only file system") as exc:
        (view.parent / "guard/new").write_text("x")
    assert exc.value.errno == errno.EROFS
