"""The mask layer on a kernel whose tmpfs has no user xattrs (Linux < 6.6, Debian 12's 6.1).

The environment's overlay is mounted in a user namespace with ``userxattr``: the mask's
opaque directories carry ``user.overlay.opaque``, which tmpfs stores only since 6.6.  There
the mask is an ext4 image on a self-detaching loop device (sdeefs/fs/mask.py).  This VM's
tmpfs takes user xattrs, so the suite forces the fallback (``SDEEFS_MASK_BACKING=image``);
the kernel that needs it is tested in a guest (``bench/lsmguard/vm.py product --kernel
linux-image-6.1.0-47-cloud-amd64-unsigned``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs import mountinfo
from sdeefs.fs import mask
from sdeefs.fs.mask import MaskSpec, build_mask
from sdeefs.launcher import view

from ..conftest import concurrently
from .launcher_site import Site, open_site, requires_launcher

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")


def _fs_type(mountpoint: str) -> str | None:
    mount = mountinfo.at(mountpoint)
    return mount.fstype if mount is not None else None


def _loops_backed_under(directory: str) -> list[str]:
    """Loop devices whose backing file is (or was, deleted) under ``directory``."""
    found = []
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(directory.rstrip("/") + "/"):
            found.append(f"/dev/{name}: {backing}")
    return found


@pytest.fixture
def image_backing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDEEFS_MASK_BACKING", "image")


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """A lower with something to empty, hide and mount over; the mask is detached after."""
    lower = tmp_path / "lower"
    for rel, content in {"proc/cpuinfo": "cpu", "etc/keep": "keep", "etc/shadow": "secret",
                         "secret": "secret", "home/other/notes": "other's",
                         "opt/app/bin": "app"}.items():
        (lower / rel).parent.mkdir(parents=True, exist_ok=True)
        (lower / rel).write_text(content)
    os.utime(lower / "etc", ns=(1_000_000_000, 2_000_000_000))
    try:
        yield tmp_path
    finally:
        view.detach(str(tmp_path / "mask"))


SPEC = MaskSpec(empty_dirs=(b"proc", b"home"), hidden=(b"secret", b"etc/shadow"),
                mountpoints=(b"home/me",))

# In a user namespace (as sdeefs-enter makes the environment's), the overlay as the
# environment mounts it: userxattr, the mask above the lower.
OVERLAY_VIEW = r"""
import json, os, subprocess, sys
mask, lower, merged = sys.argv[1:4]
subprocess.run(["mount", "-t", "overlay", "sdeefs-test", "-o",
                f"userxattr,lowerdir={mask}:{lower}", merged], check=True)
print(json.dumps({rel: sorted(os.listdir(os.path.join(merged, rel)))
                  for rel in ("", "proc", "home", "home/me", "etc", "opt/app")}
                 | {"etc_mtime": os.stat(os.path.join(merged, "etc")).st_mtime_ns}))
"""


def _overlay_listing(tree: Path) -> dict[str, object]:
    merged = tree / "merged"
    merged.mkdir()
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "--", sys.executable, "-c",
         OVERLAY_VIEW, str(tree / "mask"), str(tree / "lower"), str(merged)],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listing: dict[str, object] = json.loads(done.stdout)
    return listing


def test_a_mask_on_its_image_under_a_userxattr_overlay(tree: Path, image_backing: None
                                                       ) -> None:
    target = str(tree / "mask")
    assert build_mask(target, str(tree / "lower"), SPEC, view.MASK_OPAQUE)
    assert _fs_type(target) == "ext4"
    assert sorted(os.listdir(tree)) == ["lower", "mask"]  # the image has no name: the loop
    # device holds the only reference
    assert _loops_backed_under(str(tree))  # (deleted)
    listing = _overlay_listing(tree)
    assert listing["proc"] == []  # opaque: the lower's cpuinfo is gone
    assert listing["home"] == ["me"]  # opaque, with the mountpoint made in it
    assert listing["home/me"] == []
    assert listing["etc"] == ["keep"]  # the whiteout hides shadow
    assert listing["opt/app"] == ["bin"]  # not masked: the lower shows through
    assert listing[""] == ["etc", "home", "opt", "proc"]  # no secret, no lost+found
    assert listing["etc_mtime"] == 2_000_000_000  # the mask's directory copies the lower's
    view.detach(target)
    assert not view.mounted(target)
    assert _loops_backed_under(str(tree)) == []
    assert sorted(os.listdir(tree)) == ["lower", "mask", "merged"]


def test_nothing_to_mask_mounts_nothing(tree: Path, image_backing: None) -> None:
    target = str(tree / "mask")
    assert not build_mask(target, str(tree / "lower"), MaskSpec(hidden=(b"absent",)),
                          view.MASK_OPAQUE)
    assert not view.mounted(target)
    assert _loops_backed_under(str(tree)) == []


def test_the_probe_asks_the_filesystem(tmp_path: Path) -> None:
    """The choice is the kernel's answer to a user xattr: ramfs has no xattrs at all (as
    tmpfs before 6.6 has no user ones), tmpfs here takes them."""
    answers = {}
    for fs in ("ramfs", "tmpfs"):
        path = tmp_path / fs
        path.mkdir()
        subprocess.run(["mount", "-t", fs, "sdeefs-test", str(path)], check=True)
        try:
            answers[fs] = mask.takes_xattr(str(path), view.MASK_OPAQUE)
            assert os.listxattr(path) == []  # the probe leaves nothing
        finally:
            subprocess.run(["umount", str(path)], check=True)
    assert answers == {"ramfs": False, "tmpfs": True}
    target = str(tmp_path / "auto")
    os.mkdir(target)
    try:  # no override: this VM's tmpfs answers yes
        assert mask.mount_mask_filesystem(target, view.MASK_OPAQUE) == mask.MaskBacking.TMPFS
        assert _fs_type(target) == "tmpfs"
    finally:
        view.detach(target)


def test_probes_of_one_path_at_once_all_answer(tmp_path: Path) -> None:
    """Two jobs' prologs on one node probe the same replica directory at once: one's remove
    may find the name already gone (ENODATA, which drained a node in CI)."""
    def probe(_: int) -> None:
        for _round in range(2000):
            assert mask.takes_xattr(str(tmp_path), b"user.sdeefs.probe")

    concurrently(probe, range(4))
    assert os.listxattr(tmp_path) == []


def test_a_bad_override_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(mask.BACKING_ENV, "ramfs")
    with pytest.raises(mask.QuietError, match="SDEEFS_MASK_BACKING=ramfs: not one of"):
        build_mask(str(tmp_path / "mask"), "/", MaskSpec(hidden=(b"etc",)), view.MASK_OPAQUE)
    assert not view.mounted(str(tmp_path / "mask"))


# -- through the front door: a login and its stop ---------------------------------------------


@requires_launcher
def test_a_login_on_the_image_mask_leaves_nothing_after_stop(image_backing: None) -> None:
    site: Site
    with open_site(engine="overlay") as site:
        user = site.add_user()
        site.start(user)
        mask_dir = str(site.run_dir / user / "private" / "mask")
        assert _fs_type(mask_dir) == "ext4"
        out = site.run(user, "ls -A /; ls -A /proc | grep -c . ; id -u").stdout.split()
        assert "lost+found" not in out
        assert out[-1] == "0"
        assert int(out[-2]) > 3  # the environment's own /proc over the emptied one
        assert _loops_backed_under(str(site.run_dir))
        site.stop(user)
        assert not view.mounted(mask_dir)
        assert _loops_backed_under(str(site.run_dir)) == []
