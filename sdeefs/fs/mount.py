"""Mounting and unmounting the views: requests, their checks, the engines, the guard.

* ``--engine fuse``: one daemon serves the merged view (``CowFS`` in ``merged``
  mode) at the mountpoint.
* ``--engine hybrid``: the daemon serves the layer root itself (``raw`` mode) at
  ``STATE/mnt``, journaling every change, and kernel overlayfs is mounted at the
  mountpoint with ``STATE/mnt/upper`` as its upper and, above the lower, the mask
  layer (``sdeefs.fs.mask``, on ``STATE/mask``) that shows the excluded paths empty.
* ``--engine kernel``: ``UPPER`` is ``LAYER/upper``, on the layer image
  ``LAYER.img`` (``sdeefs.fs.image``; made if missing, ``--image-size``) mounted at
  ``LAYER``; the capture daemon (``sdeefs.fs.kernel``: supervised, restarted if it
  dies) journals it into ``STATE/journal``, and kernel overlayfs is mounted at the
  mountpoint over the mask and the lower with ``LAYER/upper`` as its upper: no sdeefs
  process in the I/O path.  ``LAYER/state`` names the state directory, for
  ``sdeefs umount``.
* the guard (``sdeefs.fs.guard``): a read-only layer of its own daemon, mounted
  by the launcher above the host root.

Every daemon is started by ``sdeefs.fs.daemon`` (fork, report on a pipe, detach,
STATE/lock); every STATE path comes from ``sdeefs.statedir``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable

import attrs
import pyfuse3
import trio

from .. import mountinfo
from ..apply import recover
from ..config import Engine, GuardDaemon, guard_daemon
from ..errors import ExitCode, QuietError
from ..identity import Identity
from ..journal import Journal, NullJournal
from ..offload import Offload
from ..statedir import StateDir
from ..sysio import open_tree_clone
from . import daemon, kernel
from .cow import DEFAULT_EXCLUDES, CowFS, Mode, OverlayXattrs, ViewConfig
from .guard import DenyPatterns, GuardView, Policy, guard_binary
from .image import ImageError
from .lower import HidePolicy
from .mask import MaskSpec, build_mask
from .ops import GuardOperations, Operations

log = logging.getLogger(__name__)

# Below this, a deep tree walk would drop its own parents' entries again and again
MIN_NODE_LIMIT = 1000
MOUNT_ENGINES = (Engine.FUSE, Engine.HYBRID, Engine.KERNEL)  # what ``sdeefs mount`` makes


@attrs.frozen
class MountRequest:
    """Everything ``sdeefs mount`` was asked to do (validated by :func:`validate`)."""

    mountpoint: str
    upper: str
    state: str
    lower: str = "/"
    engine: Engine = Engine.FUSE
    journal: bool = True
    excludes: tuple[str, ...] = ()
    cache_timeout: float = 10.0
    node_limit: int = 50_000  # the fuse engine's bound on nodes known to the kernel
    sync_interval: float = 5.0
    xattr_namespace: str = "trusted"
    writeback_cache: bool = True
    foreground: bool = False
    segment_bytes: int = 64 << 20
    # A user's environment (the launcher): only its ids are accepted (the id door), and
    # for --engine fuse lower owners show as its idmapped lower shows them and what
    # sdeefs.fs.guard hides stays hidden (entries the user cannot read on the host; the
    # deny patterns also without ids)
    ids: Identity | None = None
    deny: tuple[str, ...] = ()
    image_size: int = 64 << 30  # --engine kernel: a new layer image's size

    @property
    def layer(self) -> str:
        """--engine kernel: the layer image's mountpoint (the upper's parent)."""
        return os.path.dirname(self.upper.rstrip("/"))

    @property
    def dirs(self) -> StateDir:
        return StateDir(self.state)


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def view_excludes(req: MountRequest) -> tuple[bytes, ...]:
    """Lower paths shown as empty directories: the defaults, the user's, and our own dirs."""
    lower = os.path.realpath(req.lower)
    found = list(DEFAULT_EXCLUDES) if lower == "/" else []
    for path in (*req.excludes, req.mountpoint, req.upper, req.state):
        if _inside(path, lower):
            rel = os.path.relpath(os.path.realpath(path), lower)
            if rel != ".":
                found.append(os.fsencode(rel))
    return tuple(dict.fromkeys(found))


