#!/usr/bin/env python3
# apt packages this benchmark needs (install with `apt-get install -y ...`):
#   fio fuse3 fuse-overlayfs git tar findutils coreutils util-linux python3
"""File system benchmark: sdeefs against native ext4, overlayfs and fuse-overlayfs.

Usage (as root)::

    /work/main/.venv/bin/python bench/fio/run.py [--quick] [--out FILE]
        [--contenders native,overlay,...] [--workloads read,untar,...]
        [--reps N] [--runtime SECONDS]

For every workload the contenders are run round-robin, ``--reps`` times, each
run on a freshly mounted view with an empty upper layer; the median of the
repetitions is reported with its ratio to ``native`` (higher is better: for
throughput value/native, for times native/value).

The lower tree is built once per run in a scratch directory under /var/tmp:

* ``fio/read.dat`` and ``fio/mixed.dat`` (256 MiB each) for the fio read and
  mixed modes; write modes create a new file in the view;
* ``usr/lib/python3.11``, ``usr/lib/python3`` and ``usr/include`` copied from
  the host, walked by ``find`` and used (stdlib) by the import storm;
* ``pyimport/`` with numpy pip-installed from PyPI when possible;
* ``repo/``: a git checkout of ~3000 generated files.

Contenders that cannot mount are reported as ``unavailable: <reason>`` and
the run goes on with the others. Everything the run mounts, starts or creates
is removed at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (  # noqa: E402
    BenchSession,
    CommandFailed,
    CommandTimeout,
    Contender,
    HostInfo,
    Metric,
    MountedView,
    MountError,
    NativeContender,
    ProcessTracker,
    ResultTable,
    have_program,
    log,
    one_line,
    render_markdown_table,
    render_text_table,
    require_root,
    run_command,
    standard_contenders,
    timed_command,
)

MIB = 1024 * 1024
CONTENDERS_ENV = "SDEEFS_BENCH_CONTENDERS"
REQUIRED_PROGRAMS = ("fio", "git", "tar", "find", "cp", "mount", "umount")
# A single timed command that takes longer is taken as a hung view: the
# contender is dropped for the rest of the run.
WORKLOAD_TIMEOUT = 300.0


# --------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    reps: int
    fio_runtime: int  # seconds per fio job
    fio_file_mib: int  # size of the lower files read by fio (and of mixed.dat)
    fio_write_file_mib: int  # size of the file the write modes create in the view
    tarball_files: int
    repo_files: int
    quick: bool

    @classmethod
    def for_mode(cls, quick: bool, reps: int | None, runtime: int | None) -> Settings:
        full = cls(
            reps=3,
            fio_runtime=5,
            fio_file_mib=256,
            fio_write_file_mib=256,
            tarball_files=5000,
            repo_files=3000,
            quick=False,
        )
        # Quick mode: shorter fio jobs, fewer repetitions, a smaller tarball (untar
        # through a FUSE daemon dominates the run time otherwise).
        short = replace(
            full, reps=2, fio_runtime=1, fio_write_file_mib=64, tarball_files=2000, quick=True
        )
        base = short if quick else full
        return replace(
            base,
            reps=reps if reps is not None else base.reps,
            fio_runtime=runtime if runtime is not None else base.fio_runtime,
        )


# --------------------------------------------------------------------------
# The lower tree (built once per run)
# --------------------------------------------------------------------------

STDLIB_SOURCE = Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
HOST_TREES = (STDLIB_SOURCE, Path("/usr/lib/python3"), Path("/usr/include"))

# numpy first (when it could be installed), then a broad sweep of the stdlib.
_IMPORT_WORDS = """
    numpy numpy.linalg numpy.fft numpy.random numpy.polynomial numpy.ma
    argparse asyncio base64 bisect bz2 calendar cmd code collections concurrent.futures
    configparser contextlib copy csv ctypes dataclasses datetime dbm decimal difflib dis
    doctest email.mime.multipart email.parser enum fractions ftplib functools getopt gettext
    glob gzip hashlib heapq hmac html.parser http.client http.cookiejar http.server imaplib
    inspect ipaddress json logging.handlers lzma mailbox mimetypes multiprocessing netrc
    numbers optparse pathlib pdb pickle pkgutil platform plistlib poplib pprint pydoc queue
    random shelve shlex shutil smtplib socketserver sqlite3 ssl statistics string subprocess
    tarfile tempfile textwrap threading timeit tomllib traceback typing unittest unittest.mock
    urllib.request uuid wave xml.dom.minidom xml.etree.ElementTree xmlrpc.client zipfile zoneinfo
