"""A cold stream's CPU, end by end: the login node's and the replica's daemon over loopback.

Usage (as root)::

    .venv/bin/python bench/deploy/coldcpu.py [--size 1G] [--runs 2]
        [--engine passthrough|kernel] [--baseline TREE] [--perf DIR] [--profile DIR]
        [--pyspy DIR] [--syscalls DIR] [--compute-fs ext4|tmpfs] [--settle S]
        [--work DIR] [--port N]

The journal is made once per data set and engine (``bench/deploy``'s data set, under
``/var/tmp/sdeefs-deploy-data``): ``rsync -a --inplace`` of it into a journaling
passthrough mount, as ``bench/deploy``'s ``sdeefs-cold`` does (``--engine
passthrough``, the default: Mknod/Write/Setattr records), or into the default engine's
login view (``--engine kernel``: kernel overlayfs on the user's layer image with the
capture running, ``bench/deploy/kernelview.py``; Create and Extent records, data read
from the layer at send time), up to the capture's barrier; kept in
``/var/tmp/sdeefs-coldcpu/SIZE`` (``SIZE-kernel``).  The journal's record histogram is
printed first.  Each run then starts ``sdeefs-replicad --origin`` on it
and ``sdeefs-replicad --replica-dir`` (a fresh, empty replica on a journaled ext4 image,
``compute_fs``) over 127.0.0.1 and times the
prolog's ``follow --wait``; reported per daemon: CPU seconds (user + system, every
thread, from ``/proc/PID/stat``) and the wall time.  CPU is what the load of other
processes on the machine changes least, so this compares two releases better than the
wall time of ``bench/deploy`` on a shared machine.

``--baseline TREE`` alternates the runs with the daemons of another release (a ``git
archive`` of it, imported with ``PYTHONPATH``), the same journal each.  ``--perf DIR``
records ``perf record -g`` of both daemons during each run (``perf report`` per daemon:
where the CPU goes, in C and in the kernel); ``--profile DIR`` runs the daemons under
cProfile, every thread (``bench/deploy/profiled.py``); ``--pyspy DIR`` records both
daemons with ``py-spy record --native`` (``$PYSPY``, default ``py-spy`` on the path; raw
collapsed stacks per daemon, sorted by ``bench/deploy/coldcpu_split.py``;
``$PYSPY_ARGS`` instead of ``--native``: e.g. ``--gil``, only what holds the GIL);
``--syscalls DIR``: ``perf trace -s`` of each daemon (its syscalls counted per thread,
from the kernel's tracepoints: no ptrace).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.deploy.kernelview import KernelView, histogram  # noqa: E402
from sdeefs.fs import image  # noqa: E402
from sdeefs.replication.daemon import control_request  # noqa: E402
from sdeefs.statedir import UserDirs  # noqa: E402

VENV_BIN = Path(sys.executable).parent
DATA = Path("/var/tmp/sdeefs-deploy-data")
WORK = Path("/var/tmp/sdeefs-coldcpu")
USER = "benchuser"
TICK = os.sysconf("SC_CLK_TCK")


def busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (every core; kernel threads
    included: the compute disk's writeback, the loop device's worker)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / TICK


VMSTAT = ("nr_written", "compact_stall", "allocstall_movable", "pgscan_direct",
          "pgscan_kswapd")  # counted over a run (``vmstat``)


def vmstat() -> dict[str, int]:
    """The VMSTAT counters of /proc/vmstat: pages written back (every device), direct
    compactions, direct reclaims and the pages they scanned, kswapd's scans."""
    out = dict.fromkeys(VMSTAT, 0)
    with open("/proc/vmstat") as f:
        for line in f:
            key, value = line.split()
            if key in out:
                out[key] = int(value)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def build(size: str, engine: str, baseline: str = "") -> Path:
    """The journal of ``size`` for ``engine``; ``baseline``: made by that release (a
    kernel-engine journal holds what its capture writes, which another release may not
    read: each release streams the journal its own capture made of the same data)."""
    if engine == "kernel" and baseline:
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        f"sys.path.insert(0, {baseline!r}); "
                        "import bench.deploy.coldcpu as c; "
                        f"c.WORK = Path({str(WORK / 'base')!r}); c.build_kernel({size!r})"],
                       check=True, cwd="/", env={**os.environ, "PYTHONPATH": baseline})
        return WORK / "base" / f"{size}-kernel" / "login"
    if engine == "kernel":
        return build_kernel(size)
    root = WORK / size / "login"
    done = WORK / size / "built"
    if done.exists():
        return root
    shutil.rmtree(WORK / size, ignore_errors=True)
    upper, state, mnt = root / USER / "upper", root / USER / "state", WORK / size / "mnt"
    for path in (upper, state / "work", mnt):
        path.mkdir(parents=True)
    subprocess.run([VENV_BIN / "sdeefs", "mount", "--passthrough-upper", "--upper", upper,
                    "--state", state, "--no-writeback-cache", mnt], check=True)
    try:
        subprocess.run(["rsync", "-a", "--inplace", "--no-whole-file",
                        f"{DATA / size / 'tree'}/", f"{mnt}/upper/"], check=True)
    finally:
        subprocess.run([VENV_BIN / "sdeefs", "umount", mnt], check=True)
    done.touch()
    return root


