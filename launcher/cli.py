"""The ``sdeefs`` command: mount, umount, diff, log, check.

User errors are one line on stderr and a non-zero exit code (QuietError);
``--debug`` turns on DEBUG logging and shows tracebacks; ``--debug-module
sdeefs.fs.cow`` limits DEBUG logging to the named modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import select
import shutil
import signal
import sys
from collections.abc import Sequence

import attrs

from sdeefs import config
from sdeefs.config import Engine
from sdeefs.errors import BadRecord, ExitCode, JournalCorrupt, QuietError
from sdeefs.fs import cli as fs_cli
from sdeefs.replication import cli as replication_cli
from sdeefs.statedir import StateDir
from sdeefs.tools import format_size

from . import doctor, dpkgmerge, env, limits, view
from .compute import job, spares
from .login import bpfguard, pam

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdeefs", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    parser.add_argument("--debug-module", action="append", default=[], metavar="MODULE",
                        help="debug logging for one module only, e.g. sdeefs.fs.cow (repeatable)")
    sub = parser.add_subparsers(dest="command", required=True)

    fs_cli.add_commands(sub)

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
            p.add_argument("--engine", choices=("kernel", "hybrid", "fuse", "overlay"),
                           help="engine of a new environment (default: the config's)")
    mg = sub.add_parser("migrate", help="move USER's upper of another engine into a layer "
                                        "image (the kernel engine; a new journal history)")
    mg.add_argument("user")
    st = sub.add_parser("status", help="every user's environment, for admins")
    st.add_argument("--json", action="store_true")
    sub.add_parser("stop-idle", help="stop environments idle longer than idle_timeout")
    sub.add_parser("unload-guard", help="unpin the BPF guard once no environment it guards "
                                        "runs (scripts/install.sh --uninstall)")
    sub.add_parser("scan-private", help="refresh the list of root-only lower entries that "
                                        "every environment hides")
    rm = sub.add_parser("remove-user", help="end a user's environment and delete what this "
                                            "node holds of them (layers, replica, state)")
    rm.add_argument("user", help="the user's name (also after userdel)")
    rm.add_argument("--keep-upper", action="store_true",
                    help="move the user's upper to ROOT/.removed/ instead of deleting it")
    dr = sub.add_parser("doctor", help="check this node against docs/admin.md, one line each")
    dr.add_argument("--role", choices=("login", "compute"),
                    help="default: login where a PAM service runs the sdeefs hook")
    dr.add_argument("--json", action="store_true")
    sub.add_parser("job-prolog", help="SLURM Prolog: replica at the barrier, job environment")
    sub.add_parser("job-epilog", help="SLURM Epilog: end the job's environment")
    es = sub.add_parser("end-spares", help="end the spare job environments and shared layers "
                        "a stopped sdeefs-replicad left (its unit's ExecStopPost)")
    es.add_argument("--role", choices=("login", "compute"), default="compute",
                    help="the replicad's role: login nodes have none (default %(default)s)")
    sl = sub.add_parser("install-slurm", help="load the SPANK plugin (jobs run in the "
                        "user's environment): write its plugstack line; says what slurm.conf "
                        "needs")
    sl.add_argument("--plugstack-dir", default=job.PLUGSTACK_DIR,
                    help="a directory SLURM's plugstack.conf includes (default %(default)s)")
    replication_cli.add_parser(sub)

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
        code = _dispatch(args)
        sys.stdout.flush()  # here, not at exit: a reader gone is handled below, quietly
        return code
    except QuietError as exc:
        if args.debug:
            raise
        print(f"sdeefs: {exc}", file=sys.stderr)
        return exc.exitcode
    except (JournalCorrupt, BadRecord) as exc:
        print(f"sdeefs: journal damaged: {exc}", file=sys.stderr)
        return ExitCode.JOURNAL_DAMAGED
    except BrokenPipeError as exc:
        if not _reader_went_away():
            print(f"sdeefs: {exc.strerror or exc}", file=sys.stderr)
            return 1
        return 128 + signal.SIGPIPE  # `sdeefs status | head`: what a shell tool does, quietly
    except OSError as exc:
        if args.debug:
            raise
        where = f" ({os.fsdecode(exc.filename)})" if exc.filename else ""
        print(f"sdeefs: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _reader_went_away() -> bool:
    """Is standard output a pipe nobody reads any more?  Then the output still buffered is
    dropped (the interpreter's last flush would fail again, printing a traceback)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    return gone


def _dispatch(args: argparse.Namespace) -> int:
    from sdeefs import tools

    if args.command in fs_cli.COMMANDS:
        return fs_cli.run(args)
    if args.command in LAUNCHER_COMMANDS:
        return _launcher(args)
    state = os.path.abspath(args.state or StateDir.beside(args.upper).path)
    if args.command == "log":
        return tools.show_log(state, args.from_seq, args.limit, args.json)
    if args.command == "diff":
        changes = dpkgmerge.describe_changes(
            tools.diff(os.fsencode(os.path.abspath(args.upper)),
                       os.fsencode(os.path.abspath(args.lower))),
            os.path.abspath(args.upper), os.path.abspath(args.lower))
        if args.json:
            print(json.dumps([c.as_json() for c in changes], indent=1))
        else:
            for change in changes:
                print(change.line())
        return 0
    if args.command == "check":
        from sdeefs.fs import capture, kernel

        if kernel.capture_answers(state, 1.0):  # the kernel engine: journal all it saw first
            capture.drain(state)
        problems = tools.check(os.path.abspath(args.upper), state)
        if args.json:
            print(json.dumps({"problems": problems}, indent=1))
        else:
            for problem in problems:
                print(problem)
            print("ok" if not problems else f"{len(problems)} problem(s)")
        return ExitCode.OK if not problems else ExitCode.CHECK_FAILED
    raise AssertionError(args.command)


LAUNCHER_COMMANDS = ("install-pam", "uninstall-pam", "start", "stop", "migrate", "status",
                     "stop-idle", "scan-private", "job-prolog", "job-epilog", "replica",
                     "install-slurm", "remove-user", "doctor", "end-spares", "unload-guard")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


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
    if args.command == "install-slurm":
        site = config.load()
        print(f"wrote {job.install_slurm(site, args.plugstack_dir)}: "
              f"{job.plugstack_line(site)}")
        hooks = {name: shutil.which(name) or f"/usr/local/sbin/{name}"
                 for name in ("sdeefs-prolog", "sdeefs-epilog")}
        print(f"slurm.conf needs: Prolog={hooks['sdeefs-prolog']} "
              f"Epilog={hooks['sdeefs-epilog']} PrologFlags=Alloc (and a PlugStackConfig "
              f"that includes {args.plugstack_dir}/*.conf, as Debian's does); restart slurmd")
        return 0
    if args.command == "doctor":
        role = args.role or doctor.default_role()
        findings = doctor.run_checks(role)
        if args.json:
            print(json.dumps({"role": role, "checks": [attrs.asdict(f) for f in findings]},
                             indent=1))
        else:
            for finding in findings:
                print(finding.line())
        failed = any(f.verdict == doctor.Verdict.FAIL for f in findings)
        return ExitCode.FAILURE if failed else ExitCode.OK
    if args.command == "end-spares" and args.role == "login":
        return 0  # a login node's replicad starts no job environments
    cfg = config.load()
    if args.command == "end-spares":
        for user in spares.end_spares(cfg, job.node_name()):
            print(f"{user}: spare job environment ended")
        return 0
    if args.command == "remove-user":
        done = env.remove_user(cfg, args.user, args.keep_upper)
        done += replication_cli.remove_replica(cfg.replication.on(job.node_name()), args.user)
        if not done:
            raise QuietError(f"nothing of {args.user} on this node", ExitCode.USAGE)
        for line in done:
            print(line)
        return 0
    if args.command == "replica":
        return replication_cli.run(args, cfg.replication.on(job.node_name()))
    if args.command == "start":
        engine = Engine(args.engine) if args.engine else None
        record = env.ensure(cfg, env.User.lookup(args.user), engine)
        print(f"{args.user}: {record.engine} environment pid {record.init_pid}")
        return 0
    if args.command == "stop":
        was = env.stop(cfg, env.User.lookup(args.user))
        print(f"{args.user}: " + ("stopped" if was else "was not running; mounts cleaned up"))
        return 0
    if args.command == "migrate":
        kept = env.migrate_to_kernel(cfg, env.User.lookup(args.user))
        print(f"{args.user}: migrated to the kernel engine; the old upper and journal are "
              f"kept in {kept} (remove them once the replicas caught up)")
        return 0
    if args.command == "unload-guard":
        unpinned, keeping = bpfguard.BpfGuard(cfg.run_dir).unload()
        if keeping:
            users = ", ".join(_user_name(uid) for uid in keeping)
            raise QuietError(f"the BPF guard stays loaded: it still guards {users} (processes "
                             "in their user namespaces); run this again once they end",
                             ExitCode.BUSY)
        print(f"the BPF guard is unloaded ({unpinned} pinned set(s) removed)" if unpinned
              else "no BPF guard is loaded")
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
    origin = replication_cli.origin_users(cfg.replication.on(job.node_name()))
    for row in rows:
        info = origin.get(str(row["user"]), {})
        row["replicas"] = info.get("followers", {})
        row["replication_errors"] = info.get("refused", [])
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'user':<16} {'state':<8} {'engine':<8} {'init':>8} {'sess':>4} {'procs':>5} "
          f"{'upper':>10} {'journal':>8}")
    for row in rows:
        state = ("running" if row["running"] else "stopped") if row["exists"] else "deleted"
        print(f"{row['user']:<16} {state:<8} "
              f"{row['engine'] or '-':<8} {row['init_pid'] or '-':>8} {row['sessions']:>4} "
              f"{row['processes']:>5} {format_size(int(str(row['upper_bytes']))):>10} "
              f"{row['journal_head']:>8}")
        usage: dict[str, int] = row.get("usage") or {}  # type: ignore[assignment]
        if usage:
            print(f"{'':<16} limits: memory {format_size(usage.get('memory', 0))} of "
                  f"{format_size(limits.memory_bytes(cfg.memory_max))}, processes "
                  f"{usage.get('pids', 0)} of {cfg.pids_max}")
        guard: list[int] = row.get("guard_pids") or []  # type: ignore[assignment]
        if row["running"] and row.get("guard") == "bpf":
            print(f"{'':<16} guard: bpf (the BPF LSM program; user namespace "
                  f"{row['guard_key']})")
        elif row["running"] and row["guard_mount"]:
            print(f"{'':<16} guard: {row.get('guard') or 'c'} layer, " + (
                f"keeper {guard[0]}, server {guard[1]}" if len(guard) == 2 else
                f"pid {guard[0]}" if guard else
                "no keeper (a crash of the guard ends the view until the next login)"))
        for line in replication_cli.user_lines(origin.get(str(row["user"]), {})):
            print(f"{'':<16} {line}")
        if row["hybrid"]:
            print(f"{'':<16} {env.HYBRID_HINT.format(user=row['user'])}")
    return 0
