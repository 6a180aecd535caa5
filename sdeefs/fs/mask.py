"""The mask layer: a small tmpfs that sits above the lower and hides parts of it.

Kernel overlayfs honours whiteouts and opaque directories in *lower* layers
too, so putting this layer on top of the host root hides paths at kernel speed:

* ``empty_dirs`` become empty opaque directories (mountpoints for /proc, /dev,
  /home ... which the launcher fills with bind mounts);
* ``hidden`` entries get a whiteout (char 0/0) and vanish from the view;
* ``mountpoints`` are empty directories created inside an emptied directory
  (the user's own /home/USER under an emptied /home).

Every directory the mask creates copies mode, owner and times from the lower,
because overlayfs takes a merged directory's attributes from its top layer.
Owners pass through ``owner_map`` (the launcher shows host root as the user).
The layer lives on its own tmpfs: overlayfs refuses a layer inside another
layer of the same filesystem, and the state directory is usually inside /.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable

import attrs

from ..errors import ExitCode, QuietError

OwnerMap = Callable[[int, int], tuple[int, int]]


def identity(uid: int, gid: int) -> tuple[int, int]:
    return uid, gid


@attrs.frozen
class MaskSpec:
    """What to hide; paths are relative to the lower root, as bytes."""

    empty_dirs: tuple[bytes, ...] = ()
    hidden: tuple[bytes, ...] = ()
    mountpoints: tuple[bytes, ...] = ()


def build_mask(target: str, lower: str, spec: MaskSpec, opaque_xattr: bytes,
               owner_map: OwnerMap = identity) -> bool:
    """Mount a fresh tmpfs at ``target`` holding the mask; False (nothing mounted) if empty."""
    lower_b = os.fsencode(lower)
    wanted_dirs = [p for p in spec.empty_dirs if _is_real_dir(os.path.join(lower_b, p))]
    wanted_hidden = [p for p in spec.hidden if os.path.lexists(os.path.join(lower_b, p))]
    if not (wanted_dirs or wanted_hidden or spec.mountpoints):
        return False
    os.makedirs(target, mode=0o755, exist_ok=True)
    if os.path.ismount(target):
        subprocess.run(["umount", target], check=True, capture_output=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755,size=8m,nr_inodes=65536",
                             "sdeefs-mask", target], capture_output=True, text=True)
    if result.returncode != 0:
        raise QuietError(f"cannot mount the mask layer: {result.stderr.strip()}", ExitCode.FAILURE)
    top = os.fsencode(target)
    for rel in wanted_dirs:
        path = _make_parents(top, lower_b, rel, owner_map)
        os.setxattr(path, opaque_xattr, b"y")
    for rel in wanted_hidden:
        parent = _make_parents(top, lower_b, os.path.dirname(rel), owner_map) \
            if os.path.dirname(rel) else top
        os.mknod(os.path.join(parent, os.path.basename(rel)), stat.S_IFCHR, os.makedev(0, 0))
    for rel in spec.mountpoints:
        path = os.path.join(top, rel)
        os.makedirs(path, mode=0o755, exist_ok=True)
    # Creating entries changed the directories' times: copy the lower's back, deepest first.
    for dirpath, _, _ in sorted(os.walk(top), key=lambda entry: -len(entry[0])):
        rel = os.path.relpath(dirpath, top)
        _copy_dir_attrs(os.path.join(lower_b, rel) if rel != b"." else lower_b, dirpath,
                        owner_map)
    return True


def _is_real_dir(path: bytes) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _make_parents(top: bytes, lower: bytes, rel: bytes, owner_map: OwnerMap) -> bytes:
    """Create ``rel`` (and its parents) in the mask with the lower's attributes."""
    path = top
    parts = [p for p in rel.split(b"/") if p]
    for depth in range(1, len(parts) + 1):
        sub = b"/".join(parts[:depth])
        path = os.path.join(top, sub)
        if not os.path.isdir(path):
            os.mkdir(path)
            _copy_dir_attrs(os.path.join(lower, sub), path, owner_map)
    return path


def _copy_dir_attrs(source: bytes, target: bytes, owner_map: OwnerMap) -> None:
    try:
        st = os.stat(source)
    except FileNotFoundError:
        return
    uid, gid = owner_map(st.st_uid, st.st_gid)
    os.chown(target, uid, gid)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
