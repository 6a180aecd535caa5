"""Per-user layer images: a sparse ext4 file, mounted through a loop device (root only).

``ROOT/U/layer.img`` holds U's layer: ``upper/`` and ``work/`` of the kernel overlay,
owned by U (0700), on a filesystem of their own.  Its size is U's quota: a full
layer gives U ENOSPC in their own filesystem and never fills the host's; and a
filesystem mark of fanotify on it sees exactly U's changes (``sdeefs.fs.capture``).

* :func:`create_image`: a sparse file (root, 0600) and ``mkfs.ext4`` with lazy
  initialisation (seconds for any size), no reserved blocks; the filesystem root
  stays root's (U must not be able to rename ``upper/`` away under the capture).
* :func:`mount_image`: ``mount -o loop,nodev,nosuid`` (loop devices of ``mount -o
  loop`` detach themselves when unmounted); before that ``e2fsck -p`` if the image
  was not cleanly unmounted (its superblock says the journal needs recovery or an
  error was recorded); then direct I/O on the loop device when the host's filesystem
  allows it (the image's pages are cached once, by the ext4 inside, not twice).
* :func:`unmount_image`.

Superblock fields read (``SUPERBLOCK``, at byte 1024 of the image, little endian):
``s_magic`` u16 at 0x38 (0xEF53), ``s_state`` u16 at 0x3A (bit 2: errors were
found), ``s_feature_incompat`` u32 at 0x60 (bit 0x4: the journal needs recovery,
set while mounted).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator

from .. import mountinfo

log = logging.getLogger(__name__)

SUPERBLOCK_OFFSET = 1024
EXT4_MAGIC = 0xEF53
STATE_ERRORS = 0x2
INCOMPAT_RECOVER = 0x4
_MAGIC = struct.Struct("<H")
_STATE = struct.Struct("<H")
_INCOMPAT = struct.Struct("<I")
LOOP_SET_DIRECT_IO = 0x4C08
MOUNT_OPTIONS = "loop,nodev,nosuid"


class ImageError(Exception):
    """A layer image that cannot be made, checked or mounted (one line for the user)."""


def _run(argv: list[str], what: str, ok: tuple[int, ...] = (0,)) -> int:
    # mkfs.ext4 and e2fsck live in sbin, which a PAM hook's empty environment lacks
    search = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/sbin"
    program = shutil.which(argv[0], path=search) or argv[0]
    try:
        done = subprocess.run([program, *argv[1:]], capture_output=True, text=True,
                              timeout=600)
    except FileNotFoundError:
        raise ImageError(f"{what}: {argv[0]} is not installed") from None
    if done.returncode not in ok:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise ImageError(f"{what}: {argv[0]} exited with {done.returncode}"
                         + (f": {detail[-1]}" if detail else ""))
    return done.returncode


def create_image(path: str, size: int, bytes_per_inode: int | None = None) -> None:
    """A new sparse ext4 image of ``size`` bytes at ``path`` (which must not exist)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    argv = ["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "sdeefs-layer",
            "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"]
    if bytes_per_inode:
        argv += ["-i", str(bytes_per_inode)]
    try:
        _run(argv + [path], f"making the layer image {path}")
    except ImageError:
        os.unlink(path)
        raise


def superblock_state(path: str) -> tuple[bool, bool]:
    """(journal needs recovery, errors recorded) from the image's superblock."""
    with open(path, "rb") as f:
        f.seek(SUPERBLOCK_OFFSET)
        sb = f.read(0x64)
    if len(sb) < 0x64 or _MAGIC.unpack_from(sb, 0x38)[0] != EXT4_MAGIC:
        raise ImageError(f"{path} is not an ext4 image")
    (state,) = _STATE.unpack_from(sb, 0x3A)
    (incompat,) = _INCOMPAT.unpack_from(sb, 0x60)
    return bool(incompat & INCOMPAT_RECOVER), bool(state & STATE_ERRORS)


def loop_devices_of(path: str) -> list[str]:
    """The loop devices backed by ``path`` now."""
    real = os.path.realpath(path)
    found = []
    try:
        names = os.listdir("/sys/block")
    except FileNotFoundError:
        return []
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue
        if backing.removesuffix(" (deleted)") == real:
            found.append(f"/dev/{name}")
    return found


