"""Per-user environments: create, join, count sessions, stop, report.

An environment of user U is a tree of processes under one init process
(``sdeefs-init``, PID 1 of its own PID namespace), in U's own user namespace
(inside uid 0 = host uid U) and mount namespace, whose root is kernel overlayfs
over four layers::

    upper  ROOT/U/upper        through the journaling sdeefs passthrough at
                               ROOT/U/state/mnt (engine hybrid), or directly
                               (engine overlay, no journal)
    mask   RUN/U/private/mask  tmpfs: empties /proc, /dev, /home ... (mountpoints),
                               hides sdeefs' own directories and what the deny
                               list names at start
    guard  RUN/U/private/guard sdeefs.fs.guard (FUSE, read-only): hides, when first
                               looked up, whatever the deny list matches and
                               whatever only root may read on the host, also
                               entries created after the environment started
    lower  RUN/U/private/lower idmapped read-only bind of the host root:
                               host root shows as U, so "root-owned" files are
                               the user's to change inside (copy-up)

Privileged set-up (daemons, idmapped mount, mask) happens here, as root, at
session open (the PAM hook); the namespaces themselves are made by the small
C helper ``sdeefs-enter`` (launcher/sdeefs-enter.c), which also joins them.

Directory ownership keeps the user on the host from bypassing the journal:
ROOT/U and RUN/U are root's (0700); only the layer directories inside belong
to U, reachable by U only through the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import attrs

from sdeefs.config import Engine, SiteConfig
from sdeefs.errors import ExitCode, QuietError
from sdeefs.fs.daemon import daemon_pid
from sdeefs.fs.mask import MaskSpec, build_mask
from sdeefs.fs.mount import (
    GuardRequest,
    MountRequest,
    begin_guard,
    mount,
    mount_passthrough,
    umount,
)

from . import private

log = logging.getLogger(__name__)

ALWAYS_EMPTY = ("/proc", "/sys", "/dev", "/run", "/tmp")


@attrs.frozen
class User:
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


@attrs.frozen
class Layout:
    """Where everything of one user lives."""

    root: str
    run: str

    @classmethod
    def of(cls, config: SiteConfig, user: User) -> Layout:
        return cls(config.user_root(user.name), config.user_run(user.name))

    upper = property(lambda self: os.path.join(self.root, "upper"))
    state = property(lambda self: os.path.join(self.root, "state"))
    work = property(lambda self: os.path.join(self.root, "state", "work"))
    fuse = property(lambda self: os.path.join(self.root, "state", "mnt"))
    # RUN/U is 0711: the user reads RUN/U/init (pid and start time of the environment's
    # init, for sdeefs-shell) but nothing in RUN/U/private, whose idmapped view of the
    # host root would show root's files as the user's.
    private = property(lambda self: os.path.join(self.run, "private"))
    lower = property(lambda self: os.path.join(self.run, "private", "lower"))
    mask = property(lambda self: os.path.join(self.run, "private", "mask"))
    guard = property(lambda self: os.path.join(self.run, "private", "guard"))
    view = property(lambda self: os.path.join(self.run, "private", "view"))  # engine fuse
    record = property(lambda self: os.path.join(self.run, "private", "env.json"))
    lock = property(lambda self: os.path.join(self.run, "private", "lock"))
    init = property(lambda self: os.path.join(self.run, "init"))


@attrs.frozen
class EnvRecord:
    """RUN/U/env.json: the running environment."""

    user: str
    uid: int
    init_pid: int
    init_start: int  # /proc/PID/stat start time: guards against a recycled pid
    holder_pid: int  # the init's parent (outside the PID namespace); it exits with the init
    engine: str
    sessions: int
    started: float
    last_logout: float = 0.0

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(attrs.asdict(self), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> EnvRecord | None:
        try:
            with open(path) as f:
                return cls(**json.load(f))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None


def helper_path() -> str:
    """The compiled sdeefs-enter (built by scripts/setup.sh next to the Python)."""
    path = os.environ.get("SDEEFS_ENTER") or os.path.join(os.path.dirname(sys.executable),
                                                           "sdeefs-enter")
    if not os.access(path, os.X_OK):
        raise QuietError(f"{path} is missing: run scripts/setup.sh to build sdeefs-enter",
                         ExitCode.UNAVAILABLE)
    return path


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def proc_start_time(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and fields[0] != "Z" else None


def _running(pid: int, uid: int) -> bool:
    """Is ``pid`` a live (not zombie) process of ``uid``?"""
    fields = _proc_stat(pid)
    if fields is None or fields[0] == "Z":
        return False
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid
    except OSError:
        return False


def is_alive(record: EnvRecord) -> bool:
    if proc_start_time(record.init_pid) != record.init_start:
        return False
    try:
        with open(f"/proc/{record.init_pid}/comm") as f:
            return f.read().strip() == "sdeefs-init"
    except OSError:
        return False


@contextlib.contextmanager
def user_lock(layout: Layout) -> Iterator[None]:
    """Serialise the set-up and tear-down of one user's environment (parallel logins)."""
    _ensure_run_dirs(layout)
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _ensure_run_dirs(layout: Layout) -> None:
    for path, mode in ((os.path.dirname(layout.run), 0o755), (layout.run, 0o711),
                       (layout.private, 0o700)):
        os.makedirs(path, mode=mode, exist_ok=True)
        os.chmod(path, mode)


