"""The site configuration: one TOML file, every key documented, every error naming its key.

Shared core: read by the launcher (login environments, jobs) and by
``sdeefs-replicad`` ([replication]) on every node.

Read from ``/etc/sdeefs/sdeefs.toml`` or the file named by ``$SDEEFS_CONFIG``;
a missing file means all defaults.  Example (every key, with its default)::

    [sdeefs]
    root = "/var/lib/sdeefs"     # per-user layers: ROOT/USER/layer.img (engine kernel) or
                                 # ROOT/USER/upper, and ROOT/USER/state
    run_dir = "/run/sdeefs"      # per-user runtime state (idmapped lower, mask, init pid)
    engine = "kernel"            # kernel: kernel overlayfs, the upper on the user's layer
                                 #   image, journaled after the fact by a capture daemon
                                 #   (fanotify; "captured before the barrier")
                                 # hybrid: kernel overlayfs over the journaling sdeefs upper
                                 #   (write-ahead)
                                 # fuse: the pure sdeefs overlay (every access through it)
                                 # overlay: plain kernel overlayfs on the upper (no journal)
    layer_size = "64G"           # engine kernel: size of each user's layer image
                                 # (ROOT/U/layer.img, sparse ext4): the user's quota; a full
                                 # layer is ENOSPC in their own filesystem, never the host's.
                                 # Read when the image is made (a bigger value later does
                                 # not grow existing images)
    lower = "/"                  # the shared base system every user starts from
    min_uid = 1000               # users below this uid get no environment (system accounts)
    shared = ["/scratch"]        # host paths bind-mounted read-write when they exist
    sockets = ["/run/munge", "/run/nscd", "/var/lib/sss/pipes"]
                                 # host directories of unix sockets the environment's
                                 # clients talk to (munge for SLURM, nscd/sssd for names),
                                 # bound into its own /run ... when they exist
    deny = [...]                 # host paths hidden from every view (globs allowed); the
                                 # default hides credentials, other users' homes and sdeefs'
                                 # own directories, see DEFAULT_DENY
    grace = 10.0                 # seconds an environment outlives the end of its last
                                 # session or of its last process, whichever comes later:
                                 # work left running at logout (nohup, tmux, screen, a
                                 # disowned job) keeps it running; so does a quick re-login
    idle_timeout = 0             # seconds an environment outlives its last session at
                                 # least, even with nothing running; 0: only the grace
    cache_timeout = 10.0         # seconds the view caches names and attributes of the lower
    fuse_nodes = 50000           # (engine fuse) inodes its daemon keeps known to the kernel;
                                 # past it the least recently looked-up are handed back:
                                 # bounds the daemon's memory (~1.5 KB each), at least 1000
    guard = "auto"               # what hides root-only and denied host files in a login
                                 #   view: bpf (a BPF LSM program in the kernel, no
                                 #   layer: launcher/login/bpfguard.py), c (the guard
                                 #   layer's daemon sdeefs-guard, FUSE, libfuse3) or python
                                 #   (the same layer in pyfuse3, the reference model);
                                 #   auto: bpf where this kernel loads the program, the
                                 #   engine is kernel or hybrid and every deny pattern is
                                 #   in its subset, else c (`sdeefs doctor` says which and
                                 #   why).  $SDEEFS_GUARD overrides the daemon (c/python)
    tmp_size = "25%"             # size of the private /tmp (a tmpfs) of a login environment;
                                 #   a job's /tmp is JOB_DIR/JOBID/tmp on the node's disk
    pids_max = 4096              # processes and threads of one login environment
    memory_max = "50%"           # its memory, /tmp included (bytes: 8G, 512M; or % of RAM)
    cpu_weight = 100             # its CPU share against other environments (1..10000)
                                 # (launcher/limits.py: one cgroup per environment)
    private_scan_age = 86400.0   # seconds a scan for root-only files stays valid: job
                                 # environments on compute nodes, which run no guard layer
                                 # (launcher/compute/private.py; `sdeefs scan-private`)

    [replication]                # compute nodes and jobs (replicad, launcher/compute/job.py)
    login = ""                   # HOST:PORT of the login node's sdeefs-replicad (required on
                                 # compute nodes; where the login node's replicad listens)
    listen = ""                  # HOST:PORT where this node's replicad serves followers: on
                                 # compute nodes, makes it a relay of the fan-out tree (its
                                 # address as the other nodes reach it; "" = no relaying)
    auth = "auto"                # how replicads know each other: munge (the site's munged: no
                                 # key to distribute), key (the shared key below), auto (key
                                 # if key_file exists, munge otherwise); the same everywhere
    munge_socket = "/run/munge/munge.socket.2"  # munged's socket (auth munge)
    key_file = "/etc/sdeefs/replication.key"   # shared key, root only, >= 32 bytes
    control = "/run/sdeefs-replicad.sock"      # the local replicad's control socket
    replica_dir = "/var/lib/sdeefs-replica"    # replicas of users' uppers on this node
    job_dir = "/var/lib/sdeefs-jobs"           # per-job scratch uppers (removed at job end)
    barrier_timeout = 300.0      # seconds the prolog waits for the replica to catch up
    fanout = 4                   # direct followers of a user's stream per replicad before
                                 # the next ones are sent to a relay (needs listen there)

In the [replication] paths, ``%n`` stands for the node's name (SLURMD_NODENAME, or the
short host name): several simulated nodes can share one machine.
"""

