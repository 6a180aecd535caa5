"""Jobs on compute nodes: the SLURM prolog and epilog, and ``sdeefs-run``.

A job of user U on node N runs in the same kind of environment as U's login (user,
mount and PID namespaces, masked paths, no_new_privs, U is root inside and only U
outside), over these layers::

    upper   JOB_DIR/JOBID/upper        per-job scratch, removed when the job ends
    middle  REPLICA_DIR/U/upper        U's replica, kept current by sdeefs-replicad
    mask    (tmpfs)                    the same deny list as at login
    lower   host /, idmapped           host root shows as U

The hot path is plain kernel overlayfs: no FUSE daemon runs for a job.

* ``sdeefs job-prolog`` (SLURM ``Prolog``, root, every allocated node, before any
  step; ``PrologFlags=Alloc``): asks the local replicad to follow U and waits until
  the replica holds the journal position the login node has *now* (at least what U
  had at submission), then starts the job's environment.
* ``sdeefs-run [--] CMD ...`` (what ``srun`` runs, as U): joins that environment and
  runs CMD; every step of the job on this node shares it (start once, run many).
* ``sdeefs job-epilog`` (SLURM ``Epilog``, root): kills the environment's root
  process (the whole tree goes with it), unmounts, removes the scratch upper.  The
  replica stays for the next job.

A user without an sdeefs environment on the login node gets none on the compute
node either: the prolog says so in slurmd's log and lets the job run as usual.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import shutil
import socket
import sys

from sdeefs import config as config_mod
from sdeefs import control, identity
from sdeefs.config import Engine, SiteConfig
from sdeefs.errors import ExitCode, QuietError
from sdeefs.identity import Identity
from sdeefs.statedir import ReplicaDirs

from .. import enter, env, view
from ..layout import EnvDirs, make_dirs

log = logging.getLogger(__name__)

# The ControlError kind of sdeefs-replicad's answer when the login node holds no layer of
# the user (who never logged in with sdeefs): the job runs without an environment.
NO_LAYER = "no-layer"
NO_IDS = "no-ids"  # ... or no subordinate ranges on this node (docs/identity.md)


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def _job_id() -> str:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID") or ""
    if not job.isdigit():
        raise QuietError("not in a SLURM job (SLURM_JOB_ID is not set)", ExitCode.USAGE)
    return job


def job_dirs(config: SiteConfig, node: str, job: str) -> EnvDirs:
    return EnvDirs.job(config.replication.on(node).job_dir, job)


def prolog(config: SiteConfig, node: str, user: env.User, job: str) -> env.EnvRecord | None:
    """Replica at the barrier, then the job's environment (idempotent)."""
    rep = config.replication.on(node)
    if user.uid < config.min_uid:
        return None
    reply = control.request(rep.control, {"op": "follow", "user": user.name, "wait": True,
                                          "timeout": rep.barrier_timeout},
                            timeout=rep.barrier_timeout + 30, what="sdeefs-replicad")
    log.info("job %s: replica of %s at seq %s (barrier %s)", job, user.name,
             reply.get("applied"), reply.get("barrier"))
    replica_upper = ReplicaDirs.of(rep.replica_dir, user.name).upper
    os.makedirs(rep.job_dir, mode=0o755, exist_ok=True)
    lower_dev = os.stat(config.lower).st_dev
    for key, path in (("replica_dir", rep.replica_dir), ("job_dir", rep.job_dir)):
        if os.stat(path).st_dev == lower_dev:
            raise QuietError(f"replication.{key} {path} is on the same filesystem as the lower "
                             f"({config.lower}): the kernel refuses overlapping overlay layers; "
                             "put it on the node's local scratch filesystem", ExitCode.USAGE)
    where = job_dirs(config, node, job)
    with env.locked(where.run):
        record = env.EnvRecord.load(where.run)
        if record is not None and env.is_alive(record):
            return record
        # The node's own /etc/subuid|subgid: the same ranges as the login node's (checked by
        # the replica as it applies records: docs/identity.md); never allocated here.
        ids = identity.of_user(user.name, config.min_uid, allocate=False)  # SubidError
        _make_job_dirs(where, user, ids)
        layer = where.layer
        init = view.launch(config, user, ids, where.run, layer.upper,
                           os.path.join(layer.state.work, "ovl"), middle=(replica_upper,))
        record = env.EnvRecord.started_now(user, init, Engine.OVERLAY)
        record.save(where.run)
        return record


