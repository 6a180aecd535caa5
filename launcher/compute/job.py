"""Jobs on compute nodes: the SLURM prolog and epilog, and ``sdeefs-run``.

A job of user U on node N runs in the same kind of environment as U's login (user,
mount and PID namespaces, masked paths, no_new_privs, U is root inside and only U
outside), over these layers::

    upper   JOB_DIR/JOBID/upper        per-job scratch, removed when the job ends
    middle  REPLICA_DIR/U/upper        U's replica, kept current by sdeefs-replicad
    mask    (tmpfs)                    the same deny list as at login
    lower   host /, idmapped           host root shows as U

(mask and lower are made once per user and node and shared by U's job environments
there: JOB_DIR/.layers-U, :class:`UserLayers`).

The hot path is plain kernel overlayfs: no FUSE daemon runs for a job.  **The upper is
mounted volatile** (``sdeefs-enter start --volatile``): it is scratch, removed with the job,
so nothing syncs it: a copy-up (a file of the replica or the host opened for writing) does
not fsync the copy it made, and an fsync or syncfs inside returns without writing the
upper's pages (they are written back as any dirty page is; the job reads its own writes as
ever).  A crash loses nothing a job could have kept: a job's scratch never outlives it.

**A job's /tmp** is ``JOB_DIR/JOBID/tmp``, a plain directory on the node's local
filesystem (``job_dir``'s), bound at /tmp: no overlay in its I/O path (a 4 KiB write
through the overlay costs ~1-2.5 µs more: bench/RESULTS.md, issue 15), and no
memory (a login's /tmp is a tmpfs of ``tmp_size``).  Nothing there is journaled or kept,
as nothing of the scratch upper is.  Made by root in the job's root-only directory, owned
by inside root with mode 1777 (a /tmp as the host's), only this job's environment binds
it (by an fd opened as root: ``sdeefs-enter start --tmp-dir``): another job, of the same
user or another, never sees it; the epilog removes it with the scratch upper (no symlink
the job planted is followed: ``shutil.rmtree`` walks by fds).  ``$TMPDIR`` is left as
the job was given it (SLURM passes the submitter's environment; unset, programs use /tmp).
/var/tmp stays in the overlay, not a per-job directory: in an environment it is the user's
own (kept, replicated, seen by their jobs) over the node's, which a bind would hide.

* the prolog (SLURM ``Prolog``, root, every allocated node, before any step;
  ``PrologFlags=Alloc``; done by the node's resident sdeefs-replicad, which
  ``sdeefs-prolog``, a C client, asks: :class:`NodeJobs`; ``sdeefs job-prolog`` does the
  same in-process where the replicad does not answer): has the local replicad follow U
  and waits until the replica holds the journal position the login node has *now* (at
  least what U had at submission), then starts the job's environment.
* **the SPANK plugin** (``launcher/enter/spank.c``, loaded by the plugstack line of
  ``sdeefs install-slurm``): every task SLURM starts for the job on this node joins that
  environment before it execs, as U's own uid inside: the batch script, each ``srun``
  step, MPI ranks, ``srun --pty``; ``--sdeefs=off`` runs a job or step bare.  Every step
  of the job on this node shares the environment (start once, run many).  A job's
  environment has no PID namespace of its own (``host_pids``: a task SLURM forked cannot
  move into one; its /proc is the host's), and the epilog ends it by mount namespace;
* ``sdeefs-run [--] CMD ...`` (the explicit form, as U): joins that environment as inside
  root and runs CMD (in a task the plugin already moved in: CMD as it is).
* the epilog (SLURM ``Epilog``, root; ``sdeefs-epilog`` asks the replicad, ``sdeefs
  job-epilog`` in-process): kills the environment's root process (the whole tree goes
  with it), unmounts, removes the scratch upper.  The replica stays for the next job.

A user without an sdeefs environment on the login node gets none on the compute
node either (nor does a system account, uid below ``min_uid``): the prolog says so in
slurmd's log and lets the job run as usual (the plugin leaves its tasks alone, and
``sdeefs-run CMD`` runs CMD as it is, bare).

A user's problem fails the user's job, never the node
=====================================================

SLURM drains a node whose Prolog exits non-zero, and holds the job: one user's broken
replica would take nodes away from everybody.  So the prolog (whoever runs it: the
replicad for ``sdeefs-prolog``, or ``sdeefs job-prolog``; it finds the site config at its
default path) tells apart:

* **the user's problems** (:class:`UserProblem`): the barrier not reached in time (a
  stream stuck), a replica that skipped records (it differs from the user's upper:
  ``sdeefs replica resync USER`` repairs it), an environment that does not start.  The
  prolog writes one line to ``JOB_DIR/JOBID.problem`` and exits 0: the node stays in
  service, and every task of the job fails with that line on its stderr (exit 1: the
  plugin, or ``sdeefs-run``).  A user without an environment is marked the same way as
  *bare*;
* **the node's problems**: the config unreadable, sdeefs-replicad not running, this node
  keeping no replicas, the replica or job directory on the lower's filesystem: non-zero,
  and SLURM drains the node, as it should.

The kinds of the replicad's errors (``control.ControlError.kind``) decide, never their
text.

``JOB_DIR/JOBID.problem`` (JSON, mode 0644, removed by the Epilog)::

    {"kind": "failed" | "bare", "message": "<one line>"}
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pwd
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping

import attrs

from sdeefs import config as config_mod
from sdeefs import control, identity
from sdeefs.config import Engine, SiteConfig
from sdeefs.errors import ExitCode, QuietError
from sdeefs.fs.mask import build_mask, takes_xattr
from sdeefs.identity import Identity
from sdeefs.statedir import ReplicaDirs
from sdeefs.sysio import write_file_atomic

from .. import enter, env, view
from ..layout import EnvDirs, SiteRun, make_dirs

log = logging.getLogger(__name__)

# The ControlError kinds of sdeefs-replicad's answer (sdeefs.replication.daemon) that are
# the user's problem.  no-layer: the login node holds nothing of the user (who never logged
# in with sdeefs): the job runs without an environment.
NO_LAYER = "no-layer"
USER_KINDS = frozenset({"barrier-timeout", "skipped"})
PROBLEM_FAILED, PROBLEM_BARE = "failed", "bare"


class UserProblem(QuietError):
    """This user's environment cannot serve the job: the job fails, the node does not."""


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def _job_id() -> str:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOBID") or ""
    if not job.isdigit():
        raise QuietError("not in a SLURM job (SLURM_JOB_ID is not set)", ExitCode.USAGE)
    return job


