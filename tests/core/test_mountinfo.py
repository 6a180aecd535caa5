"""The mount table read in one place (sdeefs.mountinfo): fields split before their escapes
are undone, so a mount at a path with a blank, a newline or a backslash is found."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sdeefs import mountinfo

LINE = (b"36 35 98:0 /mnt\\0401 /mnt/a\\040b\\011c\\012d\\134e rw,noatime,nodev master:1 - "
        b"overlay src\\040x rw,lowerdir=/l,upperdir=/st\\054ate/u\\040p,workdir=/w\n")


def test_a_line_with_escapes_reads_back_as_the_names_it_was_made_with() -> None:
    mount = mountinfo.Mount.parse(LINE)
    assert mount is not None
    assert (mount.mount_id, mount.parent_id, mount.device, mount.minor) == (36, 35, "98:0", 0)
    assert mount.root == "/mnt 1"
    assert mount.point == "/mnt/a b\tc\nd\\e"
    assert mount.options == {"rw", "noatime", "nodev"}
    assert (mount.fstype, mount.source) == ("overlay", "src x")
    # the filesystem's own options are split before they are unescaped: "," in a path stays
    assert mount.super_option("upperdir") == "/st,ate/u p"
    assert mount.super_option("lowerdir") == "/l"
    assert mount.super_option("index") is None


def test_a_name_that_is_not_utf8_survives() -> None:
    mount = mountinfo.Mount.parse(b"1 0 0:1 / /x\\377y rw - tmpfs t rw\n")
    assert mount is not None
    assert os.fsencode(mount.point) == b"/x\xffy"


@pytest.mark.parametrize("line", [b"", b"garbage\n", b"1 2 0:1 / /x rw\n",
                                  b"a b 0:1 / /x rw - t s o\n", b"1 2 0:1 / /x rw - tmpfs\n"])
def test_a_line_of_another_shape_is_skipped(line: bytes) -> None:
    assert mountinfo.Mount.parse(line) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
def test_a_real_mount_at_a_path_with_a_space_and_a_newline(tmp_path: Path) -> None:
    point = tmp_path / "a dir\nwith\\odd names"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "odd source", str(point)],
                   check=True)
    try:
        mount = mountinfo.at(point)
        assert mount is not None
        assert (mount.fstype, mount.source) == ("tmpfs", "odd source")
        assert str(point) in mountinfo.points()
        assert mountinfo.at(point.parent) is None or mountinfo.at(point.parent) != mount
    finally:
        subprocess.run(["umount", str(point)], check=True)
    assert mountinfo.at(point) is None
