"""Deploying a user's upper layer from a login node to a compute node: seconds and bytes.

Usage (as root)::

    .venv/bin/python bench/deploy/run.py [--sizes 5M,100M,1G,2G]
        [--scenarios full,nothing,1pct,edit64] [--methods rsync,tar,...] [--repeat 3]
        [--out bench/out/deploy.md] [--data-dir DIR] [--rebuild]
        [--compute-fs ext4|tmpfs|host] [--no-warmup]

The two nodes are network namespaces on this machine (login 10.250.0.1, compute
10.250.0.2) joined by a veth pair, created for the run and removed at exit. The login side
reads the data set from the host file system; the compute side writes into a journaled ext4
made for the run (see ``make_compute_fs`` for why not the host's root file system).
Measurements start warm (source and compute-side trees read just before, then ``sync``);
an untimed full deploy per method and data set comes first.

Data sets (cached under ``/var/tmp/sdeefs-deploy-data``; ``--rebuild`` rebuilds them): a
user's upper layer of about the given size, ``home/user/venv`` (a venv with numpy, scipy
and a few pure-Python packages installed by pip from PyPI; the small sizes take a subset)
plus ``home/user/data/input-NN.bin`` files of random data up to the size. If pip cannot
reach PyPI the venv is filled with copies of /usr/lib/python3 trees instead, and the report
says so.

Scenarios, per data set: ``full`` (into an empty destination), ``nothing`` (resubmit
unchanged), ``1pct`` (files totalling 1% of the bytes rewritten: same sizes, new content,
new mtime), ``edit64`` (64 bytes overwritten in the middle of the biggest file). Every method
sees the same changes: they are derived from fixed seeds and applied to the working copy of
the data set once per scenario and repetition, and undone afterwards.

Methods: ``rsync`` (rsync daemon on the compute side, ``rsync -a --delete --stats`` pushing
from the login side) and ``tar`` (tar over one TCP connection; always re-sends everything),
plus every ``METHODS`` list found in ``bench/deploy/*_method.py`` (see
``bench/deploy/harness.py`` for the interface).

Output: a Markdown report (``--out``), the raw numbers as JSON beside it (same name,
``.json``) and an SVG plot (same name, ``.svg``) of full-deploy time against size for every
method, next to the points the SDEE paper reports for its Fig. 11.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import importlib
import json
import math
import os
import random
import re
import shutil
import socket
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (  # noqa: E402
    SCRATCH_PARENT,
    BenchSession,
    HostInfo,
    ProcessTracker,
    log,
    one_line,
    render_markdown_table,
    run_command,
    signals_deferred,
    wait_until,
)
from bench.deploy.harness import (  # noqa: E402
    EDIT64,
    FULL,
    ONE_PCT,
    SCENARIOS,
    SETTLE_MEMORY,
    SYNC,
    DeployFailed,
    DeployMethod,
    Measurement,
    MethodUnavailable,
    Net,
    Spawned,
    create_net,
    describe_failure,
    empty_dir,
    remove_net,
    settle,
)
from bench.deploy.plot import PALETTE, PAPER_COLOR, Chart, Marker, Series, write_svg  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_PY = Path(__file__).resolve()
DEPLOY_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = Path("/var/tmp/sdeefs-deploy-data")
DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "deploy.md"
DEFAULT_SIZES = "5M,100M,1G,2G"
DEPLOY_TIMEOUT = 900.0
MIB = 1 << 20
GIB = 1 << 30

# What the SDEE paper states about its Fig. 11 in its text (the figure itself is not in
# the text we have): "When the size was several megabytes, the job can start running at
# the compute node in less than one second" and "The maximum size of the upper file
# system that we used in the test process was 2 GB, and the test result was 80 s".
# Their testbed: a Tianhe server (FT-1500A 16-core, 64 GB); the network is not stated.
PAPER_FIG11: tuple[dict[str, Any], ...] = (
    {"bytes": 5e6, "seconds": 1.0, "kind": "upper_bound",
     "quote": "several megabytes: less than one second"},
    {"bytes": 2e9, "seconds": 80.0, "kind": "point", "quote": "2 GB: 80 s"},
)

# Packages pip installs into the data sets' venv (numpy and scipy for weight, the rest
# pure Python, used to make the small data set).
PIP_PACKAGES = ("numpy", "scipy", "requests", "six", "packaging", "attrs", "pyparsing")
# Order in which site-packages groups are taken until a data set's size is reached: the
# pure-Python packages first (they make the 5 MB set), then numpy, setuptools, pip, scipy.
GROUP_PRIORITY = ("requests", "urllib3", "idna", "certifi", "charset_normalizer", "six",
                  "packaging", "attr", "attrs", "pyparsing", "numpy", "_distutils_hack",
                  "distutils", "setuptools", "pkg_resources", "pip", "scipy")
BLOB_MAX = 400 * MIB  # random-data files are split into pieces of at most this size
BLOB_MIN = 1 * MIB  # below this the size is considered reached without a blob
CHANGE_MTIME_NS = 1_600_000_000 * 10**9  # mtime of changed files: fixed, and in the past
# (tar warns about time stamps in the future)
TMP_NAME = ".sdd-deploy.tmp"


class BenchError(RuntimeError):
    """A problem that ends the run; printed as one line."""


def fmt_bytes(value: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(value) >= size:
            number = value / size
            return f"{number:.2f} {unit}" if number < 100 else f"{number:.0f} {unit}"
    return f"{value:.0f} B"


def fmt_seconds(value: float) -> str:
    if value < 1:
        return f"{value:.3f}"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 0.1:
        return f"{value:.2f}x"
    return f"1/{round(1 / value):,}x"


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise BenchError(f"bad size {text!r} (examples: 5M, 100M, 1G, 2G)")
    factor = {"": 1, "K": 1024, "M": MIB, "G": GIB}[match.group(2).upper()]
    size = int(float(match.group(1)) * factor)
    if size < 64 * 1024:
        raise BenchError(f"size {text!r} is too small (at least 64K)")
    return size


# --------------------------------------------------------------------------
# tar over a socket: the helper processes (run as `run.py _tarpipe ...`)
# --------------------------------------------------------------------------

TAR_CREATE = ("tar", "-c", "-f", "-", "--numeric-owner", "--totals")
TAR_EXTRACT = ("tar", "-x", "-f", "-", "--numeric-owner")


def _tar_receive(addr: str, port: int, dest: str) -> int:
    """Compute side: accept one connection and hand the socket to ``tar -x`` as stdin.

    tar reads the socket itself (no copy through Python). When it has exited, the rest
    of the stream is drained and a JSON line with tar's exit code goes back, which is
    what stops the sender's clock.
    """
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((addr, port))
    server.listen(1)
    print("ready", flush=True)
    conn, _peer = server.accept()
    server.close()
    with conn:
        proc = subprocess.run([*TAR_EXTRACT, "-C", dest], stdin=conn.fileno(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        # tar stops at the end-of-archive blocks; read to the sender's EOF so closing
        # does not reset the connection with our answer still in flight.
        while conn.recv(1 << 20):
            pass
        answer = {"rc": proc.returncode, "err": one_line(proc.stderr.decode(errors="replace"))}
        conn.sendall(json.dumps(answer).encode() + b"\n")
    return 0


def _tar_send(addr: str, port: int, src: str) -> int:
    """Login side: on "go", connect and let ``tar -c`` write straight into the socket."""
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 2
    with socket.create_connection((addr, port)) as sock:
        proc = subprocess.run([*TAR_CREATE, "-C", src, "."], stdin=subprocess.DEVNULL,
                              stdout=sock.fileno(), stderr=subprocess.PIPE, check=False)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    err = proc.stderr.decode(errors="replace")
    total = re.search(r"Total bytes written: (\d+)", err)
    err_lines = "\n".join(line for line in err.splitlines()
                          if not line.startswith("Total bytes written"))
    report = {"tar_rc": proc.returncode, "tar_err": one_line(err_lines),
              "tar_bytes": int(total.group(1)) if total else -1,
              "answer": answer.decode(errors="replace").strip(), "answer_bytes": len(answer)}
    print(json.dumps(report), flush=True)
    return 0


def tarpipe_main(argv: Sequence[str]) -> int:
    if len(argv) != 4 or argv[0] not in {"recv", "send"}:
        print("usage: run.py _tarpipe recv|send ADDR PORT DIR", file=sys.stderr)
        return 2
    mode, addr, port, path = argv
    return (_tar_receive if mode == "recv" else _tar_send)(addr, int(port), path)


# --------------------------------------------------------------------------
# Built-in methods
# --------------------------------------------------------------------------

RSYNC_MODULE = "upper"
RSYNC_FLAGS = ("-a", "--delete", "--stats")


class RsyncDaemonMethod:
    """rsync daemon in the compute namespace; the client pushes from the login namespace."""

    name = "rsync"
    description = (
        "`rsync --daemon --no-detach` in the compute namespace (module `upper`, use chroot = "
        "yes so absolute symlinks arrive unmodified, reverse lookup = no, uid/gid root, "
        "numeric ids); login side runs `rsync "
        f"{' '.join(RSYNC_FLAGS)} SRC/ rsync://10.250.0.2/upper/`: plain `-a --delete` "
        "(no -H, no --inplace, no -z), delta transfer on as rsync always does over the "
        "network, so a changed file is rebuilt into a temporary copy and renamed"
    )

    def __init__(self) -> None:
        self.dest = ""
        self._net: Net | None = None
        self._daemon: Spawned | None = None
        self._log = Path()

    def setup(self, net: Net, workdir: str) -> None:
        if shutil.which("rsync") is None:
            raise MethodUnavailable("rsync is not installed (apt-get install rsync)")
        self._net = net
        work = Path(workdir)
        dest = work / "dest"
        dest.mkdir(parents=True, exist_ok=True)
        self.dest = str(dest)
        self._log = work / "rsyncd.log"
        config = work / "rsyncd.conf"
        # use chroot = yes: a module served without chroot is "limited to a subdir", and
        # rsync then munges incoming symlinks (prefix /rsyncd-munged/) or, with munging
        # off, still sanitizes them (drops the leading "/"): the venv's absolute
        # bin/python3.11 -> /usr/bin/python3.11 would arrive broken. Chrooted into the
        # module, the daemon serves "/" and stores symlinks as sent.
        # reverse lookup = no: the namespace has no DNS; a lookup would stall each connect.
        config.write_text("\n".join([
            f"address = {net.compute_addr}",
            "port = 873",
            "use chroot = yes",
            "munge symlinks = no",
            "reverse lookup = no",
            "numeric ids = yes",
            "uid = root",
            "gid = root",
            f"log file = {self._log}",
            "",
            f"[{RSYNC_MODULE}]",
            f"path = {dest}",
            "read only = no",
            "",
        ]))
        self._daemon = net.spawn("compute", ["rsync", "--daemon", "--no-detach",
                                             f"--config={config}"],
                                 label="rsync daemon", log_file=work / "rsyncd.out")
        url = f"rsync://{net.compute_addr}/"

        def listening() -> bool:
            if self._daemon is None or not self._daemon.alive():
                return True  # stop waiting; reported below
            result = net.run("login", ["rsync", url], timeout=10)
            return result.ok and RSYNC_MODULE in result.stdout

        ready = wait_until(listening, 15.0, 0.1)
        if not ready or not self._daemon.alive():
            reason = one_line(self._tail(work / "rsyncd.out") or self._tail(self._log))
            raise MethodUnavailable(f"rsync daemon did not start: {reason or 'no output'}")

    @staticmethod
    def _tail(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def deploy(self, src: str, scenario: str) -> Measurement:
        if self._net is None:
            raise DeployFailed("rsync: setup() was not run")
        if scenario == FULL:
            empty_dir(self.dest)
            settle()
        url = f"rsync://{self._net.compute_addr}/{RSYNC_MODULE}/"
        result = self._net.run("login", ["rsync", *RSYNC_FLAGS, src.rstrip("/") + "/", url],
                               timeout=DEPLOY_TIMEOUT)
        if not result.ok:
            raise DeployFailed(f"rsync client: {result.failure_reason()}")
        stats = parse_rsync_stats(result.stdout)
        if "Total bytes sent" not in stats:
            raise DeployFailed("rsync client printed no --stats")
        detail = (f"{stats.get('Number of regular files transferred', 0)} files transferred, "
                  f"literal {fmt_bytes(stats.get('Literal data', 0))}, "
                  f"matched {fmt_bytes(stats.get('Matched data', 0))}")
        return Measurement(result.elapsed, stats["Total bytes sent"],
                           stats.get("Total bytes received", 0), detail)

    def teardown(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
            self._daemon = None


def parse_rsync_stats(text: str) -> dict[str, int]:
    """The numeric lines of ``rsync --stats`` ("Total bytes sent: 1,234" and the like)."""
    stats: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z][A-Za-z ]+):\s*([\d,]+)(?:\s|$)", line.strip())
        if match:
            stats[match.group(1)] = int(match.group(2).replace(",", ""))
    return stats


class TarSocketMethod:
    """GNU tar over one TCP connection; every deploy sends the whole tree."""

    name = "tar"
    description = (
        "GNU tar over one TCP connection: on the login side `tar -c -f - --numeric-owner "
        "-C SRC .` writes straight into the socket; on the compute side a small Python "
        "listener gives the accepted socket to `tar -x -f - --numeric-owner -C DEST` as its "
        "stdin (no copy through Python). Both helpers are started before the clock; the "
        "clock stops when the receiver's tar has exited and said so over the socket. "
        "Resubmissions re-send everything and extract over the existing tree"
    )
    port = 5001

    def __init__(self) -> None:
        self.dest = ""
        self._net: Net | None = None

    def setup(self, net: Net, workdir: str) -> None:
        if shutil.which("tar") is None:
            raise MethodUnavailable("tar is not installed")
        self._net = net
        dest = Path(workdir) / "dest"
        dest.mkdir(parents=True, exist_ok=True)
        self.dest = str(dest)

    def deploy(self, src: str, scenario: str) -> Measurement:
        net = self._net
        if net is None:
            raise DeployFailed("tar: setup() was not run")
        if scenario == FULL:
            empty_dir(self.dest)
            settle()
        helper = [sys.executable, str(RUN_PY), "_tarpipe"]
        receiver = net.spawn("compute", [*helper, "recv", net.compute_addr, str(self.port),
                                         self.dest], label="tar receiver", stdout_pipe=True)
        sender: Spawned | None = None
        try:
            if receiver.readline(30) != "ready":
                raise DeployFailed("tar receiver did not get ready")
            sender = net.spawn("login", [*helper, "send", net.compute_addr, str(self.port),
                                         src], label="tar sender", stdin_pipe=True,
                               stdout_pipe=True)
            if sender.readline(30) != "ready":
                raise DeployFailed("tar sender did not get ready")
            start = time.perf_counter()
            sender.write_line("go")
            line = sender.readline(DEPLOY_TIMEOUT)
            elapsed = time.perf_counter() - start
            sender.wait(30)
            receiver.wait(30)
        finally:
            for proc in (sender, receiver):
                if proc is not None and proc.alive():
                    proc.stop()
        report = json.loads(line)
        answer = json.loads(report["answer"]) if report["answer"] else {}
        if report["tar_rc"] != 0:
            raise DeployFailed(f"tar -c exit {report['tar_rc']}: {report['tar_err']}")
        if answer.get("rc") != 0:
            raise DeployFailed(f"tar -x exit {answer.get('rc')}: {answer.get('err', 'no answer')}")
        return Measurement(elapsed, int(report["tar_bytes"]), int(report["answer_bytes"]),
                           "archive bytes from tar --totals")

    def teardown(self) -> None:
        self._net = None


BUILTIN_METHODS: tuple[Callable[[], DeployMethod], ...] = (RsyncDaemonMethod, TarSocketMethod)


@dataclass
class MethodEntry:
    name: str
    method: DeployMethod | None
    origin: str
    unavailable: str = ""

    @property
    def description(self) -> str:
        text = getattr(self.method, "description", "") if self.method is not None else ""
        return str(text) or self.name


def discover_methods() -> list[MethodEntry]:
    """Built-in methods, then ``METHODS`` of every ``bench/deploy/*_method.py``.

    A module that fails to import, or defines no usable ``METHODS``, is reported as an
    unavailable entry named after the module, not as a crash.
    """
    entries = [MethodEntry(factory().name, factory(), "built-in") for factory in BUILTIN_METHODS]
    for path in sorted(DEPLOY_DIR.glob("*_method.py")):
        module_name = f"bench.deploy.{path.stem}"
        try:
            module = importlib.import_module(module_name)
            methods = list(module.METHODS)
        except Exception as exc:  # noqa: BLE001 - a broken extra must not stop the run
            entries.append(MethodEntry(path.stem, None, module_name,
                                       f"importing {module_name}: {describe_failure(exc)}"))
            continue
        for method in methods:
            name = getattr(method, "name", "")
            if not name or not all(callable(getattr(method, attr, None))
                                   for attr in ("setup", "deploy", "teardown")):
                entries.append(MethodEntry(name or path.stem, None, module_name,
                                           "not a DeployMethod (needs name, setup, deploy, "
                                           "teardown)"))
                continue
            entries.append(MethodEntry(name, method, module_name))
    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise BenchError(f"two deploy methods are named {entry.name!r}")
        seen.add(entry.name)
    return entries


# --------------------------------------------------------------------------
# Trees: scanning, comparing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    kind: str  # f(ile), d(ir), l(ink), o(ther)
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    link: str = ""


def scan_tree(root: Path) -> dict[str, Entry]:
    """Every entry below ``root`` (not root itself), by path relative to it."""
    entries: dict[str, Entry] = {}
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(root / rel_dir if rel_dir else root) as it:
            for item in it:
                rel = f"{rel_dir}/{item.name}" if rel_dir else item.name
                st = item.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    kind, link = "d", ""
                    stack.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    kind, link = "f", ""
                elif stat.S_ISLNK(st.st_mode):
                    kind, link = "l", os.readlink(item.path)
                else:
                    kind, link = "o", ""
                entries[rel] = Entry(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                     st.st_size if kind == "f" else 0, st.st_mtime_ns, link)
    return entries


@dataclass(frozen=True)
class Window:
    """A byte range to compare: ``length`` < 0 means the whole file."""

    path: str
    offset: int = 0
    length: int = -1


def compare_trees(src: Path, dest: Path, windows: Iterable[Window]) -> None:
    """Raise DeployFailed unless ``dest`` mirrors ``src``.

    Metadata of every entry (file mtimes to the second: tar's default format keeps only
    whole seconds; directory mtimes are not compared, they move as entries are written),
    then the content of the given windows.
    """
    want, have = scan_tree(src), scan_tree(dest)
    problems: list[str] = []
    for rel in sorted(want.keys() | have.keys()):
        a, b = want.get(rel), have.get(rel)
        if a is None:
            problems.append(f"{rel}: extra on the compute side")
        elif b is None:
            problems.append(f"{rel}: missing on the compute side")
        elif a.kind != b.kind:
            problems.append(f"{rel}: type {a.kind} vs {b.kind}")
        elif (a.mode, a.uid, a.gid) != (b.mode, b.uid, b.gid):
            problems.append(f"{rel}: mode/owner {a.mode:o} {a.uid}:{a.gid} vs "
                            f"{b.mode:o} {b.uid}:{b.gid}")
        elif a.kind == "l" and a.link != b.link:
            problems.append(f"{rel}: symlink {a.link!r} vs {b.link!r}")
        elif a.kind == "f" and a.size != b.size:
            problems.append(f"{rel}: size {a.size} vs {b.size}")
        elif a.kind == "f" and a.mtime_ns // 10**9 != b.mtime_ns // 10**9:
            problems.append(f"{rel}: mtime {a.mtime_ns // 10**9} vs {b.mtime_ns // 10**9}")
    if not problems:
        for window in windows:
            if not _same_bytes(src / window.path, dest / window.path, window):
                problems.append(f"{window.path}: content differs at "
                                f"{window.offset}+{window.length}")
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DeployFailed(f"compute side differs from the source: {problems[0]}{more}")


def _same_bytes(a: Path, b: Path, window: Window) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(window.offset)
        fb.seek(window.offset)
        left = window.length if window.length >= 0 else None
        while left is None or left > 0:
            n = 4 * MIB if left is None else min(4 * MIB, left)
            x, y = fa.read(n), fb.read(n)
            if x != y:
                return False
            if not x:
                return True
            if left is not None:
                left -= len(x)
    return True


# --------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Venv:
    path: Path
    site_packages: Path
    source: str
    fallback: bool


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise BenchError(f"{venv}: no lib/python3*/site-packages")
    return found[0]


