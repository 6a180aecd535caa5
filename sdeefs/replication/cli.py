"""``sdeefs replica follow|unfollow|resync|status`` and the replica rows of ``sdeefs status``.

The command line's view of the local ``sdeefs-replicad``, through its control socket
(``daemon``).  The ``sdeefs`` command (``sdeefs.launcher.cli``) composes these: it adds
the subcommand with :func:`add_parser`, runs it with :func:`run`, and shows under each
user of ``sdeefs status`` what :func:`origin_users` found, as :func:`user_lines`.

``sdeefs replica resync USER`` (root, on a compute node) replaces the node's replica of
USER with a verified snapshot from the login node: the recovery for a replica that
skipped records or is stuck; the nodes it relays to follow (``daemon``).
"""

from __future__ import annotations

import argparse
import json

from ..config import Replication
from ..errors import ExitCode, QuietError
from ..tools import format_size
from .daemon import control_request

STATUS_TIMEOUT = 5.0  # seconds ``sdeefs status`` waits for the replicad


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``replica`` subcommand."""
    rp = sub.add_parser("replica", help="the local sdeefs-replicad: follow a user, resync a "
                        "user's replica from the login node, status")
    rp.add_argument("action", choices=("follow", "unfollow", "resync", "status"))
    rp.add_argument("user", nargs="?")
    rp.add_argument("--wait", action="store_true", help="follow: wait for the login's head")
    rp.add_argument("--control", help="control socket (default: from the config)")
    rp.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, rep: Replication) -> int:
    """``sdeefs replica ...`` with this node's [replication] settings."""
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
            for line in refused_lines(info):
                print(f"    {line}")
        replicas: dict[str, dict[str, object]] = reply.get("replicas", {})
        for user, info in sorted(replicas.items()):
            print(f"  replica {user}: applied {info['applied']} of {info['upstream_head']} "
                  f"(lag {info['lag']}, {format_size(int(str(info['bytes_received'])))} received, "
                  f"{'connected' if info['connected'] else 'disconnected'} to "
                  f"{info['upstream']})")
            for line in skipped_lines(info):
                print(f"    {line}")
        return 0
    if not args.user:
        raise QuietError(f"replica {args.action} needs a user name", ExitCode.USAGE)
    reply = control_request(control, {"op": args.action, "user": args.user,
                                      "wait": args.wait, "timeout": rep.barrier_timeout},
                            timeout=rep.barrier_timeout + 30)
    print(json.dumps(reply) if args.json else " ".join(f"{k}={v}" for k, v in reply.items()))
    return 0


def origin_users(rep: Replication) -> dict[str, dict[str, object]]:
    """Per user, what the local (login node) replicad reports: the replicas following it
    (``followers``, by node) and the journal's records every replica refuses
    (``refused``); {} if none runs here."""
    try:
        reply = control_request(rep.control, {"op": "status"}, timeout=STATUS_TIMEOUT)
    except QuietError:  # not running (or not answering): nothing to show
        return {}
    origin: dict[str, dict[str, object]] = reply.get("origin", {})
    return origin


def refused_lines(info: dict[str, object]) -> list[str]:
    refused: list[dict[str, object]] = info.get("refused", [])  # type: ignore[assignment]
    return [f"error: record {r['seq']} is skipped by every replica: {r['reason']}"
            for r in refused]


def skipped_lines(info: dict[str, object]) -> list[str]:
    records: list[dict[str, object]] = info.get("skipped_records", [])  # type: ignore[assignment]
    count = int(str(info.get("skipped", 0)))
    lines = [f"error: record {r['seq']} skipped: {r['reason']}" for r in records]
    if count > len(records):
        lines.append(f"error: {count - len(records)} more records skipped")
    if count:
        lines.append("this replica differs from the user's environment: "
                     "`sdeefs replica resync USER` repairs it")
    return lines


def user_lines(info: dict[str, object]) -> list[str]:
    """The rows ``sdeefs status`` shows under a user: its replicas and the errors."""
    followers: dict[str, dict[str, object]] = info.get("followers", {})  # type: ignore[assignment]
    return [f"replica on {node}: acked {f['acked']}, lag {f['lag']} records"
            for node, f in sorted(followers.items())] + refused_lines(info)
