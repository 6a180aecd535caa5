#!/usr/bin/env python3
"""bench/jobs: benchmarks run as SLURM jobs, bare vs sdeefs vs container peers (issue 15).

On the real SLURM test cluster (``tests/cluster/slurm_cluster.py`` through
``tests/cluster/test_slurm_jobs.open_grid``: slurmctld, 2 slurmd nodes in network
namespaces, one sdeefs-replicad per node, the sdeefs prolog/epilog) a user logs in once
(their environment exists and streams to the nodes), then submits, round after round, one
batch job per contender, the contenders' order rotating each round (interleaved: a noisy
2-core machine shifts every contender alike).  Every job runs the same steps, each as
``srun [SRUN_ARGS] PREFIX CMD``:

* per-step start: 100 ``srun -N1 -n1 PREFIX /bin/true`` in a row (ms per step, srun's own
  cost included: bare's is the floor);
* sysbench cpu (fixed number of events; events/s);
* hpcc (HPL, DGEMM, STREAM, RandomAccess, FFT, PTRANS; N=1000) on 1 rank, and on 2 ranks
  across the 2 nodes (Debian's hpcc is built with Open MPI: ``mpirun`` starts its daemons
  through an agent that runs ``srun -w NODE PREFIX``, so every rank is inside; always
  ``--allow-run-as-root``: inside sdeefs the user is root of the environment's namespace);
* fio's six modes (read, write, randread, randwrite, rw, randrw; 64 MiB, 3 s each) in a
  scratch directory on the node's local tmpfs: for sdeefs the job's scratch upper (which
  the prolog puts on that tmpfs), for the others the same tmpfs directly or bind-mounted.

Contenders (``CONTENDERS``; ``--only`` picks some):

* ``bare``: ``srun CMD`` (the floor);
* ``sdeefs``: ``srun sdeefs-run -- CMD`` (what jobs do today);
* ``ch-run``: Charliecloud from Debian, ``srun ch-run IMG -- CMD``;
* ``podman``: ``srun podman run --rm ... --rootfs IMG:O CMD`` (rootful: rootless podman
  needs subordinate ids and per-user storage; its jobs are submitted as root);
* ``sdeefs-spank`` (off unless ``--spank-plugstack`` is given): the SPANK plugin, plain
  ``srun [--option] CMD`` on a cluster whose plugstack loads it.

IMG, for both container peers, is the host's own root filesystem bind-mounted read-only
(the same software as bare and as the lower of sdeefs).  The packages (hpcc, sysbench,
charliecloud, podman, fio) are installed here, not by scripts/setup.sh.

Run (root; ~15 min for 3 rounds)::

    .venv/bin/python bench/jobs/run.py --rounds 3 --out bench/out/jobs
    .venv/bin/python bench/jobs/plot.py bench/out/jobs/results.json bench/out/jobs.svg
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common import log, require_root  # noqa: E402

PACKAGES = ("hpcc", "sysbench", "charliecloud", "podman", "fio", "openmpi-bin")
STEPS = 100
FIO_MODES = ("read", "write", "randread", "randwrite", "rw", "randrw")
HPCC_KEYS = ("HPL_Tflops", "SingleDGEMM_Gflops", "SingleSTREAM_Triad", "SingleRandomAccess_GUPs",
             "SingleFFT_Gflops", "PTRANS_GBs", "MPIRandomAccess_GUPs", "MPIFFT_Gflops")
SYSBENCH = "sysbench cpu --cpu-max-prime=10000 --threads=1 --time=0 --events=4000 run"
PODMAN_OPTS = ("--log-level=error", "--runtime", "runc", "--cgroup-manager", "cgroupfs")
# SLURM_*: srun inside (mpirun's agent) must know it runs in the job's allocation, or it
# asks for a new one and waits behind the job itself
PODMAN_RUN_OPTS = ("--rm", "--network=host", "--ipc=host", "-e", "SLURM_*")


@dataclass(frozen=True)
class Contender:
    """How a job step runs CMD: ``srun [srun_args] [prefix] CMD``; ``root``: jobs are
    submitted as root; ``binds``: prefix words that expose a host directory (DIR in each)."""

    name: str
    prefix: tuple[str, ...] = ()
    srun_args: tuple[str, ...] = ()
    root: bool = False
    bind: tuple[str, ...] = ()  # words adding a bind of DIR (container peers)
    fio_inside: str = ""  # where the fio directory is seen inside ("" = the host path)


@dataclass
class Bench:
    """What a run needs: the grid, the image, the contenders, the results."""

    rounds: int
    out: Path
    contenders: list[Contender]
    image: Path
    work: Path  # shared by every job (hpccinf.txt, agents)
    results: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def record(self, contender: str, key: str, value: float) -> None:
        self.results.setdefault(contender, {}).setdefault(key, []).append(value)


def podman_script(image: Path) -> str:
    """podman run as a job step can: the step's own soft limits as the container's (podman
    raises them to limits runc may not set in a SLURM step: EPERM, rlimit 6 and 7)."""
    run = " ".join(shlex.quote(w) for w in ("podman", *PODMAN_OPTS, "run", *PODMAN_RUN_OPTS))
    # nproc: no more than 4096 (podman's own default, and the step's soft limit when it
    # is unlimited, are refused)
    return (f"#!/bin/bash\nn=$(ulimit -Sn); u=$(ulimit -Su)\n"
            f"[ \"$u\" = unlimited ] || [ \"$u\" -gt 4096 ] && u=4096\n"
            f"exec {run} --ulimit nofile=$n:$n --ulimit nproc=$u:$u \"$@\"\n")


def contenders(venv_bin: Path, work: Path, image: Path, spank: str | None,
               spank_args: Sequence[str]) -> list[Contender]:
    podman = (str(work / "podman-run"),)
    out = [
        Contender("bare"),
        Contender("sdeefs", (str(venv_bin / "sdeefs-run"), "--"), fio_inside="/var/tmp"),
        Contender("ch-run", ("ch-run", "-b", "{dir}:/mnt", "-b", "{cwd}", str(image), "--"),
                  fio_inside="/mnt"),
        # the cluster's directory bound too: srun inside (mpirun's agent) reaches munged's
        # socket only as the host's inode, not through podman's overlay of the image
        Contender("podman", (*podman, "-v", "{dir}:/mnt", "-v", "{cwd}:{cwd}", "-w", "{cwd}",
                             "-v", "{grid}:{grid}",
                             "-e", "SLURM_CONF", "--rootfs",
                             f"{image}:O"), root=True, fio_inside="/mnt"),
    ]
    if spank is not None:
        out.append(Contender("sdeefs-spank", srun_args=tuple(spank_args), fio_inside="/var/tmp"))
    return out


def words(contender: Contender, scratch: str, cwd: str, grid: str) -> str:
    """The step prefix as shell words."""
    return " ".join(shlex.quote(w.format(dir=scratch, cwd=cwd, grid=grid))
                    for w in contender.prefix)


def job_script(b: Bench, c: Contender, scratch: str, grid: str, tag: str) -> str:
    """The batch script: every step under ``c``, results as lines ``R key value``."""
    work = str(b.work)
    pre = words(c, scratch, work, grid)
    srun = "srun " + " ".join(shlex.quote(a) for a in c.srun_args)
    fio_dir = f"{c.fio_inside or scratch}/fio-{tag}"
    fio = []
    for mode in FIO_MODES:
        bs = "1m" if mode in ("read", "write", "rw") else "4k"
        fio.append(
            f"{srun} -N1 -n1 {pre} sh -c 'mkdir -p {fio_dir} && fio --name={mode} "
            f"--directory={fio_dir} --filename=data --size=64m --rw={mode} --bs={bs} "
            f"--ioengine=psync --runtime=3 --time_based --minimal' "
            f"| awk -F';' '{{print \"R fio_{mode}_kbs\", $7 + $48}}'")
    hpcc_grep = "|".join(HPCC_KEYS)
    agent = f"{work}/agent-{c.name}"
    return f"""#!/bin/bash
