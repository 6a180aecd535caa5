"""Mounting and unmounting: argument checks, the daemon process, and the hybrid stack.

``sdeefs mount`` forks a daemon that mounts the filesystem and reports back
through a pipe: the command returns only once the mount is usable, or prints
the daemon's one-line reason and exits non-zero.

Layout of a state directory::

    STATE/journal/   journal segments (sdeefs.journal)
    STATE/work/      overlayfs work directory (same filesystem as the upper)
    STATE/lock       flock'ed by the running daemon; holds its pid
    STATE/mnt/       hybrid engine: where the passthrough upper is mounted
    STATE/mask/      hybrid engine: a tmpfs, the top lower layer that hides excluded paths
"""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator

import attrs
import pyfuse3
import trio

from ..apply import recover
from ..errors import ExitCode, QuietError
from ..journal import Journal, NullJournal
from ..offload import Offload
from ..statedir import StateDir
from ..sysio import open_tree_clone
from .cow import DEFAULT_EXCLUDES, Config, CowFS, Layout, Mode
from .guard import DenyPatterns, GuardView, Policy
from .mask import MaskSpec
from .mask import build_mask as build_mask_layer
from .ops import GuardOperations, Operations

log = logging.getLogger(__name__)

ENGINES = ("fuse", "hybrid")


@attrs.frozen
class MountRequest:
    """Everything ``sdeefs mount`` was asked to do (validated by :func:`validate`)."""

    mountpoint: str
    upper: str
    state: str
    lower: str = "/"
    engine: str = "fuse"
    journal: bool = True
    excludes: tuple[str, ...] = ()
    cache_timeout: float = 10.0
    sync_interval: float = 5.0
    xattr_namespace: str = "trusted"
    writeback_cache: bool = True
    foreground: bool = False
    segment_bytes: int = 64 << 20
    # --engine fuse for a user's environment (the launcher): lower entries of uid/gid 0
    # show as this (uid, gid), and what sdeefs.guard hides stays hidden (root-only
    # entries; the deny patterns also without root_owner)
    root_owner: tuple[int, int] | None = None
    deny: tuple[str, ...] = ()


def default_state(upper: str) -> str:
    return StateDir.beside(upper).path


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
    if req.engine not in ENGINES:
        raise QuietError(f"unknown engine {req.engine!r} (choose from {', '.join(ENGINES)})",
                         ExitCode.USAGE)
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


def prepare_state(req: MountRequest) -> None:
    os.makedirs(req.state, mode=0o700, exist_ok=True)
    os.makedirs(os.path.join(req.state, "work"), mode=0o700, exist_ok=True)
    if os.stat(req.upper).st_dev != os.stat(os.path.join(req.state, "work")).st_dev:
        raise QuietError(f"cannot mount: state {req.state} must be on the upper's filesystem "
                         "(copy-ups are renamed from its work directory into the upper)",
                         ExitCode.USAGE)


