"""Renaming directories of the lower (issue 9 item 4): kernel-format redirects.

Kernel overlayfs with redirect_dir=on renames a lower directory by copying the
directory itself up, setting ``trusted.overlay.redirect`` (its old name for a rename
within one directory, ``/`` and its lower path otherwise) and leaving a whiteout at the
old name.  sdeefs does the same (fuse engine) or lets the kernel do it on its journaled
upper (hybrid engine), and each reads what the other wrote: the same sequence is applied
to kernel overlayfs and to sdeefs, then the uppers are swapped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdeefs.check import run_checks

from ..conftest import Layers, mounted, requires_fuse

pytestmark = requires_fuse
ENGINES = ["fuse", "hybrid"]
REDIRECT = "trusted.overlay.redirect"


def populate(lower: Path) -> None:
    for d in ("usr/lib/pkg/sub", "usr/share/doc", "etc/conf.d"):
        (lower / d).mkdir(parents=True)
    (lower / "usr/lib/pkg/mod.py").write_text("lower mod\n")
    (lower / "usr/lib/pkg/sub/data").write_text("lower data\n")
    (lower / "etc/conf.d/a.conf").write_text("a\n")


def exercise(mnt: Path) -> None:
    """Renames of lower directories: within a directory, across, twice, over a new name,
    with changes inside before and after."""
    (mnt / "usr/lib/pkg/new.py").write_text("new\n")
    os.rename(mnt / "usr/lib/pkg", mnt / "usr/lib/pkg2")  # same directory: relative
    (mnt / "usr/lib/pkg2/sub/more").write_text("more\n")
    os.rename(mnt / "usr/lib/pkg2/sub", mnt / "usr/share/sub")  # across: absolute
    os.rename(mnt / "usr/lib/pkg2", mnt / "usr/share/doc/pkg")  # relative, then absolute
    os.rename(mnt / "etc/conf.d", mnt / "etc/conf")
    os.unlink(mnt / "etc/conf/a.conf")
    (mnt / "etc/conf.d").mkdir()  # the old name again: a new, opaque directory
    (mnt / "etc/conf.d/b.conf").write_text("b\n")


def tree(root: Path) -> dict[str, str]:
    found = {}
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for d in dirs:
            found[os.path.normpath(os.path.join(rel, d))] = "dir"
        for f in files:
            found[os.path.normpath(os.path.join(rel, f))] = (Path(dirpath) / f).read_text()
    return found


EXPECTED = {
    "etc": "dir", "etc/conf": "dir", "etc/conf.d": "dir", "etc/conf.d/b.conf": "b\n",
    "usr": "dir", "usr/lib": "dir", "usr/share": "dir", "usr/share/doc": "dir",
    "usr/share/doc/pkg": "dir", "usr/share/doc/pkg/mod.py": "lower mod\n",
    "usr/share/doc/pkg/new.py": "new\n", "usr/share/sub": "dir",
    "usr/share/sub/data": "lower data\n", "usr/share/sub/more": "more\n",
}


def kernel_mount(lower: Path, upper: Path, work: Path, mnt: Path) -> None:
    work.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work},redirect_dir=on",
                    str(mnt)], check=True, capture_output=True)


def kernel_umount(mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], check=True, capture_output=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_lower_directory_renames_cross_mount(layers: Layers, engine: str, tmp_path: Path
                                             ) -> None:
    populate(layers.lower)
    kupper, kwork, kmnt = tmp_path / "kupper", tmp_path / "kwork", tmp_path / "kmnt"
    kupper.mkdir()
    kmnt.mkdir()
    try:
        # kernel overlayfs writes, as the reference
        kernel_mount(layers.lower, kupper, kwork, kmnt)
        try:
            exercise(kmnt)
            assert tree(kmnt) == EXPECTED
        finally:
            kernel_umount(kmnt)
        # sdeefs writes the same, in the kernel's format
        mnt = layers.mount(engine)
        exercise(mnt)
        assert tree(mnt) == EXPECTED
        layers.umount()
        assert os.getxattr(layers.upper / "usr/share/doc/pkg", REDIRECT) == b"/usr/lib/pkg"
        assert os.getxattr(layers.upper / "usr/share/sub", REDIRECT) == b"/usr/lib/pkg/sub"
        assert os.getxattr(layers.upper / "etc/conf", REDIRECT) == b"conf.d"
        for path in ("usr/share/doc/pkg", "usr/share/sub", "etc/conf"):
            assert os.getxattr(layers.upper / path, REDIRECT) == \
                os.getxattr(kupper / path, REDIRECT)
        assert run_checks(str(layers.upper), str(layers.state)) == []
        # sdeefs wrote, the kernel reads
        kernel_mount(layers.lower, layers.upper, layers.state / "xwork", kmnt)
        try:
            assert tree(kmnt) == EXPECTED
        finally:
            kernel_umount(kmnt)
        # the kernel wrote, sdeefs reads (and keeps changing it)
        state2 = tmp_path / "state2"
        mnt = layers.mount(engine, upper=kupper, state=state2)
        assert tree(mnt) == EXPECTED
        os.rename(mnt / "usr/share/sub", mnt / "usr/lib/back")
        assert (mnt / "usr/lib/back/data").read_text() == "lower data\n"
        layers.umount()
        assert os.getxattr(kupper / "usr/lib/back", REDIRECT) == b"/usr/lib/pkg/sub"
    finally:
        for m in (kmnt,):
            if mounted(m):
                subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_diff_follows_renamed_directories(tmp_path: Path) -> None:
    """``sdeefs diff`` of an upper the kernel wrote: a renamed lower directory is its old
    contents under the new name, and only what changed inside it is listed."""
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for d in (lower, upper, mnt):
        d.mkdir()
    populate(lower)
    kernel_mount(lower, upper, work, mnt)
    try:
        exercise(mnt)
    finally:
        kernel_umount(mnt)
    result = subprocess.run([sys.executable, "-m", "sdeefs", "diff", "--upper", str(upper),
                             "--lower", str(lower)], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [
        "A /etc/conf  (directory, renamed from /etc/conf.d)",
        "D /etc/conf/a.conf",
        "R /etc/conf.d  (directory contents replaced)",
        "A /etc/conf.d/b.conf  (file)",
        "D /usr/lib/pkg",
        "A /usr/share/doc/pkg  (directory, renamed from /usr/lib/pkg)",
        "A /usr/share/doc/pkg/new.py  (file)",
        "D /usr/share/doc/pkg/sub",
        "A /usr/share/sub  (directory, renamed from /usr/lib/pkg/sub)",
        "A /usr/share/sub/more  (file)",
    ]