def build_kernel(size: str) -> Path:
    """The journal of the default engine: the data set copied into a kernel-engine login
    view with its capture running, up to the capture's barrier; the capture is then
    stopped cleanly and the layer left mounted (the origin reads the data from it)."""
    base = WORK / f"{size}-kernel"
    root, done = base / "login", base / "built"
    view = KernelView(root, USER, base / "mnt")
    if done.exists():
        return root
    view.remove()
    shutil.rmtree(base, ignore_errors=True)
    view.open()
    try:
        subprocess.run(["rsync", "-a", "--inplace", "--no-whole-file",
                        f"{DATA / size / 'tree'}/", f"{view.mnt}/"], check=True)
        view.barrier()
    finally:
        view.close()
    done.touch()
    return root


def compute_fs(kind: str = "ext4") -> Path:
    """The replica's disk: a journaled ext4 in a loop-mounted image, as ``bench/deploy``
    makes it (the root file system here has no journal, and without one ext4 scans past
    every inode freed in the last minutes on each create: that measured the ``rm`` of the
    previous run's copy, 40% of the replica's CPU); ``tmpfs``: a tmpfs (no writeback)."""
    mount = WORK / "compute"
    if os.path.ismount(mount):
        return mount
    mount.mkdir(parents=True, exist_ok=True)
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8g,mode=0755", "tmpfs",
                        str(mount)], check=True)
        return mount
    image = WORK / "compute.img"
    with open(image, "wb") as handle:
        handle.truncate(8 << 30)  # sparse: one copy of the 2G set at a time
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    return mount


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """In /: ``python -c`` puts the working directory first on the path, and a baseline
    (PYTHONPATH) must win over this tree."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=out, start_new_session=True,
                                cwd="/")


def wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"coldcpu: a daemon did not start (see {path.parent}/*.log)")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def live_upper(root: Path) -> str:
    """The upper the journal describes (the layer image's, mounted, for the kernel engine)."""
    dirs = UserDirs.of(str(root), USER)
    if os.path.exists(dirs.image):
        image.mount_image(dirs.image, dirs.layer)
    return dirs.live()[0]


def one_run(root: Path, label: str, baseline: str, port: int, perf: Path | None,
            profile: Path | None, run: int, engine: str,
            pyspy: Path | None = None, syscalls: Path | None = None,
            settle: float = 0.0) -> dict[str, object]:
    work = WORK / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    replicas = WORK / "compute" / "replicas"
    shutil.rmtree(replicas, ignore_errors=True)
    if settle:
        # the last run's copy was just freed: its memory serves this run's page cache
        # unless it has been free long enough for the virtio balloon to report it to the
        # host, which then faults it in again at the first write (bench/RESULTS.md,
        # branch applyext4): ``bench/deploy/run.py``'s sdeefs deploys meet that memory
        subprocess.run(["sync"], check=True)
        time.sleep(settle)
    key = work / "key"
    key.write_text(os.urandom(32).hex())
    os.chmod(key, 0o600)
    env = {**os.environ, "PYTHONPATH": baseline} if baseline else dict(os.environ)
    procs = {}
    for side in ("login", "compute"):
        control = work / f"{side}.sock"
        argv = [str(VENV_BIN / "python")]
        if profile is not None:
            argv += [str(Path(__file__).with_name("profiled.py")),
                     str(profile / f"{label}-{engine}-{side}-{run}.prof")]
        else:
            argv += ["-c", "import sys; from sdeefs.replication.daemon import main; "
                     "sys.exit(main())"]
        argv += ["--key-file", str(key), "--node", side, "--control", str(control)]
        if side == "login":
            argv += ["--origin", str(root), "--listen", f"127.0.0.1:{port}"]
        else:
            argv += ["--replica-dir", str(replicas), "--upstream",
                     f"127.0.0.1:{port}"]
        procs[side] = spawn(argv, env, work / f"{side}.log")
        wait_socket(control, procs[side])
    recorder = None
    spies: list[subprocess.Popen[bytes]] = []
    try:
        cpu0 = {side: cpu_seconds(p.pid) for side, p in procs.items()}
        if pyspy is not None:
            for side, proc in procs.items():
                spies.append(subprocess.Popen(
                    [os.environ.get("PYSPY", "py-spy"), "record", "--threads", "-r", "200",
                     *os.environ.get("PYSPY_ARGS", "--native").split(), "--format", "raw",
                     "-p", str(proc.pid), "-o",
                     str(pyspy / f"{label}-{engine}-{side}-{run}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        if syscalls is not None:
            for side, proc in procs.items():
                spies.append(subprocess.Popen(
                    ["perf", "trace", "-s", "-p", str(proc.pid), "-o",
                     str(syscalls / f"{label}-{engine}-{side}-{run}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        if perf is not None:
            recorder = subprocess.Popen(
                ["perf", "record", "-q", "-g", "-F", "499", "-o",
                 str(perf / f"{label}-{engine}-{run}.data"), "-p",
                 f"{procs['login'].pid},{procs['compute'].pid}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        subprocess.run(["sync"], check=True)
        busy0, vm0 = busy_seconds(), vmstat()
        start = time.perf_counter()
        reply = control_request(str(work / "compute.sock"),
                                {"op": "follow", "user": USER, "wait": True, "timeout": 900})
        wall = time.perf_counter() - start
        cpu = {side: cpu_seconds(p.pid) - cpu0[side] for side, p in procs.items()}
        busy, vm = busy_seconds() - busy0, {k: v - vm0[k] for k, v in vmstat().items()}
    finally:
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)
            recorder.wait()
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        for proc in procs.values():
            stop(proc)
    check = subprocess.run(["diff", "-rq", "--no-dereference", live_upper(root),
                            str(replicas / USER / "upper")], capture_output=True,
                           text=True)
    return {"release": label, "engine": engine, "wall": round(wall, 2),
            "origin_cpu": round(cpu["login"], 2),
            "replica_cpu": round(cpu["compute"], 2), "busy": round(busy, 2),
            "written_mib": vm.pop("nr_written") * 4096 >> 20, **vm, "barrier": reply.get("barrier"),
            "identical": check.returncode == 0 and not check.stdout,
            "load": os.getloadavg()[0]}


def main() -> int:
    global WORK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--baseline", default="")
    parser.add_argument("--perf", type=Path)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--pyspy", type=Path)
    parser.add_argument("--syscalls", type=Path)
    parser.add_argument("--port", type=int, default=7391)
    parser.add_argument("--engine", choices=("passthrough", "kernel"), default="passthrough")
    parser.add_argument("--compute-fs", choices=("ext4", "tmpfs"), default="ext4",
                        help="the replica's file system (default: ext4 on a loop image)")
    parser.add_argument("--settle", type=float, default=0.0,
                        help="seconds to wait after deleting the last run's copy (memory "
                        "free that long: see one_run)")
    parser.add_argument("--work", type=Path, default=WORK,
                        help=f"journals, runs and the replica's disk (default {WORK}; "
                        "another directory and --port for runs beside someone else's)")
    args = parser.parse_args()
    WORK = args.work
    roots = {"new": build(args.size, args.engine)}
    if args.baseline:
        roots["base"] = build(args.size, args.engine, args.baseline)
    for label, root in roots.items():
        print(json.dumps({"release": label, "engine": args.engine, "size": args.size,
                          "journal": histogram(str(root / USER / "state"))}), flush=True)
    compute_fs(args.compute_fs)
    for out in (args.perf, args.profile, args.pyspy, args.syscalls):
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
    releases = [("new", "")] + ([("base", args.baseline)] if args.baseline else [])
    try:
        for run in range(args.runs):
            for label, tree in releases:
                result = one_run(roots.get(label, roots["new"]), label, tree, args.port,
                                 args.perf, args.profile, run, args.engine, args.pyspy,
                                 args.syscalls, args.settle)
                print(json.dumps(result), flush=True)
    finally:
        subprocess.run(["umount", str(WORK / "compute")], check=False)
        (WORK / "compute.img").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
