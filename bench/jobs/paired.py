"""CPU-bound job steps, bare vs sdeefs, paired step by step in one allocation (issue 15: ≤ 1 %).

Usage (as root)::

    .venv/bin/python bench/jobs/paired.py [--rounds 30] [--kinds sysbench,hpcc,mpi2] \\
        [--out bench/out/jobs-paired.md]

Why a second harness next to bench/jobs/run.py: run.py submits one job per contender and
round, minutes apart, and on a shared 2-core machine bare's own throughput varied 4x between
rounds, so 1 % could not be resolved.  Here everything happens in **one job of the user's**
(``sbatch -N2``, typed inside the user's environment, on the test suite's real SLURM
cluster with the SPANK plugin: ``tests/cluster/test_slurm_jobs.open_grid(2, spank=True)``),
and each round runs every benchmark twice back to back, once as a bare step
(``srun --sdeefs=off``) and once as the user's step (plain ``srun``: the plugin moves the task
into the job's environment), the order alternating each round.  A round's two steps are
seconds apart, so slow drifts of the machine's load hit both; the figure is the median of the
per-round **paired** ratios with its distribution-free ~95 % confidence interval.

Two measures per step, both taken around the benchmark alone (not srun, not the step's start)
by a small timer run as the task (``python3 -c``, the host's Python in both contenders):

* **wall** seconds (CLOCK_MONOTONIC) and the benchmark's own rates (sysbench events/s,
  hpcc's HPL, DGEMM, STREAM, RandomAccess, FFT, PTRANS);
* **CPU** seconds (user + system of the benchmark, ``getrusage(RUSAGE_CHILDREN)``, ns-exact
  on Linux): the work the task did.  Other processes on the machine lengthen a step's wall
  time by preempting it, far less its CPU time, so on a loaded machine CPU seconds resolve
  what wall time cannot: an environment that added work to a CPU-bound task (page faults
  through a FUSE layer, syscall interposition, a slower page cache) shows here.

Benchmarks (``--kinds``): ``sysbench`` cpu (a fixed 8,000 events, one thread); ``hpcc`` on one
rank (an Open MPI singleton; N=2000: HPL, DGEMM, STREAM, RandomAccess, FFT, PTRANS); ``mpi2``:
hpcc on 2 ranks across the 2 nodes (P=1, Q=2, N=1000), ``mpirun`` in the step on the first node
starting the remote rank through an agent that is an srun step of the same contender on the
second (bare: ``srun --sdeefs=off``, sdeefs: plain ``srun``, joining that node's job
environment); its CPU seconds are the first node's (mpirun and the local rank).

Writes OUT (Markdown), OUT.json (every value) and OUT.svg (paired overhead per measure).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from bench.jobs.run import install_packages  # noqa: E402
from bench.jobs.steps import median_ci  # noqa: E402
from tests.cluster.test_slurm_jobs import open_grid  # noqa: E402
from tests.launcher.launcher_site import SHELL, VENV_BIN  # noqa: E402

CONTENDERS = {"bare": "srun -N1 -n1 --sdeefs=off", "sdeefs": "srun -N1 -n1"}
SYSBENCH = "sysbench cpu --cpu-max-prime=10000 --threads=1 --time=0 --events=8000 run"
HPCC_KEYS = ("HPL_Tflops", "SingleDGEMM_Gflops", "SingleSTREAM_Triad",
             "SingleRandomAccess_GUPs", "SingleFFT_Gflops", "PTRANS_GBs")
MPI_KEYS = ("HPL_Tflops", "MPIFFT_Gflops", "MPIRandomAccess_GUPs", "PTRANS_GBs")
KINDS = ("sysbench", "hpcc", "mpi2")
DEFAULT_KINDS = "sysbench,hpcc"
# measure -> (label, higher is better)
MEASURES = {
    "sysbench_cpu_s": ("sysbench cpu: CPU seconds", False),
    "sysbench_wall_s": ("sysbench cpu: wall seconds", False),
    "sysbench_eps": ("sysbench cpu: events/s", True),
    "hpcc_cpu_s": ("hpcc 1 rank: CPU seconds", False),
    "hpcc_wall_s": ("hpcc 1 rank: wall seconds", False),
    **{f"hpcc_{k}": (f"hpcc {k.replace('Single', '').split('_')[0]}", True) for k in HPCC_KEYS},
    "mpi2_wall_s": ("hpcc 2 ranks/2 nodes: wall seconds", False),
    "mpi2_cpu_s": ("hpcc 2 ranks/2 nodes: CPU seconds (first node)", False),
    **{f"mpi2_{k}": (f"hpcc 2 ranks/2 nodes: {k.split('_')[0]}", True) for k in MPI_KEYS},
}

# The task: runs one benchmark in a fresh directory and prints ``R <measure> <value>`` lines.
# Python only around the benchmark: its start is outside the timed interval.
TIMER = r'''
import os, re, resource, shutil, subprocess, sys, time
kind, where, inf = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(where)
os.chdir(where)
env = dict(os.environ)
if kind == "mpi2":
    # two ranks, one per node: mpirun starts the remote one through the agent (argv[4]),
    # an srun step of the same contender on the other node
    shutil.copy(inf, "hpccinf.txt")
    cmd = ["mpirun", "--allow-run-as-root", "-np", "2", "--host", sys.argv[5], "--mca", "plm",
           "rsh", "--mca", "plm_rsh_agent", sys.argv[4], "--mca", "ras", "^slurm",
           "--mca", "oob_tcp_if_include", "eth0", "--mca", "btl_tcp_if_include", "eth0",
           "--mca", "btl", "self,vader,tcp", "hpcc"]
elif kind == "hpcc":
    shutil.copy(inf, "hpccinf.txt")
    cmd = ["hpcc"]
    # an Open MPI singleton: without the step's SLURM/PMI variables it does not try to
    # join the step as an MPI job (which fails before MPI_Init in a plain srun task)
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "PMI", "PMIX", "OMPI_"))}
else:
    cmd = SYSBENCH.split()
before = resource.getrusage(resource.RUSAGE_CHILDREN)
t0 = time.monotonic()
out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
wall = time.monotonic() - t0
after = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
if out.returncode:
    print("R failed", out.returncode, out.stdout[-300:].replace(chr(10), " "))
    sys.exit(1)
print(f"R {kind}_wall_s {wall:.6f}")
print(f"R {kind}_mntns {os.stat('/proc/self/ns/mnt').st_ino}")  # which environment ran it
print(f"R {kind}_cpu_s {cpu:.6f}")
if kind in ("hpcc", "mpi2"):
    text = open("hpccoutf.txt").read()
    for key in KEYS if kind == "hpcc" else MPI_KEYS:
        m = re.search("^" + key + "=(\\S+)$", text, re.M)
        if m:
            print(f"R {kind}_{key} {m.group(1)}")
else:
    m = re.search(r"events per second:\s*(\S+)", out.stdout)
    if m:
        print(f"R sysbench_eps {m.group(1)}")
os.chdir("/")
shutil.rmtree(where)
'''


def timer_source() -> str:
    return f"SYSBENCH = {SYSBENCH!r}\nKEYS = {HPCC_KEYS!r}\nMPI_KEYS = {MPI_KEYS!r}\n{TIMER}"


def agent_script(name: str) -> str:
    """Open MPI's launch agent (called like ssh: HOST COMMAND...): the remote daemon as a
    step of the same contender on HOST."""
    return (f"#!/bin/sh\nhost=$1; shift\nexec {CONTENDERS[name]} --overlap -w \"$host\" "
            "sh -c \"$*\"\n")


def batch_script(rounds: int, work: Path, kinds: tuple[str, ...]) -> str:
    """The user's job (2 nodes): per round, each benchmark as a bare step and as the user's
    step, the order alternating; lines ``P <round> <contender> <measure> <value>``."""
    timer = work / "timer.py"
    lines = ["#!/bin/sh", f"cd {shlex.quote(str(work))}",
             "first=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -1)",
             "hosts=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | paste -sd,)"]
    for r in range(rounds):
        order = list(CONTENDERS) if r % 2 == 0 else list(reversed(CONTENDERS))
        for kind in kinds:
            inf = work / ("hpccinf-2.txt" if kind == "mpi2" else "hpccinf.txt")
            for name in order:
                where = work / "runs" / f"{kind}-{name}-{r}"
                lines.append(
                    f"{CONTENDERS[name]} --overlap -w $first python3 {timer} {kind} {where} "
                    f"{inf} {work / ('agent-' + name)} $hosts | sed 's/^R /P {r} {name} /'")
    return "\n".join(lines) + "\n"


def hpcc_input(ranks: int) -> str:
    text = Path("/usr/share/doc/hpcc/examples/_hpccinf.txt").read_text()
    # one rank: N=2000 (the example's 1000 makes HPL a 0.3 s run: finer ratios); two ranks
    # over TCP between network namespaces: N=1000 (MPIRandomAccess alone takes a minute at 2000)
    n = 2000 if ranks == 1 else 1000
    grid = text.replace("2            Ps", "1            Ps").replace(
        "2            Qs", f"{ranks}            Qs")
    return grid.replace("1000         Ns", f"{n:<4}         Ns")


def parse(text: str) -> dict[str, dict[int, dict[str, float]]]:
    """measure -> round -> contender -> value; a failed step raises."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "P" and parts[3] == "failed":
            raise RuntimeError(f"a step failed: {line}")
        if len(parts) != 5 or parts[0] != "P":
            continue
        out.setdefault(parts[3], {}).setdefault(int(parts[1]), {})[parts[2]] = float(parts[4])
    return out