set -u
cd {shlex.quote(work)}
t0=$(date +%s%N)
for i in $(seq {STEPS}); do {srun} -N1 -n1 {pre} /bin/true || echo "R step_failed 1"; done
t1=$(date +%s%N)
awk -v a=$t0 -v b=$t1 'BEGIN {{ print "R step_ms", (b - a) / 1e6 / {STEPS} }}'
{srun} -N1 -n1 {pre} {SYSBENCH} | awk '/events per second/ {{print "R sysbench_eps", $4}}'
for ranks in 1 2; do
  d=$(mktemp -d {work}/mpi-XXXXXX) && chmod 777 $d && cp {work}/hpccinf-$ranks.txt $d/hpccinf.txt
  hosts=$(hostname); [ $ranks = 1 ] || hosts=n1,n2
  {srun} -N1 -n1 --overlap {pre} mpirun --allow-run-as-root -np $ranks --host $hosts --mca plm rsh \
    --mca plm_rsh_agent {agent} --mca ras ^slurm --mca oob_tcp_if_include eth0 \
    --mca btl_tcp_if_include eth0 --mca btl self,vader,tcp --wdir $d hpcc > $d/mpirun.log 2>&1 \
    || {{ echo "R mpi_failed 1"; tail -40 $d/mpirun.log; }}
  {srun} -N1 -n1 -w $(hostname) {pre} sh -c "grep -E '^({hpcc_grep})=' $d/hpccoutf.txt" \
    | sed "s/^/R hpcc${{ranks}}_/; s/=/ /"
  rm -rf $d