def validate(req: MountRequest) -> None:
    """Refuse, in one line each, every set-up that cannot work."""
    for what, path in (("upper", req.upper), ("state", req.state), ("lower", req.lower),
                       ("mountpoint", req.mountpoint)):
        if any(c in path for c in ",:\n\t "):
            raise QuietError(f"cannot mount: the {what} path {path!r} contains a comma, colon or "
                             "blank (mount options cannot carry it)", ExitCode.USAGE)
    if req.engine not in MOUNT_ENGINES:
        raise QuietError(f"unknown engine {req.engine!r} "
                         f"(choose from {', '.join(MOUNT_ENGINES)})", ExitCode.USAGE)
    if req.node_limit < MIN_NODE_LIMIT:
        raise QuietError(f"cannot mount: --node-limit must be at least {MIN_NODE_LIMIT}",
                         ExitCode.USAGE)
    if req.engine == Engine.KERNEL:
        _validate_kernel(req)
        return
    if not os.path.exists("/dev/fuse"):
        raise QuietError("cannot mount: /dev/fuse does not exist (load the fuse module)",
                         ExitCode.UNAVAILABLE)
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise QuietError("cannot mount: no permission to open /dev/fuse", ExitCode.UNAVAILABLE)
    if os.geteuid() != 0:
        raise QuietError("cannot mount: sdeefs mount must run as root (it serves every uid)",
                         ExitCode.UNAVAILABLE)
    for what, path in (("lower", req.lower), ("upper", req.upper), ("mountpoint", req.mountpoint)):
        if not os.path.isdir(path):
            raise QuietError(f"cannot mount: {what} {path} is not a directory", ExitCode.USAGE)
    if os.path.ismount(req.mountpoint):
        raise QuietError(f"cannot mount: {req.mountpoint} is busy (something is mounted there)",
                         ExitCode.BUSY)
    if os.listdir(req.mountpoint):
        raise QuietError(f"cannot mount: mountpoint {req.mountpoint} is not empty", ExitCode.BUSY)
    for what, path in (("upper", req.upper), ("state", req.state)):
        if _inside(path, req.mountpoint):
            raise QuietError(f"cannot mount: the {what} directory {path} is inside the mountpoint",
                             ExitCode.USAGE)
        if _inside(req.lower, path):
            raise QuietError(f"cannot mount: the lower {req.lower} is inside the {what} {path}",
                             ExitCode.USAGE)
    if _inside(req.state, req.upper) or _inside(req.upper, req.state):
        raise QuietError("cannot mount: upper and state directories must not contain each other",
                         ExitCode.USAGE)
    lower = os.path.realpath(req.lower)
    given = [*req.excludes, *(os.path.join(lower, os.fsdecode(e)) for e in DEFAULT_EXCLUDES
                              if lower == "/")]
    for what, path in (("upper", req.upper), ("state", req.state)):
        for excluded in given:
            if _inside(path, excluded):
                raise QuietError(f"cannot mount: the {what} {path} is inside the excluded path "
                                 f"{excluded}, which the launcher bind-mounts from the host",
                                 ExitCode.USAGE)


def _validate_kernel(req: MountRequest) -> None:
    if os.geteuid() != 0:
        raise QuietError("cannot mount: sdeefs mount must run as root (fanotify, loop mounts)",
                         ExitCode.UNAVAILABLE)
    if os.path.basename(req.upper.rstrip("/")) != "upper":
        raise QuietError("cannot mount: --engine kernel takes --upper LAYER/upper (the image "
                         "LAYER.img is mounted at LAYER)", ExitCode.USAGE)
    for what, path in (("lower", req.lower), ("mountpoint", req.mountpoint)):
        if not os.path.isdir(path):
            raise QuietError(f"cannot mount: {what} {path} is not a directory", ExitCode.USAGE)
    if os.path.ismount(req.mountpoint) or os.listdir(req.mountpoint):
        raise QuietError(f"cannot mount: mountpoint {req.mountpoint} is busy or not empty",
                         ExitCode.BUSY)
    for what, path in (("layer", req.layer), ("state", req.state)):
        if _inside(path, req.mountpoint) or _inside(req.lower, path):
            raise QuietError(f"cannot mount: the {what} {path} and the mountpoint or lower "
                             "overlap", ExitCode.USAGE)
    if _inside(req.state, req.layer) or _inside(req.layer, req.state):
        raise QuietError("cannot mount: layer and state directories must not contain each "
                         "other", ExitCode.USAGE)


