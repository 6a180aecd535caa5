#!/usr/bin/env python3
"""bench/jobs: benchmarks run as SLURM jobs, bare vs sdeefs vs container peers (issue 15).

On the real SLURM test cluster (``tests/cluster/slurm_cluster.py`` through
``tests/cluster/test_slurm_jobs.open_grid``: slurmctld, 2 slurmd nodes in network
namespaces, one sdeefs-replicad per node, the sdeefs prolog/epilog, the SPANK plugin loaded
by the plugstack line ``sdeefs install-slurm`` writes) a user logs in once (their environment
exists and streams to the nodes), then submits, round after round, one batch job per
contender, the contenders' order rotating each round (interleaved: a noisy 2-core machine
shifts every contender alike).  Every job runs the same steps, each as
``srun [SRUN_ARGS] PREFIX CMD`` (``--parts`` picks some; per-step start and environment
starts are bench/jobs/steps.py's, fio on the user's files bench/jobs/fio.py's):

* sysbench cpu (fixed number of events; events/s);
* hpcc (HPL, DGEMM, STREAM, RandomAccess, FFT, PTRANS; N=1000) on 1 rank, and on 2 ranks
  across the 2 nodes (Debian's hpcc is built with Open MPI: ``mpirun`` starts its daemons
  through an agent that runs ``srun -w NODE PREFIX``, so every rank is inside; always
  ``--allow-run-as-root``: inside sdeefs the user is root of the environment's namespace);
* fio's six modes (read, write, randread, randwrite, rw, randrw; 64 MiB, 3 s each) in a
  scratch directory on the node's local tmpfs: for sdeefs the job's scratch upper (which
  the prolog puts on that tmpfs), for the others the same tmpfs directly or bind-mounted.

Contenders (``--only`` picks some; the default is all but ``sdeefs-run``):

* ``bare``: ``sbatch --sdeefs=off``, ``srun --sdeefs=off CMD`` (the floor);
* ``sdeefs``: plain ``sbatch``, ``srun CMD``: what a user gets, every task (the batch
  script, each step, each MPI rank) joins the job's environment through the plugin;
* ``sdeefs-run``: ``--sdeefs=off`` and ``srun sdeefs-run -- CMD``: the explicit form;
* ``ch-run``: Charliecloud from Debian, ``srun --sdeefs=off ch-run IMG -- CMD``;
* ``podman``: ``srun --sdeefs=off podman run --rm ... --rootfs IMG:O CMD`` (rootful:
  rootless podman needs subordinate ids and per-user storage; its jobs are submitted as
  root).

IMG, for both container peers, is the host's own root filesystem bind-mounted read-only
(the same software as bare and as the lower of sdeefs).  The packages (hpcc, sysbench,
charliecloud, podman, fio) are installed here, not by scripts/setup.sh.

Run (root; ~4 min a round)::

    .venv/bin/python bench/jobs/run.py --rounds 3 --out bench/out/jobs
    .venv/bin/python bench/jobs/plot.py bench/out/jobs/results.json bench/out/jobs.svg
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.common import log, require_root  # noqa: E402

PACKAGES = ("hpcc", "sysbench", "charliecloud", "podman", "fio", "openmpi-bin")
PARTS = ("cpu", "mpi", "fio")
OFF = ("--sdeefs=off",)  # the plugin's option: this job or step runs bare
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
    sbatch_args: tuple[str, ...] = ()


@dataclass
class Bench:
    """What a run needs: the grid, the image, the contenders, the results."""

    rounds: int
    out: Path
    contenders: list[Contender]
    image: Path
    work: Path  # shared by every job (hpccinf.txt, agents)
    parts: frozenset[str] = frozenset(PARTS)
    results: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def record(self, contender: str, key: str, value: float) -> None:
        self.results.setdefault(contender, {}).setdefault(key, []).append(value)


def install_packages() -> None:
    """The benchmarks' packages (not scripts/setup.sh's)."""
    subprocess.run(["bash", "-c", f". {REPO}/scripts/apt.sh && apt_install {' '.join(PACKAGES)}"],
                   check=True)


@contextlib.contextmanager
def host_image() -> Iterator[tuple[Path, Path]]:
    """(IMG, WORK): the host's root bind-mounted read-only (the container peers' image: the
    same software as bare) and a directory every job can write (mode 0777)."""
    image = Path(tempfile.mkdtemp(prefix="sdeefs-bench-img-", dir="/var/tmp"))
    work = Path(tempfile.mkdtemp(prefix="sdeefs-bench-jobs-", dir="/var/tmp"))
    os.chmod(work, 0o777)
    try:
        subprocess.run(["mount", "--bind", "/", str(image)], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(image)], check=True)
        yield image, work
    finally:
        subprocess.run(["umount", "-l", str(image)], check=False)
        os.rmdir(image)
        subprocess.run(["rm", "-rf", str(work)], check=False)


def podman_script(image: Path) -> str:
    """podman run as a job step can: the step's own soft limits as the container's (podman
    raises them to limits runc may not set in a SLURM step: EPERM, rlimit 6 and 7)."""
    run = " ".join(shlex.quote(w) for w in ("podman", *PODMAN_OPTS, "run", *PODMAN_RUN_OPTS))
    # nproc: no more than 4096 (podman's own default, and the step's soft limit when it
    # is unlimited, are refused)
    return (f"#!/bin/bash\nn=$(ulimit -Sn); u=$(ulimit -Su)\n"
            f"[ \"$u\" = unlimited ] || [ \"$u\" -gt 4096 ] && u=4096\n"
            f"exec {run} --ulimit nofile=$n:$n --ulimit nproc=$u:$u \"$@\"\n")


def contenders(venv_bin: Path, work: Path, image: Path) -> list[Contender]:
    podman = (str(work / "podman-run"),)
    return [
        Contender("bare", srun_args=OFF, sbatch_args=OFF),
        # the job's scratch upper: /var/tmp inside is the host's, under the job's upper
        Contender("sdeefs", fio_inside="/var/tmp"),
        Contender("sdeefs-run", (str(venv_bin / "sdeefs-run"), "--"), srun_args=OFF,
                  sbatch_args=OFF, fio_inside="/var/tmp"),
        Contender("ch-run", ("ch-run", "-b", "{dir}:/mnt", "-b", "{cwd}", str(image), "--"),
                  srun_args=OFF, sbatch_args=OFF, fio_inside="/mnt"),
        # the cluster's directory bound too: srun inside (mpirun's agent) reaches munged's
        # socket only as the host's inode, not through podman's overlay of the image
        Contender("podman", (*podman, "-v", "{dir}:/mnt", "-v", "{cwd}:{cwd}", "-w", "{cwd}",
                             "-v", "{grid}:{grid}",
                             "-e", "SLURM_CONF", "--rootfs",
                             f"{image}:O"), srun_args=OFF, sbatch_args=OFF, root=True,
                  fio_inside="/mnt"),
    ]


def words(contender: Contender, scratch: str, cwd: str, grid: str) -> str:
    """The step prefix as shell words."""
    return " ".join(shlex.quote(w.format(dir=scratch, cwd=cwd, grid=grid))
                    for w in contender.prefix)


def job_script(b: Bench, c: Contender, scratch: str, grid: str, tag: str) -> str:
    """The batch script: every step under ``c``, results as lines ``R key value``.  The MPI
    runs' directories (WORK/mpi-TAG-RANKS, with hpccinf.txt) are the harness's: made on the
    host, they show on every node, inside an environment too (its lower)."""
    work = str(b.work)
    pre = words(c, scratch, work, grid)
    srun = "srun " + " ".join(shlex.quote(a) for a in c.srun_args)
    fio_dir = f"{c.fio_inside or scratch}/fio-{tag}"
    lines = ["#!/bin/bash", "set -u", f"cd {shlex.quote(work)}"]
    if "cpu" in b.parts:
        lines.append(f"{srun} -N1 -n1 {pre} {SYSBENCH} "
                     "| awk '/events per second/ {print \"R sysbench_eps\", $4}'")
    if "cpu" in b.parts or "mpi" in b.parts:
        hpcc_grep = "|".join(HPCC_KEYS)
        agent = f"{work}/agent-{c.name}"
        for ranks in (1, 2) if "mpi" in b.parts else (1,):
            d = f"{work}/mpi-{tag}-{ranks}"
            hosts = "$(hostname)" if ranks == 1 else "n1,n2"
            lines += [
                f"{srun} -N1 -n1 --overlap {pre} mpirun --allow-run-as-root -np {ranks} "
                f"--host {hosts} --mca plm rsh --mca plm_rsh_agent {agent} --mca ras ^slurm "
                "--mca oob_tcp_if_include eth0 --mca btl_tcp_if_include eth0 "
                f"--mca btl self,vader,tcp --wdir {d} hpcc > {d}/mpirun.log 2>&1 "
                f"|| {{ echo 'R mpi_failed 1'; tail -40 {d}/mpirun.log; }}",
                f"{srun} -N1 -n1 -w $(hostname) {pre} sh -c \"grep -E '^({hpcc_grep})=' "
                f"{d}/hpccoutf.txt\" | sed 's/^/R hpcc{ranks}_/; s/=/ /'"]
    if "fio" in b.parts:
        for mode in FIO_MODES:
            bs = "1m" if mode in ("read", "write", "rw") else "4k"
            lines.append(
                f"{srun} -N1 -n1 {pre} sh -c 'mkdir -p {fio_dir} && fio --name={mode} "
                f"--directory={fio_dir} --filename=data --size=64m --rw={mode} --bs={bs} "
                f"--ioengine=psync --runtime=3 --time_based --minimal' "
                f"| awk -F';' '{{print \"R fio_{mode}_kbs\", $7 + $48}}'")
        lines.append(f"{srun} -N1 -n1 {pre} rm -rf {fio_dir}")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--only", default="bare,sdeefs,ch-run,podman",
                        help="comma-separated contenders (also: sdeefs-run)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated: cpu (sysbench, hpcc 1 rank), mpi (hpcc 1 and "
                        "2 ranks), fio (six modes on the job's scratch)")
    args = parser.parse_args(argv)
    require_root()
    install_packages()
    from tests.launcher.launcher_site import VENV_BIN

    args.out.mkdir(parents=True, exist_ok=True)
    with host_image() as (image, work):
        (work / "podman-run").write_text(podman_script(image))
        (work / "podman-run").chmod(0o755)
        cs = [c for c in contenders(VENV_BIN, work, image) if c.name in args.only.split(",")]
        b = Bench(args.rounds, args.out, cs, image, work,
                  parts=frozenset(args.parts.split(",")))
        for ranks in (1, 2):
            (work / f"hpccinf-{ranks}.txt").write_text(hpcc_input(ranks))
        run_rounds(b)
    log(f"results in {args.out / 'results.json'}")
    return 0


def save(b: Bench) -> None:
    """results.json, after every job (an interrupted run keeps what it measured)."""
    (b.out / "results.json").write_text(json.dumps(
        {"rounds": b.rounds, "contenders": [c.name for c in b.contenders],
         "raw": b.results, "summary": summary(b)}, indent=1))


def run_rounds(b: Bench) -> None:
    from tests.cluster.test_slurm_jobs import open_grid  # the cluster of the tests

    # spank: the plugin is loaded, and the test cluster's munge directory (not /run/munge)
    # is in the site's ``sockets``, as an admin sets it: srun inside an environment
    with open_grid(2, spank=True) as g:
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
            for ranks in (1, 2):
                d = b.work / f"mpi-{tag}-{ranks}"
                d.mkdir()
                d.chmod(0o777)
                (d / "hpccinf.txt").write_text((b.work / f"hpccinf-{ranks}.txt").read_text())
            script = job_script(b, c, scratch, str(g.base), tag)
            out = b.work / f"job-{tag}.out"
            began = time.monotonic()
            job = g.slurm.sbatch(script, ["-N2", "-w", "n1,n2", "--exclusive", *c.sbatch_args,
                                          "-o", str(out)],
                                 user=None if c.root else g.user,
                                 env={"SDEEFS_CONFIG": str(g.site.config)}, cwd=b.work)
            state = g.slurm.wait_job(job, timeout=1800)
            text = out.read_text() if out.exists() else ""
            got = parse(b, c, text)
            b.record(c.name, "job_s", time.monotonic() - began)
            log(f"round {r + 1}/{b.rounds} {c.name}: {state}, {got} results "
                f"in {time.monotonic() - began:.0f} s")
            if got < 3 or "_failed" in text:
                log(f"  output: {text[-1500:]}")
            (b.out / f"job-{tag}.out").write_text(text)
            save(b)


if __name__ == "__main__":
    sys.exit(main())
