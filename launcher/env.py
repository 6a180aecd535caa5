"""Per-user environments: create, count sessions, stop, report.  The launcher's public API.

An environment of user U is a tree of processes under one init process
(``sdeefs-init``, PID 1 of its own PID namespace), in U's own user namespace
(inside root = U's first subordinate uid, U's own uid = itself: docs/identity.md) and
mount namespace, over a root that view.py builds.
Every session of U shares the one environment; its record (:class:`EnvRecord`) says
which process is its init, which engine its root runs and how many sessions use it.

The API (what the command line, the PAM hook, sdeefs-launchd and the jobs call)::

    User, EnvRecord                   who, and the running environment (RUN/U/private/env.json)
    ensure(config, user, engine)      the running environment, started if needed (no session)
    open_session, close_session       the PAM hook: one session more or fewer; after the last
                                      one the environment lingers while its processes run,
                                      and ends ``grace`` seconds after the last (linger)
    stop, stop_idle                   end one environment, or those idle for too long
    status(config)                    every user's environment, for ``sdeefs status``
    remove_user(config, name)         delete what this node holds of a user (admin action)

and, for environments in other directories (a job's, compute/job.py)::

    locked(run)                       serialise the set-up and tear-down of one environment
    EnvRecord.load(run), .save(run)   the record, and RUN/U/init for sdeefs-shell
    is_alive(record), teardown(dirs, record)

Privileged set-up happens here, as root, at session open (the PAM hook) or on request
(sdeefs-launchd).  Directory ownership keeps the user on the host from bypassing the
journal: ROOT/U and RUN/U are root's (0700, 0711); only the layer directories inside
belong to U, reachable by U only through the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import pwd
import signal
import stat
import subprocess
import time
from collections.abc import Iterator

import attrs

from sdeefs import control, identity, trees
from sdeefs.config import Engine, Guard, SiteConfig
from sdeefs.errors import ExitCode, QuietError
from sdeefs.fs import daemon, image, kernel
from sdeefs.fs.daemon import daemon_pid, end_after_unmount, keeper_pids
from sdeefs.identity import Identity
from sdeefs.sysio import write_file_atomic

from . import limits, procs, view
from .layout import EnvDirs, RunDirs, SiteRun, make_dirs
from .login import bpfguard
from .view import User

log = logging.getLogger(__name__)

ROOT_OWNED = (0, 0)


@attrs.frozen
class EnvRecord:
    """RUN/U/private/env.json (a JSON object of these fields): the running environment."""

    user: str
    uid: int
    init_pid: int
    init_start: int  # /proc/PID/stat start time: guards against a recycled pid
    holder_pid: int  # the init's parent (outside the PID namespace); it exits with the init
    engine: Engine = attrs.field(converter=Engine)
    sessions: int
    started: float
    last_logout: float = 0.0
    # what hides root-only and denied host files: "bpf" (the BPF LSM guard, its key
    # guard_key: the user's uid, launcher/login/bpfguard.py), "c"/"python" (the guard
    # layer's daemon), "none" (engine fuse: its overlay does); records from before: "c"
    guard: str = "c"
    guard_key: int = 0

    @classmethod
    def started_now(cls, user: User, init: procs.InitProcess, engine: Engine,
                    guard: Guard | None = None, guard_key: int = 0) -> EnvRecord:
        """A new environment's record (no session counted yet); ``guard``: what guards it
        (None: nothing, a job's or engine fuse's)."""
        return cls(user.name, user.uid, init.pid, init.start, init.holder_pid, engine, 0,
                   time.time(), guard=guard.value if guard else "none", guard_key=guard_key)

    def save(self, run: RunDirs) -> None:
        """env.json, and RUN/U/init: "PID START ENGINE\\n", which the user may read
        (sdeefs-shell, launcher/enter/shell.c)."""
        write_file_atomic(run.record, json.dumps(attrs.asdict(self)).encode())
        write_file_atomic(run.init, f"{self.init_pid} {self.init_start} {self.engine}\n".encode(),
                          mode=0o644)

    @classmethod
    def load(cls, run: RunDirs) -> EnvRecord | None:
        try:
            with open(run.record) as f:
                return cls(**json.load(f))
        except (FileNotFoundError, ValueError, TypeError):  # ValueError: bad JSON, bad engine
            return None


def is_alive(record: EnvRecord) -> bool:
    """Is the record's init still that process, and still an environment's init?"""
    return (procs.start_time(record.init_pid) == record.init_start and
            procs.command_name(record.init_pid) == "sdeefs-init")


@contextlib.contextmanager
def locked(run: RunDirs, create: bool = True) -> Iterator[None]:
    """Serialise the set-up and tear-down of one environment (parallel logins, job steps).
    ``create`` False: FileNotFoundError if its directories are gone (removed by an admin)."""
    if create:
        make_dirs(((os.path.dirname(run.path), ROOT_OWNED, 0o755),
                   (run.path, ROOT_OWNED, 0o711), (run.private, ROOT_OWNED, 0o700)))
    fd = os.open(run.lock, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _login(config: SiteConfig, user: User,
           create: bool = True) -> Iterator[tuple[EnvDirs, EnvRecord | None]]:
    """The user's login environment, locked: its directories, and its record if it has one."""
    dirs = EnvDirs.login(config.root, config.run_dir, user.name)
    with locked(dirs.run, create):
        yield dirs, EnvRecord.load(dirs.run)


