"""``sdeefs end-spares``: what a stopped sdeefs-replicad left running on a compute node, ended.

After a job of U started on a node, the node's replicad starts U's next job environment
ahead, a *spare* (``JOB_DIR/.spare-U``, ``.spare-U.run``), over the read-only layers U's
jobs there share (``JOB_DIR/.layers-U``: an idmapped bind of the host root and the mask
tmpfs, both mounted in the host's mount namespace): sdeefs.launcher.compute.job.NodeJobs.
The replicad ends them when it stops following U, after SPARE_TTL unused, and at its start.

Its unit kills only the daemon when it stops or restarts (``KillMode=process``: running
jobs' environments are its descendants and must stay; docs/admin.md), so a spare's init
and the shared layers' mounts would outlive ``systemctl stop sdeefs-replicad@compute``
until the daemon's next start, possibly never.  The unit's ``ExecStopPost`` runs this
command once the daemon is gone, on a stop, a restart and after a crash alike:

* every spare of the node ended (its init and the processes of its mount namespace
  killed, by the pid and start time its record names, or, for a spare whose start the
  daemon did not live to record, the pid its start left in ``private/starting``:
  sdeefs.launcher.env.unrecorded; nothing else is; its directories removed) and every
  user's shared layers unmounted and removed.  Running jobs keep theirs: an overlay holds
  private clones of its layers, and a job's own environment is not a spare (a spare a job
  took was renamed to the job's directory);
* nothing if this node has no replicas (``--role login``), or if the replicad answers on
  its control socket: then it is running and ends its spares itself (this refuses, and
  exits BUSY, rather than race its job ops).

* the scratch uppers of finished jobs that the daemon had not removed yet
  (``JOB_DIR/.gone-*``: renamed there by the job's epilog once its processes were gone
  and its mounts detached; a stopping daemon does not wait for their removal) removed,
  unless something is mounted there (:func:`sdeefs.launcher.compute.job.remove_gone`).
"""

from __future__ import annotations

import logging

from sdeefs import control
from sdeefs.config import SiteConfig
from sdeefs.errors import ExitCode, QuietError

from .job import NodeJobs, gone_jobs, remove_gone

log = logging.getLogger(__name__)

STATUS_TIMEOUT = 10.0  # seconds a live replicad has to answer "status"


def replicad_running(config: SiteConfig, node: str) -> bool:
    """Does a replicad answer on ``node``'s control socket?  (A socket file nobody listens
    on, or none: no.  One that accepts and then does not answer in time: yes, hung; it
    may still run job ops, so nothing is ended under it.)"""
    try:
        control.request(config.replication.on(node).control, {"op": "status"},
                        timeout=STATUS_TIMEOUT, what="sdeefs-replicad")
    except control.ControlError:
        return True  # it answered, with an error
    except QuietError as exc:
        return exc.exitcode != ExitCode.UNAVAILABLE
    return True


def end_spares(config: SiteConfig, node: str) -> list[str]:
    """End every spare job environment and shared layers on ``node`` (module docstring):
    the users whose spare ended.  QuietError (BUSY) while the node's replicad runs."""
    if replicad_running(config, node):
        raise QuietError(f"sdeefs-replicad is running on {node}: it ends its spare "
                         "environments itself (stop it first)", ExitCode.BUSY)
    ended = NodeJobs().expire(node, 0)
    for user in ended:
        log.info("%s: the spare job environment on %s ended", user, node)
    for path in gone_jobs(config, node):
        remove_gone(path)
    return ended