def overheads(per_round: dict[int, dict[str, float]], higher_better: bool) -> list[float]:
    """Per round, sdeefs' overhead over bare in % of time (rates turned into time)."""
    out = []
    for pair in per_round.values():
        if "bare" in pair and "sdeefs" in pair and min(pair.values()) > 0:
            bare, mine = pair["bare"], pair["sdeefs"]
            ratio = bare / mine if higher_better else mine / bare
            out.append(100 * (ratio - 1))
    return out


def summarize(values: dict[str, dict[int, dict[str, float]]]
              ) -> list[tuple[str, str, int, float, float, float, float, float]]:
    """(measure, label, n, bare median, sdeefs median, overhead median %, CI low, CI high)."""
    rows = []
    for key, (label, higher) in MEASURES.items():
        if key not in values:
            continue
        per_round = values[key]
        d = overheads(per_round, higher)
        if not d:
            continue
        m, lo, hi = median_ci(d)
        bare = statistics.median(p["bare"] for p in per_round.values() if "bare" in p)
        mine = statistics.median(p["sdeefs"] for p in per_round.values() if "sdeefs" in p)
        rows.append((key, label, len(d), bare, mine, m, lo, hi))
    return rows


def svg(rows: list[tuple[str, str, int, float, float, float, float, float]], subtitle: str) -> str:
    """One bar per measure: the paired median overhead, the whisker its ~95 % interval."""
    lo = min([-3.0, *(r[6] for r in rows)])
    hi = max([3.0, *(r[7] for r in rows)])
    left, width, row_h = 250, 480, 22
    height = 70 + len(rows) * row_h + 30

    def x(v: float) -> float:
        return left + (v - lo) / (hi - lo) * width

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 40}" '
           f'height="{height}" font-family="sans-serif" font-size="11">',
           '<text x="10" y="18" font-size="13">sdeefs over bare, paired steps in one job: '
           '% of time (bar: median, whisker: ~95 % CI)</text>',
           f'<text x="10" y="36" fill="#555">{escape(subtitle)}</text>']
    step = 1 if hi - lo <= 12 else 2 if hi - lo <= 30 else 5
    for tick in range(math.ceil(lo / step) * step, math.floor(hi) + 1, step):
        out += [f'<line x1="{x(tick):.1f}" y1="50" x2="{x(tick):.1f}" y2="{height - 30}" '
                f'stroke="{"#000" if tick == 0 else "#ddd"}"/>',
                f'<text x="{x(tick):.1f}" y="{height - 14}" text-anchor="middle">{tick:+d}</text>']
    for i, (_, label, n, _, _, m, a, b) in enumerate(rows):
        y = 56 + i * row_h
        colour = "#1f77b4" if "CPU" in label else "#7fa7c9"
        out += [f'<text x="{left - 8}" y="{y + 11}" text-anchor="end">{escape(label)} '
                f'(n={n})</text>',
                f'<rect x="{min(x(0), x(m)):.1f}" y="{y + 2}" width="{abs(x(m) - x(0)):.1f}" '
                f'height="12" fill="{colour}"/>',
                f'<line x1="{x(a):.1f}" y1="{y + 8}" x2="{x(b):.1f}" y2="{y + 8}" stroke="#000"/>',
                f'<line x1="{x(a):.1f}" y1="{y + 4}" x2="{x(a):.1f}" y2="{y + 12}" stroke="#000"/>',
                f'<line x1="{x(b):.1f}" y1="{y + 4}" x2="{x(b):.1f}" y2="{y + 12}" stroke="#000"/>']
    out.append("</svg>")
    return "\n".join(out) + "\n"