def ensure_venv(data_dir: Path, rebuild: bool, tracker: ProcessTracker) -> Venv:
    """The venv all data sets copy from, built once: pip install from PyPI, else a fallback.

    ``BUILD.json`` is written last and marks a complete build; anything without it is
    rebuilt from scratch.
    """
    venv = data_dir / "venv"
    marker = venv / "BUILD.json"
    if marker.exists() and not rebuild:
        info = json.loads(marker.read_text())
        return Venv(venv, _site_packages(venv), info["source"], info["fallback"])
    shutil.rmtree(venv, ignore_errors=True)
    log(f"building the venv in {venv} (pip install {' '.join(PIP_PACKAGES)})")
    result = run_command([sys.executable, "-m", "venv", str(venv)], tracker, timeout=300)
    if not result.ok:
        raise BenchError(f"python -m venv: {result.failure_reason()}")
    site = _site_packages(venv)
    pip = run_command([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-input",
                       "--disable-pip-version-check", "--quiet", *PIP_PACKAGES], tracker,
                      timeout=1800)
    if pip.ok:
        versions = sorted(p.name.removesuffix(".dist-info") for p in site.glob("*.dist-info"))
        wanted = {name.lower() for name in PIP_PACKAGES}
        shown = [v for v in versions if v.split("-")[0].lower() in wanted]
        source = f"pip install from PyPI: {', '.join(shown)}"
        fallback = False
    else:
        reason = pip.failure_reason()
        log(f"pip install failed ({reason}); falling back to copies of /usr/lib/python3 trees")
        for entry in sorted(site.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        stdlib = Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
        sources = [p for p in sorted(Path("/usr/lib/python3/dist-packages").iterdir())]
        sources.append(stdlib)
        for item in sources:
            copied = run_command(["cp", "-a", str(item), str(site / item.name)], tracker,
                                 timeout=600)
            if not copied.ok:
                raise BenchError(f"copying {item}: {copied.failure_reason()}")
        source = (f"FALLBACK (pip could not install from PyPI: {reason}): copies of "
                  f"/usr/lib/python3/dist-packages and {stdlib}")
        fallback = True
    marker.write_text(json.dumps({"source": source, "fallback": fallback}, indent=1))
    return Venv(venv, site, source, fallback)


def _group_key(name: str) -> str:
    """numpy, numpy.libs, numpy-2.4.6.dist-info -> numpy; distutils-precedence.pth -> distutils."""
    return name.split("-")[0].split(".")[0].lower()


def _tree_bytes(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size if path.is_file() and not path.is_symlink() else 0
    return sum(e.size for e in scan_tree(path).values())


@dataclass(frozen=True)
class Dataset:
    label: str
    target: int
    tree: Path
    total_bytes: int
    files: int
    dirs: int
    symlinks: int
    biggest: str
    biggest_size: int
    groups: tuple[str, ...]
    blobs: tuple[str, ...]
    venv_source: str
    fallback: bool
    index: dict[str, tuple[int, int]] = field(repr=False)  # regular file -> (size, mtime_ns)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("index")
        data["tree"] = str(self.tree)
        return data

    def contents(self) -> str:
        blobs = sum(self.index[b][0] for b in self.blobs)
        text = f"venv ({', '.join(self.groups)})"
        if self.blobs:
            text += f" + {len(self.blobs)} random-data file(s), {fmt_bytes(blobs)}"
        return text


def _dataset_from_manifest(path: Path) -> Dataset:
    data = json.loads(path.read_text())
    return Dataset(
        label=data["label"], target=data["target"], tree=path.parent / "tree",
        total_bytes=data["total_bytes"], files=data["files"], dirs=data["dirs"],
        symlinks=data["symlinks"], biggest=data["biggest"], biggest_size=data["biggest_size"],
        groups=tuple(data["groups"]), blobs=tuple(data["blobs"]),
        venv_source=data["venv_source"], fallback=data["fallback"],
        index={k: (v[0], v[1]) for k, v in data["index"].items()},
    )


def _dataset_intact(dataset: Dataset) -> bool:
    """Regular files still as built (sizes and mtimes): catches a run killed mid-change
    or hand edits; the hard-linked working copies make in-place edits visible here."""
    if not dataset.tree.is_dir():
        return False
    current = {rel: (e.size, e.mtime_ns) for rel, e in scan_tree(dataset.tree).items()
               if e.kind == "f"}
    return current == dataset.index


def ensure_dataset(label: str, target: int, data_dir: Path, venv: Venv, rebuild: bool,
                   tracker: ProcessTracker) -> Dataset:
    root = data_dir / label
    manifest = root / "manifest.json"
    if manifest.exists() and not rebuild:
        dataset = _dataset_from_manifest(manifest)
        if _dataset_intact(dataset):
            return dataset
        log(f"data set {label} differs from its manifest: rebuilding it")
    return build_dataset(label, target, root, venv, tracker)


def build_dataset(label: str, target: int, root: Path, venv: Venv,
                  tracker: ProcessTracker) -> Dataset:
    """Venv skeleton + site-packages groups in GROUP_PRIORITY order while they fit, then
    random-data files up to ``target``. ``manifest.json`` is written last."""
    log(f"building data set {label} ({fmt_bytes(target)}) in {root}")
    shutil.rmtree(root, ignore_errors=True)
    tree = root / "tree"
    home = tree / "home" / "user"
    venv_dst = home / "venv"
    site_rel = venv.site_packages.relative_to(venv.path)

    def skeleton_ignore(directory: str, names: list[str]) -> list[str]:
        if Path(directory) == venv.site_packages:
            return names
        return [n for n in names if n == "BUILD.json" and Path(directory) == venv.path]

    shutil.copytree(venv.path, venv_dst, symlinks=True, ignore=skeleton_ignore)
    total = _tree_bytes(tree)
    groups: dict[str, list[Path]] = {}
    for entry in sorted(venv.site_packages.iterdir()):
        groups.setdefault(_group_key(entry.name), []).append(entry)
    order = [g for g in GROUP_PRIORITY if g in groups]
    order += sorted(g for g in groups if g not in GROUP_PRIORITY)
    chosen: list[str] = []
    for group in order:
        size = sum(_tree_bytes(p) for p in groups[group])
        if total + size > target * 1.02:  # small overshoot is fine; "about N" sizes
            continue
        for item in groups[group]:
            result = run_command(["cp", "-a", str(item), str(venv_dst / site_rel / item.name)],
                                 tracker, timeout=600)
            if not result.ok:
                raise BenchError(f"copying {item}: {result.failure_reason()}")
        chosen.append(group)
        total += size
    blobs: list[str] = []
    remaining = target - total
    if remaining >= BLOB_MIN:
        count = math.ceil(remaining / BLOB_MAX)
        data = home / "data"
        data.mkdir(parents=True)
        for i in range(count):
            size = remaining // count + (remaining % count if i == count - 1 else 0)
            rel = f"home/user/data/input-{i + 1:02d}.bin"
            rng = random.Random(f"{label}/{rel}")  # reproducible content
            with open(tree / rel, "wb") as handle:
                left = size
                while left > 0:
                    n = min(8 * MIB, left)
                    handle.write(rng.randbytes(n))
                    left -= n
            blobs.append(rel)
    os.sync()
    entries = scan_tree(tree)
    files = {rel: e for rel, e in entries.items() if e.kind == "f"}
    biggest = max(files, key=lambda rel: (files[rel].size, rel))
    dataset = Dataset(
        label=label, target=target, tree=tree,
        total_bytes=sum(e.size for e in files.values()), files=len(files),
        dirs=sum(1 for e in entries.values() if e.kind == "d"),
        symlinks=sum(1 for e in entries.values() if e.kind == "l"),
        biggest=biggest, biggest_size=files[biggest].size, groups=tuple(chosen),
        blobs=tuple(blobs), venv_source=venv.source, fallback=venv.fallback,
        index={rel: (e.size, e.mtime_ns) for rel, e in files.items()},
    )
    manifest = dataset.summary()
    manifest["index"] = {rel: list(v) for rel, v in dataset.index.items()}
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, root / "manifest.json")
    log(f"data set {label}: {fmt_bytes(dataset.total_bytes)} in {dataset.files} files")
    return dataset


# --------------------------------------------------------------------------
# Scenario changes
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """The files a scenario replaces in the working copy (identical for every method)."""

    scenario: str
    rewrites: tuple[str, ...] = ()  # rewritten whole: same size, new content, new mtime
    edit: tuple[str, int] | None = None  # (path, offset): 64 bytes overwritten there
    changed_bytes: int = 0

    @property
    def paths(self) -> tuple[str, ...]:
        return self.rewrites + ((self.edit[0],) if self.edit else ())

    def windows(self) -> list[Window]:
        out = [Window(rel) for rel in self.rewrites]
        if self.edit is not None:
            rel, offset = self.edit
            out.append(Window(rel, max(0, offset - 4096), 8192))
        return out

    def describe(self) -> str:
        if self.rewrites:
            return f"{len(self.rewrites)} files, {fmt_bytes(self.changed_bytes)} rewritten"
        if self.edit is not None:
            return f"64 B at offset {self.edit[1]:,} of {self.edit[0]}"
        return "-"


def plan_change(dataset: Dataset, scenario: str) -> Change:
    if scenario == ONE_PCT:
        rng = random.Random(f"1pct/{dataset.label}")
        candidates = sorted(dataset.index)
        rng.shuffle(candidates)
        budget = dataset.total_bytes // 100
        left = budget
        chosen: list[str] = []
        for rel in candidates:
            size = dataset.index[rel][0]
            if 0 < size <= left:
                chosen.append(rel)
                left -= size
            if left <= budget // 100:
                break
        return Change(scenario, rewrites=tuple(sorted(chosen)), changed_bytes=budget - left)
    if scenario == EDIT64:
        return Change(scenario, edit=(dataset.biggest, dataset.biggest_size // 2),
                      changed_bytes=64)
    return Change(scenario)


def _replace_with(src_root: Path, rel: str, write: Callable[[Path], None]) -> None:
    """Write a new file beside ``rel`` and rename it over: the cached data set, which the
    working copy hard-links, is never written."""
    target = src_root / rel
    tmp = target.parent / TMP_NAME
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    write(tmp)
    st = target.lstat()
    os.chown(tmp, st.st_uid, st.st_gid)
    os.chmod(tmp, stat.S_IMODE(st.st_mode))
    os.utime(tmp, ns=(CHANGE_MTIME_NS, CHANGE_MTIME_NS))
    os.replace(tmp, target)


def _random_writer(seed: str, size: int) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_bytes(random.Random(seed).randbytes(size))

    return write


def apply_change(change: Change, src_root: Path) -> None:
    for rel in change.rewrites:
        size = (src_root / rel).lstat().st_size
        _replace_with(src_root, rel, _random_writer(f"rewrite/{rel}", size))
    if change.edit is not None:
        rel, offset = change.edit

        def edited(tmp: Path) -> None:
            shutil.copyfile(src_root / rel, tmp)  # copy_file_range: fast, untimed anyway
            fd = os.open(tmp, os.O_WRONLY)
            try:
                os.pwrite(fd, random.Random(f"edit64/{rel}").randbytes(64), offset)
            finally:
                os.close(fd)

        _replace_with(src_root, rel, edited)


def revert_change(change: Change, src_root: Path, cache_tree: Path) -> None:
    """Put the cached originals back (hard links again: same inode, content and mtime)."""
    for rel in change.paths:
        tmp = (src_root / rel).parent / TMP_NAME
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.link(cache_tree / rel, tmp)
        os.replace(tmp, src_root / rel)


def full_windows(dataset: Dataset) -> list[Window]:
    """Content checked after a full deploy: whole files up to 4 MiB, three 1 MiB windows
    (start, middle, end) of bigger ones; a few seconds at most for 2 GB."""
    windows: list[Window] = []
    for rel, (size, _mtime) in sorted(dataset.index.items()):
        if size <= 4 * MIB:
            windows.append(Window(rel))
        else:
            for offset in (0, size // 2 - MIB // 2, size - MIB):
                windows.append(Window(rel, offset, MIB))
    return windows


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    seconds: float
    bytes_sent: int
    bytes_received: int
    wire_tx: int
    wire_rx: int
    verified: bool
    detail: str


@dataclass
class Cell:
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, attr: str) -> float | None:
        values = [getattr(s, attr) for s in self.samples]
        return statistics.median(values) if values else None


@dataclass
class Run:
    sizes: list[tuple[str, int]]
    scenarios: list[str]
    repeat: int
    methods: list[MethodEntry]
    net: Net
    scratch: Path
    data_dir: Path
    rebuild: bool
    tracker: ProcessTracker
    datasets: dict[str, Dataset] = field(default_factory=dict)
    compute_fs: str = ""
    warmup: bool = True
    changes: dict[tuple[str, str], Change] = field(default_factory=dict)
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)

    def cell(self, size: str, scenario: str, method: str) -> Cell:
        return self.cells.setdefault((size, scenario, method), Cell())


def warm_tree(root: Path) -> None:
    """Read every regular file under ``root`` once, so a measurement starts warm.

    Needed here because this machine may run DAMON proactive reclaim, which pages out
    page-cache pages idle for about a minute: without it, whether a data set is still
    cached would depend on how long ago the previous scenario touched it.
    """
    buffer = bytearray(MIB)
    for rel, entry in scan_tree(root).items():
        if entry.kind != "f" or entry.size == 0:
            continue
        with contextlib.suppress(OSError), open(root / rel, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def damon_pageout() -> str:
    """A description of active DAMON pageout schemes (read-only look), or ""."""
    notes: list[str] = []
    base = Path("/sys/kernel/mm/damon/admin/kdamonds")
    with contextlib.suppress(OSError, ValueError):
        for kdamond in sorted(base.glob("[0-9]*")):
            if (kdamond / "state").read_text().strip() != "on":
                continue
            for ctx in sorted(kdamond.glob("contexts/[0-9]*")):
                aggr_us = int((ctx / "monitoring_attrs/intervals/aggr_us").read_text())
                for scheme in sorted(ctx.glob("schemes/[0-9]*")):
                    if (scheme / "action").read_text().strip() != "pageout":
                        continue
                    age = int((scheme / "access_pattern/age/min").read_text())
                    quota = int((scheme / "quotas/bytes").read_text())
                    reset_ms = int((scheme / "quotas/reset_interval_ms").read_text())
                    rate = f", at most {fmt_bytes(quota)} per {reset_ms} ms" if quota else ""
                    notes.append(f"pages idle for {age * aggr_us / 1e6:.0f} s{rate}")
    return "; ".join(notes)


def _deploy_checked(run: Run, entry: MethodEntry, src: Path, scenario: str,
                    windows: list[Window]) -> Sample:
    """One deploy with the wire counted around it, then the compute side checked."""
    method = entry.method
    assert method is not None
    dest = getattr(method, "dest", "") or ""
    warm_tree(src)
    if dest and scenario != FULL:
        warm_tree(Path(dest))
    settle()
    tx0, rx0 = run.net.wire_bytes()
    measurement = method.deploy(str(src), scenario)
    tx1, rx1 = run.net.wire_bytes()
    if dest:
        compare_trees(src, Path(dest), windows)
    return Sample(measurement.seconds, measurement.bytes_sent, measurement.bytes_received,
                  tx1 - tx0, rx1 - rx0, bool(dest), measurement.detail)


def run_size(run: Run, label: str, dataset: Dataset) -> None:
    """All scenarios x repetitions x methods for one data set.

    Per repetition and scenario: every method's destination is first brought to the base
    tree (untimed), then the scenario's change is applied once, every method deploys it
    (order rotated per repetition), and the change is undone.
    """
    src = run.scratch / f"src-{label}"
    result = run_command(["cp", "-al", str(dataset.tree), str(src)], run.tracker, timeout=600)
    if not result.ok:
        raise BenchError(f"making the working copy of {label}: {result.failure_reason()}")
    live = [m for m in run.methods if m.method is not None and not m.unavailable]
    # "unknown": nothing or another data set there; "base": mirrors the unchanged tree;
    # "stale": holds a change that has since been undone in the source.
    state = dict.fromkeys((m.name for m in live), "unknown")
    for scenario in run.scenarios:
        run.changes[(label, scenario)] = plan_change(dataset, scenario)
    try:
        if run.warmup:
            # An untimed full deploy per method first: the first writes of a run into
            # the compute file system (and into memory the VM has not used yet) ran
            # about twice as slow as later ones, for every method alike.
            for entry in live:
                _bring_to_base(run, entry, src, label, "warm-up", state)
        for rep in range(run.repeat):
            order = live[rep % len(live):] + live[: rep % len(live)] if live else []
            for scenario in run.scenarios:
                change = run.changes[(label, scenario)]
                if scenario != FULL:
                    for entry in order:
                        _bring_to_base(run, entry, src, label, scenario, state)
                apply_change(change, src)
                try:
                    windows = full_windows(dataset) if scenario == FULL else change.windows()
                    for entry in order:
                        if scenario != FULL and state[entry.name] != "base":
                            continue  # its catch-up failed; recorded already
                        _measure(run, entry, src, label, scenario, rep, windows, state,
                                 changed=bool(change.paths))
                finally:
                    revert_change(change, src, dataset.tree)
    finally:
        shutil.rmtree(src, ignore_errors=True)


def _bring_to_base(run: Run, entry: MethodEntry, src: Path, label: str, scenario: str,
                   state: dict[str, str]) -> None:
    if state[entry.name] == "base":
        return
    catch_up = FULL if state[entry.name] == "unknown" else SYNC
    method = entry.method
    assert method is not None
    try:
        settle()
        method.deploy(str(src), catch_up)
        dest = getattr(method, "dest", "") or ""
        if dest:
            compare_trees(src, Path(dest), [])
        state[entry.name] = "base"
    except Exception as exc:  # noqa: BLE001 - one broken method must not end the run
        reason = f"untimed catch-up ({catch_up}) before {scenario}: {describe_failure(exc)}"
        log(f"{label} {entry.name}: {reason}")
        run.cell(label, scenario, entry.name).errors.append(reason)
        state[entry.name] = "unknown"


def _measure(run: Run, entry: MethodEntry, src: Path, label: str, scenario: str, rep: int,
             windows: list[Window], state: dict[str, str], *, changed: bool) -> None:
    cell = run.cell(label, scenario, entry.name)
    try:
        sample = _deploy_checked(run, entry, src, scenario, windows)
    except Exception as exc:  # noqa: BLE001 - one broken method must not end the run
        reason = describe_failure(exc)
        log(f"{label} {scenario} #{rep + 1} {entry.name}: FAILED: {reason}")
        cell.errors.append(reason)
        state[entry.name] = "unknown"
        return
    cell.samples.append(sample)
    state[entry.name] = "stale" if changed else "base"
    check = "checked" if sample.verified else "UNVERIFIED"
    log(f"{label} {scenario} #{rep + 1} {entry.name}: {sample.seconds:.3f} s, sent "
        f"{fmt_bytes(sample.bytes_sent)}, wire {fmt_bytes(sample.wire_tx)} ({check})")


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def _ratio(base: float | None, value: float | None) -> float | None:
    if base is None or value is None or base <= 0 or value <= 0:
        return None
    return base / value


def result_rows(run: Run) -> tuple[list[str], list[list[str]]]:
    header = ["upper", "scenario", "method", "median s", "min..max s", "x rsync (time)",
              "bytes sent / received", "on the wire → / ←", "x rsync (wire →)"]
    rows: list[list[str]] = []
    names = [m.name for m in run.methods if m.method is not None and not m.unavailable]
    for label, _size in run.sizes:
        for scenario in run.scenarios:
            base = run.cells.get((label, scenario, "rsync"))
            for name in names:
                cell = run.cells.get((label, scenario, name), Cell())
                if not cell.samples:
                    reason = cell.errors[0] if cell.errors else "not run"
                    rows.append([label, scenario, name, "failed", "-", "-", "-", "-",
                                 one_line(reason, 90)])
                    continue
                seconds = cell.median("seconds")
                times = [s.seconds for s in cell.samples]
                t_ratio = _ratio(base.median("seconds") if base else None, seconds)
                w_ratio = _ratio(base.median("wire_tx") if base else None,
                                 cell.median("wire_tx"))
                flag = "" if all(s.verified for s in cell.samples) else " (unverified)"
                if cell.errors:
                    flag += f" ({len(cell.errors)} failed)"
                rows.append([
                    label, scenario, name, fmt_seconds(seconds or 0) + flag,
                    f"{fmt_seconds(min(times))}..{fmt_seconds(max(times))}",
                    fmt_ratio(t_ratio),
                    f"{fmt_bytes(cell.median('bytes_sent') or 0)} / "
                    f"{fmt_bytes(cell.median('bytes_received') or 0)}",
                    f"{fmt_bytes(cell.median('wire_tx') or 0)} / "
                    f"{fmt_bytes(cell.median('wire_rx') or 0)}",
                    fmt_ratio(w_ratio),
                ])
    return header, rows


def paper_rows(run: Run) -> tuple[list[str], list[list[str]]]:
    names = [m.name for m in run.methods if m.method is not None and not m.unavailable]
    header = ["upper", "SDEE paper, Fig. 11 (their testbed)",
              *(f"{n}: full deploy" for n in names)]
    rows: list[list[str]] = []
    for label, _size in run.sizes:
        dataset = run.datasets.get(label)
        paper = "-"
        paper_s: float | None = None
        if dataset is not None and dataset.total_bytes >= 1.5e9:
            paper, paper_s = "80 s (\"2 GB\")", 80.0
        elif dataset is not None and dataset.total_bytes <= 2e7:
            paper, paper_s = "< 1 s (\"several megabytes\")", 1.0
        cells = []
        for name in names:
            median = run.cells.get((label, FULL, name), Cell()).median("seconds")
            if median is None:
                cells.append("-")
            elif paper_s is not None:
                bound = "at least " if paper.startswith("<") else ""
                cells.append(f"{fmt_seconds(median)} s ({bound}{paper_s / median:.0f}x faster)")
            else:
                cells.append(f"{fmt_seconds(median)} s")
        rows.append([label, paper, *cells])
    return header, rows


def dataset_rows(run: Run) -> tuple[list[str], list[list[str]]]:
    header = ["upper", "bytes", "files", "dirs", "symlinks", "biggest file", "contents",
              "1pct change"]
    rows = []
    for label, _size in run.sizes:
        d = run.datasets.get(label)
        if d is None:
            continue
        one = run.changes.get((label, ONE_PCT))
        rows.append([label, f"{d.total_bytes:,} ({fmt_bytes(d.total_bytes)})", f"{d.files:,}",
                     f"{d.dirs:,}", f"{d.symlinks:,}",
                     f"{d.biggest.rsplit('/', 1)[-1]} ({fmt_bytes(d.biggest_size)})",
                     d.contents(), one.describe() if one else "-"])
    return header, rows


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    return (out.stdout.splitlines() or ["?"])[0].strip()


def write_outputs(run: Run, out: Path, host: HostInfo, wall: float,
                  notes: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    methods = [m for m in run.methods if m.method is not None and not m.unavailable]
    venv_sources = sorted({d.venv_source for d in run.datasets.values()})
    lines = [
        "# Deploying a user's upper layer to a compute node (bench/deploy)",
        "",
        f"- Command: `{host.command}`",
        f"- Date: {host.date}; wall time {wall / 60:.1f} min",
        f"- Host: {host.kernel}; {host.cpus} CPUs; Python {host.python}; "
        f"{tool_version(['rsync', '--version'])}; {tool_version(['tar', '--version'])}",
        f"- Network: two network namespaces on this machine, login {run.net.login_addr} and "
        f"compute {run.net.compute_addr}, joined by a veth pair (MTU 1500, IPv6 off); plain "
        "TCP, no encryption, no compression. Both ends share this machine's disk"
        + (f"; each side's processes run on its own CPUs (`--pin`): login {run.net.login_cpus},"
           f" compute {run.net.compute_cpus} (the kernel's own workers on any)."
           if run.net.login_cpus else " and CPUs."),
        f"- Login side: the data set's working copy on the host root file system. Compute "
        f"side: every method writes into a {run.compute_fs} (`--compute-fs`; see "
        "`make_compute_fs` in run.py for why not the host's root ext4).",
        "- Measured warm: before every measurement the source tree and the method's existing "
        "compute-side tree are read once and `sync` runs (write-back of earlier runs does "
        "not overlap the measurement); receivers do not fsync. The clock stops when the "
        "compute side has the files (rsync: client exit; "
        "tar: the receiver's tar exit, acknowledged over the socket)."
        + (f" After that `sync`, {os.environ[SETTLE_MEMORY]} s of wait (`--settle-memory`): "
           "every method's page cache comes from memory free that long."
           if os.environ.get(SETTLE_MEMORY) else ""),
        f"- Repetitions: {run.repeat} per cell, methods interleaved (order rotated each "
        "repetition), median reported with min..max"
        + ("; before them, one untimed full deploy per method and data set (warm-up)."
           if run.warmup else "; no warm-up deploy (--no-warmup)."),
        "- Ratios: rsync's median divided by the method's, for time and for bytes sent on "
        "the wire (> 1 = better than rsync). Bytes sent/received: the method's own count "
        "(rsync --stats \"Total bytes sent/received\"; tar: archive size from --totals, and "
        "the receiver's answer). On the wire: the login end of the veth, headers included.",
        "- Every deploy is checked: the compute-side tree is compared with the source "
        "(names, types, modes, owners, sizes, file mtimes to the second, symlink targets), "
        "plus content: every file up to 4 MiB and three 1 MiB windows of bigger ones after "
        "a full deploy, every changed file (or the edited window) otherwise.",
        "- Scenarios: full = into an empty destination; nothing = resubmit unchanged; 1pct "
        "= files totalling ~1% of the bytes rewritten (same size, new content and mtime); "
        "edit64 = 64 bytes overwritten in the middle of the biggest file (mtime changes). "
        "Changes come from fixed seeds: every method deploys identical changes.",
        f"- Data sets: {'; '.join(venv_sources)}. Cached in `{run.data_dir}`.",
    ]
    if any(d.fallback for d in run.datasets.values()):
        lines.append("- **The venv is a fallback copy of /usr/lib/python3 trees, not a pip "
                     "install from PyPI** (see the data-set line).")
    lines.append("- Methods:")
    lines += [f"  - **{m.name}** ({m.origin}): {m.description}" for m in methods]
    lines += [f"  - **{m.name}**: unavailable: {m.unavailable}" for m in run.methods
              if m.method is None or m.unavailable]
    lines += ["", "## Data sets", "", render_markdown_table(*dataset_rows(run)), "",
              "## Results", "", render_markdown_table(*result_rows(run)), "",
              "## Against the SDEE paper's Fig. 11", "",
              "The paper's text gives two points of its Fig. 11 (the curve itself is only in "
              "the figure): \"several megabytes\" in less than one second, and 2 GB in 80 s, "
              "on a Tianhe server (FT-1500A, 16 cores) over a network it does not describe. "
              "Its synchronisation, like rsync's quick check, compares sizes and timestamps.",
              "", render_markdown_table(*paper_rows(run)), "",
              f"Plot: `{out.with_suffix('.svg').name}` (log-log, full deploy time against "
              "upper size, resubmission with 1% changed dashed, the paper's two points in "
              "red).", ""]
    failures = [f"{size} {scenario} {method}: {err}"
                for (size, scenario, method), cell in sorted(run.cells.items())
                for err in cell.errors]
    if failures or notes:
        lines += ["## Notes", "", *(f"- {text}" for text in notes + failures), ""]
    out.write_text("\n".join(lines))

    raw = {
        "command": host.command, "date": host.date, "wall_seconds": wall,
        "host": asdict(host),
        "options": {"sizes": [label for label, _ in run.sizes], "scenarios": run.scenarios,
                    "repeat": run.repeat, "data_dir": str(run.data_dir),
                    "compute_fs": run.compute_fs},
        "net": {"login_ns": run.net.login_ns, "compute_ns": run.net.compute_ns,
                "login_addr": run.net.login_addr, "compute_addr": run.net.compute_addr},
        "paper_fig11": list(PAPER_FIG11),
        "methods": [{"name": m.name, "origin": m.origin, "description": m.description,
                     "unavailable": m.unavailable} for m in run.methods],
        "datasets": {label: d.summary() for label, d in run.datasets.items()},
        "changes": {f"{label}/{scenario}": asdict(c)
                    for (label, scenario), c in run.changes.items()},
        # In run order (sizes as given, scenarios, methods), not sorted by name.
        "results": [
            {"size": size, "scenario": scenario, "method": method,
             "median_seconds": cell.median("seconds"),
             "samples": [asdict(s) for s in cell.samples], "errors": cell.errors}
            for (size, scenario, method), cell in run.cells.items()
        ],
        "notes": notes,
    }
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps(raw, indent=1))
    svg_path = out.with_suffix(".svg")
    write_svg(svg_path, make_chart(run, methods))
    log(f"wrote {out}, {json_path.name}, {svg_path.name}")


def make_chart(run: Run, methods: list[MethodEntry]) -> Chart:
    series: list[Series] = []
    for i, entry in enumerate(methods):
        color = PALETTE[i % len(PALETTE)]
        for scenario, dashed, suffix in ((FULL, False, "full deploy"),
                                         (ONE_PCT, True, "resubmit, 1% changed")):
            points = []
            for label, _size in run.sizes:
                dataset = run.datasets.get(label)
                median = run.cells.get((label, scenario, entry.name), Cell()).median("seconds")
                if dataset is not None and median is not None:
                    points.append((float(dataset.total_bytes), median))
            if points:
                series.append(Series(f"{entry.name}: {suffix}", points, color, dashed,
                                     annotate_last=not dashed))
    markers = [
        Marker("SDEE paper (their testbed): 2 GB in 80 s", 2e9, 80.0, PAPER_COLOR,
               note="SDEE paper: 80 s"),
        Marker("SDEE paper (their testbed): several MB in < 1 s", 5e6, 1.0, PAPER_COLOR,
               upper_bound=True, note="paper: < 1 s"),
    ]
    return Chart(
        title="Deploying a user's upper layer to a compute node",
        subtitle=f"veth between two network namespaces, warm cache, median of {run.repeat}; "
                 "paper points from its text (Fig. 11)",
        x_label="upper layer size (bytes, log scale)",
        y_label="time to deploy (seconds, log scale)",
        series=series, markers=markers)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"upper sizes, comma-separated (default {DEFAULT_SIZES})")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"subset of {','.join(SCENARIOS)} (default all)")
    parser.add_argument("--methods", default="",
                        help="comma-separated method names (default: every available one)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measurements per cell, median reported (default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="Markdown report; .json and .svg are written beside it "
                             "(default bench/out/deploy.md)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help=f"data set cache (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--compute-fs", choices=COMPUTE_FS_CHOICES, default="ext4",
                        help="file system the compute side writes into: a journaled ext4 "
                             "made for the run (default), a tmpfs, or the host's own")
    parser.add_argument("--pin", metavar="LOGIN:COMPUTE", type=parse_pin, default=("", ""),
                        help="run the login side's processes on the CPUs LOGIN and the compute "
                             "side's on COMPUTE (taskset lists, e.g. 0:1: two one-core nodes, "
                             "whose CPU time does not add up as on one shared machine); "
                             "default: both sides on every CPU")
    parser.add_argument("--settle-memory", type=float, default=0.0, metavar="S",
                        help="after the sync before each clock, wait S seconds: every "
                             "method's page cache then comes from memory free that long "
                             "(bench/deploy/harness.py, settle)")
    parser.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                        help="one untimed full deploy per method and data set before the "
                             "measurements (default on)")
    parser.add_argument("--rebuild", action="store_true",
                        help="rebuild the venv and the selected data sets")
    return parser.parse_args(argv)