def mount_kernel(req: MountRequest) -> None:
    """--engine kernel: the layer image, its capture, then kernel overlayfs over it."""
    os.makedirs(req.state, mode=0o700, exist_ok=True)
    image_path = req.layer + ".img"
    try:
        upper, work = kernel.open_layer(image_path, req.layer, req.image_size, 0, 0)
        with open(os.path.join(req.layer, "state"), "w") as f:
            f.write(os.path.abspath(req.state) + "\n")
    except (ImageError, OSError) as exc:
        raise QuietError(f"cannot mount: {exc}", ExitCode.FAILURE) from None
    mask = None
    try:
        kernel.start_capture(req.layer, req.state, os.path.join(req.state, "capture.log"))
        mask = _hybrid_mask(req)
        mount_overlay([mask, req.lower] if mask else [req.lower], upper, work, req.mountpoint)
    except BaseException:
        if mask:
            unmount_path(mask)
        with contextlib.suppress(QuietError):
            kernel.stop_capture(req.state, 60.0)
        kernel.close_layer(image_path, req.layer)
        raise


def prepare_state(req: MountRequest) -> None:
    os.makedirs(req.state, mode=0o700, exist_ok=True)
    os.makedirs(req.dirs.work, mode=0o700, exist_ok=True)
    if os.stat(req.upper).st_dev != os.stat(req.dirs.work).st_dev:
        raise QuietError(f"cannot mount: state {req.state} must be on the upper's filesystem "
                         "(copy-ups are renamed from its work directory into the upper)",
                         ExitCode.USAGE)


# -- the journaling daemon ---------------------------------------------------------------------


def _fsname(state: str) -> str:
    # The state directory in fsname lets `sdeefs umount MOUNTPOINT` find the daemon's lock.
    return f"sdeefs:{os.path.abspath(state)}"


def _fuse_options(state: str) -> set[str]:
    # default_permissions in both modes: in raw mode too the caller may be the user (a
    # user-namespace overlay mounted by them), who must not chown to root or the like.
    return {f"fsname={_fsname(state)}", "subtype=sdeefs", "default_permissions",
            "allow_other", "nodev", "nosuid"}


# The mount's readahead (KiB).  FUSE starts from the bdi's default, 128 KiB (the kernel
# offers it as max_readahead at INIT; libfuse may only lower it), so a sequential read
# reached the daemon as 128 KiB requests: eight round trips, eight Python handlers a MiB.
# Past 1 MiB (libfuse 3.14's max_pages: 256) the kernel splits a readahead into 1 MiB
# requests, and a larger window lets it ask for the next while the reader copies.
READAHEAD_KIB = 4096


def raise_readahead(fsname: str, kib: int = READAHEAD_KIB) -> None:
    """Set the readahead of the FUSE mount named ``fsname`` (bdi ``read_ahead_kb``: root only).

    The mount is found in /proc/self/mountinfo by its source, not its path: a stat of
    the mountpoint would be a request to this very daemon, which does not serve yet.
    Best effort: without it reads are correct, only slower (a note in the log).
    """
    try:
        devices = [mount.device for mount in mountinfo.mounts()
                   if mount.fstype.startswith("fuse") and mount.source == fsname]
        if not devices:
            log.warning("readahead left at the default: %s not in mountinfo", fsname)
            return
        # the latest mount of it (there is one: STATE/lock)
        with open(f"/sys/class/bdi/{devices[-1]}/read_ahead_kb", "w") as f:
            f.write(f"{kib}\n")
    except OSError as exc:
        log.warning("readahead left at the default: %s", exc)


