"""Building an environment's root, and starting its namespaces over it.

The root of a login environment of user U is kernel overlayfs over four layers::

    upper  ROOT/U/upper        through the journaling sdeefs passthrough at
                               ROOT/U/state/mnt (engine hybrid), or directly
                               (engine overlay, no journal); engine kernel:
                               ROOT/U/layer/upper on the user's layer image,
                               journaled by the supervised capture daemon
                               (sdeefs.fs.kernel, :func:`ensure_kernel_layer`)
    mask   RUN/U/private/mask  tmpfs (an ext4 image where tmpfs has no user xattrs:
                               Linux < 6.6, sdeefs/fs/mask.py): empties /proc, /dev,
                               /home ... (mountpoints), hides sdeefs' own directories
                               and what the deny list names at start
    guard  RUN/U/private/guard sdeefs.fs.guard (FUSE, read-only): hides, when first
                               looked up, whatever the deny list matches and
                               whatever only root may read on the host, also
                               entries created after the environment started
                               (guard c or python; with guard bpf there is no such
                               layer, see below)
    lower  RUN/U/private/lower idmapped read-only bind of the host root:
                               system ids show as U's subordinate ids (inside
                               root, _apt ...), U's own ids as themselves, every
                               other id unmapped (sdeefs.identity), so system files
                               are inside root's to change (copy-up)

With ``guard = "bpf"`` (or ``auto`` where it can run: launcher/login/bpfguard.py) the root
is upper + mask + lower, no FUSE: a BPF LSM program in the kernel (launcher/login/bpf)
answers ENOENT, at every access, for what the guard layer hides, and the mask also hides,
by name, the root-only entries the scan of compute/private.py finds at start (as a job's
mask does).  The one difference to the guard layer: an entry created or made root-only on
the host after the start still shows its *name* in a listing (no LSM hook sees directory
entries); stat, open, exec, xattrs, copy-up and everything below it say ENOENT.  The
user's uid is added to the program's map before anything is mounted: the program guards
every user namespace the user owns, the environment's from the moment ``sdeefs-enter
start`` makes it (bpfguard.py says why not the namespace's inode).

Engine fuse replaces all four with one mount, the pure sdeefs overlay at
RUN/U/private/view, which applies the same rules itself.  A job's root (compute/job.py)
has a scratch upper, the user's replica as a middle layer, the mask and the lower, and
no guard: the cached scan of compute/private.py hides root-only entries instead.

Privileged set-up (daemons, idmapped mount, mask) happens here, as root; the
namespaces themselves are made by the C helper (enter.py).  Paths: layout.py.

A job's prolog and epilog import this module too, and start a Python process per job
on every node: the FUSE stack (sdeefs.fs.mount: pyfuse3, trio, the overlay) is imported
only by the functions that mount a login view, so a job pays none of its import time.
"""

from __future__ import annotations

import glob
import logging
import os
import pwd
import subprocess
from collections.abc import Callable

import attrs

from sdeefs import mountinfo
from sdeefs.config import Engine, Guard, GuardDaemon, SiteConfig
from sdeefs.errors import ExitCode, QuietError
from sdeefs.fs import kernel
from sdeefs.fs.daemon import daemon_pid
from sdeefs.fs.mask import MaskSpec, build_mask
from sdeefs.identity import Identity, format_map
from sdeefs.sysio import filesystem_ids

from . import enter, migrate, slurm
from .compute import private
from .layout import EnvDirs, RunDirs
from .procs import InitProcess

log = logging.getLogger(__name__)

MASK_OPAQUE = b"user.overlay.opaque"  # the environment's overlay is mounted userxattr
ALWAYS_EMPTY = ("/proc", "/sys", "/dev", "/run", "/tmp")  # the environment mounts its own
# Denied directories the environment gets an empty one of, its own (in the upper), rather
# than none: package tools write their logs there.
OWN_WHEN_DENIED = ("/var/log",)


@attrs.frozen
class User:
    """Whose environment: the passwd entry that decides its ids and home."""

    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def lookup(cls, name: str) -> User:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise QuietError(f"no such user: {name}", ExitCode.USAGE) from None
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)


def mounted(path: str) -> bool:
    return os.path.realpath(path) in mount_targets()