def measure(rounds: int, kinds: tuple[str, ...]
            ) -> tuple[dict[str, dict[int, dict[str, float]]], list[float]]:
    with open_grid(2, spank=True) as g:
        try:
            g.site.start(g.user)
            home = g.site.home(g.user)
            work = home / "paired"
            work.mkdir()
            (work / "timer.py").write_text(timer_source())
            (work / "hpccinf.txt").write_text(hpcc_input(1))
            (work / "hpccinf-2.txt").write_text(hpcc_input(2))
            for name in CONTENDERS:
                (work / f"agent-{name}").write_text(agent_script(name))
                (work / f"agent-{name}").chmod(0o755)
            (work / "runs").mkdir()
            (home / "paired.sh").write_text(batch_script(rounds, work, kinds))
            for path in (work, *work.iterdir(), home / "paired.sh"):
                os.chown(path, home.stat().st_uid, home.stat().st_gid)
            env = {"SDEEFS_RUN_DIR": str(g.site.run_dir), "HOME": str(home),
                   "SDEEFS_CONFIG": str(g.site.config)}
            out = home / "paired.out"
            loads = [os.getloadavg()[0]]
            # typed inside the user's environment, as a user submits: plain sbatch
            job = g.slurm.run([str(SHELL), "-c", f"sbatch --parsable -N2 --exclusive -o {out} "
                               f"{home}/paired.sh"], user=g.user, cwd=home, env=env)
            state = g.slurm.wait_job(int(job.stdout.strip()), timeout=300 + rounds * 60)
            loads.append(os.getloadavg()[0])
            text = out.read_text() if out.exists() else ""
            if state != "COMPLETED":
                raise RuntimeError(f"the user's job ended {state}:\n{text[-2000:]}")
            return parse(text), loads
        finally:
            subprocess.run([str(VENV_BIN / "sdeefs"), "stop", g.user], env=g.site.env(),
                           capture_output=True)


