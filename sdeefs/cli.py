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

from .errors import BadRecord, JournalCorrupt, QuietError
from .mount import MountRequest, default_state, mount, umount

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
    m.add_argument("--foreground", action="store_true", help="stay attached")
    m.add_argument("mountpoint")

    u = sub.add_parser("umount", help="unmount and wait for the daemon to finish")
    u.add_argument("mountpoint")

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
        return 6
    except OSError as exc:
        if args.debug:
            raise
        where = f" ({os.fsdecode(exc.filename)})" if exc.filename else ""
        print(f"sdeefs: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from . import tools

    if args.command == "mount":
        state = args.state or default_state(args.upper)
        engine = args.engine
        req = MountRequest(
            mountpoint=os.path.abspath(args.mountpoint), upper=os.path.abspath(args.upper),
            state=os.path.abspath(state), lower=os.path.abspath(args.lower), engine=engine,
            journal=not args.no_journal, excludes=tuple(args.exclude),
            cache_timeout=args.cache_timeout, sync_interval=args.sync_interval,
            xattr_namespace=args.xattr_namespace, writeback_cache=not args.no_writeback_cache,
            foreground=args.foreground)
        if args.passthrough_upper:
            from .mount import mount_passthrough

            mount_passthrough(req)
        else:
            mount(req)
        return 0
    if args.command == "umount":
        umount(args.mountpoint)
        return 0
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
        return 0 if not problems else 7
    raise AssertionError(args.command)