async def _serve(periodic: Callable[[], Awaitable[None]] | None = None,
                 interval: float = 0.0,
                 beside: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run pyfuse3's request loop until unmounted or signalled; ``periodic`` every ``interval``;
    ``beside`` once, next to the loop."""
    async def every_interval() -> None:
        assert periodic is not None
        while True:
            await trio.sleep(interval)
            await periodic()

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting", signum)
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        if periodic is not None:
            nursery.start_soon(every_interval)
        nursery.start_soon(on_signals)
        if beside is not None:
            nursery.start_soon(beside)
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


def run_daemon(req: MountRequest, mountpoint: str, mode: Mode, ready_fd: int | None) -> int:
    """Mount and serve until unmounted.  Reports "ok" or an error line on ``ready_fd``."""
    faulthandler.register(signal.SIGUSR1)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(daemon.state_lock(req.state))
            journal: Journal | NullJournal
            upper, work = os.fsencode(req.upper), os.fsencode(req.dirs.work)
            if req.journal:
                journal = Journal.open(req.dirs.journal, req.segment_bytes)
                stack.callback(journal.close)
                seq = recover(journal, upper, work)
                if seq is not None:
                    log.info("recovery: re-checked journal record %d", seq)
            else:
                journal = NullJournal()
            prefix = b"user.overlay." if req.xattr_namespace == "user" else b"trusted.overlay."
            config = ViewConfig(upper=os.fsencode(os.path.abspath(req.upper)),
                                work=os.fsencode(os.path.abspath(req.dirs.work)),
                                lower=os.fsencode(req.lower) if mode == "merged" else None,
                                mode=mode, excludes=view_excludes(req),
                                xattrs=OverlayXattrs(prefix), cache_timeout=req.cache_timeout,
                                node_limit=req.node_limit, hide=_hide_policy(req), ids=req.ids)
            fs = CowFS.open(config, journal)
            stack.callback(fs.close)
            ops = Operations(fs, Offload(), req.cache_timeout,
                             writeback_cache=req.writeback_cache)
            pyfuse3.init(ops, mountpoint, _fuse_options(req.state))
        except (QuietError, OSError) as exc:
            return _failed(ready_fd, exc, "cannot mount")
        daemon.report(ready_fd, "ok")

        async def sync_journal() -> None:
            await ops.offload.run(fs.sync_journal)

        async def readahead() -> None:
            # after the kernel took libfuse's INIT reply, which sets the readahead to at
            # most the 128 KiB it offered (Operations.init runs just before that reply)
            await ops.initialized.wait()
            raise_readahead(_fsname(req.state))

        # SIGTERM ends the serving (the loop's handler, _serve); once the loop returns the
        # old disposition is back: ignored, so a SIGTERM that comes late (after the unmount,
        # daemon.end_after_unmount) cannot cut the journal's close short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            trio.run(_serve, sync_journal, req.sync_interval, readahead)
        finally:
            pyfuse3.close(unmount=True)
    return 0


def _failed(ready_fd: int | None, exc: QuietError | OSError, what: str) -> int:
    """Report why a daemon could not start, in one line; its exit code."""
    if isinstance(exc, QuietError):
        daemon.report(ready_fd, str(exc), exc.exitcode)
        return exc.exitcode
    where = f" ({os.fsdecode(exc.filename)})" if exc.filename else ""
    daemon.report(ready_fd, f"{what}: {exc.strerror or exc}{where}", ExitCode.FAILURE)
    return ExitCode.FAILURE


def _hide_policy(req: MountRequest) -> HidePolicy | None:
    """What the merged view hides of the lower (sdeefs.fs.guard's rules), if anything."""
    deny = DenyPatterns.of(req.deny)
    if req.ids is not None:
        return Policy(deny, req.ids).hides
    if deny.patterns:
        return lambda rel, st: deny.matches(rel)
    return None


def _start_view(req: MountRequest, mountpoint: str, mode: Mode) -> None:
    """The journaling daemon serving ``mountpoint``: in the foreground, or detached (once
    it reports that the mount is up)."""
    if req.foreground:
        sys.exit(run_daemon(req, mountpoint, mode, None))
    daemon.spawn(req.dirs.daemon_log, lambda ready_fd: run_daemon(req, mountpoint, mode,
                                                                  ready_fd))


# -- the guard layer (sdeefs.fs.guard) ---------------------------------------------------------


@attrs.frozen
class GuardRequest:
    """A guard over ``lower`` for the user ``ids`` (sdeefs.identity)."""

    mountpoint: str
    lower: str
    ids: Identity
    deny: tuple[str, ...] = ()
    log: str = "/dev/null"
    cache_timeout: float = 10.0
    # "PID START\n" of the daemon, written once it serves: a daemon whose mount another
    # mount namespace keeps after the unmount can be found and ended (daemon.end_process)
    pid_file: str | None = None
    daemon: GuardDaemon = GuardDaemon.C  # ($SDEEFS_GUARD overrides it: config.guard_daemon)


GUARD_FSNAME = "sdeefs-guard"


def run_guard(req: GuardRequest, ready_fd: int | None) -> int:
    """Mount the guard and serve until unmounted.  Reports like :func:`run_daemon`."""
    faulthandler.register(signal.SIGUSR1)
    try:
        try:
            lower_fd = open_tree_clone(req.lower)  # no submounts: what the idmapped lower shows
        except PermissionError:
            raise QuietError("cannot mount the guard: it must run as root",
                             ExitCode.UNAVAILABLE) from None
        policy = Policy(DenyPatterns.of(req.deny), req.ids)
        if guard_daemon(req.daemon) == GuardDaemon.C:
            _exec_c_guard(req, policy, lower_fd, ready_fd)  # returns only if exec failed
        view = GuardView(lower_fd, policy)
        ops = GuardOperations(view, Offload(), req.cache_timeout)
        pyfuse3.init(ops, req.mountpoint, {
            f"fsname={GUARD_FSNAME}", f"subtype={GUARD_FSNAME}", "ro", "default_permissions",
            "allow_other", "nodev", "nosuid", "noexec"})
    except (QuietError, OSError) as exc:
        return _failed(ready_fd, exc, "cannot mount the guard")
    if req.pid_file is not None:
        daemon.write_pid_file(req.pid_file)
    daemon.report(ready_fd, "ok")
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
        os.close(lower_fd)
    return 0


def _exec_c_guard(req: GuardRequest, policy: Policy, lower_fd: int, ready_fd: int | None) -> None:
    """Become ``sdeefs-guard`` (sdeefs/fs/guardd/guard.c) with this policy: it mounts, reports
    on ``ready_fd`` and serves (this process becomes its keeper, the pid file's pid; the
    server it forks reports, and is replaced if it dies: guard.c "surviving a crash")."""
    binary = guard_binary()
    argv = [os.fsencode(binary), b"--lower-fd", b"%d" % lower_fd, b"--mountpoint",
            os.fsencode(req.mountpoint), b"--timeout", repr(req.cache_timeout).encode()]
    if req.pid_file is not None:
        argv += [b"--pid-file", os.fsencode(req.pid_file)]
    if ready_fd is not None:
        os.set_inheritable(ready_fd, True)
        argv += [b"--ready-fd", b"%d" % ready_fd]
    os.set_inheritable(lower_fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(binary, [*argv, *policy.argv()])
    except OSError as exc:
        raise QuietError(f"cannot mount the guard: {binary}: {exc.strerror} (scripts/setup.sh "
                         "builds it; SDEEFS_GUARD=python runs the Python guard)",
                         ExitCode.UNAVAILABLE) from None


def mount_guard(req: GuardRequest) -> None:
    """Mount the guard layer at ``req.mountpoint`` (a detached daemon; ends when unmounted)."""
    begin_guard(req)()


def begin_guard(req: GuardRequest) -> Callable[[], None]:
    """Start mounting the guard; the returned call waits until it is mounted (or raises)."""
    if not os.path.isdir(req.mountpoint):
        raise QuietError(f"cannot mount the guard: {req.mountpoint} is not a directory",
                         ExitCode.USAGE)
    if not os.path.isdir(req.lower):
        raise QuietError(f"cannot mount the guard: lower {req.lower} is not a directory",
                         ExitCode.USAGE)
    return daemon.fork(req.log, lambda ready_fd: run_guard(req, ready_fd))


# -- the hybrid stack --------------------------------------------------------------------------


def _hybrid_mask(req: MountRequest) -> str | None:
    """The mask layer (``sdeefs.fs.mask``) showing the excluded paths as empty directories."""
    mask = req.dirs.mask
    spec = MaskSpec(empty_dirs=view_excludes(req))
    return mask if build_mask(mask, req.lower, spec, b"trusted.overlay.opaque") else None


def mount_overlay(lowers: list[str], upper: str, work: str, target: str) -> None:
    # xino=on: st_ino stays the origin's across copy-up although the upper is another fs.
    # nodev: device nodes host root makes in the view stay inert, as in the fuse engine's.
    # redirect_dir=on: a lower directory renames (trusted.overlay.redirect, which the fuse
    # engine reads and writes too: sdeefs.fs.cow) instead of EXDEV.
    options = (f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},xino=on,"
               "redirect_dir=on")
    result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"nodev,{options}",
                             target],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise QuietError(f"cannot mount kernel overlayfs: {result.stderr.strip()}",
                         ExitCode.FAILURE)


def mount(req: MountRequest) -> None:
    validate(req)
    if req.engine == Engine.KERNEL:
        mount_kernel(req)
        return
    prepare_state(req)
    if req.engine == Engine.FUSE:
        _start_view(req, req.mountpoint, "merged")
        return
    inner = req.dirs.mnt
    os.makedirs(inner, mode=0o700, exist_ok=True)
    if os.path.ismount(inner):
        raise QuietError(f"cannot mount: {inner} is still mounted from an earlier run",
                         ExitCode.BUSY)
    mask = _hybrid_mask(req)
    try:
        daemon.spawn(req.dirs.daemon_log, lambda ready_fd: run_daemon(req, inner, "raw",
                                                                      ready_fd))
        try:
            os.makedirs(os.path.join(inner, "work", "ovl"), exist_ok=True)
            lowers = [mask, req.lower] if mask else [req.lower]
            mount_overlay(lowers, os.path.join(inner, "upper"),
                          os.path.join(inner, "work", "ovl"), req.mountpoint)
        except BaseException:
            unmount_path(inner)
            daemon.wait_exit(req.state, 10.0)
            raise
    except BaseException:
        if mask:
            unmount_path(mask)
        raise
    if req.foreground:
        daemon.wait_exit(req.state, None)


def mount_passthrough(req: MountRequest) -> None:
    """``--passthrough-upper``: serve upper/ and work/ as they are, journaled, at the mountpoint.

    Kernel overlayfs can then use ``MOUNTPOINT/upper`` and ``MOUNTPOINT/work/ovl``
    as its upper and work directories (this is what ``--engine hybrid`` does).
    """
    validate(req)
    prepare_state(req)
    _start_view(req, req.mountpoint, "raw")


# -- unmounting --------------------------------------------------------------------------------


def unmount_path(path: str) -> None:
    result = subprocess.run(["umount", path], capture_output=True, text=True)
    if result.returncode != 0:
        raise QuietError(f"cannot unmount {path}: {result.stderr.strip()}", ExitCode.UNMOUNT)


def mounted_state(mountpoint: str) -> tuple[str, str | None]:
    """(type, state dir) of an sdeefs mount at ``mountpoint``, from /proc/self/mountinfo."""
    mount = mountinfo.at(mountpoint)
    if mount is None:
        raise QuietError(f"{mountpoint} is not mounted", ExitCode.USAGE)
    if mount.fstype == "overlay":
        upper = mount.super_option("upperdir")
        if upper is None:
            return "overlay", None
        inner = os.path.dirname(upper)  # STATE/mnt
        if os.path.exists(inner + ".img"):  # LAYER (engine kernel)
            with open(os.path.join(inner, "state")) as f:
                return "kernel", f.read().strip()
        return "hybrid", os.path.dirname(inner)
    if mount.fstype.startswith("fuse") and mount.source.startswith("sdeefs:"):
        return "fuse", mount.source[len("sdeefs:"):]
    raise QuietError(f"{mountpoint} is a {mount.fstype} mount not made by sdeefs", ExitCode.USAGE)


def _upperdir(mountpoint: str) -> str:
    mount = mountinfo.at(mountpoint)
    upper = mount.super_option("upperdir") if mount is not None else None
    if upper is None:
        raise QuietError(f"{mountpoint} is not a kernel overlay", ExitCode.USAGE)
    return upper


def umount(mountpoint: str, timeout: float = 30.0) -> None:
    """Unmount an sdeefs view and wait until its daemon has exited (journal closed); one
    whose mount another mount namespace pins is asked to finish (daemon.end_after_unmount)."""
    kind, state = mounted_state(mountpoint)
    if kind == "overlay" or state is None:
        raise QuietError(f"{mountpoint} is a kernel overlay not made by sdeefs", ExitCode.USAGE)
    upper = _upperdir(mountpoint) if kind == "kernel" else None
    unmount_path(mountpoint)
    if kind == "kernel":
        assert upper is not None
        dirs = StateDir(state)
        if os.path.ismount(dirs.mask):
            unmount_path(dirs.mask)
        kernel.stop_capture(state, max(timeout, 600.0))  # the stop drains the queue first
        layer = os.path.dirname(upper)
        if not kernel.close_layer(layer + ".img", layer):
            raise QuietError(f"the layer {layer} stays mounted: it is busy", ExitCode.UNMOUNT)
        return
    if kind == "hybrid":
        dirs = StateDir(state)
        unmount_path(dirs.mnt)
        if os.path.ismount(dirs.mask):
            unmount_path(dirs.mask)
    daemon.end_after_unmount(state, timeout)