def _make_login_dirs(config: SiteConfig, dirs: EnvDirs, user: User, ids: Identity) -> None:
    layer, owner = dirs.layer, (user.uid, user.gid)
    # The upper's root is the view's "/": inside root's, with the host root's mode.
    top = (layer.upper, ids.root, stat.S_IMODE(os.stat(config.lower).st_mode))
    make_dirs(((os.path.dirname(layer.path), ROOT_OWNED, 0o755), (layer.path, ROOT_OWNED, 0o700),
               top, (layer.state.path, ROOT_OWNED, 0o700),
               (layer.state.work, owner, 0o700), (layer.state.mnt, ROOT_OWNED, 0o700),
               (dirs.run.lower, ROOT_OWNED, 0o700)))


def _start_anew(config: SiteConfig, user: User, dirs: EnvDirs, record: EnvRecord | None,
                engine: Engine) -> EnvRecord:
    """Tear down what is left of ``record``, then start the environment (no session yet)."""
    teardown(dirs, record)
    ids = identity.of_user(user.name, config.min_uid, allocate=True)
    _make_login_dirs(config, dirs, user, ids)
    engine = engine_for(dirs, engine)
    try:
        start = view.start_login(config, user, ids, dirs, engine)
    except bpfguard.GuardError:
        teardown(dirs, None)  # its init is killed: unmount what its root was made of
        raise
    _merge_package_database(config, dirs, engine)
    started = EnvRecord.started_now(user, start.init, engine, start.guard,
                                     start.guard_key)
    limits.apply(config, user.name, [started.holder_pid, started.init_pid])
    return started


def engine_for(dirs: EnvDirs, engine: Engine) -> Engine:
    """The engine a new environment of the user runs: ``engine``, except

    * a user with a layer image (ROOT/U/layer.img) runs the kernel engine: the other
      engines keep the upper in ROOT/U/upper, and the journal describes the image's;
    * a user without one whose journal exists (an upper made by another engine) stays
      on the hybrid engine when the kernel engine is asked, until ``sdeefs migrate``
      moves the upper into an image (a new journal history: see
      :func:`migrate_to_kernel`).
    """
    layer = dirs.layer
    if os.path.exists(layer.image):
        if engine != Engine.KERNEL:
            log.info("%s has a layer image: the kernel engine, not %s", layer.path, engine)
        return Engine.KERNEL
    if engine == Engine.KERNEL and _has_history(layer.state.journal):
        log.info("%s: an upper of another engine; hybrid until `sdeefs migrate`", layer.path)
        return Engine.HYBRID
    return engine