def mount_source(mountpoint: str) -> str | None:
    """The source device of the mount at ``mountpoint`` (None if nothing is mounted there)."""
    mount = mountinfo.at(mountpoint)
    return mount.source if mount is not None else None


def check_image(path: str) -> None:
    """``e2fsck -p`` if the image was not cleanly unmounted; ImageError if it cannot repair."""
    recover, errors = superblock_state(path)
    if not (recover or errors):
        return
    log.warning("layer image %s was not cleanly unmounted: e2fsck -p", path)
    # 0 clean, 1 errors corrected, 2 corrected (reboot advised: for a root fs only)
    _run(["e2fsck", "-p", path], f"checking the layer image {path}", ok=(0, 1, 2))


def mount_image(path: str, mountpoint: str) -> str:
    """Mount the image at ``mountpoint`` (checked first if needed); return its loop device.

    Several processes may mount one image (the launcher at a login, the login replicad
    reading a logged-out user's layer): an exclusive ``flock`` on the image file
    serialises check and mount.  An image whose loop device is still attached although
    nothing is mounted here is mounted in another mount namespace (one that copied the
    host's mounts while the layer was mounted, issue 11 item 6): its filesystem is live,
    so it is neither checked nor attached again; mounting the same device here shares
    its superblock (the kernel never mounts one block device twice as two filesystems).
    """
    with _image_lock(path):
        source = mount_source(mountpoint)
        devices = loop_devices_of(path)
        if source is not None and source in devices:
            return source  # mounted here already
        if source is not None:
            raise ImageError(f"{mountpoint} has something else mounted on it")
        os.makedirs(mountpoint, mode=0o700, exist_ok=True)
        if len(devices) > 1:
            raise ImageError(f"layer image {path} is attached twice ({', '.join(devices)})")
        if devices and _mounted_here(devices[0]):
            raise ImageError(f"layer image {path} is in use ({devices[0]} is mounted "
                             "elsewhere)")
        if devices:
            log.info("layer image %s is live on %s (another mount namespace): mounting it",
                     path, devices[0])
            _run(["mount", "-t", "ext4", "-o", "nodev,nosuid", devices[0], mountpoint],
                 f"mounting the layer image {path}")
        else:
            check_image(path)
            _run(["mount", "-t", "ext4", "-o", MOUNT_OPTIONS, path, mountpoint],
                 f"mounting the layer image {path}")
        device = mount_source(mountpoint)
        if device is None:
            raise ImageError(f"mounting the layer image {path}: not mounted after mount(8)")
        if not devices:
            _direct_io(device)
        return device


@contextlib.contextmanager
def _image_lock(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _mounted_here(device: str) -> bool:
    return any(mount.source == device for mount in mountinfo.mounts())


def is_mounted(path: str, mountpoint: str) -> bool:
    """Is the image ``path`` what is mounted at ``mountpoint`` (in this mount namespace)?"""
    source = mount_source(mountpoint)
    return source is not None and source in loop_devices_of(path)


def _direct_io(device: str) -> None:
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.info("no direct I/O on %s: %s", device, exc)
        return
    try:
        fcntl.ioctl(fd, LOOP_SET_DIRECT_IO, 1)
    except OSError as exc:  # a host filesystem without O_DIRECT: cached twice, still correct
        log.info("no direct I/O on %s: %s", device, exc)
    finally:
        os.close(fd)


def unmount_image(mountpoint: str, path: str | None = None) -> bool:
    """Unmount the layer (its loop device detaches itself once no mount namespace holds
    it); False if it is busy (a reader has files open: it stays mounted, the next
    :func:`mount_image` finds it so).  ``path``: the image, to take its lock."""
    lock = _image_lock(path) if path is not None else contextlib.nullcontext()
    with lock:
        if mount_source(mountpoint) is None:
            return True
        done = subprocess.run(["umount", mountpoint], capture_output=True, text=True)
        if done.returncode != 0:
            log.warning("layer at %s stays mounted: %s", mountpoint,
                        (done.stderr.strip().splitlines() or ["busy"])[-1])
            return False
        return True


def prepare_layer(mountpoint: str, uid: int, gid: int) -> tuple[str, str]:
    """``upper/`` and ``work/`` in a mounted layer, owned by the user, 0700; their paths."""
    paths = []
    for name in ("upper", "work"):
        path = os.path.join(mountpoint, name)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        else:
            os.chown(path, uid, gid)
        paths.append(path)
    return paths[0], paths[1]