def mount_targets() -> set[str]:
    """Where something is mounted in this mount namespace (/proc/self/mountinfo)."""
    return mountinfo.points()


def detach(path: str) -> None:
    """Unmount ``path`` if something is mounted there, lazily if it is busy."""
    if mounted(path):
        result = subprocess.run(["umount", path], capture_output=True, text=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True)


def is_inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def mkdir_as(path: str, mode: int, uid: int, gid: int) -> None:
    """mkdir as ``uid``/``gid`` (this thread's fsuid/fsgid): through the journaling daemon,
    whose id door refuses host root as a creator, the directory is the user's from its
    journal record on.  The parent is opened as root first: the user may not traverse
    the root-owned directories above it."""
    parent = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with filesystem_ids(uid, gid):
            os.mkdir(os.path.basename(path), mode, dir_fd=parent)
    finally:
        os.close(parent)


# -- the mask ---------------------------------------------------------------------------------


def scan_skip(config: SiteConfig) -> tuple[str, ...]:
    """What the scan for root-only entries (compute/private.py) does not descend into."""
    return tuple(os.path.join(config.lower, p.lstrip("/")) for p in
                 (*ALWAYS_EMPTY, "home", config.root, config.run_dir))


def masked_matches(config: SiteConfig) -> list[tuple[str, str]]:
    """(pattern, path in the lower) for every entry the deny list, sdeefs' own directories
    and the environment's own mountpoints name now: what the mask hides or empties, before
    the scan for root-only entries (a few globs: cheap, unlike the mask itself)."""
    return [(pattern, path)
            for pattern in (*ALWAYS_EMPTY, config.root, config.run_dir, *config.deny)
            for path in sorted(glob.glob(os.path.join(config.lower, pattern.lstrip("/"))))]


def private_scan(config: SiteConfig) -> list[bytes]:
    """The cached scan for root-only entries, refreshed if missing or too old."""
    return private.private_paths(config.lower, config.run_dir, scan_skip(config),
                                 config.private_scan_age, config.min_uid)


def mask_spec(config: SiteConfig, user: User, scan_private: bool = True) -> MaskSpec:
    lower = config.lower
    empty: list[bytes] = []
    hidden: list[bytes] = []
    needed = (user.home, *config.shared)  # mountpoints that must stay reachable
    for pattern, path in masked_matches(config):
        rel = os.fsencode(os.path.relpath(path, lower))
        # A denied directory (and sdeefs' own) vanishes (a whiteout), unless a bind mount
        # goes inside it (/home) or the environment mounts something there (/proc): then
        # it is emptied.  An emptied secret directory would keep its owner and mode
        # (/etc/munge: 0700, munge), and "permission denied" tells more than "no such file".
        keep = pattern in (*ALWAYS_EMPTY, *OWN_WHEN_DENIED) or \
            any(is_inside(p, "/" + os.fsdecode(rel)) for p in needed)
        if os.path.isdir(path) and not os.path.islink(path) and keep:
            empty.append(rel)
        else:
            hidden.append(rel)
    covered = set(empty) | set(hidden)
    scanned = private_scan(config) if scan_private else []
    for rel in scanned:
        if not _below_any(rel, covered, itself=True):
            full = os.path.join(os.fsencode(lower), rel)
            (empty if os.path.isdir(full) and not os.path.islink(full) else hidden).append(rel)
    # Nothing inside a vanished entry: its whiteout already hides all of it.  No whiteout
    # inside an emptied directory either: nothing below it shows, and overlayfs lists a
    # whiteout in a directory it does not merge as a broken entry ("c?????????", /run/sdeefs).
    gone = set(hidden)
    empty = [e for e in empty if not _below_any(e, gone)]
    covering = gone | set(empty)  # once: in the loop it made this quadratic (13,000 root-only
    hidden = [h for h in hidden if not _below_any(h, covering)]  # paths here: 12 s a job)
    mountpoints = [os.fsencode(p.lstrip("/")) for p in (user.home, *config.shared)
                   if any(is_inside(p, "/" + os.fsdecode(e)) for e in empty)]
    return MaskSpec(tuple(dict.fromkeys(empty)), tuple(dict.fromkeys(hidden)),
                    tuple(mountpoints))