HYBRID_HINT = ("hybrid engine: removing one name of a hard-linked file can leave its other "
               "names answering ESTALE (docs/hardlinks.md); `sdeefs stop {user}; sdeefs migrate "
               "{user}` moves the environment to the kernel engine")


def on_hybrid(config: SiteConfig, name: str, record_engine: str | None = None) -> bool:
    """Does ``name``'s environment run (or will its next start run) the hybrid engine?"""
    if record_engine == Engine.HYBRID:
        return True
    dirs = EnvDirs.login(config.root, config.run_dir, name)
    return os.path.isdir(dirs.layer.path) and engine_for(dirs, config.engine) == Engine.HYBRID


def _has_history(journal_dir: str) -> bool:
    try:
        return any(name.startswith("seg-") for name in os.listdir(journal_dir))
    except FileNotFoundError:
        return False


def _merge_package_database(config: SiteConfig, dirs: EnvDirs, engine: Engine) -> None:
    """The admin's package changes into the user's dpkg database (dpkgmerge.py).

    Runs after the namespaces started and before anyone may join (the record is saved
    afterwards): nothing in the environment has looked the file up yet, so its kernel
    overlay finds the new one.  Written through the journal; a failure costs only the merge.
    """
    from . import dpkgmerge  # (view.py's docstring: what jobs import)

    # where a write is journaled: the daemon's passthrough (hybrid), the view (fuse), the
    # image's upper itself (kernel: the capture journals it), the upper (overlay: no journal)
    upper = dirs.layer.live()[0]
    write_root = {Engine.HYBRID: os.path.join(dirs.layer.state.mnt, "upper"),
                  Engine.FUSE: dirs.run.view}.get(engine, upper)
    try:
        merged = dpkgmerge.merge_layer(config.lower, upper, write_root, dirs.layer.state.dpkg)
    except OSError as exc:
        log.warning("%s: the package database was not merged: %s", dirs.layer.path, exc)
        return
    if merged:
        log.info("%s: merged the admin's package changes into %s", dirs.layer.path,
                 ", ".join(merged))


def _usable(dirs: EnvDirs, record: EnvRecord | None) -> bool:
    """Is the environment running, with the daemons its view depends on alive?

    A view whose guard or journaling daemon died fails every lookup that needs it
    (ENOTCONN): the next login replaces it (journal replay) rather than joining it.
    """
    if record is None or not is_alive(record):
        return False
    if record.guard == Guard.BPF and not bpfguard.BpfGuard(
            os.path.dirname(dirs.run.path)).guarding(record.guard_key, record.uid):
        # fail closed: never joined unguarded (the program unpinned, the key dropped)
        log.warning("the environment of %s is no longer guarded by the BPF guard: starting "
                    "it anew", record.user)
        return False
    # statfs always reaches the daemon (a stat may be answered from the kernel's cache)
    layer = [] if record.guard == Guard.BPF else [dirs.run.guard]
    needed = {Engine.FUSE: [dirs.run.view],
              Engine.HYBRID: [*layer, dirs.layer.state.mnt]}.get(record.engine, layer)
    try:
        for path in needed:
            os.statvfs(path)
    except OSError:
        log.warning("the environment of %s lost a daemon: starting it anew", record.user)
        return False
    return all(view.mounted(path) for path in needed)


def _supervise(dirs: EnvDirs, record: EnvRecord) -> None:
    """A running environment's daemons that can be restarted without replacing it: the
    kernel engine's capture (not in the I/O path; sdeefs.fs.kernel)."""
    if record.engine == Engine.KERNEL:
        kernel.ensure_capture(dirs.layer.layer, dirs.layer.state.path, view.capture_log(dirs))


def supervise(config: SiteConfig) -> list[str]:
    """Restart what :func:`_supervise` restarts, for every running environment (sdeefs-launchd
    calls it periodically); the users whose daemons were restarted.  Under each
    environment's lock: a stop in progress must not see its capture come back."""
    restarted = []
    for found in _records(config):
        if found.engine != Engine.KERNEL:
            continue
        dirs = EnvDirs.login(config.root, config.run_dir, found.user)
        with locked(dirs.run):
            record = EnvRecord.load(dirs.run)
            if record is None or record.engine != Engine.KERNEL or not is_alive(record):
                continue
            if kernel.ensure_capture(dirs.layer.layer, dirs.layer.state.path,
                                     view.capture_log(dirs)):
                restarted.append(record.user)
    return restarted


