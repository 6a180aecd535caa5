"""The ``sdeefs`` command: mount, umount, diff, log, check.

User errors are one line on stderr and a non-zero exit code (QuietError);
``--debug`` turns on DEBUG logging and shows tracebacks; ``--debug-module
sdeefs.cow`` limits DEBUG logging to the named modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from sdeefs import config, control
from sdeefs.config import Engine, SiteConfig
from sdeefs.errors import BadRecord, ExitCode, JournalCorrupt, QuietError
from sdeefs.mount import MountRequest, default_state, mount, umount

from . import env, view
from .compute import job
from .login import pam

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdeefs", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--debug-module", action="append", default=[], metavar="MODULE",
                        help="debug logging for one module only, e.g. sdeefs.cow (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount a user's view (lower + upper)")
    m.add_argument("--lower", default="/", help="read-only lower tree (default: /)")
    m.add_argument("--upper", required=True, help="the user's upper directory")
    m.add_argument("--state", help="state directory (journal, work dir); default: beside upper")
    m.add_argument("--engine", choices=("fuse", "hybrid"), default="fuse",
                   help="fuse: pure sdeefs overlay; hybrid: kernel overlayfs over the "
                        "journaling sdeefs upper")
    m.add_argument("--passthrough-upper", action="store_true",
                   help="serve the layer root itself (upper/ and work/) for a kernel overlay")
    m.add_argument("--no-journal", action="store_true", help="do not journal (benchmarks)")
    m.add_argument("--exclude", action="append", default=[], metavar="PATH",
                   help="lower path shown as an empty directory (repeatable; /proc /sys /dev "
                        "/run are excluded when the lower is /)")
    m.add_argument("--cache-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long the kernel caches names and attributes; lower changes "
                        "appear within this time (default 10)")
    m.add_argument("--sync-interval", type=float, default=5.0, metavar="SECONDS",
                   help="journal fdatasync period when nobody calls fsync (default 5)")
    m.add_argument("--xattr-namespace", choices=("trusted", "user"), default="trusted",
                   help="overlay xattrs as trusted.overlay.* (host mounts) or user.overlay.* "
                        "(user-namespace mounts with userxattr)")
    m.add_argument("--no-writeback-cache", action="store_true")
    m.add_argument("--segment-bytes", type=int, default=64 << 20, metavar="BYTES",
                   help="start a new journal segment beyond this size; trimming after "
                        "replication removes whole segments (default 64 MiB)")
    m.add_argument("--foreground", action="store_true", help="stay attached")
    m.add_argument("mountpoint")

    u = sub.add_parser("umount", help="unmount and wait for the daemon to finish")
    u.add_argument("mountpoint")

    ip = sub.add_parser("install-pam", help="add the session hook to /etc/pam.d/SERVICE")
    ip.add_argument("--service", required=True, help="PAM service, e.g. sshd or login")
    ip.add_argument("--control", choices=("optional", "required"), default="optional")
    up = sub.add_parser("uninstall-pam", help="remove the session hook from a PAM service")
    up.add_argument("--service", required=True)
    for name, helptext in (("start", "start USER's environment (as the PAM hook does)"),
                           ("stop", "stop USER's environment: its processes and mounts")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("user")
        if name == "start":
            p.add_argument("--engine", choices=("hybrid", "fuse", "overlay"),
                           help="engine of a new environment (default: the config's)")
    st = sub.add_parser("status", help="every user's environment, for admins")
    st.add_argument("--json", action="store_true")
    sub.add_parser("stop-idle", help="stop environments idle longer than idle_timeout")
    sub.add_parser("scan-private", help="refresh the list of root-only lower entries that "
                                        "every environment hides")
    sub.add_parser("job-prolog", help="SLURM Prolog: replica at the barrier, job environment")
    sub.add_parser("job-epilog", help="SLURM Epilog: end the job's environment")
    rp = sub.add_parser("replica", help="the local sdeefs-replicad: follow a user, status")
    rp.add_argument("action", choices=("follow", "unfollow", "status"))
    rp.add_argument("user", nargs="?")
    rp.add_argument("--wait", action="store_true", help="follow: wait for the login's head")
    rp.add_argument("--control", help="control socket (default: from the config)")
    rp.add_argument("--json", action="store_true")

    for name, helptext in (("diff", "what this user added, changed and deleted"),
                           ("log", "the journal, human-readable"),
                           ("check", "consistency checks of upper + journal")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--upper", required=True)
        p.add_argument("--state")
        p.add_argument("--lower", default="/")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "log":
            p.add_argument("--from", dest="from_seq", type=int, default=1)
            p.add_argument("--limit", type=int, default=0, help="show at most N records")
    return parser


def _setup_logging(debug: bool, modules: Sequence[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="sdeefs: %(message)s", stream=sys.stderr)
    for name in modules or (["sdeefs"] if debug else []):
        logging.getLogger(name).setLevel(logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args.debug, args.debug_module)
    try:
        return _dispatch(args)
    except QuietError as exc:
        if args.debug:
            raise
        print(f"sdeefs: {exc}", file=sys.stderr)
        return exc.exitcode
    except (JournalCorrupt, BadRecord) as exc:
        print(f"sdeefs: journal damaged: {exc}", file=sys.stderr)
        return ExitCode.JOURNAL_DAMAGED
    except OSError as exc:
        if args.debug:
            raise
        where = f" ({os.fsdecode(exc.filename)})" if exc.filename else ""
        print(f"sdeefs: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from sdeefs import tools

    if args.command == "mount":
        state = args.state or default_state(args.upper)
        engine = args.engine
        req = MountRequest(
            mountpoint=os.path.abspath(args.mountpoint), upper=os.path.abspath(args.upper),
            state=os.path.abspath(state), lower=os.path.abspath(args.lower), engine=engine,
            journal=not args.no_journal, excludes=tuple(args.exclude),
            cache_timeout=args.cache_timeout, sync_interval=args.sync_interval,
            xattr_namespace=args.xattr_namespace, writeback_cache=not args.no_writeback_cache,
            foreground=args.foreground, segment_bytes=args.segment_bytes)
        if args.passthrough_upper:
            from sdeefs.mount import mount_passthrough

            mount_passthrough(req)
        else:
            mount(req)
        return 0
    if args.command == "umount":
        umount(args.mountpoint)
        return 0
    if args.command in LAUNCHER_COMMANDS:
        return _launcher(args)
    state = os.path.abspath(args.state or default_state(args.upper))
    if args.command == "log":
        return tools.show_log(state, args.from_seq, args.limit, args.json)
    if args.command == "diff":
        changes = tools.diff(os.fsencode(os.path.abspath(args.upper)),
                             os.fsencode(os.path.abspath(args.lower)))
        if args.json:
            print(json.dumps([c.as_json() for c in changes], indent=1))
        else:
            for change in changes:
                print(change.line())
        return 0
    if args.command == "check":
        problems = tools.check(os.path.abspath(args.upper), state)
        if args.json:
            print(json.dumps({"problems": problems}, indent=1))
        else:
            for problem in problems:
                print(problem)
            print("ok" if not problems else f"{len(problems)} problem(s)")
        return ExitCode.OK if not problems else ExitCode.CHECK_FAILED
    raise AssertionError(args.command)


LAUNCHER_COMMANDS = ("install-pam", "uninstall-pam", "start", "stop", "status", "stop-idle",
                     "scan-private", "job-prolog", "job-epilog", "replica")


def _launcher(args: argparse.Namespace) -> int:
    if args.command == "install-pam":
        config_path = os.environ.get("SDEEFS_CONFIG")
        print(f"installed in {pam.install(args.service, args.control, config=config_path)}")
        return 0
    if args.command == "uninstall-pam":
        removed = pam.uninstall(args.service)
        print("removed" if removed else "nothing to remove")
        return 0
    if args.command in ("job-prolog", "job-epilog"):
        return job.slurm_hook_main(args.command[4:])
    cfg = config.load()
    if args.command == "replica":
        return _replica(args, cfg)
    if args.command == "start":
        engine = Engine(args.engine) if args.engine else None
        record = env.ensure(cfg, env.User.lookup(args.user), engine)
        print(f"{args.user}: {record.engine} environment pid {record.init_pid}")
        return 0
    if args.command == "stop":
        was = env.stop(cfg, env.User.lookup(args.user))
        print(f"{args.user}: " + ("stopped" if was else "was not running; mounts cleaned up"))
        return 0
    if args.command == "scan-private":
        found = view.refresh_private_scan(cfg)
        print(f"{len(found)} root-only entries will be hidden from new environments")
        return 0
    if args.command == "stop-idle":
        for user in env.stop_idle(cfg):
            print(f"{user}: stopped (idle)")
        return 0
    rows = env.status(cfg)
    replicas = _replica_lag(cfg)
    for row in rows:
        row["replicas"] = replicas.get(str(row["user"]), {})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'user':<16} {'state':<8} {'engine':<8} {'init':>8} {'sess':>4} {'procs':>5} "
          f"{'upper':>10} {'journal':>8}")
    for row in rows:
        print(f"{row['user']:<16} {'running' if row['running'] else 'stopped':<8} "
              f"{row['engine'] or '-':<8} {row['init_pid'] or '-':>8} {row['sessions']:>4} "
              f"{row['processes']:>5} {_size(int(str(row['upper_bytes']))):>10} "
              f"{row['journal_head']:>8}")
        followers: dict[str, dict[str, object]] = row["replicas"]  # type: ignore[assignment]
        for node, f in sorted(followers.items()):
            print(f"{'':<16} replica on {node}: acked {f['acked']}, lag {f['lag']} records")
    return 0


def _replica_lag(cfg: SiteConfig) -> dict[str, dict[str, object]]:
    """Per user, the followers the local (login node) replicad reports; {} if none runs."""
    path = cfg.replication.on(job.node_name()).control
    if not os.path.exists(path):
        return {}
    try:
        reply = control.request(path, {"op": "status"}, timeout=5, what="sdeefs-replicad")
    except QuietError:
        return {}
    origin: dict[str, dict[str, object]] = reply.get("origin", {})
    return {user: info["followers"] for user, info in origin.items()}  # type: ignore[misc]


def _replica(args: argparse.Namespace, cfg: object) -> int:
    from sdeefs.replicad import control_request

    rep = cfg.replication.on(job.node_name())  # type: ignore[attr-defined]
    control = args.control or rep.control
    if args.action == "status":
        reply = control_request(control, {"op": "status"})
        if args.json:
            print(json.dumps(reply, indent=1))
            return 0
        print(f"node {reply['node']}")
        origin: dict[str, dict[str, object]] = reply.get("origin", {})
        for user, info in sorted(origin.items()):
            followers: dict[str, dict[str, object]] = info["followers"]  # type: ignore[assignment]
            print(f"  {user}: head {info['head']}")
            for node, f in sorted(followers.items()):
                via = "" if f.get("direct") else f" via {f.get('via')}"
                print(f"    {node:<16} acked {f['acked']:>8}  lag {f['lag']:>6}{via}")
        replicas: dict[str, dict[str, object]] = reply.get("replicas", {})
        for user, info in sorted(replicas.items()):
            print(f"  replica {user}: applied {info['applied']} of {info['upstream_head']} "
                  f"(lag {info['lag']}, {_size(int(str(info['bytes_received'])))} received, "
                  f"{'connected' if info['connected'] else 'disconnected'} to "
                  f"{info['upstream']})")
        return 0
    if not args.user:
        raise QuietError(f"replica {args.action} needs a user name", ExitCode.USAGE)
    reply = control_request(control, {"op": args.action, "user": args.user,
                                      "wait": args.wait, "timeout": rep.barrier_timeout})
    print(json.dumps(reply) if args.json else " ".join(f"{k}={v}" for k, v in reply.items()))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n}{unit}"
        n //= 1024
    return f"{n}T"