def _below_any(rel: bytes, dirs: set[bytes], itself: bool = False) -> bool:
    """Is ``rel`` inside one of ``dirs`` (or one of them, with ``itself``)?  One set lookup
    per ancestor: the private scan can list thousands of paths."""
    if itself and rel in dirs:
        return True
    parts = rel.split(b"/")
    return any(b"/".join(parts[:i]) in dirs for i in range(1, len(parts)))


# -- the daemons of a login's root ------------------------------------------------------------


def _ensure_upper_daemon(config: SiteConfig, dirs: EnvDirs, ids: Identity) -> None:
    """Engine hybrid: the journaling passthrough of the upper, healthy (recovered after a crash)."""
    from sdeefs.fs.mount import MountRequest, mount_passthrough

    state = dirs.layer.state
    if mounted(state.mnt):
        try:
            os.stat(os.path.join(state.mnt, "upper"))
            if daemon_pid(state.path) is not None:
                return
        except OSError:
            pass
        log.warning("%s: the upper daemon died; remounting (the journal recovers)", state.mnt)
        detach(state.mnt)
    mount_passthrough(MountRequest(mountpoint=state.mnt, upper=dirs.layer.upper,
                                   state=state.path, lower="/", engine=Engine.FUSE,
                                   cache_timeout=config.cache_timeout, ids=ids,
                                   xattr_namespace="user", writeback_cache=False))


def _begin_guard(config: SiteConfig, ids: Identity, run: RunDirs,
                 daemon: Guard) -> Callable[[], str]:
    """Make sure the guard layer (sdeefs.fs.guard) of the user's view is mounted and healthy
    (remounted if its daemon died).  Its daemon starts now; the returned call waits for it,
    so that the upper's daemon can start meanwhile."""
    from sdeefs.fs.mount import GuardRequest, begin_guard

    if mounted(run.guard):
        try:
            os.statvfs(run.guard)
            return lambda: run.guard
        except OSError:  # ENOTCONN: the daemon is gone
            log.warning("%s: the guard daemon died; remounting", run.guard)
            detach(run.guard)
    os.makedirs(run.guard, mode=0o700, exist_ok=True)
    wait = begin_guard(GuardRequest(mountpoint=run.guard, lower=config.lower, ids=ids,
                                    deny=config.deny, log=run.guard_log, pid_file=run.guard_pid,
                                    cache_timeout=config.cache_timeout,
                                    daemon=GuardDaemon(daemon)))

    def wait_mounted() -> str:
        wait()
        return run.guard

    return wait_mounted


def _ensure_fuse_view(config: SiteConfig, ids: Identity, dirs: EnvDirs) -> str:
    """Engine fuse: the pure sdeefs overlay of the host root and the user's upper."""
    from sdeefs.fs.mount import MountRequest, mount

    view = dirs.run.view
    if mounted(view):
        try:
            os.statvfs(view)
            return view
        except OSError:
            log.warning("%s: the daemon died; remounting (the journal recovers)", view)
            detach(view)
    os.makedirs(view, mode=0o700, exist_ok=True)
    own_when_denied = tuple(p for p in OWN_WHEN_DENIED if p in config.deny)
    # The same view as the other engines: owners as the idmapped lower shows them, the deny
    # list and what the user cannot read on the host are hidden (sdeefs.fs.guard's rules),
    # sdeefs' own trees vanish, and /proc, /dev, /home, /var/log ... are empty directories
    # (for the environment's own mounts, or its own files).
    mount(MountRequest(mountpoint=view, upper=dirs.layer.upper, state=dirs.layer.state.path,
                       lower=config.lower, engine=Engine.FUSE,
                       excludes=tuple(p for p in (*ALWAYS_EMPTY, "/home", *own_when_denied)
                                      if os.path.isdir(os.path.join(config.lower, p[1:]))),
                       cache_timeout=config.cache_timeout, node_limit=config.fuse_nodes,
                       xattr_namespace="user", ids=ids,
                       deny=tuple(d for d in (*config.deny, config.root, config.run_dir)
                                  if d not in own_when_denied)))
    return view


# -- starting ---------------------------------------------------------------------------------