def ensure(config: SiteConfig, user: User, engine: Engine | None = None) -> EnvRecord:
    """The user's running environment, started if needed (no session counted).

    ``engine`` (default: the config's) applies to a new environment; a running one of
    another engine is an error: its sessions share it.
    """
    with _login(config, user) as (dirs, record):
        if record is not None and _usable(dirs, record):
            _supervise(dirs, record)
            if engine is not None and engine_for(dirs, engine) != record.engine:
                raise QuietError(f"the environment of {user.name} runs the {record.engine} "
                                 f"engine ({record.sessions} session(s)); stop it first to "
                                 f"start it with {engine}", ExitCode.BUSY)
            return record
        record = _start_anew(config, user, dirs, record, engine or config.engine)
        record.save(dirs.run)
        return record


def open_session(config: SiteConfig, user: User, session_pid: int | None = None) -> EnvRecord:
    """One session more, in the running environment or a new one; ``session_pid`` (the
    login's process) joins the environment's limits (launcher/limits.py).  Why a start
    failed is kept in RUN/U/failure for sdeefs-shell to say (the PAM hook's own output goes
    nowhere the user sees)."""
    with _login(config, user) as (dirs, record):
        try:
            if record is None or not _usable(dirs, record):
                record = _start_anew(config, user, dirs, record, config.engine)
            else:
                _supervise(dirs, record)
        except (QuietError, OSError) as exc:
            _note_failure(dirs.run, exc)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dirs.run.failure)
        if session_pid is not None:
            limits.join(user.name, session_pid)
        record = attrs.evolve(record, sessions=record.sessions + 1)
        record.save(dirs.run)
        return record


def _note_failure(run: RunDirs, exc: QuietError | OSError) -> None:
    if isinstance(exc, OSError):
        where = f" ({os.fsdecode(exc.filename)})" if exc.filename else ""
        text = f"{exc.strerror or exc}{where}"
    else:
        text = str(exc)
    line = " ".join(text.split())[:MAX_FAILURE]
    with contextlib.suppress(OSError):
        write_file_atomic(run.failure, f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n".encode(),
                          mode=0o644)


MAX_FAILURE = 400  # characters of a start's failure kept for sdeefs-shell


def close_session(config: SiteConfig, user: User) -> None:
    """One session fewer.  After the last one the environment lingers (:func:`linger`, in a
    detached watcher: one per environment) while processes of its own still run, and ends
    ``grace`` seconds after the last of them; with grace and idle_timeout 0 and nothing
    running it ends at once."""
    with _login(config, user) as (dirs, record):
        if record is None:
            return
        record = attrs.evolve(record, sessions=max(0, record.sessions - 1),
                              last_logout=time.time())
        if record.sessions == 0 and (not is_alive(record) or (
                config.grace == 0 and config.idle_timeout == 0 and
                not procs.namespace_members(record.init_pid))):
            teardown(dirs, record)
            limits.remove(user.name)
            return
        record.save(dirs.run)
        if record.sessions == 0 and not daemon.pid_file_alive(dirs.run.linger_pid):
            # The watcher keeps none of our descriptors (daemon.fork), the lock's included;
            # it writes its pid file before it reports, so the next logout sees it.
            daemon.fork(dirs.run.linger_log, functools.partial(_watcher, config, user, dirs,
                                                               record))()


def _watcher(config: SiteConfig, user: User, dirs: EnvDirs, logout: EnvRecord,
             ready_fd: int) -> int:
    daemon.write_pid_file(dirs.run.linger_pid)
    daemon.report(ready_fd, "ok")
    linger(config, user, (logout.init_pid, logout.init_start))
    return 0


