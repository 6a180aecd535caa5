"""Replication fan-out: N simulated compute nodes following one user's journal.

Usage (as root)::

    .venv/bin/python bench/fanout/run.py [--nodes 1,2,4,8,16,32] [--fanout 4]
        [--upper-mb 100] [--edits 5] [--out bench/out/fanout.md]

Topology: a *hub* network namespace with a bridge plays the login node (its
``sdeefs-replicad --origin``); each compute node is a namespace of its own with a veth
to the bridge, running one ``sdeefs-replicad`` whose replica directory is its own tmpfs
(a node's local disk). The user's upper is written through a journaling sdeefs mount
(``--passthrough-upper``, as the login environment's daemon does) in the root
namespace. Everything runs on this machine's cores, so N nodes share them: times at
large N measure this machine as much as the protocol (see the per-hop figures).

For every N (fresh user, fresh daemons, empty replicas), timed from the user's last
change (the writing process returned) to *every* node past ``follow --wait`` (the
SLURM prolog's barrier), all N asked at once:

* ``cold``: the user writes an upper of ``--upper-mb`` MB (files of 4 MB, then a
  mkdir); the nodes start following only now (a job on nodes that never saw the user);
* ``idle``: the login node's journal has gone quiet and ends in Done/Sync markers
  (nothing follows them); every node asks again (issue 15: relayed nodes never passed);
* ``warm``: the tree is in place; the user rewrites all of it (same size, new bytes);
* ``edit``: one byte changes in one file (median of ``--edits``).

Also recorded: the tree's depth and each node's depth, bytes the login node sent
(application payload, from its status), head queries the login node answered, and each
node replicad's resident memory (idle, after the run) and peak. Every replica is
checked against the upper (tree digest) at the end of each N.

Output: a Markdown report (``--out``), the raw numbers beside it (``.json``) and an
SVG plot (``.svg``) of barrier time against N per scenario. The report ends with an
extrapolation to 1,000 and 10,000 nodes from the measured per-hop costs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (  # noqa: E402
    BenchSession,
    HostInfo,
    ProcessTracker,
    TrackedProcess,
    log,
    render_markdown_table,
    require_root,
    run_command,
    wait_until,
)
from bench.deploy.plot import PALETTE, Chart, Series, render  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "fanout.md"
PORT = 7077
HUB_ADDR = "10.77.0.1"
USER_PREFIX = "u"
BARRIER_TIMEOUT = 600.0
MB = 1_000_000

sys.path.insert(0, str(REPO_ROOT))
from sdeefs.journal import JournalTail  # noqa: E402
from sdeefs.replication.daemon import control_request  # noqa: E402
from sdeefs.replication.relay import LOGIN_ROUND_GAP, tree_cost  # noqa: E402
from sdeefs.replication.snapshot import tree_digest  # noqa: E402


class BenchError(RuntimeError):
    """A problem that ends the run; printed as one line."""


def node_addr(i: int) -> str:
    return f"10.77.{i // 200}.{10 + i % 200}"


# --------------------------------------------------------------------------
# Namespaces: a hub with a bridge, one namespace per node
# --------------------------------------------------------------------------


@dataclass
class Topology:
    """``<p>hub`` with bridge br0 (HUB_ADDR/16) and ``<p>n<i>`` joined to it by veths."""

    prefix: str
    tracker: ProcessTracker
    nodes: int = 0

    @property
    def hub(self) -> str:
        return f"{self.prefix}hub"

    def ns(self, i: int) -> str:
        return self.hub if i == 0 else f"{self.prefix}n{i}"

    def argv(self, i: int, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns(i)}", "--",
                *(os.fspath(a) for a in argv)]

    def _ip(self, *args: str) -> None:
        result = run_command(["ip", *args], self.tracker, timeout=30)
        if not result.ok:
            raise BenchError(f"ip {' '.join(args)}: {result.failure_reason()}")

    def create(self, nodes: int) -> None:
        self._ip("netns", "add", self.hub)
        self._ip("-n", self.hub, "link", "set", "lo", "up")
        self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.hub, "addr", "add", f"{HUB_ADDR}/16", "dev", "br0")
        self._ip("-n", self.hub, "link", "set", "br0", "up")
        for i in range(1, nodes + 1):
            self._ip("netns", "add", self.ns(i))
            self.nodes = i
            self._ip("-n", self.ns(i), "link", "set", "lo", "up")
            self._ip("link", "add", f"{self.prefix}h{i}", "netns", self.hub, "type", "veth",
                     "peer", "name", "eth0", "netns", self.ns(i))
            self._ip("-n", self.hub, "link", "set", f"{self.prefix}h{i}", "master", "br0", "up")
            self._ip("-n", self.ns(i), "addr", "add", f"{node_addr(i)}/16", "dev", "eth0")
            self._ip("-n", self.ns(i), "link", "set", "eth0", "up")

    def remove(self) -> None:
        """Kill, by pid, whatever is left inside our namespaces; delete them."""
        listed = run_command(["ip", "netns", "list"], self.tracker, timeout=30).stdout
        existing = {line.split()[0] for line in listed.splitlines() if line.strip()}
        for i in range(self.nodes, -1, -1):
            name = self.ns(i)
            if name not in existing:
                continue
            pids = run_command(["ip", "netns", "pids", name], self.tracker, timeout=30).stdout
            left = [p for pid in pids.split() if pid.isdigit()
                    and (p := self.tracker.track(int(pid), f"left in {name}")) is not None]
            for desc in self.tracker.terminate(left, grace_seconds=3):
                log(f"cleanup: killed {desc}")
            run_command(["ip", "netns", "del", name], self.tracker, timeout=30)


@contextlib.contextmanager
def open_topology(tracker: ProcessTracker, nodes: int) -> Iterator[Topology]:
    listed = run_command(["ip", "netns", "list"], tracker, timeout=30).stdout
    taken = {line.split()[0] for line in listed.splitlines() if line.strip()}
    base = os.getpid() % 1000
    prefix = next(f"sf{(base + k) % 1000:03d}" for k in range(1000)
                  if f"sf{(base + k) % 1000:03d}hub" not in taken)
    topo = Topology(prefix, tracker)
    try:
        topo.create(nodes)
        yield topo
    finally:
        topo.remove()


# --------------------------------------------------------------------------
# Daemons
# --------------------------------------------------------------------------


@dataclass
class Daemon:
    name: str
    popen: subprocess.Popen[bytes]
    tracked: TrackedProcess | None
    control: Path
    log_path: Path

    def request(self, request: dict[str, object], timeout: float = 60) -> dict[str, object]:
        return control_request(str(self.control), request, timeout=timeout)

    def stop(self, tracker: ProcessTracker) -> None:
        if self.tracked is not None:
            tracker.terminate([self.tracked], grace_seconds=3)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def memory(self) -> tuple[float, float]:
        """(resident MB, peak resident MB)."""
        values = {}
        with open(f"/proc/{self.popen.pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024 / MB
        return values["VmRSS"], values["VmHWM"]


def start_daemon(topo: Topology, i: int, name: str, args: Sequence[str], workdir: Path,
                 key: Path, tracker: ProcessTracker) -> Daemon:
    control = workdir / f"{name}.sock"
    log_path = workdir / f"{name}.log"
    control.unlink(missing_ok=True)
    with open(log_path, "ab") as sink:
        popen = subprocess.Popen(
            topo.argv(i, [VENV_BIN / "sdeefs-replicad", "--node", name, "--key-file", key,
                          "--control", control, *args]),
            stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, start_new_session=True)
    tracked = tracker.track(popen.pid, f"replicad {name}")
    if not wait_until(lambda: control.exists() or popen.poll() is not None, 20):
        raise BenchError(f"{name} did not start")
    if popen.poll() is not None:
        raise BenchError(f"{name} exited: {log_path.read_text()[-500:]}")
    return Daemon(name, popen, tracked, control, log_path)


# --------------------------------------------------------------------------
# One N
# --------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    seconds: float  # user's last change -> every node past the barrier
    per_node: dict[str, float] = field(default_factory=dict)
    passed: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class Run:
    nodes: int
    fanout: int
    upper_bytes: int
    phases: dict[str, Phase] = field(default_factory=dict)
    edit_samples: list[float] = field(default_factory=list)
    edit_per_node: dict[str, list[float]] = field(default_factory=dict)
    barriers: int = 0  # bursts of N barrier questions
    depth: int = 0
    depths: dict[str, int] = field(default_factory=dict)
    direct_max: int = 0
    login_bytes_cold: int = 0
    login_bytes_total: int = 0
    login_queries: int = 0
    rss: dict[str, float] = field(default_factory=dict)
    peak: dict[str, float] = field(default_factory=dict)
    converged: int = 0


def barrier_all(nodes: Sequence[Daemon], user: str, start: float, name: str,
                timeout: float = BARRIER_TIMEOUT) -> Phase:
    """Every node's ``follow --wait`` at once; seconds from ``start`` to the last one."""

    def ask(node: Daemon) -> tuple[str, float, str]:
        try:
            reply = node.request({"op": "follow", "user": user, "wait": True,
                                  "timeout": timeout}, timeout=timeout + 30)
        except Exception as exc:  # noqa: BLE001 - reported per node, one line
            return node.name, time.monotonic() - start, f"{node.name}: {exc}"
        ok = int(reply["applied"]) >= int(reply["barrier"])  # type: ignore[call-overload]
        return node.name, time.monotonic() - start, "" if ok else f"{node.name}: {reply}"

    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        results = list(pool.map(ask, nodes))
    phase = Phase(name, max(t for _, t, _ in results))
    for node, seconds, error in results:
        phase.per_node[node] = seconds
        if error:
            phase.failures.append(error)
        else:
            phase.passed += 1
    log(f"  {name}: {phase.passed}/{len(nodes)} nodes at the barrier after "
        f"{phase.seconds:.3f} s")
    return phase


