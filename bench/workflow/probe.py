#!/usr/bin/env python3
"""bench/workflow/probe.py: where a chained job's task time goes (issue 15, branch workflow2).

The workflow's chain runs each stage as a new job: every job's tasks run in a new job
environment (a new overlay mount), and right after each ``job-start`` the node's replicad
prepares the user's *next* environment (a spare) while the job's first tasks run.  This
probe tells the suspects apart: a chain of JOBS dependent jobs of the sdeefs user
(``sbatch -N2 --exclusive``, plain sbatch typed in the login environment, as run.py), each
running POSITIONS tasks of stage 1 one after the other on n1 (``srun -N1 -n1 -w n1
--overlap wf-task``), after waiting DELAY seconds in the batch script (0: the tasks start
at once, as in the workflow).  Per position in the job: the median task wall (srun to its
return) and the program's own time.  A cold overlay would slow position 1 only (the first
Python start in an environment warms its dentries for the others); work on the node at
the job's start (the spare) slows the first positions whatever they are, and not after
a delay.

    .venv/bin/python bench/workflow/probe.py --jobs 4 --positions 6 --delays 0,3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.workflow.run import Contender, open_bench, parse_tasks  # noqa: E402


def job_script(work: Path, positions: int, delay: float) -> str:
    return f"""#!/bin/bash
echo "B 1 $({work}/mono)"
sleep {delay}
for i in $(seq 0 {positions - 1}); do
  t0=$({work}/mono)
  out=$(srun -N1 -n1 -w n1 --overlap wf-task 1 $i {positions} {work} 2>&1)
  rc=$?
  t1=$({work}/mono)
  echo "T 1 $i n1 $t0 $t1 $rc $(echo "$out" | grep '^W ' | tail -1)"
  [ $rc = 0 ] || echo "E 1 $i: $out"
done
"""


def layer_costs(g: Any, times: int) -> dict[str, Any]:
    """What the read-only layers under a job environment cost the node (the replicad's
    thread: the idmapped lower, the mask): made anew (each environment, before branch
    workflow2; now once per user, node and key) against shared (each environment now).
    The grid's config and user, node n1; ending the shared layers under running
    environments is safe (launcher/compute/job.py, UserLayers)."""
    if times <= 0:
        return {}
    from sdeefs import config as config_mod
    from sdeefs import identity
    from sdeefs.launcher import env
    from sdeefs.launcher.compute import job as job_mod

    config = config_mod.load(str(g.site.config))
    user = env.User.lookup(g.user)
    ids = identity.of_user(g.user, config.min_uid, allocate=False)
    where = job_mod.UserLayers.of(config, "n1", g.user)
    out: dict[str, Any] = {"made": [], "made_cpu": [], "shared": [], "shared_cpu": []}
    for _ in range(times):
        for what in ("made", "shared"):
            if what == "made":
                job_mod.end_user_layers(where)
            wall, cpu = time.perf_counter(), time.process_time()
            with job_mod.user_layers(config, "n1", user, ids) as layers:
                pass
            out[what].append((time.perf_counter() - wall) * 1000)
            out[what + "_cpu"].append((time.process_time() - cpu) * 1000)
    out["whiteouts"] = sum(len(files) for _, _, files in os.walk(layers[0])) \
        if len(layers) == 2 else 0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--positions", type=int, default=6)
    parser.add_argument("--delays", default="0,3")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=5,
                        help="times the job layers are made and shared (0: not measured)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("probe.py: run as root", file=sys.stderr)
        return 2
    from tests.conftest import install_runtime

    install_runtime()
    delays = [float(d) for d in args.delays.split(",")]
    walls: dict[float, dict[int, list[float]]] = {d: {} for d in delays}
    programs: dict[float, dict[int, list[float]]] = {d: {} for d in delays}
    with open_bench(args.positions, ["sdeefs"], ["chain"], None,
                    log=lambda m: print(m, file=sys.stderr, flush=True)) as b:
        g = b.grid
        c = Contender("sdeefs", submitter="inside", sbatch_args=())
        b.run_one(c, "steps", -1)  # the warm-up: the node's root-only scan, first spares
        for rnd in range(args.rounds):
            for delay in delays:
                work = b.work_dir(c, f"probe-{rnd}-{delay}")
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                (work / "job.sh").write_text(job_script(work, args.positions, delay))
                lines = ["#!/bin/sh", "set -e", f"cd {work}", "dep="]
                for k in range(args.jobs):
                    lines.append(f"j=$(sbatch --parsable -N2 --exclusive $dep -J p{k} "
                                 f"-o {work}/out-{k}.txt {work}/job.sh)")
                    lines.append('dep="--dependency=afterok:$j"; echo "JOB $j"')
                (work / "submit.sh").write_text("\n".join(lines) + "\n")
                shutil.copy(b.clock, work / "mono")
                subprocess.run(["chown", "-R", f"{g.user}:", str(work.parent)], check=True)
                out = b.submit(c, work)
                jobs = [int(line.split()[1]) for line in out.splitlines()
                        if line.startswith("JOB ")]
                states = b.wait(jobs, timeout=60 + 20 * args.jobs * args.positions)
                for k in range(args.jobs):
                    text = (work / f"out-{k}.txt").read_text(errors="replace")
                    tasks, errors, _ = parse_tasks(text)
                    if errors or len(tasks) != args.positions:
                        print(f"probe.py: job {k} ({states}): {errors[:3]}\n{text[-800:]}",
                              file=sys.stderr)
                        return 1
                    for t in tasks:
                        walls[delay].setdefault(t.index, []).append(t.wall)
                        programs[delay].setdefault(t.index, []).append(t.program)
                if args.out is not None:
                    args.out.mkdir(parents=True, exist_ok=True)
                    for p in work.glob("out-*.txt"):
                        shutil.copy(p, args.out / f"{rnd}-{delay}-{p.name}")
                shutil.rmtree(work, ignore_errors=True)
                print(f"round {rnd + 1} delay {delay}: load {os.getloadavg()[0]:.1f}",
                      file=sys.stderr, flush=True)
        layers = layer_costs(g, args.layers)
        if args.out is not None:
            for log in g.base.glob("replicad-*.log"):
                shutil.copy(log, args.out / log.name)
    print("| delay s | " + " | ".join(f"task {i + 1}" for i in range(args.positions)) + " |")
    print("|---|" + "---:|" * args.positions)
    for delay in delays:
        cells = [f"{statistics.median(walls[delay][i]) * 1000:.0f} "
                 f"({statistics.median(programs[delay][i]) * 1000:.0f})"
                 for i in range(args.positions)]
        print(f"| {delay:g} | " + " | ".join(cells) + " |")
    print("(median task wall ms, program ms in brackets, over "
          f"{args.rounds} x {args.jobs} jobs; load now {os.getloadavg()[0]:.1f})")
    if layers:
        print(f"\nthe layers under a job environment of the user on n1 ({args.layers} times "
              f"each, ms, median [min-max]; the mask holds {layers['whiteouts']} whiteouts):")
        for what in ("made", "shared"):
            wall, cpu = layers[what], layers[what + "_cpu"]
            print(f"  {what:6}: wall {statistics.median(wall):7.1f} [{min(wall):.1f}-"
                  f"{max(wall):.1f}], CPU of this process {statistics.median(cpu):7.1f}")
    if args.out is not None:
        (args.out / "probe.json").write_text(json.dumps(
            {"walls": {str(d): v for d, v in walls.items()},
             "programs": {str(d): v for d, v in programs.items()}, "layers": layers,
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