def _make_job_dirs(where: EnvDirs, user: env.User, ids: Identity) -> None:
    root, owner = (0, 0), (user.uid, user.gid)
    layer = where.layer
    make_dirs(((layer.path, root, 0o700), (layer.upper, ids.root, 0o755),
               (layer.state.path, root, 0o700), (layer.state.work, owner, 0o700),
               (where.run.lower, root, 0o700)))


def epilog(config: SiteConfig, node: str, job: str) -> bool:
    """End the job's environment on this node and remove its scratch upper."""
    where = job_dirs(config, node, job)
    if not os.path.isdir(where.run.path) and not os.path.isdir(where.layer.path):
        return False
    with env.locked(where.run):
        env.teardown(where, env.EnvRecord.load(where.run))
    shutil.rmtree(where.layer.path, ignore_errors=True)
    shutil.rmtree(where.run.path, ignore_errors=True)
    return True


def _slurm_user() -> env.User:
    name = os.environ.get("SLURM_JOB_USER")
    if not name:
        raise QuietError("SLURM_JOB_USER is not set (run me as SLURM's Prolog/Epilog)",
                         ExitCode.USAGE)
    return env.User.lookup(name)


def prolog_main(config: SiteConfig) -> int:
    node, job, user = node_name(), _job_id(), _slurm_user()
    try:
        prolog(config, node, user, job)
    except control.ControlError as exc:
        if exc.kind not in (NO_LAYER, NO_IDS):
            raise
        why = "has no sdeefs environment" if exc.kind == NO_LAYER else \
            f"has no subordinate ids on {node} ({exc})"
        print(f"sdeefs: job {job}: {user.name} {why}; the job runs without one",
              file=sys.stderr)
    except identity.SubidError as exc:  # a failed prolog would drain the node
        print(f"sdeefs: job {job}: {exc}; the job runs without an environment",
              file=sys.stderr)
    return 0


def epilog_main(config: SiteConfig) -> int:
    epilog(config, node_name(), _job_id())
    return 0


def run_main(argv: list[str] | None = None) -> int:
    """``sdeefs-run [--engine overlay] [--] CMD ...``: run CMD in this job's environment."""
    parser = argparse.ArgumentParser(prog="sdeefs-run", description=run_main.__doc__)
    parser.add_argument("--engine", choices=("overlay", "fuse"), default="overlay",
                        help="overlay (default): kernel overlayfs over the replica")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if not command:
            raise QuietError("usage: sdeefs-run [--engine overlay] -- CMD [ARG...]", ExitCode.USAGE)
        if args.engine == "fuse":
            raise QuietError("--engine fuse is not available on compute nodes: the pure FUSE "
                             "engine has one lower layer, a job needs the replica and the host",
                             ExitCode.USAGE)
        config = config_mod.load()
        where = job_dirs(config, node_name(), _job_id())
        try:
            with open(where.run.init) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            raise QuietError(f"no sdeefs environment for job {_job_id()} on {node_name()} "
                             "(is `sdeefs job-prolog` SLURM's Prolog here?)",
                             ExitCode.UNAVAILABLE) from None
        # The environment shows the home and the shared paths of the host; elsewhere the
        # job's directory does not exist inside, so start in the home instead.
        cwd = os.getcwd()
        me = env.User.lookup(pwd.getpwuid(os.getuid()).pw_name)
        if not any(view.is_inside(cwd, p) for p in (me.home, *config.shared)):
            cwd = me.home
        enter.exec_join(pid, cwd, command)
    except QuietError as exc:
        print(f"sdeefs-run: {exc}", file=sys.stderr)
        return exc.exitcode
    return 0  # not reached


def slurm_hook_main(which: str) -> int:
    logging.basicConfig(level=logging.INFO, format="sdeefs: %(message)s")
    try:
        config = config_mod.load()
        return prolog_main(config) if which == "prolog" else epilog_main(config)
    except QuietError as exc:
        print(f"sdeefs job-{which}: {exc}", file=sys.stderr)
        return exc.exitcode
    except OSError as exc:
        print(f"sdeefs job-{which}: {exc}", file=sys.stderr)
        return 1