"""
IMPORT_CANDIDATES = tuple(_IMPORT_WORDS.split())

# Prints the candidates that import and come from below one of the given roots.
IMPORT_PROBE = """
import importlib, json, sys
roots, names = sys.argv[1:-1], json.loads(sys.argv[-1])
good = []
for name in names:
    try:
        module = importlib.import_module(name)
    except Exception:
        continue
    origin = getattr(module, "__file__", None) or ""
    if any(origin.startswith(root) for root in roots):
        good.append(name)
print(json.dumps(good))
"""


@dataclass
class LowerTree:
    root: Path
    tarball: Path
    read_file: str = "fio/read.dat"
    mixed_file: str = "fio/mixed.dat"
    find_dir: str = "usr"
    repo_dir: str = "repo"
    import_dirs: tuple[str, ...] = ()
    import_modules: tuple[str, ...] = ()
    numpy_version: str | None = None
    find_entries: int = 0
    tarball_files: int = 0
    repo_files: int = 0
    notes: list[str] = field(default_factory=list)

    def python_path(self, view: Path) -> str:
        return os.pathsep.join(str(view / rel) for rel in self.import_dirs)


def _write_filler(path: Path, mib: int) -> None:
    """A file of incompressible bytes (one random MiB repeated)."""
    block = random.Random(path.name).randbytes(MIB)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for _ in range(mib):
            handle.write(block)


_TEXT_WORDS = "alpha beta gamma delta kernel overlay fuse journal inode dentry upper lower"


def _generated_text(rng: random.Random, size: int) -> bytes:
    """Deterministic text of ``size`` bytes (source-file-like, compressible)."""
    words = _TEXT_WORDS.split()
    out: list[str] = []
    total = 0
    while total < size:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "\n"
        out.append(line)
        total += len(line)
    return "".join(out).encode()[:size]


def build_tarball(path: Path, file_count: int) -> None:
    """Many small files in 50-file directories, deterministic content."""
    rng = random.Random(1234)
    with tarfile.open(path, "w") as archive:
        for index in range(file_count):
            data = _generated_text(rng, rng.randint(200, 4000))
            info = tarfile.TarInfo(f"src/pkg{index // 50:03d}/module_{index:05d}.txt")
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))


def build_git_repo(repo: Path, file_count: int, tracker: ProcessTracker) -> None:
    rng = random.Random(4321)
    old = time.time() - 3600  # well before the index is written: no "racily clean" entries
    for index in range(file_count):
        path = repo / f"dir{index // 100:02d}" / f"sub{index % 5}" / f"file_{index:05d}.c"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_generated_text(rng, rng.randint(300, 6000)))
        os.utime(path, (old, old))
    git = ["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["commit", "-q", "-m", "generated tree"],
        ["status", "--porcelain"],
    ):
        result = run_command([*git, *args], tracker, timeout=300)
        if not result.ok:
            raise RuntimeError(f"git {args[0]} failed: {result.failure_reason()}")


def install_numpy(target: Path, tracker: ProcessTracker) -> str | None:
    """pip-install numpy into ``target``; its version, or None if PyPI is unusable."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    argv = [*pip, "--no-input", "--timeout", "20", "--retries", "1", "--target", str(target)]
    argv.append("numpy")
    try:
        result = run_command(argv, tracker, timeout=300)
    except CommandTimeout:
        return None
    if not result.ok:
        log(f"  numpy unavailable ({one_line(result.stderr)}); import storm uses the stdlib only")
        return None
    versions = sorted(target.glob("numpy-*.dist-info"))
    return versions[0].name.removeprefix("numpy-").removesuffix(".dist-info") if versions else "?"