@contextlib.contextmanager
def state_lock(state: str) -> Iterator[int]:
    """Hold STATE/lock for the daemon's lifetime: one daemon per state directory."""
    fd = os.open(os.path.join(state, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise QuietError(f"cannot mount: state {state} is in use by daemon pid {pid}",
                             ExitCode.BUSY) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield fd
    finally:
        os.close(fd)


def daemon_pid(state: str) -> int | None:
    """The pid holding STATE/lock, or None if no daemon runs."""
    path = os.path.join(state, "lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


# -- the daemon --------------------------------------------------------------------------------


def _fuse_options(state: str) -> set[str]:
    # The state directory in fsname lets `sdeefs umount MOUNTPOINT` find the daemon's lock.
    # default_permissions in both modes: in raw mode too the caller may be the user (a
    # user-namespace overlay mounted by them), who must not chown to root or the like.
    options = {f"fsname=sdeefs:{os.path.abspath(state)}", "subtype=sdeefs",
               "default_permissions", "allow_other", "nodev",
               "nosuid"}
    return options


async def _serve(periodic: Callable[[], Awaitable[None]] | None = None,
                 interval: float = 0.0) -> None:
    """Run pyfuse3's request loop until unmounted or signalled; ``periodic`` every ``interval``."""
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
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


def run_daemon(req: MountRequest, mountpoint: str, mode: Mode, ready_fd: int | None) -> int:
    """Mount and serve until unmounted.  Reports "ok" or an error line on ``ready_fd``."""
    faulthandler.register(signal.SIGUSR1)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(state_lock(req.state))
            journal: Journal | NullJournal
            upper, work = os.fsencode(req.upper), os.fsencode(os.path.join(req.state, "work"))
            if req.journal:
                journal = Journal.open(os.path.join(req.state, "journal"), req.segment_bytes)
                stack.callback(journal.close)
                seq = recover(journal, upper, work)
                if seq is not None:
                    log.info("recovery: re-checked journal record %d", seq)
            else:
                journal = NullJournal()
            prefix = b"user.overlay." if req.xattr_namespace == "user" else b"trusted.overlay."
            config = Config(upper=os.fsencode(os.path.abspath(req.upper)),
                            work=os.fsencode(os.path.abspath(os.path.join(req.state, "work"))),
                            lower=os.fsencode(req.lower) if mode == "merged" else None,
                            mode=mode, excludes=view_excludes(req), layout=Layout(prefix),
                            cache_timeout=req.cache_timeout, hide=_hide_policy(req),
                            root_owner=req.root_owner)
            fs = CowFS.open(config, journal)
            stack.callback(fs.close)
            ops = Operations(fs, Offload(), req.cache_timeout,
                             writeback_cache=req.writeback_cache)
            pyfuse3.init(ops, mountpoint, _fuse_options(req.state))
        except QuietError as exc:
            _report(ready_fd, str(exc), exc.exitcode)
            return exc.exitcode
        except OSError as exc:
            _report(ready_fd, f"cannot mount: {exc.strerror or exc}"
                    + (f" ({os.fsdecode(exc.filename)})" if exc.filename else ""), 1)
            return 1
        _report(ready_fd, "ok")

        async def sync_journal() -> None:
            await ops.offload.run(journal.sync)

        try:
            trio.run(_serve, sync_journal, req.sync_interval)
        finally:
            pyfuse3.close(unmount=True)
    return 0


def _hide_policy(req: MountRequest) -> Callable[[bytes, os.stat_result], bool] | None:
    """What the merged view hides of the lower (sdeefs.guard's rules), if anything."""
    deny = DenyPatterns.of(req.deny)
    if req.root_owner is not None:
        return Policy(deny, *req.root_owner).hides
    if deny.patterns:
        return lambda rel, st: deny.matches(rel)
    return None


def _report(fd: int | None, message: str, exitcode: int = 0) -> None:
    """Tell the waiting ``sdeefs mount`` how starting went: "ok" or "<exit code> <reason>"."""
    if fd is None:
        if message != "ok":
            print(f"sdeefs: {message}", file=sys.stderr)
        return
    line = message if message == "ok" else f"{exitcode} {message}"
    with contextlib.suppress(OSError):
        os.write(fd, line.encode() + b"\n")
        os.close(fd)


def spawn_daemon(req: MountRequest, mountpoint: str, mode: Mode) -> None:
    """Fork a detached daemon and wait until it reports that the mount is up."""
    _spawn(os.path.join(req.state, "daemon.log"),
           lambda ready_fd: run_daemon(req, mountpoint, mode, ready_fd))


def _spawn(log_path: str, serve: Callable[[int], int]) -> None:
    """Fork a detached process running ``serve(ready_fd)``; return once it reported "ok"
    on ``ready_fd``, or raise its one-line reason."""
    _fork_daemon(log_path, serve)()


def _fork_daemon(log_path: str, serve: Callable[[int], int]) -> Callable[[], None]:
    """Fork a detached process running ``serve(ready_fd)``; the returned call waits until it
    reported "ok" on ``ready_fd``, or raises its one-line reason (two daemons can start at
    once)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: detach, then serve
        os.close(read_fd)
        # Keep nothing of the caller's but the report pipe: an inherited descriptor (a
        # caller's flock, a socket) would otherwise live as long as the daemon.
        os.closerange(3, write_fd)
        os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        _detach_stdio(log_path)
        code = 1
        try:
            code = serve(write_fd)
        except BaseException:
            log.exception("daemon failed")
        finally:
            os._exit(code)
    os.close(write_fd)
    os.waitpid(pid, 0)

    def wait() -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            answer = pipe.readline().decode(errors="replace").strip()
        if answer == "ok":
            return
        status, _, message = answer.partition(" ")
        if not status.isdigit():
            raise QuietError(f"cannot mount: the daemon died while starting (see {log_path})",
                             ExitCode.FAILURE)
        raise QuietError(message, int(status))

    return wait


def _detach_stdio(log_path: str) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    logfile = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    os.dup2(logfile, 1)
    os.dup2(logfile, 2)
    os.close(logfile)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s "
                                           "%(message)s"))
    root.addHandler(handler)


# -- the guard layer (sdeefs.guard) ------------------------------------------------------------


@attrs.frozen
class GuardRequest:
    """A guard over ``lower`` for a user whose view shows host root as ``uid``/``gid``."""

    mountpoint: str
    lower: str
    uid: int
    gid: int
    deny: tuple[str, ...] = ()
    log: str = "/dev/null"
    cache_timeout: float = 10.0


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
        view = GuardView(lower_fd, Policy(DenyPatterns.of(req.deny), req.uid, req.gid))
        ops = GuardOperations(view, Offload(), req.cache_timeout)
        pyfuse3.init(ops, req.mountpoint, {
            f"fsname={GUARD_FSNAME}", f"subtype={GUARD_FSNAME}", "ro", "default_permissions",
            "allow_other", "nodev", "nosuid", "noexec"})
    except QuietError as exc:
        _report(ready_fd, str(exc), exc.exitcode)
        return exc.exitcode
    except OSError as exc:
        _report(ready_fd, f"cannot mount the guard: {exc.strerror or exc}", 1)
        return 1
    _report(ready_fd, "ok")
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)
        os.close(lower_fd)
    return 0


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
    return _fork_daemon(req.log, lambda ready_fd: run_guard(req, ready_fd))


# -- the hybrid stack --------------------------------------------------------------------------


def build_mask(req: MountRequest) -> str | None:
    """The mask layer (``sdeefs.mask``) showing the excluded paths as empty directories."""
    mask = os.path.join(req.state, "mask")
    spec = MaskSpec(empty_dirs=view_excludes(req))
    return mask if build_mask_layer(mask, req.lower, spec, b"trusted.overlay.opaque") else None


def mount_overlay(lowers: list[str], upper: str, work: str, target: str) -> None:
    # xino=on: st_ino stays the origin's across copy-up although the upper is another fs
    options = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work},xino=on"
    result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, target],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise QuietError(f"cannot mount kernel overlayfs: {result.stderr.strip()}",
                         ExitCode.FAILURE)


def mount(req: MountRequest) -> None:
    validate(req)
    prepare_state(req)
    if req.engine == "fuse":
        if req.foreground:
            sys.exit(run_daemon(req, req.mountpoint, "merged", None))
        spawn_daemon(req, req.mountpoint, "merged")
        return
    inner = os.path.join(req.state, "mnt")
    os.makedirs(inner, mode=0o700, exist_ok=True)
    if os.path.ismount(inner):
        raise QuietError(f"cannot mount: {inner} is still mounted from an earlier run",
                         ExitCode.BUSY)
    mask = build_mask(req)
    try:
        spawn_daemon(req, inner, "raw")
        try:
            os.makedirs(os.path.join(inner, "work", "ovl"), exist_ok=True)
            lowers = [mask, req.lower] if mask else [req.lower]
            mount_overlay(lowers, os.path.join(inner, "upper"),
                          os.path.join(inner, "work", "ovl"), req.mountpoint)
        except BaseException:
            unmount_path(inner)
            wait_daemon_exit(req.state, 10.0)
            raise
    except BaseException:
        if mask:
            unmount_path(mask)
        raise
    if req.foreground:
        pid = daemon_pid(req.state)
        while pid is not None and _alive(pid):
            time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def unmount_path(path: str) -> None:
    result = subprocess.run(["umount", path], capture_output=True, text=True)
    if result.returncode != 0:
        raise QuietError(f"cannot unmount {path}: {result.stderr.strip()}", ExitCode.UNMOUNT)


def wait_daemon_exit(state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while daemon_pid(state) is not None:
        if time.monotonic() > deadline:
            raise QuietError(f"the daemon of {state} did not exit within {timeout:.0f} s",
                             ExitCode.UNMOUNT)
        time.sleep(0.02)


def mounted_state(mountpoint: str) -> tuple[str, str | None]:
    """(type, state dir) of an sdeefs mount at ``mountpoint``, from /proc/self/mountinfo."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] != target:
                continue
            fstype, source, options = fields[sep + 1], fields[sep + 2], fields[sep + 3]
            if fstype == "overlay":
                for opt in options.split(","):
                    if opt.startswith("upperdir="):
                        inner = os.path.dirname(opt[len("upperdir="):])
                        return "hybrid", os.path.dirname(inner)
                return "overlay", None
            if fstype.startswith("fuse") and source.startswith("sdeefs:"):
                return "fuse", source[len("sdeefs:"):].replace("\\040", " ")
            raise QuietError(f"{mountpoint} is a {fstype} mount not made by sdeefs", ExitCode.USAGE)
    raise QuietError(f"{mountpoint} is not mounted", ExitCode.USAGE)


def umount(mountpoint: str, timeout: float = 30.0) -> None:
    """Unmount an sdeefs view and wait until its daemon has exited (journal closed)."""
    kind, state = mounted_state(mountpoint)
    if kind == "overlay" or state is None:
        raise QuietError(f"{mountpoint} is a kernel overlay not made by sdeefs", ExitCode.USAGE)
    unmount_path(mountpoint)
    if kind == "hybrid":
        unmount_path(os.path.join(state, "mnt"))
        if os.path.ismount(os.path.join(state, "mask")):
            unmount_path(os.path.join(state, "mask"))
    wait_daemon_exit(state, timeout)


def mount_passthrough(req: MountRequest) -> None:
    """``--passthrough-upper``: serve upper/ and work/ as they are, journaled, at the mountpoint.

    Kernel overlayfs can then use ``MOUNTPOINT/upper`` and ``MOUNTPOINT/work/ovl``
    as its upper and work directories (this is what ``--engine hybrid`` does).
    """
    validate(req)
    prepare_state(req)
    if req.foreground:
        sys.exit(run_daemon(req, req.mountpoint, "raw", None))
    spawn_daemon(req, req.mountpoint, "raw")
