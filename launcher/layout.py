"""Where the launcher keeps what exists while environments run: the one definition of RUN.

The user's layer (``ROOT/U/upper``, ``ROOT/U/state/...``) is the shared core's
(:class:`sdeefs.statedir.UserDirs`); this module adds the runtime side, on a tmpfs
(``RUN_DIR`` is ``[sdeefs] run_dir`` of the site config)::

    RUN_DIR/                   SiteRun
        launchd.sock           sdeefs-launchd's socket (0666: the service checks SO_PEERCRED)
        private-paths          the scan of root-only lower entries (compute/private.py)
        U/                     RunDirs (root, 0711: U reads init, nothing else)
            init               "PID START ENGINE\\n": the environment's init, read by sdeefs-shell
            failure            why the last start failed (one line), shown by sdeefs-shell
            private/           (root, 0700): the idmapped lower shows root's files as U's
                env.json       the EnvRecord (env.py)
                lock           flock'ed while the environment is set up or torn down
                lower/         idmapped read-only bind of the host root
                mask/          the mask (tmpfs; an ext4 image on kernels < 6.6: mask.py)
                guard/         the guard layer's FUSE mount (logins)
                guard.log      its daemon's log
                guard.pid      "PID START": its daemon (ended if it outlives its unmount)
                linger.log     the log of the watcher that ends it after the last logout
                linger.pid     "PID START": that watcher, while it watches (one at a time)
                view/          engine fuse: the sdeefs overlay's mount

A job (compute/job.py) has both halves under ``JOB_DIR`` (``[replication] job_dir``)::

    JOB_DIR/JOBID/             UserDirs: the job's scratch upper and state/work
    JOB_DIR/JOBID.run/         RunDirs

The C helper reads three of these names too: ``U/init``, ``U/failure`` and ``launchd.sock``
(launcher/enter/shell.c).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import attrs

from sdeefs.statedir import UserDirs


def _at(*parts: str) -> property:
    """The path ``parts`` below the instance's ``path``."""
    return property(lambda self: os.path.join(self.path, *parts))


@attrs.frozen
class RunDirs:
    """``RUN/U``: one environment's runtime state (see the module docstring)."""

    path: str

    init = _at("init")
    failure = _at("failure")
    private = _at("private")
    record = _at("private", "env.json")
    starting = _at("private", "starting")  # sdeefs-enter start's output: the init it started
    lock = _at("private", "lock")
    lower = _at("private", "lower")
    mask = _at("private", "mask")
    guard = _at("private", "guard")
    guard_log = _at("private", "guard.log")
    guard_pid = _at("private", "guard.pid")
    linger_log = _at("private", "linger.log")
    linger_pid = _at("private", "linger.pid")
    view = _at("private", "view")


@attrs.frozen
class SiteRun:
    """``RUN_DIR``: what every environment of the site shares (see the module docstring)."""

    path: str

    launchd_socket = _at("launchd.sock")
    private_paths = _at("private-paths")

    def user(self, name: str) -> RunDirs:
        return RunDirs(os.path.join(self.path, name))


@attrs.frozen
class EnvDirs:
    """Both halves of one environment: its layer (``ROOT/U``, or a job's scratch) and RUN."""

    layer: UserDirs
    run: RunDirs

    @classmethod
    def login(cls, root: str, run_dir: str, user: str) -> EnvDirs:
        return cls(UserDirs.of(root, user), SiteRun(run_dir).user(user))

    @classmethod
    def job(cls, job_dir: str, job: str) -> EnvDirs:
        return cls(UserDirs(os.path.join(job_dir, job)),
                   RunDirs(os.path.join(job_dir, f"{job}.run")))


def make_dirs(dirs: Iterable[tuple[str, tuple[int, int], int]]) -> None:
    """Create each ``(path, (uid, gid), mode)`` and give it exactly that owner and mode."""
    for path, (uid, gid), mode in dirs:
        os.makedirs(path, mode=mode, exist_ok=True)
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.chown(path, uid, gid)
        if st.st_mode & 0o7777 != mode:
            os.chmod(path, mode)