def report(rows: list[tuple[str, str, int, float, float, float, float, float]],
           rounds: int, kinds: str, loads: list[float], started: float) -> str:
    lines = [
        "# bench/jobs/paired.py: CPU-bound steps, bare vs sdeefs, paired in one job",
        "",
        f"- Command: `.venv/bin/python bench/jobs/paired.py --rounds {rounds} --kinds {kinds}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; wall time "
        f"{(time.time() - started) / 60:.1f} min; kernel {os.uname().release}; "
        f"{os.cpu_count()} CPUs; 1-min load average before/after the job: "
        f"{', '.join(f'{x:.1f}' for x in loads)}",
        "- overhead: sdeefs' step over the bare step of the same round, % of time (rates "
        "turned into time: bare/sdeefs − 1); median of the rounds [~95 % CI]",
        "",
        "| measure | rounds | bare (median) | sdeefs (median) | overhead, median [95 % CI] |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for _, label, n, bare, mine, m, lo, hi in rows:
        lines.append(f"| {label} | {n} | {bare:.4g} | {mine:.4g} | "
                     f"{m:+.2f} % [{lo:+.2f}, {hi:+.2f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--kinds", default=DEFAULT_KINDS,
                        help="comma-separated: sysbench, hpcc (1 rank), mpi2 (2 ranks, 2 nodes)")
    parser.add_argument("--out", type=Path,
                        default=REPO_ROOT / "bench" / "out" / "jobs-paired.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("paired.py: run as root (it starts a SLURM cluster)", file=sys.stderr)
        return 2
    install_packages()
    started = time.time()
    try:
        values, loads = measure(args.rounds, tuple(args.kinds.split(",")))
    except RuntimeError as exc:
        print(f"paired.py: {exc}", file=sys.stderr)
        return 1
    rows = summarize(values)
    if not rows:
        print("paired.py: no step of both contenders produced a value", file=sys.stderr)
        return 1
    text = report(rows, args.rounds, args.kinds, loads, started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"values": values, "loads": loads}))
    args.out.with_suffix(".svg").write_text(svg(rows, (
        f"{args.rounds} rounds, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
        f"load {', '.join(f'{x:.1f}' for x in loads)}")))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