def prepare_lower(
    scratch: Path, settings: Settings, tracker: ProcessTracker, use_numpy: bool
) -> LowerTree:
    root = scratch / "lower"
    data = scratch / "data"
    root.mkdir()
    data.mkdir()
    lower = LowerTree(root=root, tarball=data / "smallfiles.tar")

    log(f"  fio files: 2 x {settings.fio_file_mib} MiB")
    _write_filler(root / lower.read_file, settings.fio_file_mib)
    _write_filler(root / lower.mixed_file, settings.fio_file_mib)

    log("  copying host trees: " + ", ".join(str(tree) for tree in HOST_TREES))
    for tree in HOST_TREES:
        if not tree.is_dir():
            lower.notes.append(f"{tree} missing on the host; not in the find tree")
            continue
        destination = root / tree.relative_to("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        result = run_command(["cp", "-a", str(tree), str(destination)], tracker, timeout=600)
        if not result.ok:
            raise RuntimeError(f"copying {tree} failed: {result.failure_reason()}")
    stdlib_copy = root / STDLIB_SOURCE.relative_to("/")
    # Byte-code next to every source (mtimes preserved by cp -a) so imports only read.
    run_command(
        [sys.executable, "-m", "compileall", "-q", "-j0", str(stdlib_copy)], tracker, timeout=600
    )
    lower.find_entries = (
        sum(1 + len(dirs) + len(files) for _, dirs, files in os.walk(root / lower.find_dir)) - 1
    )

    import_dirs = [
        str(STDLIB_SOURCE.relative_to("/")),
        str((STDLIB_SOURCE / "lib-dynload").relative_to("/")),
    ]
    if use_numpy:
        log("  pip install numpy into the lower tree")
        lower.numpy_version = install_numpy(root / "pyimport", tracker)
        if lower.numpy_version is not None:
            import_dirs.insert(0, "pyimport")
    lower.import_dirs = tuple(import_dirs)
    lower.import_modules = tuple(probe_import_modules(lower, tracker))
    if not lower.import_modules:
        raise RuntimeError("no module of the import storm imports from the lower tree")

    log(f"  git repository with {settings.repo_files} files")
    build_git_repo(root / lower.repo_dir, settings.repo_files, tracker)
    lower.repo_files = settings.repo_files

    log(f"  tarball with {settings.tarball_files} small files")
    build_tarball(lower.tarball, settings.tarball_files)
    lower.tarball_files = settings.tarball_files
    return lower


def probe_import_modules(lower: LowerTree, tracker: ProcessTracker) -> list[str]:
    roots = [str(lower.root / rel) for rel in lower.import_dirs]
    env = import_env(lower, lower.root)
    argv = [sys.executable, "-s", "-c", IMPORT_PROBE, *roots, json.dumps(IMPORT_CANDIDATES)]
    result = run_command(argv, tracker, timeout=300, env=env, cwd="/")
    if not result.ok:
        raise RuntimeError(f"import probe failed: {result.failure_reason()}")
    modules: list[str] = json.loads(result.stdout.strip().splitlines()[-1])
    return modules


def import_env(lower: LowerTree, view: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHONPATH": lower.python_path(view),
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def settle_git_index(repo: Path, tracker: ProcessTracker) -> None:
    """Refresh the index of a copied checkout so later `git status` runs are steady."""
    run_command(["git", "-C", str(repo), "status", "--porcelain"], tracker, timeout=300)


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunContext:
    lower: LowerTree
    settings: Settings
    tracker: ProcessTracker
    tag: str  # unique per run; names new files so native runs never collide


@dataclass(frozen=True)
class Workload:
    name: str
    metrics: tuple[Metric, ...]
    run: Callable[[Path, RunContext], dict[str, float]]


class WorkloadError(RuntimeError):
    pass


FIO_MODES = ("read", "write", "rw", "randread", "randwrite", "randrw")


def fio_workload(mode: str) -> Workload:
    random_access = mode.startswith("rand")
    block = "4k" if random_access else "1M"
    reads_only = mode in ("read", "randread")
    mixed = mode in ("rw", "randrw")
    metric = Metric(f"fio-{mode}", f"fio {mode} ({block})", "MiB/s", higher_is_better=True)

    def run(view: Path, ctx: RunContext) -> dict[str, float]:
        argv = [
            "fio",
            "--output-format=json",
            f"--name={mode}",
            f"--rw={mode}",
            f"--bs={block}",
            "--ioengine=psync",
            "--iodepth=1",
            "--numjobs=1",
            "--time_based=1",
            f"--runtime={ctx.settings.fio_runtime}",
            "--invalidate=0",
        ]
        if reads_only:
            argv += [
                f"--filename={view / ctx.lower.read_file}",
                f"--size={ctx.settings.fio_file_mib}M",
                "--readonly",
            ]
        elif mixed:  # the lower file is opened read-write: the view copies it up
            argv += [
                f"--filename={view / ctx.lower.mixed_file}",
                f"--size={ctx.settings.fio_file_mib}M",
                "--rwmixread=50",
                "--end_fsync=1",
            ]
        else:  # a new file in the view
            argv += [
                f"--filename={view / f'fio-{ctx.tag}.dat'}",
                f"--size={ctx.settings.fio_write_file_mib}M",
                "--end_fsync=1",
            ]
        result = run_command(
            argv, ctx.tracker, timeout=ctx.settings.fio_runtime + WORKLOAD_TIMEOUT, cwd="/"
        )
        if not result.ok:
            raise WorkloadError(f"fio: {result.failure_reason()}")
        job = parse_fio_json(result.stdout)
        if job.get("error"):
            raise WorkloadError(f"fio job error {job['error']}: {one_line(result.stderr)}")
        bandwidth = sum(job[direction]["bw_bytes"] for direction in ("read", "write")) / MIB
        if bandwidth <= 0:
            raise WorkloadError("fio moved no data")
        return {metric.key: bandwidth}

    return Workload(mode, (metric,), run)


def parse_fio_json(stdout: str) -> dict[str, Any]:
    """The first job of fio's JSON report (fio may print notes before the JSON)."""
    start = stdout.find("{")
    if start < 0:
        raise WorkloadError(f"fio printed no JSON: {one_line(stdout)}")
    try:
        report = json.loads(stdout[start:])
        job: dict[str, Any] = report["jobs"][0]
    except (ValueError, KeyError, IndexError) as exc:
        raise WorkloadError(f"unreadable fio JSON: {exc}") from None
    return job


def untar_workload(lower_files: int) -> Workload:
    metric = Metric("untar", f"untar {lower_files} small files", "s", higher_is_better=False)

    def run(view: Path, ctx: RunContext) -> dict[str, float]:
        # tar creates the target directory itself (nothing here touches the view).
        argv = ["tar", "-xf", str(ctx.lower.tarball), "-C", str(view)]
        argv.append(f"--one-top-level=untar-{ctx.tag}")
        seconds = timed_command(argv, ctx.tracker, timeout=WORKLOAD_TIMEOUT, cwd="/")
        return {metric.key: seconds}

    return Workload("untar", (metric,), run)


def find_workload(entries: int) -> Workload:
    cold = Metric("find-cold", f"find {entries} entries, 1st pass", "s", higher_is_better=False)
    warm = Metric("find-warm", f"find {entries} entries, 2nd pass", "s", higher_is_better=False)

    def run(view: Path, ctx: RunContext) -> dict[str, float]:
        # -printf %s needs a stat of every entry, not only readdir.
        argv = ["find", str(view / ctx.lower.find_dir), "-printf", "%s %p\n"]
        first = timed_command(argv, ctx.tracker, timeout=WORKLOAD_TIMEOUT, cwd="/")
        second = timed_command(argv, ctx.tracker, timeout=WORKLOAD_TIMEOUT, cwd="/")
        return {cold.key: first, warm.key: second}

    return Workload("find", (cold, warm), run)


def import_workload(lower: LowerTree) -> Workload:
    what = f"numpy {lower.numpy_version} + stdlib" if lower.numpy_version else "stdlib"
    metric = Metric(
        "import",
        f"import storm ({len(lower.import_modules)} modules, {what})",
        "s",
        higher_is_better=False,
    )

    def run(view: Path, ctx: RunContext) -> dict[str, float]:
        argv = [sys.executable, "-s", "-c", "import " + ", ".join(ctx.lower.import_modules)]
        seconds = timed_command(
            argv, ctx.tracker, timeout=WORKLOAD_TIMEOUT, env=import_env(ctx.lower, view), cwd="/"
        )
        return {metric.key: seconds}

    return Workload("import", (metric,), run)


def git_workload(files: int) -> Workload:
    first = Metric("git-1", f"git status ({files} files), 1st", "s", higher_is_better=False)
    second = Metric("git-2", f"git status ({files} files), 2nd", "s", higher_is_better=False)

    def run(view: Path, ctx: RunContext) -> dict[str, float]:
        argv = [
            "git",
            "-c",
            "safe.directory=*",
            "-C",
            str(view / ctx.lower.repo_dir),
            "status",
            "--porcelain",
        ]
        return {
            first.key: timed_command(argv, ctx.tracker, timeout=WORKLOAD_TIMEOUT, cwd="/"),
            second.key: timed_command(argv, ctx.tracker, timeout=WORKLOAD_TIMEOUT, cwd="/"),
        }

    return Workload("git", (first, second), run)


WORKLOAD_NAMES = (*FIO_MODES, "untar", "find", "import", "git")


def build_workloads(names: Sequence[str], lower: LowerTree) -> list[Workload]:
    def make(name: str) -> Workload:
        if name in FIO_MODES:
            return fio_workload(name)
        if name == "untar":
            return untar_workload(lower.tarball_files)
        if name == "find":
            return find_workload(lower.find_entries)
        if name == "import":
            return import_workload(lower)
        if name == "git":
            return git_workload(lower.repo_files)
        raise ValueError(f"unknown workload {name}")

    return [make(name) for name in names]


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


# Run in a child process with a timeout: touching a view whose daemon hangs
# would otherwise block the harness itself in an uninterruptible wait.
VIEW_PROBE = """
import os, sys
view, lower, rel, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if os.stat(os.path.join(view, rel)).st_size != size:
    sys.exit("view shows the wrong size for a lower file")
probe = os.path.join(view, "probe-write.txt")
with open(probe, "w") as handle:
    handle.write("sdeefs bench probe\\n")
with open(probe) as handle:
    if handle.read() != "sdeefs bench probe\\n":
        sys.exit("a file written to the view reads back wrong")
if view != lower and os.path.exists(os.path.join(lower, "probe-write.txt")):
    sys.exit("a write to the view reached the lower tree")
os.unlink(probe)
"""


def flush_scratch(session: BenchSession) -> None:
    run_command(["sync", "--file-system", str(session.scratch)], session.tracker, timeout=600)


def probe_contender(session: BenchSession, contender: Contender, lower: LowerTree) -> str | None:
    """Mount once and check the view works; a one-line reason if it does not."""
    assert session.mounts is not None
    try:
        mounted = session.mounts.mount(contender, lower.root, f"probe-{contender.name}")
    except MountError as exc:
        return one_line(str(exc)) or "mount failed"
    try:
        size = (lower.root / lower.read_file).stat().st_size
        argv = [sys.executable, "-c", VIEW_PROBE, str(mounted.view), str(lower.root)]
        result = run_command(
            [*argv, lower.read_file, str(size)], session.tracker, timeout=60, cwd="/"
        )
        if not result.ok:
            return f"view not usable: {one_line(result.stderr) or result.failure_reason()}"
    except CommandTimeout:
        return "view not usable: a stat/write/read probe hung for 60 s"
    finally:
        session.mounts.release(mounted)
    return None


def run_benchmark(
    session: BenchSession,
    contenders: Sequence[Contender],
    workloads: Sequence[Workload],
    lower: LowerTree,
    settings: Settings,
    table: ResultTable,
) -> None:
    assert session.mounts is not None
    for workload in workloads:
        failed: set[str] = set()
        for rep in range(settings.reps):
            # Rotate the starting contender each repetition so no one always goes first.
            order = [
                contenders[(rep + offset) % len(contenders)] for offset in range(len(contenders))
            ]
            for contender in order:
                if contender.name in table.unavailable or contender.name in failed:
                    continue
                tag = f"{workload.name}-{contender.name}-{rep}"
                # Flush what earlier runs left dirty so its writeback is not charged
                # to this run (only the scratch file system: never a FUSE mount).
                flush_scratch(session)
                try:
                    mounted: MountedView = session.mounts.mount(contender, lower.root, tag)
                except MountError as exc:
                    reason = one_line(str(exc)) or "mount failed"
                    log(f"[{workload.name}] {contender.name}: unavailable: {reason}")
                    table.mark_unavailable(contender.name, reason)
                    continue
                try:
                    context = RunContext(lower, settings, session.tracker, tag)
                    values = workload.run(mounted.view, context)
                except (WorkloadError, CommandFailed, CommandTimeout, OSError) as exc:
                    reason = one_line(str(exc)) or type(exc).__name__
                    log(f"[{workload.name}] rep {rep + 1} {contender.name}: failed: {reason}")
                    for metric in workload.metrics:
                        table.add_error(metric.key, contender.name, reason)
                    failed.add(contender.name)
                    if isinstance(exc, CommandTimeout):
                        table.mark_unavailable(contender.name, f"hung in {workload.name}: {reason}")
                    continue
                finally:
                    session.mounts.release(mounted)
                shown = ", ".join(
                    f"{metric.key}={metric.format_value(values[metric.key])}"
                    for metric in workload.metrics
                )
                log(f"[{workload.name}] rep {rep + 1}/{settings.reps} {contender.name}: {shown}")
                for metric in workload.metrics:
                    table.add_sample(metric.key, contender.name, values[metric.key])


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def report_lines(
    host: HostInfo,
    settings: Settings,
    lower: LowerTree | None,
    contenders: Sequence[Contender],
    table: ResultTable,
    elapsed: float,
    markdown: bool,
) -> list[str]:
    header, rows = table.rows()
    lines = ["# sdeefs file system benchmark (fio + metadata)", ""] if markdown else []
    bullet = "- " if markdown else ""
    code = "`" if markdown else ""
    fio_note = (
        f"ioengine=psync, iodepth 1, {settings.fio_runtime} s per job, warm page cache"
        " (invalidate=0), bs 1M sequential / 4k random. read/randread read a"
        f" {settings.fio_file_mib} MiB lower file through the view; rw/randrw open a"
        f" {settings.fio_file_mib} MiB lower file read-write (the view copies it up; for kernel"
        " overlayfs that happens before fio's clock starts); write/randwrite create a"
        f" {settings.fio_write_file_mib} MiB file in the view. Writing jobs end with an fsync."
    )
    quick = " (quick mode)" if settings.quick else ""
    lines += [
        f"{bullet}Command: {code}{host.command}{code}",
        f"{bullet}Date: {host.date}; wall time {elapsed / 60:.1f} min",
        f"{bullet}Kernel: {host.kernel}; {host.cpus} CPUs; Python {host.python}",
        f"{bullet}Repetitions: {settings.reps} per workload and contender{quick}, interleaved"
        " round-robin, median reported; every run mounts a fresh view with an empty upper layer",
        f"{bullet}Ratio: to native, higher is better (throughput: value/native;"
        " time: native/value)",
        f"{bullet}fio: {fio_note}",
    ]
    if lower is not None:
        numpy = f"numpy {lower.numpy_version} pip-installed, " if lower.numpy_version else ""
        lines.append(
            f"{bullet}Lower tree: find walks usr/ ({lower.find_entries} entries copied from "
            + ", ".join(str(tree) for tree in HOST_TREES)
            + f"); the import storm imports {len(lower.import_modules)} modules ({numpy}stdlib"
            " copied into the lower) with PYTHONPATH in the view, byte-code precompiled,"
            " PYTHONDONTWRITEBYTECODE=1"
        )
    lines.append(
        f"{bullet}Contenders: " + "; ".join(f"{c.name} = {c.describe()}" for c in contenders)
    )
    lines.append("")
    lines.append(
        render_markdown_table(header, rows) if markdown else render_text_table(header, rows)
    )
    notes = table.footnotes() + (lower.notes if lower is not None else [])
    if notes:
        lines += ["", "**Notes**", ""] if markdown else ["", "Notes:"]
        lines += [f"- {note}" for note in notes]
    return lines


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    base_tree = _option_value(argv, "--base-tree")
    known = standard_contenders(base_tree=Path(base_tree) if base_tree else None)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="short fio runs and fewer repetitions (~3 min)"
    )
    parser.add_argument("--out", type=Path, help="also write the report as Markdown to this file")
    parser.add_argument(
        "--contenders",
        default=os.environ.get(CONTENDERS_ENV, ",".join(known)),
        help=f"comma-separated subset of {','.join(known)} (default: all, or ${CONTENDERS_ENV})",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOAD_NAMES),
        help=f"comma-separated subset of {','.join(WORKLOAD_NAMES)}",
    )
    parser.add_argument(
        "--reps", type=int, help="repetitions per workload and contender (default 3, quick 2)"
    )
    parser.add_argument("--runtime", type=int, help="seconds per fio job (default 5, quick 1)")
    parser.add_argument(
        "--no-numpy", action="store_true", help="import storm from the stdlib only (no pip)"
    )
    parser.add_argument("--sdeefs-python", type=Path, help="interpreter that runs `-m sdeefs`")
    parser.add_argument(
        "--base-tree",
        type=Path,
        help="add contender sdeefs-fuse-base: the fuse engine of the sdeefs tree here "
        "(e.g. `git worktree add --detach DIR main`), run with the same interpreter",
    )
    parser.add_argument("--svg", type=Path, help="also draw the medians relative to native")
    parser.add_argument("--json", type=Path, help="also write every sample as JSON")
    args = parser.parse_args(argv)

    args.contender_names = [name.strip() for name in args.contenders.split(",") if name.strip()]
    unknown = [name for name in args.contender_names if name not in known]
    if unknown or not args.contender_names:
        parser.error(f"unknown contender(s) {','.join(unknown)}; known: {','.join(known)}")
    args.workload_names = [name.strip() for name in args.workloads.split(",") if name.strip()]
    bad = [name for name in args.workload_names if name not in WORKLOAD_NAMES]
    if bad or not args.workload_names:
        parser.error(f"unknown workload(s) {','.join(bad)}; known: {','.join(WORKLOAD_NAMES)}")
    if args.reps is not None and args.reps < 1:
        parser.error("--reps must be at least 1")
    if args.runtime is not None and args.runtime < 1:
        parser.error("--runtime must be at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_root()
    missing = [program for program in REQUIRED_PROGRAMS if not have_program(program)]
    if missing:
        raise SystemExit(
            f"missing programs: {', '.join(missing)} (see the apt list at the top of {__file__})"
        )
    settings = Settings.for_mode(args.quick, args.reps, args.runtime)
    host = HostInfo.collect()
    every_contender = standard_contenders(args.sdeefs_python, args.base_tree)
    contenders = [every_contender[name] for name in args.contender_names]
    started = time.monotonic()
    lower: LowerTree | None = None
    table: ResultTable | None = None

    try:
        with BenchSession("sdeefs-bench-fio-") as session:
            log(f"scratch directory {session.scratch}")
            log("preparing the lower tree")
            lower = prepare_lower(
                session.scratch, settings, session.tracker, use_numpy=not args.no_numpy
            )
            flush_scratch(session)
            workloads = build_workloads(args.workload_names, lower)
            table = ResultTable(
                [m for w in workloads for m in w.metrics], [c.name for c in contenders]
            )

            for contender in contenders:
                if contender.name == "fuse-overlayfs" and not have_program("fuse-overlayfs"):
                    table.mark_unavailable(contender.name, "fuse-overlayfs is not installed")
                    continue
                try:
                    contender.prepare(lower.root, session.scratch, session.tracker)
                except MountError as exc:
                    table.mark_unavailable(contender.name, one_line(str(exc)))
                    continue
                if isinstance(contender, NativeContender) and contender.root is not None:
                    settle_git_index(contender.root / lower.repo_dir, session.tracker)
                reason = probe_contender(session, contender, lower)
                if reason is not None:
                    log(f"{contender.name}: unavailable: {reason}")
                    table.mark_unavailable(contender.name, reason)
                else:
                    log(f"{contender.name}: mounts fine")
            flush_scratch(session)

            run_benchmark(session, contenders, workloads, lower, settings, table)
            if session.mounts is not None and session.mounts.notes:
                lower.notes += list(dict.fromkeys(session.mounts.notes))
    except KeyboardInterrupt as exc:
        reason = str(exc) or "Ctrl-C"
        log(f"interrupted ({reason}); mounts, processes and scratch files were cleaned up")
        return 130
    except RuntimeError as exc:
        log(f"benchmark aborted: {exc}; mounts, processes and scratch files were cleaned up")
        return 1

    assert table is not None
    elapsed = time.monotonic() - started
    print(
        "\n".join(report_lines(host, settings, lower, contenders, table, elapsed, markdown=False))
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        markdown = report_lines(host, settings, lower, contenders, table, elapsed, markdown=True)
        args.out.write_text("\n".join(markdown) + "\n")
        log(f"wrote {args.out}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"metrics": {m.key: [m.label, m.unit, m.higher_is_better] for m in table.metrics},
             "samples": [[key, name, values] for (key, name), values in table.samples.items()]},
            indent=1) + "\n")
        log(f"wrote {args.json}")
    if args.svg is not None:
        write_chart(args.svg, table, settings)
        log(f"wrote {args.svg}")
    return 0