@attrs.frozen
class LoginStart:
    """A login environment just started: its init, the guard it got (None: engine fuse)
    and, with the BPF guard, its key in the program's map (the user's uid: bpfguard.py)."""

    init: InitProcess
    guard: Guard | None
    guard_key: int = 0


def start_login(config: SiteConfig, user: User, ids: Identity, dirs: EnvDirs,
                engine: Engine) -> LoginStart:
    """The daemons and mounts of a login environment of ``engine``, then its namespaces.

    The caller made ``dirs`` (env.py) and holds the environment's lock.  The guard is
    chosen first (launcher/login/bpfguard.py): ``guard = "bpf"`` where the program cannot
    run fails here, before anything is mounted.
    """
    from .login import bpfguard

    choice = bpfguard.choose(config, engine, ids)
    log.debug("%s: %s", user.name, choice.why)
    if engine == Engine.FUSE:
        from sdeefs.fs.mount import umount  # (the FUSE stack: only where a login mounts it)

        if migrate.needed(dirs, ids) and not mounted(dirs.run.view):
            _ensure_upper_daemon(config, dirs, ids)  # the chowns journaled, for replicas
            try:
                migrate.chown_tree(os.path.join(dirs.layer.state.mnt, "upper"), ids)
            finally:
                umount(dirs.layer.state.mnt)
            migrate.mark(dirs, ids)
        return LoginStart(_start_namespaces(config, user, ids,
                                            ["--root-view", _ensure_fuse_view(config, ids, dirs)]),
                          None)
    guard_key = 0
    if choice.guard == Guard.BPF:
        detach(dirs.run.guard)  # an earlier environment's guard layer: not below this one
        # Before the namespace exists: the user can join it from then on (bpfguard.py)
        try:
            guard_key = bpfguard.BpfGuard(config.run_dir).add(config, ids)
        except (OSError, QuietError) as exc:
            raise bpfguard.GuardError(f"the BPF guard cannot guard {user.name}: {exc}",
                                      ExitCode.UNAVAILABLE) from None
        guard: Callable[[], str | None] = lambda: None  # noqa: E731
    else:
        guard = _begin_guard(config, ids, dirs.run, choice.guard or Guard.C)
    try:
        if engine == Engine.HYBRID:
            _ensure_upper_daemon(config, dirs, ids)
            mnt = dirs.layer.state.mnt
            upper = os.path.join(mnt, "upper")
            work = os.path.join(mnt, "work", "ovl")  # made through the daemon: journaled
        elif engine == Engine.KERNEL:
            upper, work = ensure_kernel_layer(config, ids, dirs)
        else:
            upper, work = dirs.layer.upper, os.path.join(dirs.layer.state.work, "ovl")
        if migrate.needed(dirs, ids):
            migrate.chown_tree(upper, ids)
            migrate.mark(dirs, ids)
    finally:
        guard_path = guard()  # waited for in any case: no daemon is left unreported
    init = launch(config, user, ids, dirs.run, upper, work, guard=guard_path)
    return LoginStart(init, choice.guard, guard_key)


def idmap_lower(config: SiteConfig, user: User, ids: Identity, target: str) -> None:
    """The idmapped read-only bind of the host root at ``target`` (module docstring)."""
    enter.run(["idmap", "--uid", str(user.uid), "--gid", str(user.gid),
               "--uid-map", format_map(ids.lower_uid_map()),
               "--gid-map", format_map(ids.lower_gid_map()), config.lower, target])