COMPUTE_FS_CHOICES = ("ext4", "tmpfs", "host")


def parse_pin(text: str) -> tuple[str, str]:
    """``LOGIN:COMPUTE`` CPU lists (taskset's form, e.g. ``0:1`` or ``0-1:2-3``)."""
    login, sep, compute = text.partition(":")
    cpu_list = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
    if not sep or not cpu_list.fullmatch(login) or not cpu_list.fullmatch(compute):
        raise argparse.ArgumentTypeError(f"expected LOGIN:COMPUTE CPU lists such as 0:1, "
                                         f"not {text!r}")
    return login, compute


def make_compute_fs(kind: str, mount_point: Path, size: int, tracker: ProcessTracker) -> str:
    """The compute node's local file system, where every method's copy lands.

    ext4 (default): a journaled ext4 in a sparse image file, loop-mounted for the run.
    The root file system of these machines is ext4 *without* a journal, and without one
    ext4 will not reuse an inode freed in the last 60-300 s: it scans past every recently
    freed inode on each create. A full deploy right after deleting the previous copy
    then took 3.3 s for 100 MB (3,400 files) instead of 0.4 s, i.e. it measured the
    delete before it. tmpfs: a RAM-backed tree (diskless compute nodes). host: a plain
    directory on the root file system, pathology included.
    """
    mount_point.mkdir(parents=True, exist_ok=True)
    if kind == "host":
        return f"plain directory on the host root file system ({mount_point})"
    if kind == "tmpfs":
        result = run_command(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                              str(mount_point)], tracker, timeout=60)
        if not result.ok:
            raise BenchError(f"mounting the tmpfs: {result.failure_reason()}")
        return f"tmpfs of {fmt_bytes(size)}"
    image = mount_point.parent / "compute-fs.img"
    with open(image, "wb") as handle:
        handle.truncate(size)
    # Inode tables and journal initialised now: lazy init would zero them from a kernel
    # thread in the middle of the measurements.
    mkfs = run_command(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                        "lazy_itable_init=0,lazy_journal_init=0", str(image)], tracker,
                       timeout=600)
    if not mkfs.ok:
        raise BenchError(f"mkfs.ext4 for the compute file system: {mkfs.failure_reason()}")
    result = run_command(["mount", "-o", "loop", str(image), str(mount_point)], tracker,
                         timeout=60)
    if not result.ok:
        raise BenchError(f"loop-mounting the compute file system: {result.failure_reason()} "
                         "(try --compute-fs tmpfs or host)")
    return (f"journaled ext4 (mkfs.ext4 defaults, data=ordered) on a loop-mounted sparse "
            f"image of {fmt_bytes(size)} in the scratch directory")