def job_dirs(config: SiteConfig, node: str, job: str) -> EnvDirs:
    return EnvDirs.job(config.replication.on(node).job_dir, job)


def problem_path(config: SiteConfig, node: str, job: str) -> str:
    return os.path.join(config.replication.on(node).job_dir, f"{job}.problem")


def record_problem(config: SiteConfig, node: str, job: str, kind: str, message: str) -> None:
    """Leave the job's problem for its steps (``sdeefs-run``) to tell (module docstring)."""
    path = problem_path(config, node, job)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    write_file_atomic(path, json.dumps({"kind": kind, "message": message}).encode(), 0o644)


def read_problem(config: SiteConfig, node: str, job: str) -> tuple[str, str] | None:
    """(kind, message) the prolog left for this job (None: none)."""
    try:
        with open(problem_path(config, node, job), "rb") as f:
            problem = json.loads(f.read())
        return str(problem["kind"]), str(problem["message"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return PROBLEM_FAILED, "the job's environment could not be prepared on this node"


@attrs.frozen
class Verdict:
    """What the prolog decided for a job on a node: ``ready`` (the environment runs), or
    the problem it recorded for the job's tasks (``bare``, ``failed``) with its one line."""

    kind: str
    message: str = ""


READY = "ready"
Barrier = Callable[[str, float], Mapping[str, object]]
TakeSpare = Callable[[EnvDirs], bool]


def control_barrier(config: SiteConfig, node: str) -> Barrier:
    """The barrier as the prolog asks it: ``follow --wait`` on the node's replicad."""
    rep = config.replication.on(node)

    def wait(user: str, timeout: float) -> Mapping[str, object]:
        return control.request(rep.control, {"op": "follow", "user": user, "wait": True,
                                             "timeout": timeout},
                               timeout=timeout + 30, what="sdeefs-replicad")

    return wait


def start_job(config: SiteConfig, node: str, user: env.User, job: str, barrier: Barrier,
              spare: TakeSpare | None = None) -> Verdict:
    """The prolog's work, whoever runs it (``sdeefs job-prolog``, or the node's replicad on
    ``job-start``: sdeefs.replication.daemon): the replica at the barrier, then the job's
    environment; the user's problems recorded for the job's tasks (module docstring).
    Raises only for the node's problems."""
    try:
        prolog(config, node, user, job, barrier, spare)
    except control.ControlError as exc:
        if exc.kind != NO_LAYER:
            raise
        message = f"{user.name} has no sdeefs environment"
        record_problem(config, node, job, PROBLEM_BARE, message)
        return Verdict(PROBLEM_BARE, f"{message}; the job runs without one")
    except UserProblem as exc:
        record_problem(config, node, job, PROBLEM_FAILED, str(exc))
        return Verdict(PROBLEM_FAILED, f"{exc} (the job fails, the node stays in service)")
    if user.uid < config.min_uid:
        return Verdict(PROBLEM_BARE, f"{user.name} is a system account: the job runs without "
                       "an environment")
    return Verdict(READY)


def prolog(config: SiteConfig, node: str, user: env.User, job: str,
           barrier: Barrier | None = None, spare: TakeSpare | None = None
           ) -> env.EnvRecord | None:
    """Replica at the barrier, then the job's environment (idempotent)."""
    rep = config.replication.on(node)
    if user.uid < config.min_uid:
        record_problem(config, node, job, PROBLEM_BARE, f"{user.name} is a system account "
                       f"(uid below min_uid {config.min_uid})")
        return None
    try:
        reply = (barrier or control_barrier(config, node))(user.name, rep.barrier_timeout)
    except control.ControlError as exc:
        if exc.kind in USER_KINDS:
            raise UserProblem(str(exc)) from None
        raise
    log.info("job %s: replica of %s at seq %s (barrier %s)", job, user.name,
             reply.get("applied"), reply.get("barrier"))
    return start_environment(config, node, user, job, spare)


def start_environment(config: SiteConfig, node: str, user: env.User, job: str,
                      spare: TakeSpare | None = None) -> env.EnvRecord:
    """The job's environment over the user's replica (the caller saw it at the barrier):
    ``spare`` moves a spare environment of the user into the job's place if it has one."""
    rep = config.replication.on(node)
    os.makedirs(rep.job_dir, mode=0o755, exist_ok=True)
    lower_dev = os.stat(config.lower).st_dev
    for key, path in (("replica_dir", rep.replica_dir), ("job_dir", rep.job_dir)):
        if os.stat(path).st_dev == lower_dev:
            raise QuietError(f"replication.{key} {path} is on the same filesystem as the lower "
                             f"({config.lower}): the kernel refuses overlapping overlay layers; "
                             "put it on the node's local scratch filesystem", ExitCode.USAGE)
        if not takes_xattr(path, USER_XATTR_PROBE):  # (tmpfs before Linux 6.6)
            raise QuietError(f"replication.{key} {path}: its filesystem stores no user.* "
                             "xattrs, which a job's layers need (overlayfs' whiteouts and "
                             "opaque directories in a user namespace); put it on the node's "
                             "local scratch filesystem (ext4, xfs)", ExitCode.USAGE)
    where = job_dirs(config, node, job)
    if spare is not None and not os.path.exists(where.run.path) and \
            not os.path.exists(where.layer.path):
        spare(where)
    with env.locked(where.run):
        record = env.EnvRecord.load(where.run)
        if record is not None and env.is_alive(record):
            return record
        if os.path.exists(where.run.starting):  # an environment of this job that died, or
            # whose starter died before recording it (env.unrecorded): ended first, or its
            # init would run on with an overlay over the same upper as the new one
            env.teardown(where, record)
        return _launch(config, node, user, where)


def _launch(config: SiteConfig, node: str, user: env.User, where: EnvDirs) -> env.EnvRecord:
    """A job environment at ``where`` (the caller holds its lock)."""
    replica_upper = ReplicaDirs.of(config.replication.on(node).replica_dir,
                                   user.name).upper
    # The node's own /etc/subuid|subgid: the same ranges as the login node's (checked by
    # the replica as it applies records: docs/identity.md); never allocated here.
    try:
        ids = identity.of_user(user.name, config.min_uid, allocate=False)
    except identity.SubidError as exc:  # the user's problem, never the node's
        raise UserProblem(f"{user.name} on {node}: {exc}") from None
    _make_job_dirs(where, user, ids)
    layer = where.layer
    work = os.path.join(layer.state.work, "ovl")
    # A volatile overlay (scratch=True below) leaves WORK/work/incompat/volatile, and the
    # kernel refuses another mount over that workdir (after a crash, unsynced writes of the
    # upper may be lost).  Found here, it is this job's environment that died while the node
    # ran on (the caller holds the job's lock and found it dead; a crash ends the job): the
    # upper's writes are all in the page cache, the same job may go on with them.
    shutil.rmtree(os.path.join(work, "work", "incompat"), ignore_errors=True)
    try:
        with user_layers(config, node, user, ids) as layers:
            init = view.launch(config, user, ids, where.run, layer.upper, work,
                               middle=(replica_upper,),
                               host_pids=True, layers=layers, tmp_dir=job_tmp(where),
                               scratch=True)
    except (OSError, QuietError) as exc:  # the replica's content is the user's
        raise UserProblem(f"{user.name}'s environment did not start on {node}: {exc}") \
            from None
    record = env.EnvRecord.started_now(user, init, Engine.OVERLAY)
    record.save(where.run)
    return record


SPARE_PREFIX = ".spare-"  # JOB_DIR/.spare-USER(.run): a spare environment of USER
LAYERS_PREFIX = ".layers-"  # JOB_DIR/.layers-USER: the mask and lower USER's jobs share
LAYERS_TTL = 600.0  # seconds a shared mask serves new jobs before it is made again
USER_XATTR_PROBE = b"user.sdeefs.probe"  # set and removed on the job and replica dirs


@attrs.frozen
class UserLayers:
    """``JOB_DIR/.layers-U`` (root, 0700): the read-only layers below the replica that every
    job environment of U on the node shares, made once instead of per job::

        lock            flock'ed while they are made, used for a start, or ended
        lower/          the idmapped read-only bind of the host root (U's id maps)
        lower.key       U's passwd entry and id maps it was made with
        mask-KEY/       the mask (launcher/view.py: a tmpfs, or an ext4 image where tmpfs
                        has no user xattrs, sdeefs/fs/mask.py), made under KEY (:func:`layers_key`)
        mask-KEY.made   written once it is complete: "mask" or "none" (nothing to mask)

    Building the mask (thousands of whiteouts, one per root-only host entry of the cached
    scan) took 0.3-1 s of CPU per environment, run by the replicad while the previous
    job's first tasks ran (the spare), on every node of the job: the workflow's chain paid
    it in every stage.  Shared, each new environment costs the overlay mount and the
    namespaces only.  Safe to share: overlayfs never writes a lower layer, the user is the
    same, and nothing inside an environment can reach a layer's mount (the environment's
    root is the overlay; the host's tree is detached).  Safe to end any time: an overlay
    holds private clones of its layers (``clone_private_mount``), so environments running
    over an ended mask or lower keep theirs, whatever is unmounted here.
    """

    path: str

    lock = property(lambda self: os.path.join(self.path, "lock"))
    lower = property(lambda self: os.path.join(self.path, "lower"))
    lower_key = property(lambda self: os.path.join(self.path, "lower.key"))

    def mask(self, key: str) -> str:
        return os.path.join(self.path, f"mask-{key[:16]}")

    @classmethod
    def of(cls, config: SiteConfig, node: str, user: str) -> UserLayers:
        return cls(os.path.join(config.replication.on(node).job_dir, f"{LAYERS_PREFIX}{user}"))


def layers_key(config: SiteConfig, user: env.User, ids: Identity) -> str:
    """What a shared mask was made from: the config file and the root-only scan, the
    user's passwd entry and id maps, and what the deny list and sdeefs' own directories
    match in the lower now.  A change of any makes a new mask."""
    scan = SiteRun(config.run_dir).private_paths
    try:
        stale = time.time() - os.stat(scan).st_mtime >= config.private_scan_age
    except FileNotFoundError:
        stale = True
    if stale:  # current first: a key made without it would not last
        view.private_scan(config)
    digest = hashlib.sha256(_config_key(config).encode())
    digest.update(repr((attrs.astuple(user), attrs.astuple(ids))).encode())
    for pattern, path in view.masked_matches(config):
        kind = "d" if os.path.isdir(path) and not os.path.islink(path) else "-"
        digest.update(f"\0{pattern}\0{path}\0{kind}".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def user_layers(config: SiteConfig, node: str, user: env.User, ids: Identity
                ) -> Iterator[tuple[str, ...]]:
    """The shared layers of ``user``'s job environments on ``node``, made if missing, made
    under another key or older than LAYERS_TTL: ``(mask, lower)`` or ``(lower,)``.  Locked
    until the caller's overlay is mounted over them (nobody ends them meanwhile)."""
    layers = UserLayers.of(config, node, user.name)
    fd = _lock_layers(layers, create=True)
    assert fd is not None
    try:
        os.utime(fd)  # last used: NodeJobs.expire ends layers unused for SPARE_TTL
        mounts = view.mount_targets()
        maps = repr((attrs.astuple(user), attrs.astuple(ids))).encode()
        try:
            with open(layers.lower_key, "rb") as f:
                same = f.read() == maps
        except FileNotFoundError:
            same = False
        if not same or os.path.realpath(layers.lower) not in mounts:
            view.detach(layers.lower)  # made under other id maps (subuid changed): anew
            os.makedirs(layers.lower, mode=0o700, exist_ok=True)
            view.idmap_lower(config, user, ids, layers.lower)
            write_file_atomic(layers.lower_key, maps)
        key = layers_key(config, user, ids)
        mask, made = layers.mask(key), layers.mask(key) + ".made"
        try:
            with open(made) as f:
                kind = f.read()
                age = time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            kind, age = "", LAYERS_TTL
        if age >= LAYERS_TTL or kind not in ("mask", "none") or \
                (kind == "mask" and os.path.realpath(mask) not in mounts):
            _end_masks(layers)  # this key's too: it is made anew
            masked = build_mask(mask, config.lower, view.mask_spec(config, user),
                                view.MASK_OPAQUE, ids.shown)
            kind = "mask" if masked else "none"
            write_file_atomic(made, kind.encode())
        yield (mask, layers.lower) if kind == "mask" else (layers.lower,)
    finally:
        os.close(fd)


def _end_masks(layers: UserLayers) -> None:
    """Every mask of ``layers`` unmounted and removed (environments keep their clones)."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(layers.path):
            if name.startswith("mask-"):
                path = os.path.join(layers.path, name)
                if name.endswith(".made"):
                    os.unlink(path)
                else:
                    view.detach(path)
                    with contextlib.suppress(OSError):
                        os.rmdir(path)


def end_user_layers(layers: UserLayers) -> None:
    """Unmount and remove ``layers`` (running environments keep their clones)."""
    fd = _lock_layers(layers, create=False)
    if fd is None:
        return
    try:
        _end_masks(layers)
        view.detach(layers.lower)
        # never rmtree: a lower whose unmount failed is the host root
        with contextlib.suppress(OSError):
            os.rmdir(layers.lower)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layers.lower_key)
        os.unlink(layers.lock)  # a waiter sees its lock file gone, and starts over
        with contextlib.suppress(OSError):
            os.rmdir(layers.path)
    finally:
        os.close(fd)


def _lock_layers(layers: UserLayers, create: bool) -> int | None:
    """flock ``layers``' lock file (made with its directory if ``create``; else None when
    there is none): the descriptor, to close when done."""
    while True:
        if create:
            make_dirs(((os.path.dirname(layers.path), (0, 0), 0o755),
                       (layers.path, (0, 0), 0o700)))
        try:
            fd = os.open(layers.lock, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0),
                         0o600)
        except FileNotFoundError:
            if create:
                continue  # the directory was removed meanwhile
            return None
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(layers.lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # ended while we waited
        if not create:
            return None


@attrs.define(eq=False)
class NodeJobs:
    """The job ops of the node's resident sdeefs-replicad (``job-start``, ``job-end``:
    sdeefs.replication.daemon), which ``sdeefs-prolog``/``-epilog`` (launcher/enter/jobhook.c)
    ask for: the same work as ``sdeefs job-prolog``/``job-epilog``, without a Python start
    per job.  Each call reads the site config afresh, as a prolog would (the replicad's
    ``$SDEEFS_CONFIG`` or the default path); blocking: the replicad runs it in a thread.

    **Spare environments.**  After a job of U started here, :meth:`prepare` starts the next
    one ahead (``JOB_DIR/.spare-U``, ``.spare-U.run``: a fresh empty scratch upper over U's
    replica, nothing run in it); the next job of U takes it, after its barrier, by renaming
    both directories to the job's (its mounts go with them): the prolog's environment start
    becomes two renames.  A spare is used only if it was made under the same config file,
    the same scan for root-only files (refreshed after ``private_scan_age``), the same ids
    of the user and what the deny list matches in the lower now (its ``key``,
    :func:`layers_key`): otherwise it is ended and a job environment started as before.
    Nothing of a job is ever reused: a spare has never run a task.  Its overlay is mounted
    before the barrier, over the replica as it then was; a job environment's overlay is over a
    replica that moves on while the job runs anyway (the replica applies whole records, the
    overlay looks the changed entries up afresh: nothing was looked up in a spare but the
    mountpoints of its start).  The replicad ends the spares it finds at its start
    (:meth:`leftovers`), a spare whose user it stops following, and every spare older than
    its ``SPARE_TTL`` (:meth:`expire`; 10 minutes).
    """

    _locks: dict[str, threading.Lock] = attrs.field(init=False, factory=dict)
    _locks_lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def _lock(self, user: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(user, threading.Lock())

    def start(self, node: str, user: str, job: str, barrier: Barrier) -> dict[str, object]:
        """The reply of ``job-start``, with the milliseconds the barrier took (``barrier_ms``,
        None if there was none), whether a spare served (``spare``) and the whole (``ms``)."""
        began = time.monotonic()
        waited: list[float] = []
        took: list[bool] = []

        def timed(name: str, timeout: float) -> Mapping[str, object]:
            t0 = time.monotonic()
            try:
                return barrier(name, timeout)
            finally:
                waited.append(time.monotonic() - t0)

        config = config_mod.load()
        owner = env.User.lookup(user)

        def take(where: EnvDirs) -> bool:
            took.append(self._take_spare(config, node, owner, where))
            return took[-1]

        verdict = start_job(config, node, owner, job, timed, take)
        return {"job": job, "verdict": verdict.kind, "message": verdict.message,
                "barrier_ms": round(waited[0] * 1000, 1) if waited else None,
                "spare": bool(took and took[0]),
                "ms": round((time.monotonic() - began) * 1000, 1)}

    def end(self, node: str, job: str) -> tuple[dict[str, object], str | None]:
        """(the reply, the scratch left to remove in the background)."""
        ended, gone = end_job(config_mod.load(), node, job)
        return {"job": job, "ended": ended}, gone

    def prepare(self, node: str, user: str) -> bool:
        """Start a spare environment of ``user`` unless a usable one is there (True if one
        is there now).  The user's problems (a replica not there, ids) leave none."""
        config = config_mod.load()
        owner = env.User.lookup(user)
        if owner.uid < config.min_uid:
            return False
        spare = spare_dirs(config, node, user)
        key = _env_key(config, owner)
        if key is None:
            return False
        with self._lock(user):
            if _spare_usable(spare, key):
                return True
            self._end_spare(spare)
            try:
                os.makedirs(spare.run.path, mode=0o711, exist_ok=True)
                with env.locked(spare.run):
                    _launch(config, node, owner, spare)
                    write_file_atomic(os.path.join(spare.run.path, "spare-key"), key.encode())
            except (OSError, QuietError) as exc:
                log.info("no spare environment of %s on %s: %s", user, node, exc)
                self._end_spare(spare)
                return False
            return True

    def _take_spare(self, config: SiteConfig, node: str, user: env.User, where: EnvDirs
                    ) -> bool:
        spare = spare_dirs(config, node, user.name)
        with self._lock(user.name):
            if not os.path.isdir(spare.run.path):
                return False
            key = _env_key(config, user)
            if key is None or not _spare_usable(spare, key):
                self._end_spare(spare)
                return False
            os.rename(spare.run.path, where.run.path)
            os.rename(spare.layer.path, where.layer.path)
            return True

    def _end_spare(self, spare: EnvDirs) -> None:
        if not os.path.isdir(spare.run.path) and not os.path.isdir(spare.layer.path):
            return
        with env.locked(spare.run):
            env.teardown(spare, env.EnvRecord.load(spare.run))
        shutil.rmtree(spare.layer.path, ignore_errors=True)
        shutil.rmtree(spare.run.path, ignore_errors=True)

    def forget(self, node: str, user: str) -> None:
        """End ``user``'s spare environment and shared layers (the replicad stops following
        them)."""
        config = config_mod.load()
        with self._lock(user):
            self._end_spare(spare_dirs(config, node, user))
            end_user_layers(UserLayers.of(config, node, user))

    def remove_gone(self, path: str) -> bool:
        """A finished job's scratch (:func:`remove_gone`)."""
        return remove_gone(path)

    def leftovers(self, node: str) -> list[str]:
        """At the replicad's start: every spare ended; the scratch left to remove."""
        self.expire(node, 0)
        return gone_jobs(config_mod.load(), node)

    def expire(self, node: str, max_age: float) -> list[str]:
        """End the spares made more than ``max_age`` seconds ago (a user who stopped
        submitting keeps nothing running here for long); the users whose spare ended."""
        config = config_mod.load()
        job_dir = config.replication.on(node).job_dir
        ended = []
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(job_dir):
                if not (name.startswith(SPARE_PREFIX) and name.endswith(".run")):
                    continue
                user, dirs = name[len(SPARE_PREFIX):-4], EnvDirs.job(job_dir, name[:-4])
                with self._lock(user):
                    try:
                        made = os.stat(os.path.join(dirs.run.path, "spare-key")).st_mtime
                    except FileNotFoundError:
                        made = 0.0  # half made (a daemon stopped while making it)
                    if time.time() - made >= max_age:
                        self._end_spare(dirs)
                        ended.append(user)
            for name in os.listdir(job_dir):  # shared layers no new job used for as long
                if name.startswith(LAYERS_PREFIX):
                    user = name[len(LAYERS_PREFIX):]
                    layers = UserLayers(os.path.join(job_dir, name))
                    with self._lock(user):
                        try:
                            used = os.stat(layers.lock).st_mtime
                        except FileNotFoundError:
                            used = 0.0
                        if time.time() - used >= max_age:
                            end_user_layers(layers)
        return ended


def spare_dirs(config: SiteConfig, node: str, user: str) -> EnvDirs:
    return job_dirs(config, node, f"{SPARE_PREFIX}{user}")


def _config_key(config: SiteConfig) -> str:
    """A digest of the config file and the cached scan for root-only files (of their
    contents: nodes sharing a run directory rewrite the scan with the same content)."""
    digest = hashlib.sha256()
    for path in (os.environ.get("SDEEFS_CONFIG") or config_mod.DEFAULT_PATH,
                 SiteRun(config.run_dir).private_paths):
        try:
            with open(path, "rb") as f:
                digest.update(f"{path}\0{len(data := f.read())}\0".encode() + data)
        except FileNotFoundError:
            digest.update(f"{path}\0-\0".encode())
    return digest.hexdigest()


def _env_key(config: SiteConfig, user: env.User) -> str | None:
    """What a spare must have been made under to serve a job now: the key of its shared
    layers (:func:`layers_key`: the config, the root-only scan, the user's ids, what the
    deny list matches now).  None: the user's ids are not there (no spare: the job's start
    says why)."""
    try:
        ids = identity.of_user(user.name, config.min_uid, allocate=False)
    except identity.SubidError:
        return None
    return layers_key(config, user, ids)


def _spare_usable(spare: EnvDirs, key: str) -> bool:
    try:
        with open(os.path.join(spare.run.path, "spare-key")) as f:
            if f.read() != key:
                return False
    except FileNotFoundError:
        return False
    record = env.EnvRecord.load(spare.run)
    return record is not None and env.is_alive(record)


def job_tmp(where: EnvDirs) -> str:
    """The job's /tmp on the host (module docstring): inside its root-only directory."""
    return os.path.join(where.layer.path, "tmp")


def _make_job_dirs(where: EnvDirs, user: env.User, ids: Identity) -> None:
    root, owner = (0, 0), (user.uid, user.gid)
    layer = where.layer
    make_dirs(((layer.path, root, 0o700), (layer.upper, ids.root, 0o755),
               (layer.state.path, root, 0o700), (layer.state.work, owner, 0o700),
               (job_tmp(where), ids.root, 0o1777), (where.run.lower, root, 0o700)))


def epilog(config: SiteConfig, node: str, job: str, detach: bool = False) -> bool:
    """End the job's environment on this node and remove its scratch upper: here, or with
    ``detach`` by a detached process (:func:`remove_gone_detached`: SLURM's epilog does not
    wait for it)."""
    ended, gone = end_job(config, node, job)
    if gone is not None:
        (remove_gone_detached if detach else remove_gone)(gone)
    return ended


GONE_PREFIX = ".gone-"  # JOB_DIR/.gone-JOBID-NS: a finished job's scratch, being removed


def end_job(config: SiteConfig, node: str, job: str) -> tuple[bool, str | None]:
    """The epilog's work, whoever runs it: the job's processes killed (gone when this
    returns), its mounts detached, its problem and run directory removed, and its scratch
    upper renamed out of the way: ``(ended, path)``, ``path`` what is left to remove (by
    the caller, at leisure: a new job of the same id finds nothing of this one)."""
    where = job_dirs(config, node, job)
    had_problem = _remove_problem(config, node, job)
    if not os.path.isdir(where.run.path) and not os.path.isdir(where.layer.path):
        return had_problem, None
    with env.locked(where.run):
        env.teardown(where, env.EnvRecord.load(where.run))
    trash = os.path.join(os.path.dirname(where.layer.path),
                         f"{GONE_PREFIX}{job}-{time.monotonic_ns()}")
    gone: str | None = trash
    try:
        os.rename(where.layer.path, trash)
    except FileNotFoundError:
        gone = None
    except OSError:  # not renamable (it should be): removed here and now instead
        shutil.rmtree(where.layer.path, ignore_errors=True)
        gone = None
    shutil.rmtree(where.run.path, ignore_errors=True)
    return True, gone


def remove_gone(path: str) -> bool:
    """Remove a finished job's scratch (``JOB_DIR/.gone-*``, renamed there by
    :func:`end_job` once the job's processes were gone and its mounts detached): True once
    it is gone.  Never while something is mounted at or below it in this mount namespace
    (nothing of a job is, but rmtree walks into a mount, and a detach that failed would
    leave the idmapped host root or a replica there): left, False, with one line in the
    log; the next remover (the replicad's next start, ``sdeefs end-spares``) tries again.
    Symlinks a job planted are removed, never followed (``shutil.rmtree`` walks by fds)."""
    mounted = sorted(m for m in view.mount_targets() if view.is_inside(m, path))
    if mounted:
        log.warning("%s not removed: %s mounted there", path, ", ".join(mounted))
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def remove_gone_detached(path: str) -> None:
    """:func:`remove_gone` in a detached process (its own session; ``sdeefs job-epilog``,
    the epilog without the replicad, returns at once, as the replicad's does)."""
    child = os.fork()
    if child == 0:  # pragma: no cover (the child ends by os._exit)
        code = 0
        try:
            os.setsid()
            if os.fork() == 0:  # nothing of slurmd's: its pipes stay nobody's
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                remove_gone(path)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.waitpid(child, 0)


def gone_jobs(config: SiteConfig, node: str) -> list[str]:
    """Scratch uppers of finished jobs not removed yet (their remover stopped)."""
    job_dir = config.replication.on(node).job_dir
    try:
        return [os.path.join(job_dir, n) for n in os.listdir(job_dir)
                if n.startswith(GONE_PREFIX)]
    except FileNotFoundError:
        return []


def _remove_problem(config: SiteConfig, node: str, job: str) -> bool:
    try:
        os.unlink(problem_path(config, node, job))
    except FileNotFoundError:
        return False
    return True


def _slurm_user() -> env.User:
    name = os.environ.get("SLURM_JOB_USER")
    if not name:
        raise QuietError("SLURM_JOB_USER is not set (run me as SLURM's Prolog/Epilog)",
                         ExitCode.USAGE)
    return env.User.lookup(name)


def prolog_main(config: SiteConfig) -> int:
    """The Prolog: 0 unless the node itself has a problem (module docstring)."""
    node, job, user = node_name(), _job_id(), _slurm_user()
    verdict = start_job(config, node, user, job, control_barrier(config, node))
    if verdict.message:  # slurmd's log says it; the job's steps say it to the user
        print(f"sdeefs: job {job}: {verdict.message}", file=sys.stderr)
    return 0


def epilog_main(config: SiteConfig) -> int:
    epilog(config, node_name(), _job_id(), detach=True)
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
        if os.environ.get("SDEEFS_JOB_ENV") == _job_id():
            _exec_bare(command)  # the SPANK plugin put this task in the environment already
        config = config_mod.load()
        problem = read_problem(config, node_name(), _job_id())
        if problem is not None and problem[0] == PROBLEM_BARE:
            _exec_bare(command)
        if problem is not None:
            raise QuietError(f"job {_job_id()} on {node_name()}: {problem[1]}")
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


PLUGSTACK_DIR = "/etc/slurm/plugstack.conf.d"  # Debian's plugstack.conf includes *.conf here
PLUGSTACK_FILE = "sdeefs.conf"
PLUGSTACK_MARK = "# written by sdeefs install-slurm"


def spank_plugin() -> str:
    """This installation's SPANK plugin (scripts/install.sh: PREFIX/lib/sdeefs)."""
    return os.path.join(sys.prefix, "lib", "sdeefs", "sdeefs_spank.so")


def plugstack_line(config: SiteConfig) -> str:
    """The plugstack.conf line that loads the plugin (launcher/enter/spank.c)."""
    return f"required {spank_plugin()} job_dir={config.replication.job_dir}"


def install_slurm(config: SiteConfig, plugstack_dir: str) -> str:
    """``sdeefs install-slurm``: write ``plugstack_dir/sdeefs.conf`` (the plugin's line, for
    this site's job_dir); returns its path.  The commands themselves (sdeefs-prolog,
    sdeefs-epilog, sdeefs-run) are scripts/install.sh's; a file of that name not written
    by us is refused."""
    plugin = spank_plugin()
    if not os.path.isfile(plugin):
        raise QuietError(f"{plugin} is missing: run scripts/install.sh (it builds the plugin "
                         "against libslurm-dev)", ExitCode.UNAVAILABLE)
    if not config.replication.job_dir.startswith("/") or any(
            c.isspace() for c in config.replication.job_dir):
        raise QuietError(f"replication.job_dir {config.replication.job_dir!r}: the plugin "
                         "needs an absolute path without spaces", ExitCode.USAGE)
    path = os.path.join(plugstack_dir, PLUGSTACK_FILE)
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        if not f.read().startswith(PLUGSTACK_MARK):
            raise QuietError(f"{path} exists and was not written by sdeefs: not replaced",
                             ExitCode.BUSY)
    os.makedirs(plugstack_dir, mode=0o755, exist_ok=True)
    write_file_atomic(path, f"{PLUGSTACK_MARK} (docs/admin.md)\n{plugstack_line(config)}\n"
                      .encode(), 0o644)
    return path


def _exec_bare(command: list[str]) -> None:
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        raise QuietError(f"{command[0]}: {exc.strerror}", 127) from None


def slurm_hook_main(which: str) -> int:
    """``sdeefs job-prolog``/``job-epilog``: the prolog's or epilog's work in this process.
    SLURM runs ``sdeefs-prolog``/``-epilog`` (launcher/enter/jobhook.c), which ask the
    node's replicad instead, and run this where they cannot (the replicad not running ...)."""
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

