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
    open_session, close_session       the PAM hook: one session more or fewer; the last one
                                      ends the environment (unless idle_timeout keeps it)
    stop, stop_idle                   end one environment, or those idle for too long
    status(config)                    every user's environment, for ``sdeefs status``
    remove_user_data(config, user)    delete a user's layers (admin action)

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
import json
import logging
import os
import pwd
import signal
import stat
import time
from collections.abc import Iterator

import attrs

from sdeefs import identity, trees
from sdeefs.config import Engine, SiteConfig
from sdeefs.errors import ExitCode, QuietError
from sdeefs.fs.daemon import daemon_pid
from sdeefs.fs.mount import umount
from sdeefs.identity import Identity
from sdeefs.journal import Journal
from sdeefs.sysio import write_file_atomic

from . import limits, procs, view
from .layout import EnvDirs, RunDirs, SiteRun, make_dirs
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

    @classmethod
    def started_now(cls, user: User, init: procs.InitProcess, engine: Engine) -> EnvRecord:
        """A new environment's record (no session counted yet)."""
        return cls(user.name, user.uid, init.pid, init.start, init.holder_pid, engine, 0,
                   time.time())

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
def locked(run: RunDirs) -> Iterator[None]:
    """Serialise the set-up and tear-down of one environment (parallel logins, job steps)."""
    make_dirs(((os.path.dirname(run.path), ROOT_OWNED, 0o755), (run.path, ROOT_OWNED, 0o711),
               (run.private, ROOT_OWNED, 0o700)))
    fd = os.open(run.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _login(config: SiteConfig, user: User) -> Iterator[tuple[EnvDirs, EnvRecord | None]]:
    """The user's login environment, locked: its directories, and its record if it has one."""
    dirs = EnvDirs.login(config.root, config.run_dir, user.name)
    with locked(dirs.run):
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
    started = EnvRecord.started_now(user, view.start_login(config, user, ids, dirs, engine),
                                    engine)
    limits.apply(config, user.name, [started.holder_pid, started.init_pid])
    return started


def _usable(dirs: EnvDirs, record: EnvRecord | None) -> bool:
    """Is the environment running, with the daemons its view depends on alive?

    A view whose guard or journaling daemon died fails every lookup that needs it
    (ENOTCONN): the next login replaces it (journal replay) rather than joining it.
    """
    if record is None or not is_alive(record):
        return False
    # statfs always reaches the daemon (a stat may be answered from the kernel's cache)
    needed = {Engine.FUSE: [dirs.run.view],
              Engine.HYBRID: [dirs.run.guard, dirs.layer.state.mnt]}.get(record.engine,
                                                                          [dirs.run.guard])
    try:
        for path in needed:
            os.statvfs(path)
    except OSError:
        log.warning("the environment of %s lost a daemon: starting it anew", record.user)
        return False
    return all(view.mounted(path) for path in needed)


def ensure(config: SiteConfig, user: User, engine: Engine | None = None) -> EnvRecord:
    """The user's running environment, started if needed (no session counted).

    ``engine`` (default: the config's) applies to a new environment; a running one of
    another engine is an error: its sessions share it.
    """
    with _login(config, user) as (dirs, record):
        if record is not None and _usable(dirs, record):
            if engine is not None and engine != record.engine:
                raise QuietError(f"the environment of {user.name} runs the {record.engine} "
                                 f"engine ({record.sessions} session(s)); stop it first to "
                                 f"start it with {engine}", ExitCode.BUSY)
            return record
        record = _start_anew(config, user, dirs, record, engine or config.engine)
        record.save(dirs.run)
        return record


def open_session(config: SiteConfig, user: User, session_pid: int | None = None) -> EnvRecord:
    """One session more, in the running environment or a new one; ``session_pid`` (the
    login's process) joins the environment's limits (launcher/limits.py)."""
    with _login(config, user) as (dirs, record):
        if record is None or not _usable(dirs, record):
            record = _start_anew(config, user, dirs, record, config.engine)
        if session_pid is not None:
            limits.join(user.name, session_pid)
        record = attrs.evolve(record, sessions=record.sessions + 1)
        record.save(dirs.run)
        return record


def close_session(config: SiteConfig, user: User) -> None:
    """One session fewer; the last one ends the environment (unless idle_timeout keeps it)."""
    with _login(config, user) as (dirs, record):
        if record is None:
            return
        record = attrs.evolve(record, sessions=max(0, record.sessions - 1),
                              last_logout=time.time())
        if record.sessions == 0 and config.idle_timeout == 0:
            teardown(dirs, record)
            limits.remove(user.name)
            return
        record.save(dirs.run)


def stop(config: SiteConfig, user: User) -> bool:
    """End the environment: its whole process tree, then its mounts.  The upper stays."""
    with _login(config, user) as (dirs, record):
        running = record is not None and is_alive(record)
        teardown(dirs, record)
        limits.remove(user.name)
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


def teardown(dirs: EnvDirs, record: EnvRecord | None) -> None:
    """Kill the environment's process tree (if ``record`` still names it), unmount what its
    root was made of, forget the record.  The caller holds :func:`locked`."""
    if record is not None and is_alive(record):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.init_pid, signal.SIGKILL)  # the PID namespace dies with its init
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (
                is_alive(record) or procs.running(record.holder_pid, record.uid)):
            time.sleep(0.01)
    run = dirs.run
    for path in (run.mask, run.guard, run.lower):
        view.detach(path)
    for mountpoint in (dirs.layer.state.mnt, run.view):
        if view.mounted(mountpoint):
            try:
                umount(mountpoint)
            except QuietError:
                view.detach(mountpoint)
    for path in (run.init, run.record):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


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
            "daemon_pid": daemon_pid(state.path) if os.path.isdir(state.path) else None,
            "upper_bytes": _tree_size(dirs.layer.upper),
            "usage": limits.usage(name) if alive else {},
            "journal_head": _journal_head(state.journal),
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
        if keep_upper and os.path.isdir(dirs.layer.upper):
            kept_dir = os.path.join(config.root, ".removed")
            make_dirs(((kept_dir, ROOT_OWNED, 0o700),))
            kept = os.path.join(kept_dir, f"{name}.{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(dirs.layer.upper, kept)
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


__all__ = ["EnvRecord", "User", "close_session", "ensure", "is_alive", "locked", "open_session",
           "known_user", "remove_user", "status", "stop", "stop_idle", "teardown"]