def _ensure_dirs(layout: Layout, user: User) -> None:
    for path, owner, mode in ((os.path.dirname(layout.root), None, 0o755),
                              (layout.root, None, 0o700), (layout.upper, user, 0o700),
                              (layout.state, None, 0o700), (layout.work, user, 0o700),
                              (layout.fuse, None, 0o700), (layout.lower, None, 0o700)):
        os.makedirs(path, mode=mode, exist_ok=True)
        uid, gid = (user.uid, user.gid) if owner else (0, 0)
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(path, uid, gid)
        if st.st_mode & 0o7777 != mode:
            os.chmod(path, mode)


def _mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _umount(path: str) -> None:
    if _mounted(path):
        result = subprocess.run(["umount", path], capture_output=True, text=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", path], capture_output=True)


def _ensure_upper_daemon(config: SiteConfig, layout: Layout) -> None:
    """Engine hybrid: the journaling passthrough of the upper, healthy (recovered after a crash)."""
    if _mounted(layout.fuse):
        try:
            os.stat(os.path.join(layout.fuse, "upper"))
            if daemon_pid(layout.state) is not None:
                return
        except OSError:
            pass
        log.warning("%s: the upper daemon died; remounting (the journal recovers)", layout.fuse)
        _umount(layout.fuse)
    mount_passthrough(MountRequest(mountpoint=layout.fuse, upper=layout.upper,
                                   state=layout.state, lower="/", engine=Engine.FUSE,
                                   cache_timeout=config.cache_timeout,
                                   xattr_namespace="user", writeback_cache=False))


def _begin_guard(config: SiteConfig, user: User, layout: Layout) -> Callable[[], str]:
    """Make sure the guard layer (sdeefs.fs.guard) of the user's view is mounted and healthy
    (remounted if its daemon died).  Its daemon starts now; the returned call waits for it,
    so that the upper's daemon can start meanwhile."""
    if _mounted(layout.guard):
        try:
            os.statvfs(layout.guard)
            return lambda: layout.guard
        except OSError:  # ENOTCONN: the daemon is gone
            log.warning("%s: the guard daemon died; remounting", layout.guard)
            _umount(layout.guard)
    os.makedirs(layout.guard, mode=0o700, exist_ok=True)
    wait = begin_guard(GuardRequest(mountpoint=layout.guard, lower=config.lower, uid=user.uid,
                                    gid=user.gid, deny=config.deny,
                                    log=os.path.join(layout.private, "guard.log"),
                                    cache_timeout=config.cache_timeout))

    def mounted() -> str:
        wait()
        return layout.guard

    return mounted


def _mask_spec(config: SiteConfig, user: User, scan_private: bool = True) -> MaskSpec:
    lower = config.lower
    empty: list[bytes] = []
    hidden: list[bytes] = []
    needed = (user.home, *config.shared)  # mountpoints that must stay reachable
    for pattern in (*ALWAYS_EMPTY, config.root, config.run_dir, *config.deny):
        for path in sorted(glob.glob(os.path.join(lower, pattern.lstrip("/")))) or []:
            rel = os.fsencode(os.path.relpath(path, lower))
            # A denied directory (and sdeefs' own) vanishes (a whiteout), unless a bind mount
            # goes inside it (/home) or the environment mounts something there (/proc): then
            # it is emptied.  An emptied secret directory would keep its owner and mode
            # (/etc/munge: 0700, munge), and "permission denied" tells more than "no such file".
            keep = pattern in ALWAYS_EMPTY or any(_inside(p, "/" + os.fsdecode(rel))
                                                  for p in needed)
            if os.path.isdir(path) and not os.path.islink(path) and keep:
                empty.append(rel)
            else:
                hidden.append(rel)
    skip = tuple(os.path.join(lower, p.lstrip("/")) for p in
                 (*ALWAYS_EMPTY, "home", config.root, config.run_dir))
    covered = set(empty) | set(hidden)
    scanned = private.private_paths(lower, config.run_dir, skip, config.private_scan_age) \
        if scan_private else []
    for rel in scanned:
        if not _below_any(rel, covered, itself=True):
            full = os.path.join(os.fsencode(lower), rel)
            (empty if os.path.isdir(full) and not os.path.islink(full) else hidden).append(rel)
    # Nothing inside a vanished entry: its whiteout already hides all of it.
    gone = set(hidden)
    empty = [e for e in empty if not _below_any(e, gone)]
    hidden = [h for h in hidden if not _below_any(h, gone)]
    mountpoints = [os.fsencode(p.lstrip("/")) for p in (user.home, *config.shared)
                   if any(_inside(p, "/" + os.fsdecode(e)) for e in empty)]
    return MaskSpec(tuple(dict.fromkeys(empty)), tuple(dict.fromkeys(hidden)),
                    tuple(mountpoints))


def _below_any(rel: bytes, dirs: set[bytes], itself: bool = False) -> bool:
    """Is ``rel`` inside one of ``dirs`` (or one of them, with ``itself``)?  One set lookup
    per ancestor: the private scan can list thousands of paths."""
    if itself and rel in dirs:
        return True
    parts = rel.split(b"/")
    return any(b"/".join(parts[:i]) in dirs for i in range(1, len(parts)))


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _run_helper(args: list[str]) -> str:
    result = subprocess.run([helper_path(), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise QuietError(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                         else f"sdeefs-enter {args[0]} failed ({result.returncode})",
                         ExitCode.FAILURE)
    return result.stdout


def _ensure_view(config: SiteConfig, user: User, layout: Layout) -> str:
    """Engine fuse: the pure sdeefs overlay of the host root and the user's upper."""
    if _mounted(layout.view):
        try:
            os.statvfs(layout.view)
            return layout.view
        except OSError:
            log.warning("%s: the daemon died; remounting (the journal recovers)", layout.view)
            _umount(layout.view)
    os.makedirs(layout.view, mode=0o700, exist_ok=True)
    # The same view as the other engines: host root shows as the user, the deny list and
    # root-only entries are hidden (sdeefs.fs.guard's rules), sdeefs' own trees vanish, and
    # /proc, /dev, /home ... are empty directories for the environment's own mounts.
    mount(MountRequest(mountpoint=layout.view, upper=layout.upper, state=layout.state,
                       lower=config.lower, engine=Engine.FUSE,
                       excludes=tuple(p for p in (*ALWAYS_EMPTY, "/home")
                                      if os.path.isdir(os.path.join(config.lower, p[1:]))),
                       cache_timeout=config.cache_timeout, xattr_namespace="user",
                       root_owner=(user.uid, user.gid),
                       deny=(*config.deny, config.root, config.run_dir)))
    return layout.view


def _start(config: SiteConfig, user: User, layout: Layout, engine: str) -> EnvRecord:
    _ensure_dirs(layout, user)
    if engine == "fuse":
        return _start_namespaces(config, user, ["--root-view", _ensure_view(config, user, layout)],
                                 engine)
    guard = _begin_guard(config, user, layout)
    try:
        if engine == "hybrid":
            _ensure_upper_daemon(config, layout)
            upper = os.path.join(layout.fuse, "upper")
            work = os.path.join(layout.fuse, "work", "ovl")  # made through the daemon: journaled
        else:
            upper, work = layout.upper, os.path.join(layout.work, "ovl")
    finally:
        guard_path = guard()  # waited for in any case: no daemon is left unreported
    return launch(config, user, layout, upper, work, engine, guard=guard_path)


def launch(config: SiteConfig, user: User, layout: Layout, upper: str, work: str, engine: str,
           middle: tuple[str, ...] = (), guard: str | None = None) -> EnvRecord:
    """Start the namespaces of an environment over ``upper``, the ``middle`` lowers (a
    replica of the user's upper, on compute nodes) and the masked, idmapped host root.

    With a ``guard`` layer (logins) root-only host entries are hidden as they are
    looked up; without one (jobs: no daemon on compute nodes) the cached scan of
    launcher/private.py hides those that existed when it ran.
    """
    if not os.path.isdir(work):
        os.mkdir(work, 0o700)
        os.chown(work, user.uid, user.gid)
    if not _mounted(layout.lower):
        _run_helper(["idmap", "--uid", str(user.uid), "--gid", str(user.gid), config.lower,
                     layout.lower])

    def as_user(uid: int, gid: int) -> tuple[int, int]:  # host root shows as the user
        return (user.uid if uid == 0 else uid, user.gid if gid == 0 else gid)

    lowers = [layout.lower] if guard is None else [guard, layout.lower]
    if build_mask(layout.mask, config.lower, _mask_spec(config, user, guard is None),
                  b"user.overlay.opaque", as_user):
        lowers.insert(0, layout.mask)
    lowers[:0] = middle  # the user's own layer is above the mask, as the upper is at login
    root = []
    for lower in lowers:
        root += ["--root-lower", lower]
    return _start_namespaces(config, user, [*root, "--root-upper", upper, "--root-work", work],
                             engine)


def _start_namespaces(config: SiteConfig, user: User, root: list[str], engine: str) -> EnvRecord:
    """sdeefs-enter start: the namespaces and init of an environment whose root is ``root``
    (its --root-* options)."""
    args = ["start", "--uid", str(user.uid), "--gid", str(user.gid), *root, "--home", user.home,
            "--tmp-size", config.tmp_size]
    for shared in config.shared:
        if os.path.isdir(shared):
            args += ["--bind", f"{shared}:{shared}"]
    pid = int(_run_helper(args).strip())
    fields = _proc_stat(pid)
    start = proc_start_time(pid)
    if start is None or fields is None:
        raise QuietError(f"the environment of {user.name} died while starting", ExitCode.FAILURE)
    return EnvRecord(user.name, user.uid, pid, start, int(fields[1]), engine, 0,
                     time.time())


def _usable(layout: Layout, record: EnvRecord | None) -> bool:
    """Is the environment running, with the daemons its view depends on alive?

    A view whose guard or journaling daemon died fails every lookup that needs it
    (ENOTCONN): the next login replaces it (journal replay) rather than joining it.
    """
    if record is None or not is_alive(record):
        return False
    # statfs always reaches the daemon (a stat may be answered from the kernel's cache)
    needed = {"fuse": [layout.view], "hybrid": [layout.guard, layout.fuse]}.get(
        record.engine, [layout.guard])
    try:
        for path in needed:
            os.statvfs(path)
    except OSError:
        log.warning("the environment of %s lost a daemon: starting it anew", record.user)
        return False
    return all(_mounted(path) for path in needed)


def ensure(config: SiteConfig, user: User, engine: str | None = None) -> EnvRecord:
    """The user's running environment, started if needed (no session counted).

    ``engine`` (default: the config's) applies to a new environment; a running one of
    another engine is an error: its sessions share it.
    """
    layout = Layout.of(config, user)
    with user_lock(layout):
        record = EnvRecord.load(layout.record)
        if record is not None and _usable(layout, record):
            if engine is not None and engine != record.engine:
                raise QuietError(f"the environment of {user.name} runs the {record.engine} "
                                 f"engine ({record.sessions} session(s)); stop it first to "
                                 f"start it with {engine}", ExitCode.BUSY)
            return record
        _teardown(layout, record)
        record = _start(config, user, layout, engine or config.engine)
        _save(layout, record)
        return record


def _save(layout: Layout, record: EnvRecord) -> None:
    record.save(layout.record)
    tmp = layout.init + ".tmp"
    with open(tmp, "w") as f:  # read by sdeefs-shell (launcher/sdeefs-enter.c)
        f.write(f"{record.init_pid} {record.init_start} {record.engine}\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, layout.init)


def open_session(config: SiteConfig, user: User) -> EnvRecord:
    layout = Layout.of(config, user)
    with user_lock(layout):
        record = EnvRecord.load(layout.record)
        if record is None or not _usable(layout, record):
            _teardown(layout, record)
            record = _start(config, user, layout, config.engine)
        record = attrs.evolve(record, sessions=record.sessions + 1)
        _save(layout, record)
        return record


def close_session(config: SiteConfig, user: User) -> None:
    """One session fewer; the last one ends the environment (unless idle_timeout keeps it)."""
    layout = Layout.of(config, user)
    with user_lock(layout):
        record = EnvRecord.load(layout.record)
        if record is None:
            return
        record = attrs.evolve(record, sessions=max(0, record.sessions - 1),
                              last_logout=time.time())
        if record.sessions == 0 and config.idle_timeout == 0:
            _teardown(layout, record)
            return
        _save(layout, record)


def stop(config: SiteConfig, user: User) -> bool:
    """End the environment: its whole process tree, then its mounts.  The upper stays."""
    layout = Layout.of(config, user)
    with user_lock(layout):
        record = EnvRecord.load(layout.record)
        running = record is not None and is_alive(record)
        _teardown(layout, record)
        return running


def stop_idle(config: SiteConfig) -> list[str]:
    """Stop environments without sessions for longer than idle_timeout (run from cron)."""
    stopped = []
    for record in _records(config):
        idle = time.time() - record.last_logout
        if record.sessions == 0 and idle >= config.idle_timeout and \
                stop(config, User.lookup(record.user)):
            stopped.append(record.user)
    return stopped


def _teardown(layout: Layout, record: EnvRecord | None) -> None:
    if record is not None and is_alive(record):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.init_pid, signal.SIGKILL)  # the PID namespace dies with its init
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
                is_alive(record) or _running(record.holder_pid, record.uid)):
            time.sleep(0.01)
    for path in (layout.mask, layout.guard, layout.lower):
        _umount(path)
    for view in (layout.fuse, layout.view):
        if _mounted(view):
            try:
                umount(view)
            except QuietError:
                _umount(view)
    for path in (layout.init, layout.record):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _records(config: SiteConfig) -> list[EnvRecord]:
    found = []
    if os.path.isdir(config.run_dir):
        for name in sorted(os.listdir(config.run_dir)):
            if not os.path.isdir(os.path.join(config.run_dir, name)):
                continue  # e.g. the private-paths cache
            record = EnvRecord.load(os.path.join(config.run_dir, name, "private", "env.json"))
            if record is not None:
                found.append(record)
    return found


def namespace_processes(pid: int) -> int:
    """How many processes live in the PID namespace of ``pid``."""
    try:
        target = os.readlink(f"/proc/{pid}/ns/pid_for_children")
        own = os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return 0
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") in (own, target):
                    count += 1
    return count


def _tree_size(path: str) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def status(config: SiteConfig) -> list[dict[str, object]]:
    """One dict per known user environment, for ``sdeefs status``."""
    from sdeefs.journal import Journal

    rows = []
    users = set()
    if os.path.isdir(config.root):
        users |= set(os.listdir(config.root))
    records = {r.user: r for r in _records(config)}
    users |= set(records)
    for name in sorted(users):
        record = records.get(name)
        state = os.path.join(config.user_root(name), "state")
        head = 0
        journal_dir = os.path.join(state, "journal")
        if os.path.isdir(journal_dir):
            with contextlib.suppress(Exception):
                segments = Journal(directory=journal_dir).segments()
                if segments:
                    for entry in Journal(directory=journal_dir).read(segments[-1][0]):
                        head = entry.seq
        alive = record is not None and is_alive(record)
        rows.append({
            "user": name,
            "running": alive,
            "engine": record.engine if record else None,
            "init_pid": record.init_pid if alive and record else None,
            "sessions": record.sessions if record else 0,
            "processes": namespace_processes(record.init_pid) if alive and record else 0,
            "upper_mount": os.path.join(state, "mnt") if _mounted(os.path.join(state, "mnt"))
            else None,
            "guard_mount": guard if _mounted(guard := os.path.join(
                config.user_run(name), "private", "guard")) else None,
            "daemon_pid": daemon_pid(state) if os.path.isdir(state) else None,
            "upper_bytes": _tree_size(os.path.join(config.user_root(name), "upper")),
            "journal_head": head,
        })
    return rows


def remove_user_data(config: SiteConfig, user: User) -> None:
    """Delete a user's layers (admin action; the environment must be stopped)."""
    stop(config, user)
    shutil.rmtree(config.user_root(user.name), ignore_errors=True)
    shutil.rmtree(config.user_run(user.name), ignore_errors=True)