def _option_value(argv: Sequence[str], option: str) -> str | None:
    """An option's value before argparse runs (it decides which contenders exist)."""
    for index, arg in enumerate(argv):
        if arg == option and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def write_chart(path: Path, table: ResultTable, settings: Settings) -> None:
    """Medians relative to native as bars (bench/install/plot.py), min..max in each label."""
    from bench.install import plot  # noqa: PLC0415 - only for --svg

    groups = []
    for metric in table.metrics:
        bars = []
        for name in table.contenders:
            ratio = table.ratio(metric, name)
            values = table.samples.get((metric.key, name), [])
            label = (f"{metric.format_value(statistics.median(values))} "
                     f"({metric.format_value(min(values))}..{metric.format_value(max(values))})"
                     if values else "")
            bars.append(plot.Bar(name, ratio or 0.0, 0.0, label))
        groups.append(plot.Group(metric.label, bars))
    colors = {name: plot.PALETTE[i % len(plot.PALETTE)] for i, name in enumerate(table.contenders)}
    plot.write_svg(path, plot.BarChart(
        title="bench/fio: " + ", ".join(m.label for m in table.metrics),
        subtitle=f"relative to native, median of {settings.reps}, min..max in brackets",
        axis_label="contender / native (throughput), native / contender (time): longer is faster",
        groups=groups, colors=colors, goals=(plot.GoalLine(0.8, "0.8x native"),)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
