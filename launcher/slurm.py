"""SLURM clients inside an environment: the shims (the C helper's ``asuser``, enter.h).

Inside root is one of the user's subordinate ids (docs/identity.md), while munge vouches
for the caller's host uid and slurmctld insists on the user's own: a client run as
inside root would be refused ("Invalid user id").  So the environment shows, at each
client's path, ``sdeefs-enter`` itself, which (run as ``sbatch`` ...) switches inside
root to the user's own uid, which the namespace maps to itself, and execs the host's
real client, bound at ``SLURM_REAL_DIR/NAME`` in the environment's own /run.  A client
run as the user (a job, a shell of ``salloc``) is exec'd unchanged.
"""

from __future__ import annotations

import os

from sdeefs.config import SiteConfig

from . import enter

CLIENTS = ("sbatch", "srun", "salloc", "squeue", "scancel", "sinfo", "scontrol", "sacct",
           "sattach", "sbcast", "sstat")
SLURM_REAL_DIR = "/run/sdeefs/slurm"  # as enter.h says
SEARCH = ("/usr/local/bin", "/usr/bin", "/bin", "/opt/slurm/bin")


def host_clients(lower: str) -> dict[str, str]:
    """name -> the host's client (its real path, symlinks resolved), for those installed."""
    found = {}
    for name in CLIENTS:
        for directory in SEARCH:
            path = os.path.join(lower, directory.lstrip("/"), name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                found[name] = os.path.realpath(path)
                break
    return found


def shim_binds(config: SiteConfig) -> list[str]:
    """``sdeefs-enter start`` options: each real client at SLURM_REAL_DIR/NAME, the shim
    over it."""
    args: list[str] = []
    clients = host_clients(config.lower)
    if not clients:
        return args
    helper = enter.helper_path()
    for name, real in clients.items():
        inside = "/" + os.path.relpath(real, config.lower)
        args += ["--ro-bind", f"{real}:{SLURM_REAL_DIR}/{name}", "--ro-bind", f"{helper}:{inside}"]
    return args