from __future__ import annotations

import enum
import os
import re
import tomllib
from typing import Any

import attrs

from sdeefs.errors import ExitCode, QuietError

DEFAULT_PATH = "/etc/sdeefs/sdeefs.toml"


class Engine(enum.StrEnum):
    """What an environment's root is made of (one enum for "engine" everywhere)."""

    KERNEL = "kernel"  # kernel overlayfs on the user's layer image, captured by fanotify
    HYBRID = "hybrid"  # kernel overlayfs over the journaling sdeefs passthrough upper
    FUSE = "fuse"  # the pure sdeefs overlay: every access through the daemon
    OVERLAY = "overlay"  # plain kernel overlayfs on the upper, no journal (jobs' scratch)


ENGINES = tuple(e.value for e in Engine)


class GuardDaemon(enum.StrEnum):
    """Which daemon serves the guard layer (sdeefs.fs.guard: the same rules in both)."""

    C = "c"  # sdeefs-guard (sdeefs/fs/guardd/guard.c, libfuse3's low-level API)
    PYTHON = "python"  # sdeefs.fs.ops.GuardOperations (pyfuse3): the reference model


GUARD_DAEMONS = tuple(g.value for g in GuardDaemon)


class Guard(enum.StrEnum):
    """The ``guard`` key: what hides root-only and denied host files in a login view."""

    AUTO = "auto"  # bpf where it can run (launcher/login/bpfguard.py: choose), else c
    BPF = "bpf"  # the BPF LSM program (launcher/login/bpf), no layer; the login fails if not
    C = "c"  # the guard layer, served by sdeefs-guard (GuardDaemon.C)
    PYTHON = "python"  # the guard layer, served by pyfuse3 (GuardDaemon.PYTHON)


GUARDS = tuple(g.value for g in Guard)


def guard_daemon(configured: GuardDaemon) -> GuardDaemon:
    """The configured guard daemon, or the one ``$SDEEFS_GUARD`` names."""
    chosen = os.environ.get("SDEEFS_GUARD", "") or configured.value
    if chosen not in GUARD_DAEMONS:
        raise QuietError(f"SDEEFS_GUARD must be one of {', '.join(GUARD_DAEMONS)}, not "
                         f"{chosen!r}", ExitCode.USAGE)
    return GuardDaemon(chosen)
DEFAULT_DENY = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers.d",
    "/etc/munge", "/etc/ssh/ssh_host_*_key", "/root", "/var/spool/slurm", "/var/spool/slurmd",
    "/var/lib/slurm", "/var/log", "/home",
)