def linger(config: SiteConfig, user: User, init: tuple[int, int]) -> None:
    """Watch the environment whose init is ``init`` (pid, start time) after its last logout:
    end it once it has had neither a session nor a process but its init for ``grace``
    seconds (from its last process's end or the last logout, whichever is later; and not
    before ``last_logout + idle_timeout``).  Returns, forgetting its pid file, when a
    session opened (the next last logout starts a watcher again) or the environment is
    gone or was replaced.

    Costs nothing while it waits: blocked in poll(2) on pidfds of the namespace's
    processes (rescanned when all of them have exited: whatever they started is then
    found) or, once it is empty, on the init's pidfd with the grace as timeout.
    """
    pid = init[0]
    while True:
        namespace, members = procs.namespace_of(pid), procs.namespace_members(pid)
        if namespace is not None and members and \
                not procs.wait_all_exit(members, also=pid, member_of=namespace):
            continue  # all of them ended: rescan, their children may live on
        empty_since = time.time()
        while True:
            try:
                with _login(config, user, create=False) as (dirs, record):
                    verdict, until = _linger_verdict(config, record, init, empty_since)
                    if verdict == "busy":
                        break  # something joined meanwhile: wait for it
                    if verdict == "end":
                        teardown(dirs, record)
                        limits.remove(user.name)
                        log.info("%s: no session and no process for %.0f s: ended",
                                 user.name, config.grace)
                    if verdict in ("end", "leave"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(dirs.run.linger_pid)
                        return
            except FileNotFoundError:  # RUN/U removed (remove_user): nothing to end
                return
            procs.wait_all_exit([], also=pid, timeout=max(0.0, until - time.time()))


def _linger_verdict(config: SiteConfig, record: EnvRecord | None, init: tuple[int, int],
                    empty_since: float) -> tuple[str, float]:
    """What the watcher of ``init`` does now: "leave" (a session is open, or the environment
    is gone or another), "busy" (a process runs in it), "end", or "wait" until the time
    returned.  The caller holds the environment's lock."""
    if record is None or (record.init_pid, record.init_start) != init or record.sessions > 0:
        return "leave", 0.0
    if not is_alive(record):
        return "end", 0.0
    if procs.namespace_members(record.init_pid):
        return "busy", 0.0
    until = max(max(empty_since, record.last_logout) + config.grace,
                record.last_logout + config.idle_timeout)
    return ("end", 0.0) if time.time() >= until else ("wait", until)


def stop(config: SiteConfig, user: User) -> bool:
    """End the environment: its whole process tree, then its mounts.  The upper stays."""
    with _login(config, user) as (dirs, record):
        running = record is not None and is_alive(record)
        teardown(dirs, record)
        limits.remove(user.name)
        return running


def stop_idle(config: SiteConfig) -> list[str]:
    """Stop environments without sessions for longer than idle_timeout and without processes
    of their own (run from cron: for environments that no logout watches, started by
    ``sdeefs start`` or sdeefs-launchd alone)."""
    stopped = []
    for record in _records(config):
        idle = time.time() - record.last_logout
        if record.sessions == 0 and idle >= max(config.idle_timeout, config.grace) and \
                not procs.namespace_members(record.init_pid) and \
                stop(config, User.lookup(record.user)):
            stopped.append(record.user)
    return stopped


START_WAIT = 65.0  # seconds: sdeefs-enter start gives up after 60 (SETUP_TIMEOUT_S)


def unrecorded(run: RunDirs) -> EnvRecord | None:
    """An environment started and never recorded: whoever started it (a replicad killed
    -9 while it started a spare or a job's environment) died between ``sdeefs-enter start``
    and :meth:`EnvRecord.save`.  Start's output stays in ``RUN/private/starting`` (view.py):
    the init's pid.  Trusted only if that pid is an ``sdeefs-init`` that started before the
    file was last written (a pid reused since started after it).  A start still running
    (its helper holds the file open: the starter died, the helper did not) is waited for,
    at most START_WAIT seconds.  A record of it (user unknown, uid the holder's) for
    :func:`teardown`, or None."""
    writers = procs.opened_by(run.starting)
    deadline = time.monotonic() + START_WAIT
    while writers and time.monotonic() < deadline:
        time.sleep(0.05)
        writers = procs.opened_by(run.starting, writers)
    try:
        with open(run.starting) as f:
            pid = int(f.read().split()[0])
            written = os.fstat(f.fileno()).st_mtime
    except (OSError, ValueError, IndexError):
        return None
    init = procs.InitProcess.find(pid)
    started = procs.started_at(pid)
    if init is None or started is None or started > written + 1 or \
            procs.command_name(pid) != "sdeefs-init":
        return None
    try:
        uid = os.stat(f"/proc/{init.holder_pid}").st_uid
    except OSError:
        uid = -1
    return EnvRecord("", uid, init.pid, init.start, init.holder_pid, Engine.OVERLAY, 0,
                     written)


def teardown(dirs: EnvDirs, record: EnvRecord | None) -> None:
    """Kill the environment's process tree (if ``record`` still names it, or with no record
    an init its starter did not live to record: :func:`unrecorded`), unmount what its root
    was made of, forget the record.  The caller holds :func:`locked`."""
    if record is None:
        record = unrecorded(dirs.run)
        if record is not None:
            log.info("%s: ending an environment started and never recorded (init %d)",
                     dirs.run.path, record.init_pid)
    if record is not None and is_alive(record):
        if procs.shares_our_pids(record.init_pid):
            # A job's environment has no PID namespace to die with its init: its processes
            # are those of its mount namespace (tasks SLURM left, or that escaped it).
            for _ in range(3):
                for pid in procs.namespace_members(record.init_pid) or []:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.init_pid, signal.SIGKILL)  # the PID namespace dies with its init
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
                is_alive(record) or procs.running(record.holder_pid, record.uid)):
            time.sleep(0.01)
    run = dirs.run
    if record is not None and record.guard == Guard.BPF:
        # after its processes: a key is never removed under a live environment
        bpfguard.BpfGuard(os.path.dirname(run.path)).forget(record.guard_key, record.uid)
    for path in (run.mask, run.guard, run.lower):
        view.detach(path)
    daemon.end_process(run.guard_pid, UNMOUNT_TIMEOUT)
    for mountpoint in (dirs.layer.state.mnt, run.view):
        if view.mounted(mountpoint):
            from sdeefs.fs.mount import umount  # a login view's: jobs never import FUSE

            try:
                umount(mountpoint)
            except QuietError as exc:
                log.warning("%s", exc)
                view.detach(mountpoint)
    _end_unmounted_daemon(dirs)
    _stop_layer(dirs)
    for path in (run.init, run.record, run.starting):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _stop_layer(dirs: EnvDirs) -> None:
    """Engine kernel, once the environment's processes are gone: the capture drains what
    they did, checkpoints and exits (started again first if it is not running, so that
    its scan journals what no capture saw), then the image is unmounted (if nothing
    else reads it: the login replicad may, for a replica catching up)."""
    layer = dirs.layer
    if not os.path.exists(layer.image) or not image.is_mounted(layer.image, layer.layer):
        return
    state = layer.state.path
    try:
        kernel.start_capture(layer.layer, state, view.capture_log(dirs))
    except QuietError as exc:
        log.error("%s: the capture cannot start to settle the journal: %s", layer.path, exc)
        return  # the image stays mounted and the capture expected: the next start scans
    try:
        kernel.stop_capture(state)
    except QuietError as exc:  # expected stays: heads wait for the next start's scan
        log.error("%s: %s", layer.path, exc)
        return
    kernel.close_layer(layer.image, layer.layer)