def launch(config: SiteConfig, user: User, ids: Identity, run: RunDirs, upper: str, work: str,
           middle: tuple[str, ...] = (), guard: str | None = None,
           host_pids: bool = False, layers: tuple[str, ...] | None = None,
           tmp_dir: str | None = None, scratch: bool = False) -> InitProcess:
    """Start the namespaces of an environment over ``upper``, the ``middle`` lowers (a
    replica of the user's upper, on compute nodes) and the masked, idmapped host root.

    With a ``guard`` layer (logins) root-only host entries are hidden as they are
    looked up; without one (jobs: no daemon on compute nodes) the cached scan of
    compute/private.py hides those that existed when it ran.  ``host_pids`` (jobs): no PID
    namespace of its own and the host's /proc, for tasks that join it later (the SPANK
    plugin, launcher/compute/job.py).  ``layers``: the mask (if any) and the idmapped lower
    made already (a job's: the user's, shared by their jobs on the node, compute/job.py),
    instead of this environment's own at ``run.mask`` and ``run.lower``.  ``tmp_dir``
    (jobs): the host directory that is the environment's /tmp (bound; else a tmpfs of
    ``tmp_size``).  ``scratch`` (jobs): ``upper`` is discarded when the environment ends,
    mounted "volatile" (``sdeefs-enter start --volatile``): never synced, a copy-up does not
    fsync the file it copied (launcher/compute/job.py).
    """
    if not os.path.isdir(work):
        mkdir_as(work, 0o700, user.uid, user.gid)
    if layers is not None:
        lowers = list(layers)
    else:
        if not mounted(run.lower):
            idmap_lower(config, user, ids, run.lower)
        lowers = [run.lower] if guard is None else [guard, run.lower]
        if build_mask(run.mask, config.lower, mask_spec(config, user, guard is None),
                      MASK_OPAQUE, ids.shown):
            lowers.insert(0, run.mask)
    lowers[:0] = middle  # the user's own layer is above the mask, as the upper is at login
    root = []
    for lower in lowers:
        root += ["--root-lower", lower]
    return _start_namespaces(config, user, ids,
                             [*root, "--root-upper", upper, "--root-work", work,
                              *(["--host-pids"] if host_pids else []),
                              *(["--volatile"] if scratch else [])], tmp_dir,
                             run.starting if os.path.isdir(run.private) else None)


def _start_namespaces(config: SiteConfig, user: User, ids: Identity,
                      root: list[str], tmp_dir: str | None = None,
                      starting: str | None = None) -> InitProcess:
    """sdeefs-enter start: the namespaces and init of an environment whose root is ``root``
    (its --root-* options), its /tmp ``tmp_dir`` bound (else a tmpfs).  ``starting``
    (``RUN/private/starting``): where its output, the init's pid, stays, so that an
    environment whose starter died before recording it is found (env.teardown)."""
    args = ["start", "--uid", str(user.uid), "--gid", str(user.gid),
            "--uid-map", format_map(ids.env_uid_map()),
            "--gid-map", format_map(ids.env_gid_map()),
            *root, "--home", user.home,
            *(["--tmp-dir", tmp_dir] if tmp_dir else ["--tmp-size", config.tmp_size])]
    for shared in config.shared:
        if os.path.isdir(shared):
            args += ["--bind", f"{shared}:{shared}"]
    for socket_dir in config.sockets:  # munge, nscd, sssd: what the host's clients talk to
        if os.path.exists(socket_dir):
            args += ["--bind", f"{socket_dir}:{socket_dir}"]
    args += slurm.shim_binds(config)
    init = InitProcess.find(int(enter.run(args, starting).strip()))
    if init is None:
        raise QuietError(f"the environment of {user.name} died while starting", ExitCode.FAILURE)
    return init


def refresh_private_scan(config: SiteConfig) -> list[bytes]:
    """``sdeefs scan-private``: scan the lower for root-only entries now (for new jobs)."""
    return private.refresh(config.lower, config.run_dir, scan_skip(config), config.min_uid)


# -- engine kernel ------------------------------------------------------------------------------


def ensure_kernel_layer(config: SiteConfig, ids: Identity, dirs: EnvDirs) -> tuple[str, str]:
    """Engine kernel: the user's layer image mounted at ROOT/U/layer and its capture
    running (supervised), before the overlay exists; (upper, work) on the image.

    The capture starts before the overlay is mounted: its filesystem mark is set
    before anything of this environment can change the upper, and its start scan
    (also after an unclean stop: e2fsck first, sdeefs.fs.image) settles what an
    earlier run left unjournaled.
    """
    layer = dirs.layer
    upper, work = kernel.open_layer(layer.image, layer.layer, config.layer_size, *ids.root)
    kernel.start_capture(layer.layer, layer.state.path, capture_log(dirs))
    return upper, work


def capture_log(dirs: EnvDirs) -> str:
    return os.path.join(dirs.layer.state.path, "capture.log")
