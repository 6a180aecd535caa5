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
The layer lives on a filesystem of its own: overlayfs refuses a layer inside
another layer of the same filesystem, and the state directory is usually inside /.

Which filesystem: a tmpfs, if it takes the opaque xattr.  The launcher's overlays are
mounted in a user namespace with ``userxattr``, so the opaque mark is
``user.overlay.opaque``, and tmpfs stores ``user.*`` xattrs only since Linux 6.6
(Debian 12's default kernel, 6.1, answers EOPNOTSUPP).  So the fresh tmpfs is asked
(:func:`takes_xattr`: the kernel's answer, never its version) and, where it refuses,
the mask is an ext4 image instead (:data:`MaskBacking.IMAGE`): a sparse file without
a name in ``target``'s directory (``O_TMPFILE``), ``mkfs.ext4`` without a journal,
``mount -o loop`` (its loop device detaches itself when the filesystem is unmounted):
the loop device holds the only reference to the file, so unmounting the mask, as every
teardown already does, leaves no loop device and no file, and a start killed on the way
leaves no file either.  An environment whose overlay still holds a clone of an
unmounted mask keeps it (and the loop device) until it ends.  Cost (bench/RESULTS.md,
"Debian 12's default kernel"): mkfs, the loop mount and its teardown add 10-20 ms of
wall time to each mask built on a quiet machine (0.06-0.13 s at load 5), 5-10 ms of it
CPU; a job's mask is built once per user and node (launcher/compute/job.py).

``SDEEFS_MASK_BACKING=image`` (:data:`BACKING_ENV`; tests and benchmarks only) skips
the tmpfs, for the suite on kernels whose tmpfs takes user xattrs.
"""

from __future__ import annotations

import enum
import errno
import os
import shutil
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


class MaskBacking(enum.Enum):
    """The filesystem a mask is made on (module docstring)."""

    TMPFS = "tmpfs"
    IMAGE = "image"  # an ext4 image on a self-detaching loop device, its file nameless


BACKING_ENV = "SDEEFS_MASK_BACKING"  # "image" or "tmpfs", no probe (tests, benchmarks only)
IMAGE_SIZE = 64 << 20  # sparse: what the mask writes (a few hundred KiB) is what it takes
IMAGE_INODES = 65536  # as the tmpfs' nr_inodes: a whiteout per root-only host entry
TMPFS_OPTIONS = "mode=755,size=8m,nr_inodes=65536"


def build_mask(target: str, lower: str, spec: MaskSpec, opaque_xattr: bytes,
               owner_map: OwnerMap = identity) -> bool:
    """Mount a fresh filesystem at ``target`` holding the mask (a tmpfs where it takes
    ``opaque_xattr``, else an ext4 image: module docstring); False (nothing mounted) if
    there is nothing to mask."""
    lower_b = os.fsencode(lower)
    wanted_dirs = [p for p in spec.empty_dirs if _is_real_dir(os.path.join(lower_b, p))]
    wanted_hidden = [p for p in spec.hidden if os.path.lexists(os.path.join(lower_b, p))]
    if not (wanted_dirs or wanted_hidden or spec.mountpoints):
        return False
    os.makedirs(target, mode=0o755, exist_ok=True)
    if os.path.ismount(target):
        subprocess.run(["umount", target], check=True, capture_output=True)
    mount_mask_filesystem(target, opaque_xattr, forced_backing())
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


def forced_backing() -> MaskBacking | None:
    """The backing :data:`BACKING_ENV` forces (None: decided by the kernel's answer)."""
    value = os.environ.get(BACKING_ENV, "")
    try:
        return MaskBacking(value) if value else None
    except ValueError:
        raise QuietError(f"{BACKING_ENV}={value}: not one of "
                         + ", ".join(b.value for b in MaskBacking), ExitCode.USAGE) from None


def mount_mask_filesystem(target: str, opaque_xattr: bytes,
                          backing: MaskBacking | None = None) -> MaskBacking:
    """An empty filesystem for a mask mounted at ``target``: a tmpfs if ``backing`` says so
    or (None) if it takes ``opaque_xattr``, else an ext4 image; which one it is."""
    if backing in (None, MaskBacking.TMPFS):
        _mount(["-t", "tmpfs", "-o", TMPFS_OPTIONS, "sdeefs-mask", target])
        if backing is MaskBacking.TMPFS or takes_xattr(target, opaque_xattr):
            return MaskBacking.TMPFS
        _unmount(target)
    _mount_image(target)
    return MaskBacking.IMAGE


def takes_xattr(path: str, name: bytes) -> bool:
    """Whether the filesystem at ``path`` stores the xattr ``name`` (set, then removed).
    Several may probe one path at once (two jobs' prologs on one node): the set is the
    answer, and another prober may already have removed the name."""
    try:
        os.setxattr(path, name, b"y")
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return False
        raise
    try:
        os.removexattr(path, name)
    except OSError as exc:
        if exc.errno != errno.ENODATA:
            raise
    return True


def _mount_image(target: str) -> None:
    """The ext4 image of a mask at ``target`` (module docstring): a file without a name
    (``O_TMPFILE`` in ``target``'s directory, reached as ``/proc/self/fd/N`` by mkfs.ext4
    and mount), so that nothing is left even if this process is killed on the way."""
    parent = os.path.dirname(target.rstrip("/")) or "."
    try:
        fd = os.open(parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:  # a login's is on RUN_DIR (tmpfs), a job's on its local scratch
        raise QuietError(f"cannot make the mask layer's image in {parent}: {exc.strerror} "
                         "(a filesystem without O_TMPFILE)", ExitCode.FAILURE) from None
    image = f"/proc/self/fd/{fd}"
    try:
        os.ftruncate(fd, IMAGE_SIZE)
        # no journal (the mask is made once and never written again), 1 KiB blocks (a
        # directory of a few entries takes 1 KiB), inode tables initialised lazily and
        # never by the kernel's thread (noinit_itable): the file stays sparse
        _run_tool(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-m", "0", "-b", "1024",
                   "-N", str(IMAGE_INODES), "-L", "sdeefs-mask",
                   "-E", "lazy_itable_init=1,nodiscard,root_owner=0:0", image],
                  "cannot make the mask layer's image", fd)
        _run_tool(["mount", "-t", "ext4", "-o", "loop,noinit_itable", image, target],
                  "cannot mount the mask layer", fd)
    finally:
        os.close(fd)  # mounted, the loop device holds the file; unmounted, it is gone
    os.rmdir(os.path.join(target, "lost+found"))  # the mask's root is merged with /


def _mount(argv: list[str]) -> None:
    _run_tool(["mount", *argv], "cannot mount the mask layer")


def _unmount(target: str) -> None:
    _run_tool(["umount", target], "cannot unmount the mask layer's probe")


def _run_tool(argv: list[str], what: str, pass_fd: int | None = None) -> None:
    # mkfs.ext4 lives in sbin, which a PAM hook's empty environment lacks
    search = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"
    program = shutil.which(argv[0], path=search)
    if program is None:
        raise QuietError(f"{what}: {argv[0]} is not installed", ExitCode.UNAVAILABLE)
    result = subprocess.run([program, *argv[1:]], capture_output=True, text=True,
                            pass_fds=() if pass_fd is None else (pass_fd,))
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        reason = detail[-1] if detail else f"{argv[0]} exited with {result.returncode}"
        raise QuietError(f"{what}: {reason}", ExitCode.FAILURE)


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