def _end_unmounted_daemon(dirs: EnvDirs) -> None:
    """A journaling daemon of this layer whose mount is gone here but held by another mount
    namespace (issue 11: a root ``unshare -m`` during the logout, or an earlier teardown
    that gave up) keeps STATE/lock: end it, so that the next login can mount the layer."""
    state = dirs.layer.state
    if daemon_pid(state.path) is None or view.mounted(state.mnt) or view.mounted(dirs.run.view):
        return
    end_after_unmount(state.path, UNMOUNT_TIMEOUT)


UNMOUNT_TIMEOUT = 30.0  # seconds a daemon may take to close its journal after its unmount


def _records(config: SiteConfig) -> list[EnvRecord]:
    found = []
    if os.path.isdir(config.run_dir):
        for name in sorted(os.listdir(config.run_dir)):
            if not os.path.isdir(os.path.join(config.run_dir, name)):
                continue  # e.g. the private-paths cache
            record = EnvRecord.load(SiteRun(config.run_dir).user(name))
            if record is not None:
                found.append(record)
    return found


def _tree_size(path: str) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _journal_head(journal_dir: str) -> int:
    """The last sequence number in the journal (0 if none, or unreadable: a report only)."""
    from sdeefs.journal import Journal  # (view.py's docstring: what jobs import)

    head = 0
    if os.path.isdir(journal_dir):
        with contextlib.suppress(Exception):
            segments = Journal(directory=journal_dir).segments()
            if segments:
                for entry in Journal(directory=journal_dir).read(segments[-1][0]):
                    head = entry.seq
    return head