def write_files(view: Path, total: int, seed: int) -> None:
    """``total`` bytes in files of 4 MB under view/data (rewritten in place), then a
    mkdir: the last change is a metadata one, so the journal ends in Done (and Sync)."""
    data = view / "data"
    data.mkdir(exist_ok=True)
    chunk = 4 * MB
    block = os.urandom(1 << 20)
    for n in range(math.ceil(total / chunk)):
        size = min(chunk, total - n * chunk)
        with open(data / f"f{n:03d}", "r+b" if (data / f"f{n:03d}").exists() else "wb") as f:
            done = 0
            while done < size:
                piece = min(len(block), size - done)
                f.write(seed.to_bytes(8, "little") + block[8:piece])  # new bytes per seed
                done += piece
    marker = view / f"done-{seed}"
    marker.mkdir()


def journal_quiet(journal: Path, timeout: float = 30) -> bool:
    """Until the journal ends in Done, Sync and stops growing."""
    from sdeefs import records as rec

    def tail_types() -> tuple[int, list[type]]:
        reader = JournalTail(str(journal), 1)
        try:
            entries: list[Any] = []
            while batch := reader.poll():
                entries.extend(batch[-2:])
                entries = entries[-2:]
            return (entries[-1].seq if entries else 0), [type(e.record) for e in entries]
        finally:
            reader.close()

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        head, types = tail_types()
        if types == [rec.Done, rec.Sync]:
            time.sleep(1.0)
            if tail_types()[0] == head:
                return True
        time.sleep(0.3)
    return False


