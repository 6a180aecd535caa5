"""``sdeefs mount`` and ``sdeefs umount``: this room's subcommands.

The ``sdeefs`` command itself is assembled in ``sdeefs.launcher.cli``, which adds
these with :func:`add_commands` and hands their parsed arguments to :func:`run`.
"""

from __future__ import annotations

import argparse
import os

from ..config import Engine, parse_size
from ..statedir import StateDir
from .mount import MOUNT_ENGINES, MountRequest, mount, mount_passthrough, umount

COMMANDS = ("mount", "umount")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mount`` and ``umount`` to the ``sdeefs`` command's subcommands."""
    m = sub.add_parser("mount", help="mount a user's view (lower + upper)")
    m.add_argument("--lower", default="/", help="read-only lower tree (default: /)")
    m.add_argument("--upper", required=True, help="the user's upper directory")
    m.add_argument("--state", help="state directory (journal, work dir); default: beside upper")
    m.add_argument("--engine", choices=[str(e) for e in MOUNT_ENGINES], default=Engine.FUSE,
                   help="fuse: pure sdeefs overlay; hybrid: kernel overlayfs over the "
                        "journaling sdeefs upper; kernel: kernel overlayfs with its upper "
                        "on a layer image (--upper LAYER/upper, image LAYER.img), journaled "
                        "by a capture daemon")
    m.add_argument("--image-size", default="64G", metavar="SIZE",
                   help="--engine kernel: size of a new layer image (sparse; default 64G)")
    m.add_argument("--passthrough-upper", action="store_true",
                   help="serve the layer root itself (upper/ and work/) for a kernel overlay")
    m.add_argument("--no-journal", action="store_true", help="do not journal (benchmarks)")
    m.add_argument("--exclude", action="append", default=[], metavar="PATH",
                   help="lower path shown as an empty directory (repeatable; /proc /sys /dev "
                        "/run are excluded when the lower is /)")
    m.add_argument("--cache-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long the kernel caches names and attributes; lower changes "
                        "appear within this time (default 10)")
    m.add_argument("--node-limit", type=int, default=50_000, metavar="N",
                   help="(fuse engine) inodes the daemon keeps known to the kernel; past it "
                        "the entries looked up longest ago are handed back, which bounds "
                        "its memory (default 50000, at least 1000)")
    m.add_argument("--sync-interval", type=float, default=5.0, metavar="SECONDS",
                   help="journal fdatasync period when nobody calls fsync (default 5)")
    m.add_argument("--xattr-namespace", choices=("trusted", "user"), default="trusted",
                   help="overlay xattrs as trusted.overlay.* (host mounts) or user.overlay.* "
                        "(user-namespace mounts with userxattr)")
    m.add_argument("--no-writeback-cache", action="store_true")
    m.add_argument("--segment-bytes", type=int, default=64 << 20, metavar="BYTES",
                   help="start a new journal segment beyond this size; trimming after "
                        "replication removes whole segments (default 64 MiB)")
    m.add_argument("--foreground", action="store_true", help="stay attached")
    m.add_argument("mountpoint")

    u = sub.add_parser("umount", help="unmount and wait for the daemon to finish")
    u.add_argument("mountpoint")


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed ``mount`` or ``umount``; the exit code (errors: QuietError)."""
    if args.command == "umount":
        umount(args.mountpoint)
        return 0
    assert args.command == "mount", args.command
    state = args.state or StateDir.beside(args.upper).path
    if args.engine == Engine.KERNEL and not args.state:  # ROOT/U/state beside ROOT/U/layer
        state = StateDir.beside(os.path.dirname(os.path.abspath(args.upper))).path
    req = MountRequest(
        mountpoint=os.path.abspath(args.mountpoint), upper=os.path.abspath(args.upper),
        state=os.path.abspath(state), lower=os.path.abspath(args.lower),
        engine=Engine(args.engine), journal=not args.no_journal, excludes=tuple(args.exclude),
        cache_timeout=args.cache_timeout, node_limit=args.node_limit,
        sync_interval=args.sync_interval,
        xattr_namespace=args.xattr_namespace, writeback_cache=not args.no_writeback_cache,
        foreground=args.foreground, segment_bytes=args.segment_bytes,
        image_size=parse_size("--image-size", args.image_size))
    if args.passthrough_upper:
        mount_passthrough(req)
    else:
        mount(req)
    return 0