def check_space(data_dir: Path, sizes: list[tuple[str, int]], n_methods: int,
                rebuild: bool, compute_fs: str) -> None:
    """Refuse to start when the disk (or RAM, for tmpfs) cannot hold what the run writes."""
    missing = sum(size for label, size in sizes
                  if rebuild or not (data_dir / label / "manifest.json").exists())
    biggest = max(size for _label, size in sizes)
    venv = 0 if (data_dir / "venv" / "BUILD.json").exists() and not rebuild else 400 * MIB
    # Data sets to build, plus the edit64 copy of the biggest file and the 1pct rewrites.
    need_data = missing + venv + biggest // 2 + GIB
    # Every method keeps one copy of the biggest tree on the compute side.
    need_copies = n_methods * biggest * 5 // 4
    probe = data_dir if data_dir.exists() else data_dir.parent
    checks: list[tuple[str, int, int]] = []
    if compute_fs == "tmpfs":
        available = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
        checks.append(("memory (tmpfs)", need_copies, available))
    elif os.stat(probe).st_dev == os.stat(SCRATCH_PARENT).st_dev:
        need_data += need_copies
    else:
        checks.append((str(SCRATCH_PARENT), need_copies, shutil.disk_usage(SCRATCH_PARENT).free))
    checks.append((str(probe), need_data, shutil.disk_usage(probe).free))
    for where, need, free in checks:
        if free < need:
            raise BenchError(f"not enough space in {where}: need about {fmt_bytes(need)}, "
                             f"{fmt_bytes(free)} free")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise BenchError("must run as root (it creates network namespaces)")
    for tool in ("ip", "nsenter", "cp"):
        if shutil.which(tool) is None:
            raise BenchError(f"`{tool}` is not installed")
    sizes = [(label.upper(), parse_size(label)) for label in _split(args.sizes)]
    if not sizes:
        raise BenchError("--sizes is empty")
    scenarios = _split(args.scenarios)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        raise BenchError(f"unknown scenario(s) {','.join(unknown) or '(none)'}; "
                         f"choose from {','.join(SCENARIOS)}")
    scenarios = [s for s in SCENARIOS if s in scenarios]  # stateful order: full first
    if args.repeat < 1:
        raise BenchError("--repeat must be at least 1")
    entries = discover_methods()
    wanted = _split(args.methods)
    if wanted:
        known = {e.name: e for e in entries}
        missing = [name for name in wanted if name not in known]
        if missing:
            raise BenchError(f"unknown method(s) {','.join(missing)}; known: "
                             f"{','.join(known)}")
        entries = [known[name] for name in wanted]
    for entry in entries:
        if entry.method is None:
            if wanted:  # asked for by name: not having it is an error
                raise BenchError(f"method {entry.name}: {entry.unavailable}")
            log(f"method {entry.name}: unavailable: {entry.unavailable}")
    check_space(args.data_dir, sizes, len(entries), args.rebuild, args.compute_fs)
    if args.settle_memory > 0:  # read by harness.settle, in this process and its methods'
        os.environ[SETTLE_MEMORY] = str(args.settle_memory)

    host = HostInfo.collect()
    started = time.monotonic()
    notes: list[str] = []
    with BenchSession("sdeefs-deployrun-") as session:
        tracker = session.tracker
        args.data_dir.mkdir(parents=True, exist_ok=True)
        venv = ensure_venv(args.data_dir, args.rebuild, tracker)
        if venv.fallback:
            log(f"NOTE: {venv.source}")
        datasets = {label: ensure_dataset(label, size, args.data_dir, venv, args.rebuild,
                                          tracker) for label, size in sizes}
        try:
            net = create_net(tracker)
        except MethodUnavailable as exc:
            raise BenchError(f"network namespaces: {exc}") from None
        net = dataclasses.replace(net, login_cpus=args.pin[0], compute_cpus=args.pin[1])
        atexit.register(remove_net, net)  # last resort if the finally below never runs
        set_up: list[MethodEntry] = []
        try:
            log(f"network: {net.login_ns} {net.login_addr} <-> {net.compute_ns} "
                f"{net.compute_addr}")
            n_live = sum(1 for e in entries if e.method is not None)
            compute_root = session.scratch / "compute"
            compute_fs = make_compute_fs(
                args.compute_fs, compute_root,
                n_live * max(d.total_bytes for d in datasets.values()) * 5 // 4 + 2 * GIB,
                tracker)
            log(f"compute side writes into: {compute_fs}")
            damon = damon_pageout()
            if damon:
                notes.append(f"This machine runs DAMON proactive reclaim (pageout of {damon}), "
                             "so page-cache data idle for a while is evicted; the harness "
                             "reads the source tree and the method's compute-side tree once "
                             "before each measurement so every measurement starts warm.")
            run = Run(sizes, scenarios, args.repeat, entries, net, session.scratch,
                      args.data_dir, args.rebuild, tracker, datasets, compute_fs,
                      args.warmup)
            for entry in entries:
                if entry.method is None:
                    continue
                workdir = compute_root / f"method-{entry.name}"
                workdir.mkdir()
                try:
                    entry.method.setup(net, str(workdir))
                    set_up.append(entry)
                except Exception as exc:  # noqa: BLE001 - reported as unavailable
                    entry.unavailable = describe_failure(exc)
                    log(f"method {entry.name}: unavailable: {entry.unavailable}")
                    if wanted:
                        raise BenchError(f"method {entry.name}: {entry.unavailable}") from None
            if not set_up:
                raise BenchError("no deploy method is available")
            for label, _size in sizes:
                run_size(run, label, datasets[label])
            wall = time.monotonic() - started
            write_outputs(run, args.out, host, wall, notes)
        finally:
            with signals_deferred():
                for entry in reversed(set_up):
                    try:
                        if entry.method is not None:
                            entry.method.teardown()
                    except Exception as exc:  # noqa: BLE001 - cleanup goes on
                        log(f"cleanup: {entry.name} teardown: {describe_failure(exc)}")
                for note in remove_net(net):
                    log(f"cleanup: {note}")
                atexit.unregister(remove_net)
    failed = sum(len(cell.errors) for cell in run.cells.values())
    print(args.out.read_text())
    if failed:
        print(f"error: {failed} deploy(s) failed; see the Notes section of {args.out}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_tarpipe"]:
        sys.exit(tarpipe_main(sys.argv[2:]))
    try:
        sys.exit(main())
    except BenchError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt as exc:
        sys.exit(f"error: interrupted ({exc or 'Ctrl-C'})")