def status(config: SiteConfig) -> list[dict[str, object]]:
    """One dict per known user environment, for ``sdeefs status``."""
    rows = []
    users = set()
    if os.path.isdir(config.root):
        users |= {n for n in os.listdir(config.root) if not n.startswith(".")}
    records = {r.user: r for r in _records(config)}
    users |= set(records)
    for name in sorted(users):
        record = records.get(name)
        dirs = EnvDirs.login(config.root, config.run_dir, name)
        state = dirs.layer.state
        alive = record is not None and is_alive(record)
        with contextlib.suppress(QuietError, control.ControlError):
            if kernel.capture_answers(state.path, 1.0):  # the head with all it saw
                from sdeefs.fs import capture  # (view.py's docstring: what jobs import)

                capture.drain(state.path, 60.0)
        live_upper = dirs.layer.live()[0]
        if os.path.exists(dirs.layer.image) and not image.is_mounted(dirs.layer.image,
                                                                      dirs.layer.layer):
            live_upper = ""
        rows.append({
            "user": name,
            "exists": known_user(name),  # False: userdel'ed (sdeefs remove-user cleans up)
            "running": alive,
            "engine": record.engine if record else None,
            "init_pid": record.init_pid if alive and record else None,
            "sessions": record.sessions if record else 0,
            "processes": procs.namespace_processes(record.init_pid) if alive and record else 0,
            "upper_mount": state.mnt if view.mounted(state.mnt) else None,
            "guard_mount": dirs.run.guard if view.mounted(dirs.run.guard) else None,
            # what guards it: bpf, c, python, none (engine fuse); None if not running
            "guard": record.guard if alive and record else None,
            "guard_key": record.guard_key if alive and record else 0,
            # [keeper, server] of sdeefs-guard (the Python guard: [its pid]); [] if none runs
            "guard_pids": keeper_pids(dirs.run.guard_pid),
            "daemon_pid": daemon_pid(state.path) if os.path.isdir(state.path) else None,
            "capture_pid": kernel.capture_pid(state.path),
            "upper_bytes": _tree_size(live_upper) if live_upper else 0,
            "usage": limits.usage(name) if alive else {},
            "journal_head": _journal_head(state.journal),
            # hard links can give ESTALE there (docs/hardlinks.md): `sdeefs migrate`
            "hybrid": on_hybrid(config, name, record.engine if record else None),
        })
    return rows