@attrs.frozen
class Replication:
    """The [replication] table (see the module docstring)."""

    login: str = ""
    listen: str = ""
    auth: str = "auto"
    munge_socket: str = "/run/munge/munge.socket.2"
    key_file: str = "/etc/sdeefs/replication.key"
    control: str = "/run/sdeefs-replicad.sock"
    replica_dir: str = "/var/lib/sdeefs-replica"
    job_dir: str = "/var/lib/sdeefs-jobs"
    barrier_timeout: float = 300.0
    fanout: int = 4

    def on(self, node: str) -> Replication:
        """These settings with ``%n`` replaced by ``node``."""
        return attrs.evolve(self, **{key: getattr(self, key).replace("%n", node) for key in
                                     ("listen", "control", "replica_dir", "job_dir")})


@attrs.frozen
class SiteConfig:
    """Validated site configuration (see the module docstring for each key)."""

    root: str = "/var/lib/sdeefs"
    run_dir: str = "/run/sdeefs"
    engine: Engine = Engine.KERNEL
    lower: str = "/"
    min_uid: int = 1000
    shared: tuple[str, ...] = ("/scratch",)
    sockets: tuple[str, ...] = ("/run/munge", "/run/nscd", "/var/lib/sss/pipes")
    deny: tuple[str, ...] = DEFAULT_DENY
    grace: float = 10.0
    idle_timeout: float = 0.0
    cache_timeout: float = 10.0
    fuse_nodes: int = 50_000
    guard: Guard = Guard.AUTO
    tmp_size: str = "25%"
    pids_max: int = 4096
    memory_max: str = "50%"
    cpu_weight: int = 100
    layer_size: int = 64 << 30
    private_scan_age: float = 86400.0
    replication: Replication = Replication()