done
{chr(10).join(fio)}
{srun} -N1 -n1 {pre} rm -rf {fio_dir}
"""


def agent_script(c: Contender, scratch: str, cwd: str, grid: str) -> str:
    """Open MPI's launch agent (``plm_rsh_agent``, called like ssh: HOST COMMAND...): the
    daemon goes through srun to HOST, inside the contender."""
    srun = " ".join(shlex.quote(a) for a in c.srun_args)
    return (f"#!/bin/sh\nhost=$1; shift\nexec srun {srun} --overlap -N1 -n1 -w \"$host\" "
            f"{words(c, scratch, cwd, grid)} sh -c \"$*\"\n")


def hpcc_input(ranks: int) -> str:
    text = Path("/usr/share/doc/hpcc/examples/_hpccinf.txt").read_text()
    q = 2 if ranks == 2 else 1
    return text.replace("2            Ps", "1            Ps").replace(
        "2            Qs", f"{q}            Qs")


def parse(b: Bench, c: Contender, text: str) -> int:
    n = 0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "R":
            try:
                b.record(c.name, parts[1], float(parts[2]))
                n += 1
            except ValueError:
                pass
    return n


def summary(b: Bench) -> dict[str, dict[str, dict[str, float]]]:
    """Per contender and key: min/median/max, and the median's ratio to bare's."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    bare = b.results.get("bare", {})
    for name, keys in b.results.items():
        for key, values in keys.items():
            row = {"min": min(values), "median": statistics.median(values),
                   "max": max(values), "n": len(values)}
            if bare.get(key):
                row["vs_bare"] = row["median"] / statistics.median(bare[key])
            out.setdefault(name, {})[key] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "jobs")
    parser.add_argument("--only", default="", help="comma-separated contenders")
    parser.add_argument("--spank-plugstack", default=None,
                        help="a plugstack.conf line loading the sdeefs SPANK plugin: adds "
                        "the contender sdeefs-spank")
    parser.add_argument("--spank-srun-arg", action="append", default=[],
                        help="srun option the plugin's contender passes (repeatable)")
    args = parser.parse_args(argv)
    require_root()
    subprocess.run(["bash", "-c", f". {REPO}/scripts/apt.sh && apt_install {' '.join(PACKAGES)}"],
                   check=True)
    from tests.cluster.test_slurm_jobs import open_grid  # the cluster of the tests
    from tests.launcher.launcher_site import VENV_BIN

    args.out.mkdir(parents=True, exist_ok=True)
    image = Path(tempfile.mkdtemp(prefix="sdeefs-bench-img-", dir="/var/tmp"))
    work = Path(tempfile.mkdtemp(prefix="sdeefs-bench-jobs-", dir="/var/tmp"))
    os.chmod(work, 0o777)
    subprocess.run(["mount", "--bind", "/", str(image)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(image)], check=True)
        (work / "podman-run").write_text(podman_script(image))
        (work / "podman-run").chmod(0o755)
        cs = contenders(VENV_BIN, work, image, args.spank_plugstack, args.spank_srun_arg)
        if args.only:
            cs = [c for c in cs if c.name in args.only.split(",")]
        b = Bench(args.rounds, args.out, cs, image, work)
        for ranks in (1, 2):
            (work / f"hpccinf-{ranks}.txt").write_text(hpcc_input(ranks))
        # the SPANK plugin's cluster: open_grid passes plugstack on to the cluster (once the
        # plugin's helper adds that); without the option nothing changes
        grid = open_grid if args.spank_plugstack is None else (
            lambda n: open_grid(n, plugstack=args.spank_plugstack))  # type: ignore[call-arg]
        run_rounds(b, grid)
    finally:
        subprocess.run(["umount", "-l", str(image)], check=False)
        os.rmdir(image)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    log(f"results in {args.out / 'results.json'}")
    return 0