def remove_user(config: SiteConfig, name: str, keep_upper: bool = False) -> list[str]:
    """``sdeefs remove-user``: end NAME's environment and delete what this node holds of
    them (login layers and runtime state); the paths removed or kept, for the admin.

    Works by name, so also after ``userdel``.  With ``keep_upper`` the user's upper is
    moved to ``ROOT/.removed/NAME.TIME`` (root-only) instead of deleted: a later user of
    the same name (a new uid) must never find it as their own.  Replicas on compute nodes
    are removed by running the same command there (``sdeefs.replication``'s side).
    """
    if not name or name in (".", "..") or "/" in name or name.startswith(".removed"):
        raise QuietError(f"not a user name: {name!r}", ExitCode.USAGE)
    dirs = EnvDirs.login(config.root, config.run_dir, name)
    if not (os.path.lexists(dirs.layer.path) or os.path.lexists(dirs.run.path)):
        return []
    done = []
    with locked(dirs.run):
        teardown(dirs, EnvRecord.load(dirs.run))
        limits.remove(name)
        view.detach(dirs.layer.layer)  # a layer image a reader kept mounted
        # the user's layer: the image (kernel engine) or the upper directory (the others)
        layer = next((p for p in (dirs.layer.image, dirs.layer.upper) if os.path.exists(p)),
                     None)
        if keep_upper and layer is not None:
            kept_dir = os.path.join(config.root, ".removed")
            make_dirs(((kept_dir, ROOT_OWNED, 0o700),))
            kept = os.path.join(kept_dir, f"{name}.{time.strftime('%Y%m%d-%H%M%S')}"
                                + (".img" if layer == dirs.layer.image else ""))
            os.rename(layer, kept)
            done.append(f"kept {kept}")
        if os.path.lexists(dirs.layer.path):
            trees.rmtree(dirs.layer.path)
            done.append(f"removed {dirs.layer.path}")
    trees.rmtree(dirs.run.path)  # the lock file too: nobody may wait on it now
    done.append(f"removed {dirs.run.path}")
    return done


def known_user(name: str) -> bool:
    """Does the account still exist (``sdeefs status`` marks layers of deleted users)?"""
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def migrate_to_kernel(config: SiteConfig, user: User) -> str:
    """``sdeefs migrate``: move the user's upper of another engine (ROOT/U/upper, on the
    host's filesystem) into a new layer image; the next start runs the kernel engine.

    The environment is stopped first (its journal complete: those engines journal ahead).
    The journal starts a new history: its Write records name files by handles of the
    host's filesystem, which mean nothing (or another file) on the image, so the old
    journal cannot go on describing the copy.  The first capture finds an empty journal
    and journals the whole upper as one full scan; replicas see a new history id and
    rebuild from it.  The old upper and journal are moved to ROOT/U/pre-kernel (returned)
    rather than deleted: the admin removes them.
    """
    with _login(config, user) as (dirs, record):
        teardown(dirs, record)
        layer = dirs.layer
        if os.path.exists(layer.image):
            raise QuietError(f"{user.name} has a layer image already", ExitCode.USAGE)
        kept = os.path.join(layer.path, "pre-kernel")
        if os.path.exists(kept):
            raise QuietError(f"{kept} exists (an earlier migration): remove it first",
                             ExitCode.BUSY)
        try:
            upper, _ = kernel.open_layer(layer.image, layer.layer, config.layer_size,
                                         user.uid, user.gid)
            if os.path.isdir(layer.upper):
                # cp -a: owners, modes, times, xattrs (overlay's, as root), hard links,
                # whiteouts (0/0 devices) and sparse files as they are
                done = subprocess.run(["cp", "-a", "--sparse=always", f"{layer.upper}/.",
                                       upper], capture_output=True, text=True)
                if done.returncode != 0:
                    raise QuietError(f"copying {layer.upper} into the image failed: "
                                     f"{done.stderr.strip()[-300:]}", ExitCode.FAILURE)
        except BaseException:
            kernel.close_layer(layer.image, layer.layer)
            os.unlink(layer.image)
            raise
        kernel.close_layer(layer.image, layer.layer)
        os.mkdir(kept, 0o700)
        # replicas.json: the old history's acknowledgements must not trim the new one
        for path in (layer.upper, layer.state.journal, layer.state.capture,
                     layer.state.replicas):
            if os.path.exists(path):
                os.rename(path, os.path.join(kept, os.path.basename(path)))
        return kept




__all__ = ["EnvRecord", "User", "close_session", "ensure", "is_alive", "known_user", "linger",
           "locked", "open_session", "remove_user", "status", "stop", "stop_idle", "teardown"]