def _absolute(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise QuietError(f"config: {key} must be an absolute path, not {value!r}", ExitCode.USAGE)
    return os.path.normpath(value)


def _paths(key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise QuietError(f"config: {key} must be a list of absolute paths", ExitCode.USAGE)
    return tuple(_absolute(f"{key}[{i}]", v) for i, v in enumerate(value))


def _number(key: str, value: object, minimum: float = 0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise QuietError(f"config: {key} must be a number >= {minimum}, not {value!r}",
                         ExitCode.USAGE)
    return float(value)


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_LAYER = 64 << 20  # ext4 with a journal needs some room; below this a layer is useless


def parse_size(what: str, value: object) -> int:
    """A byte count from ``"64G"``, ``"512M"`` or an integer; at least MIN_LAYER."""
    match = re.fullmatch(r"(\d+)([kmgtKMGT]?)", value) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif match:
        size = int(match[1]) * _UNITS[match[2].lower()]
    else:
        raise QuietError(f"{what} must look like 64G or 512M, not {value!r}", ExitCode.USAGE)
    if size < MIN_LAYER:
        raise QuietError(f"{what} must be at least 64M, not {value!r}", ExitCode.USAGE)
    return size


def _known_keys(table: dict[str, Any], record: type, name: str, source: str) -> None:
    """Every key of the TOML table ``[name]`` is a field of ``record``, or one clear error."""
    fields = {f.name for f in attrs.fields(record)}
    for key in table:
        if key not in fields:
            raise QuietError(f"{source}: unknown key {name}.{key}", ExitCode.USAGE)


def parse(data: dict[str, Any], source: str = "config") -> SiteConfig:
    """Build a SiteConfig from a parsed TOML document; one clear error per bad key."""
    unknown_tables = set(data) - {"sdeefs", "replication"}
    if unknown_tables:
        raise QuietError(f"{source}: unknown table [{sorted(unknown_tables)[0]}]", ExitCode.USAGE)
    table = data.get("sdeefs", {})
    if not isinstance(table, dict):
        raise QuietError(f"{source}: [sdeefs] must be a table", ExitCode.USAGE)
    _known_keys(table, SiteConfig, "sdeefs", source)
    values: dict[str, Any] = {}
    for key in ("root", "run_dir", "lower"):
        if key in table:
            values[key] = _absolute(f"sdeefs.{key}", table[key])
    if "engine" in table:
        if table["engine"] not in ENGINES:
            raise QuietError(f"{source}: sdeefs.engine must be one of {', '.join(ENGINES)}, "
                             f"not {table['engine']!r}", ExitCode.USAGE)
        values["engine"] = Engine(table["engine"])
    if "guard" in table:
        if table["guard"] not in GUARDS:
            raise QuietError(f"{source}: sdeefs.guard must be one of {', '.join(GUARDS)}, "
                             f"not {table['guard']!r}", ExitCode.USAGE)
        values["guard"] = Guard(table["guard"])
    if "min_uid" in table:
        values["min_uid"] = int(_number("sdeefs.min_uid", table["min_uid"]))
    for key in ("shared", "deny", "sockets"):
        if key in table:
            values[key] = _paths(f"sdeefs.{key}", table[key])
    for key in ("grace", "idle_timeout", "cache_timeout", "private_scan_age"):
        if key in table:
            values[key] = _number(f"sdeefs.{key}", table[key])
    if "fuse_nodes" in table:
        values["fuse_nodes"] = int(_number("sdeefs.fuse_nodes", table["fuse_nodes"], 1000))
    if "pids_max" in table:
        values["pids_max"] = int(_number("sdeefs.pids_max", table["pids_max"], 16))
    if "cpu_weight" in table:
        values["cpu_weight"] = int(_number("sdeefs.cpu_weight", table["cpu_weight"], 1))
        if values["cpu_weight"] > 10000:
            raise QuietError(f"{source}: sdeefs.cpu_weight must be at most 10000",
                             ExitCode.USAGE)
    if "memory_max" in table:
        size = table["memory_max"]
        if not isinstance(size, str) or not re.fullmatch(r"\d+[kmgtKMGT%]?", size):
            raise QuietError(f"{source}: sdeefs.memory_max must look like 50% or 8G, not "
                             f"{size!r}", ExitCode.USAGE)
        values["memory_max"] = size
    if "tmp_size" in table:
        size = table["tmp_size"]
        if not isinstance(size, str) or not re.fullmatch(r"\d+[kmgKMG%]?", size):
            raise QuietError(f"{source}: sdeefs.tmp_size must look like 25% or 4G, not {size!r}",
                             ExitCode.USAGE)
        values["tmp_size"] = size
    if "layer_size" in table:
        values["layer_size"] = parse_size(f"{source}: sdeefs.layer_size", table["layer_size"])
    if "replication" in data:
        values["replication"] = _replication(data["replication"], source)
    return SiteConfig(**values)


def _replication(table: object, source: str) -> Replication:
    if not isinstance(table, dict):
        raise QuietError(f"{source}: [replication] must be a table", ExitCode.USAGE)
    _known_keys(table, Replication, "replication", source)
    values: dict[str, Any] = {}
    for key in ("login", "listen"):
        if key in table:
            address = table[key]
            if not isinstance(address, str) or not re.fullmatch(r"[^\s:]+:\d{1,5}", address):
                raise QuietError(f"{source}: replication.{key} must look like HOST:PORT, "
                                 f"not {address!r}", ExitCode.USAGE)
            values[key] = address
    if "auth" in table:
        if table["auth"] not in ("auto", "munge", "key"):
            raise QuietError(f"{source}: replication.auth must be auto, munge or key, not "
                             f"{table['auth']!r}", ExitCode.USAGE)
        values["auth"] = table["auth"]
    for key in ("key_file", "munge_socket", "control", "replica_dir", "job_dir"):
        if key in table:
            values[key] = _absolute(f"replication.{key}", table[key])
    if "barrier_timeout" in table:
        values["barrier_timeout"] = _number("replication.barrier_timeout",
                                            table["barrier_timeout"], 1)
    if "fanout" in table:
        values["fanout"] = int(_number("replication.fanout", table["fanout"], 1))
    return Replication(**values)


def load(path: str | None = None) -> SiteConfig:
    """Load the configuration file (``$SDEEFS_CONFIG`` or /etc/sdeefs/sdeefs.toml)."""
    path = path or os.environ.get("SDEEFS_CONFIG") or DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if path != DEFAULT_PATH:
            raise QuietError(f"config file {path} does not exist", ExitCode.USAGE) from None
        return SiteConfig()
    except tomllib.TOMLDecodeError as exc:
        raise QuietError(f"{path}: not valid TOML: {exc}", ExitCode.USAGE) from None
    return parse(data, path)