def tree_depths(nodes: Sequence[Daemon], user: str) -> tuple[dict[str, int], int]:
    """Each node's depth (login's direct followers: 1) and the most direct followers."""
    addr_to_name = {node_addr(i + 1): node.name for i, node in enumerate(nodes)}
    parent = {}
    for node in nodes:
        upstream = str(node.request({"op": "status"})["replicas"][user]["upstream"])  # type: ignore[index]
        host = upstream.rpartition(":")[0]
        parent[node.name] = "login" if host == HUB_ADDR else addr_to_name.get(host, "?")
    depths: dict[str, int] = {}

    def depth(name: str, seen: int = 0) -> int:
        if name in ("login", "?") or seen > len(nodes):
            return 0
        if name not in depths:
            depths[name] = depth(parent[name], seen + 1) + 1
        return depths[name]

    for node in nodes:
        depth(node.name)
    children: dict[str, int] = {}
    for up in parent.values():
        children[up] = children.get(up, 0) + 1
    return depths, max(children.values(), default=0)


@dataclass
class Site:
    """One user's journaling mount, the login replicad and N node replicads."""

    user: str
    upper: Path
    state: Path
    view: Path
    work: Path
    login: Daemon
    nodes: list[Daemon]


@contextlib.contextmanager
def open_site(session: BenchSession, name: str, n: int, fanout: int) -> Iterator[Site]:
    """Fresh user, fresh daemons, empty replicas (each on its own tmpfs); all removed after."""
    tracker = session.tracker
    work = session.scratch / name
    work.mkdir()
    key = session.scratch / "key"
    user = f"{USER_PREFIX}{name}"
    root = work / "root"
    upper, state, mnt = root / user / "upper", root / user / "state", work / "mnt"
    for path in (upper, state / "work", mnt):
        path.mkdir(parents=True)
    result = run_command([VENV_BIN / "sdeefs", "mount", "--passthrough-upper", "--upper", upper,
                          "--state", state, mnt], tracker, timeout=60)
    if not result.ok:
        raise BenchError(f"sdeefs mount: {result.failure_reason()}")
    daemons: list[Daemon] = []
    tmpfs: list[Path] = []
    try:
        with open_topology(tracker, n) as topo:
            login = start_daemon(topo, 0, "login", [
                "--origin", str(root), "--listen", f"{HUB_ADDR}:{PORT}",
                "--fanout", str(fanout)], work, key, tracker)
            daemons.append(login)
            nodes = []
            for i in range(1, n + 1):
                disk = work / f"disk{i}"
                disk.mkdir()
                mounted = run_command(["mount", "-t", "tmpfs", "-o", "mode=0700,size=2g",
                                       "tmpfs", disk], tracker, timeout=30)
                if not mounted.ok:
                    raise BenchError(f"tmpfs: {mounted.failure_reason()}")
                tmpfs.append(disk)
                nodes.append(start_daemon(topo, i, f"n{i}", [
                    "--replica-dir", str(disk), "--upstream", f"{HUB_ADDR}:{PORT}",
                    "--listen", f"{node_addr(i)}:{PORT}", "--fanout", str(fanout)],
                    work, key, tracker))
            daemons += nodes
            yield Site(user, upper, state, mnt / "upper", work, login, nodes)
            for daemon in daemons:
                daemon.stop(tracker)
    finally:
        for daemon in daemons:
            daemon.stop(tracker)
        for disk in tmpfs:
            run_command(["umount", "-l", disk], tracker, timeout=30)
        run_command([VENV_BIN / "sdeefs", "umount", mnt], tracker, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def run_one(session: BenchSession, n: int, args: argparse.Namespace) -> Run:
    run = Run(n, args.fanout, args.upper_mb * MB)
    with open_site(session, f"n{n}", n, args.fanout) as site:
        user, view, login, nodes = site.user, site.view, site.login, site.nodes
        write_files(view, run.upper_bytes, 1)
        run.phases["cold"] = barrier_all(nodes, user, time.monotonic(), "cold")
        origin = login.request({"op": "status"})["origin"][user]  # type: ignore[index]
        run.login_bytes_cold = sum(int(f.get("bytes_sent", 0))
                                   for f in origin["followers"].values())
        run.depths, run.direct_max = tree_depths(nodes, user)
        run.depth = max(run.depths.values(), default=0)

        if not journal_quiet(site.state / "journal"):
            log("  note: the journal did not go quiet within 30 s")
        run.phases["idle"] = barrier_all(nodes, user, time.monotonic(), "idle", 60)

        write_files(view, run.upper_bytes, 2)
        run.phases["warm"] = barrier_all(nodes, user, time.monotonic(), "warm")

        target = view / "data" / "f000"
        for k in range(args.edits):
            with open(target, "r+b") as f:
                f.seek(MB + k)
                f.write(b"X")
            start = time.monotonic()
            phase = barrier_all(nodes, user, start, f"edit {k + 1}")
            run.edit_samples.append(phase.seconds)
            for name, seconds in phase.per_node.items():
                run.edit_per_node.setdefault(name, []).append(seconds)
            if k == 0:
                run.phases["edit"] = phase
            else:
                run.phases["edit"].passed += phase.passed
                run.phases["edit"].failures += phase.failures
        run.phases["edit"].seconds = statistics.median(run.edit_samples)
        run.phases["edit"].per_node = {name: statistics.median(times)
                                       for name, times in run.edit_per_node.items()}
        run.barriers = 3 + args.edits

        origin = login.request({"op": "status"})["origin"][user]  # type: ignore[index]
        run.login_bytes_total = sum(int(f.get("bytes_sent", 0))
                                    for f in origin["followers"].values())
        run.login_queries = int(origin.get("queries", 0))
        time.sleep(8)  # idle: the daemons give back what the streams freed
        for node in nodes:
            run.rss[node.name], run.peak[node.name] = node.memory()
        want = tree_digest(str(site.upper))
        run.converged = sum(1 for i in range(1, n + 1) if tree_digest(
            str(site.work / f"disk{i}" / user / "upper")) == want)
    return run


@dataclass
class Chain:
    """One hop's cost: a chain (fan-out 1) of ``length`` nodes; a 1-byte edit's barrier
    asked by one node alone, at depth 1 and at the end of the chain."""

    length: int
    first: list[float] = field(default_factory=list)
    last: list[float] = field(default_factory=list)
    depths: dict[str, int] = field(default_factory=dict)

    def per_hop(self) -> float:
        return (statistics.median(self.last) - statistics.median(self.first)) / (
            self.length - 1)


def run_chain(session: BenchSession, length: int, edits: int) -> Chain:
    chain = Chain(length)
    with open_site(session, "chain", length, 1) as site:
        write_files(site.view, 4 * MB, 1)
        for node in site.nodes:  # one by one: each goes below the one before
            barrier_all([node], site.user, time.monotonic(), f"join {node.name}")
        chain.depths, _ = tree_depths(site.nodes, site.user)
        if sorted(chain.depths.values()) != list(range(1, length + 1)):
            raise BenchError(f"not a chain: {chain.depths}")
        deepest = max(site.nodes, key=lambda node: chain.depths[node.name])
        top = min(site.nodes, key=lambda node: chain.depths[node.name])
        target = site.view / "data" / "f000"
        for k in range(edits):
            for node, times in ((top, chain.first), (deepest, chain.last)):
                with open(target, "r+b") as f:
                    f.seek(MB + k)
                    f.write(b"Y" if node is top else b"Z")
                start = time.monotonic()
                phase = barrier_all([node], site.user, start,
                                    f"edit at depth {chain.depths[node.name]}")
                times.append(phase.seconds)
                for other in site.nodes:  # the rest catch up before the next sample
                    barrier_all([other], site.user, time.monotonic(), "catch up")
    return chain


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def per_hop(run: Run, phase_name: str) -> float | None:
    """Seconds per hop within one run: least squares of each node's time (median of the
    edits) against its depth, so every point shares the run's load; None at one depth."""
    phase = run.phases.get(phase_name)
    if phase is None:
        return None
    points = [(run.depths[name], seconds) for name, seconds in phase.per_node.items()
              if name in run.depths]
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.mean(xs), statistics.mean(y for _, y in points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)


def report(runs: Sequence[Run], chain: Chain | None, args: argparse.Namespace,
           host: HostInfo) -> str:
    header = ["nodes", "depth", "max direct", f"cold {args.upper_mb} MB", "after idle",
              f"warm {args.upper_mb} MB", "1-byte edit", "edit per hop", "login sent (cold)",
              "login queries per barrier", "node RSS idle (max)", "node RSS peak (max)",
              "passed", "converged"]
    rows = []
    for run in runs:
        def cell(name: str, run: Run = run) -> str:
            phase = run.phases.get(name)
            if phase is None:
                return "-"
            text = f"{phase.seconds:.3f} s"
            return text if not phase.failures else f"{text} ({len(phase.failures)} failed)"
        passed = sum(p.passed for p in run.phases.values())
        asked = sum(p.passed + len(p.failures) for p in run.phases.values())
        hop = per_hop(run, "edit")
        rows.append([str(run.nodes), str(run.depth), str(run.direct_max), cell("cold"),
                     cell("idle"), cell("warm"), cell("edit"),
                     "-" if hop is None else f"{hop * 1000:.1f} ms",
                     f"{run.login_bytes_cold / MB:.0f} MB "
                     f"({run.login_bytes_cold / run.upper_bytes:.1f}x)",
                     f"{run.login_queries / max(run.barriers, 1):.1f}",
                     f"{max(run.rss.values(), default=0):.0f} MB",
                     f"{max(run.peak.values(), default=0):.0f} MB", f"{passed}/{asked}",
                     f"{run.converged}/{run.nodes}"])
    lines = [
        f"Command: `{host.command}` ({host.date}, {host.kernel}, {host.cpus} CPUs, "
        f"Python {host.python}).",
        "",
        f"Fan-out {args.fanout}; {args.upper_mb} MB upper in 4 MB files; times from the "
        "user's last change to every node past `follow --wait` (all N asked at once); "
        f"edit: median of {args.edits}; edit per hop: least squares of each node's edit "
        "time against its depth within the run; login queries: head queries the login "
        f"node answered per burst of N barriers ({3 + args.edits} bursts per N).",
        "",
        render_markdown_table(header, rows),
        "",
    ]
    # Extrapolation from what one hop costs: a lone node's edit barrier (one hop) plus,
    # per extra hop, what the chain measured with one node asking and the others idle
    # (on a real cluster every node has its own CPU; the runs above share 2 cores).
    base = statistics.median(run.phases["edit"].seconds for run in runs
                             if run.nodes == 1 and "edit" in run.phases) \
        if any(run.nodes == 1 for run in runs) else 0.0
    single = [run for run in runs if run.nodes == 1 and "cold" in run.phases]
    if chain is not None:
        hop = chain.per_hop()
        gap = LOGIN_ROUND_GAP
        lines += [
            f"One hop: a chain of {chain.length} nodes (fan-out 1), a 1-byte edit, one node "
            f"asking at a time: depth 1 {statistics.median(chain.first) * 1000:.1f} ms, depth "
            f"{chain.length} {statistics.median(chain.last) * 1000:.1f} ms: "
            f"**{hop * 1000:.1f} ms per hop** (the question climbing and the record coming "
            f"down; medians of {len(chain.first)}).",
            "",
            f"Extrapolated: edit barrier = a lone node's ({base * 1000:.1f} ms) + (depth - 1) x "
            f"{hop * 1000:.1f} ms, + at most {gap * 1000:.0f} ms when the question comes in a "
            "burst (the login node's direct followers ask it at most every "
            f"{gap * 1000:.0f} ms); cold stream = a lone node's + one 4 MiB batch per extra "
            "hop (a relay forwards what it applied; every node on its own CPU); the login "
            "node sends fan-out x upper and answers at most fan-out questions per "
            f"{gap * 1000:.0f} ms whatever N; a node's memory does not depend on N.",
            "",
        ]
        ext_rows = []
        for nodes in (1000, 10000):
            depth = int(tree_cost(nodes, args.fanout)["depth"])
            edit = base + (depth - 1) * hop
            cold = ""
            if single:
                one = single[0].phases["cold"].seconds
                batch = one * (4 << 20) / single[0].upper_bytes
                cold = f"{one + batch * (depth - 1):.2f} s"
            ext_rows.append([f"{nodes:,}", str(depth),
                             f"{edit * 1000:.0f}–{(edit + gap) * 1000:.0f} ms", cold,
                             f"{min(nodes, args.fanout)} x upper",
                             f"<= {args.fanout / gap:.0f}/s"])
        lines.append(render_markdown_table(
            ["nodes", "depth", "1-byte edit barrier", f"cold {args.upper_mb} MB",
             "login sends", "login head queries"], ext_rows))
    return "\n".join(lines) + "\n"


def chart(runs: Sequence[Run], args: argparse.Namespace) -> Chart:
    series = []
    for k, (name, label) in enumerate((("cold", f"cold {args.upper_mb} MB"),
                                       ("warm", f"warm {args.upper_mb} MB rewrite"),
                                       ("idle", "after the login went idle"),
                                       ("edit", "1-byte edit"))):
        points = [(float(run.nodes), run.phases[name].seconds) for run in runs
                  if name in run.phases and run.phases[name].seconds > 0]
        series.append(Series(label, points, PALETTE[k], dashed=name == "idle",
                             annotate_last=True))
    return Chart(f"sdeefs fan-out: every node at the barrier (fan-out {args.fanout})",
                 "simulated compute nodes (one machine, 2 cores shared by all)",
                 "seconds from the user's last change", series,
                 subtitle="network namespaces on a bridge, one replicad each on its own tmpfs")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1,2,4,8,16,32")
    parser.add_argument("--fanout", type=int, default=4)
    parser.add_argument("--upper-mb", type=int, default=100)
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--chain", type=int, default=8,
                        help="nodes of the fan-out-1 chain that measures one hop (0: skip)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    require_root()
    counts = [int(x) for x in args.nodes.split(",")]
    if max(counts) > 200 or min(counts) < 1:
        raise SystemExit("--nodes: between 1 and 200 each")
    host = HostInfo.collect()
    runs: list[Run] = []
    with BenchSession("sdeefs-fanout-") as session:
        key = session.scratch / "key"
        key.write_text(os.urandom(32).hex())
        os.chmod(key, 0o600)
        for n in counts:
            log(f"{n} node(s), fan-out {args.fanout}")
            runs.append(run_one(session, n, args))
        chain = None
        if args.chain > 1:
            log(f"a chain of {args.chain} nodes (fan-out 1)")
            chain = run_chain(session, args.chain, args.edits)
    text = report(runs, chain, args, host)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"runs": [asdict(r) for r in runs], "chain": asdict(chain) if chain else None},
        indent=1))
    args.out.with_suffix(".svg").write_text(render(chart(runs, args), x_ticks_as_bytes=False))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
