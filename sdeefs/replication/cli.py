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
import contextlib
import json
import os
import sys
import threading
import time

from .. import control as control_mod
from ..config import Replication
from ..errors import ExitCode, QuietError
from ..statedir import ReplicaDirs
from ..tools import format_size
from ..trees import rmtree
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
    request = {"op": args.action, "user": args.user, "wait": args.wait,
               "timeout": rep.barrier_timeout}
    if args.action == "follow" and args.wait and sys.stderr.isatty() and not args.json:
        reply = _with_progress(control, request, args.user, rep.barrier_timeout + 30)
    else:
        reply = control_request(control, request, timeout=rep.barrier_timeout + 30)
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


def remove_replica(rep: Replication, name: str) -> list[str]:
    """``sdeefs remove-user`` on a compute node: the local replicad stops following NAME
    (if it runs), then the replica goes; what was removed."""
    path = ReplicaDirs.of(rep.replica_dir, name).path
    if not name or name in (".", "..") or "/" in name or not os.path.lexists(path):
        return []
    with contextlib.suppress(QuietError):  # no replicad here: nothing follows the user
        control_request(rep.control, {"op": "unfollow", "user": name}, timeout=STATUS_TIMEOUT)
    rmtree(path)
    return [f"removed {path}"]


PROGRESS_INTERVAL = 0.5  # seconds between two progress lines of ``follow --wait``


def _with_progress(control: str, request: control_mod.Request, user: str,
                   timeout: float) -> control_mod.Reply:
    """``follow --wait`` on a terminal: the request waits in a thread while this one shows,
    from the replicad's status, how far the replica is (records, bytes, rate, time left)."""
    result: list[control_mod.Reply | BaseException] = []

    def wait() -> None:
        try:
            result.append(control_request(control, request, timeout=timeout))
        except BaseException as exc:  # handed to the caller's thread below
            result.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    started, first = time.monotonic(), None
    while waiter.is_alive():
        waiter.join(PROGRESS_INTERVAL)
        try:
            info = control_request(control, {"op": "status"}, timeout=STATUS_TIMEOUT)
        except QuietError:
            continue
        replica = info.get("replicas", {}).get(user)
        if not replica:
            continue
        applied, head = int(replica["applied"]), int(replica["upstream_head"])
        received = int(replica["bytes_received"])
        first = first if first is not None else (applied, received)
        elapsed = max(time.monotonic() - started, 1e-3)
        rate = (applied - first[0]) / elapsed
        left = f", {(head - applied) / rate:.0f} s left" if rate > 0 and head > applied else ""
        print(f"\r{user}: {applied} of {head} records, {format_size(received)} received, "
              f"{format_size(int((received - first[1]) / elapsed))}/s{left}\033[K",
              end="", file=sys.stderr, flush=True)
    print("\r\033[K", end="", file=sys.stderr, flush=True)
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