def save(b: Bench) -> None:
    """results.json, after every job (an interrupted run keeps what it measured)."""
    (b.out / "results.json").write_text(json.dumps(
        {"rounds": b.rounds, "contenders": [c.name for c in b.contenders],
         "raw": b.results, "summary": summary(b)}, indent=1))


def run_rounds(b: Bench, open_grid: object) -> None:
    with open_grid(2) as g:  # type: ignore[operator]
        # The test cluster's munged listens in its own directory, not /run/munge: the
        # admin's ``sockets`` setting binds it into environments (srun inside a job
        # environment: mpirun's agent), as /run/munge is by default.
        config = g.site.config.read_text()
        g.site.config.write_text(config.replace(
            "shared = []\n", f'shared = []\nsockets = ["{g.base}/cluster/munge"]\n', 1))
        g.site.start(g.user)  # the user logged in: their environment streams to the nodes
        try:
            run_jobs(b, g)
        finally:  # its environment holds the cluster's munge directory (sockets)
            g.site.stop(g.user)


def run_jobs(b: Bench, g: Any) -> None:
    """The rounds of jobs on the grid ``g`` (tests/cluster/test_slurm_jobs.Grid)."""
    for i in (1, 2):  # each node's scratch for the bare and container contenders
        scratch = g.base / f"n{i}" / "scratch"
        scratch.mkdir()
        os.chmod(scratch, 0o1777)
    for c in b.contenders:
        agent = b.work / f"agent-{c.name}"
        # every node has its own tmpfs at base/nI: the scratch path names node 1's;
        # jobs run their single-node steps on the allocation's first node
        agent.write_text(agent_script(c, str(g.base / "n1" / "scratch"), str(b.work),
                                      str(g.base)))
        agent.chmod(0o755)
    for r in range(b.rounds):
        order = b.contenders[r % len(b.contenders):] + b.contenders[:r % len(b.contenders)]
        for c in order:
            scratch = str(g.base / "n1" / "scratch")
            tag = f"{c.name}-{r}"
            script = job_script(b, c, scratch, str(g.base), tag)
            out = b.work / f"job-{tag}.out"
            began = time.monotonic()
            job = g.slurm.sbatch(script, ["-N2", "-w", "n1,n2", "--exclusive", "-o",
                                          str(out)],
                                 user=None if c.root else g.user,
                                 env={"SDEEFS_CONFIG": str(g.site.config)}, cwd=b.work)
            state = g.slurm.wait_job(job, timeout=1800)
            text = out.read_text() if out.exists() else ""
            got = parse(b, c, text)
            b.record(c.name, "job_s", time.monotonic() - began)
            log(f"round {r + 1}/{b.rounds} {c.name}: {state}, {got} results "
                f"in {time.monotonic() - began:.0f} s")
            if got < 10:
                log(f"  output: {text[-1500:]}")
            (b.out / f"job-{tag}.out").write_text(text)
            save(b)


if __name__ == "__main__":
    sys.exit(main())
