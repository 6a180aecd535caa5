"""Per-step start cost of job steps: bare ``srun`` against the SPANK plugin and the wrapper.

Usage (as root)::

    .venv/bin/python bench/jobs/steps.py [--steps 100] [--out bench/out/jobs-plugin-steps.md]

One real SLURM node (tests/cluster: slurmctld and slurmd in network namespaces, the
shipped prolog/epilog, a replica of the user, the plugin loaded through the plugstack
line ``sdeefs install-slurm`` writes).  The user logs in and submits one batch job; in
that one allocation its script starts ``--steps`` steps of each contender, interleaved
round-robin (one of each, then the next round), and times every ``srun`` from the batch
script (``date +%s%N`` before and after):

* ``bare``: ``srun --sdeefs=off true``: SLURM alone;
* ``plugin``: ``srun true``: the task joins the job's environment (launcher/enter/spank.c);
* ``wrapper``: ``srun --sdeefs=off sdeefs-run -- true``: the explicit form (Python, then
  ``sdeefs-enter join``).

Reported: median, mean, p90 per contender and the plugin's and the wrapper's cost over
bare (difference of medians); an SVG beside the report (``.svg``): every step's time,
sorted, per contender (log-log, bench/deploy/plot.py).  The batch script itself runs
inside the environment (the plugin), as a user's does; the srun client is the same for
all three.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from bench.deploy.plot import PALETTE, Chart, Series, render  # noqa: E402
from tests.cluster.test_slurm_jobs import open_grid  # noqa: E402
from tests.launcher.launcher_site import SHELL, VENV_BIN  # noqa: E402

CONTENDERS = {
    "bare": "srun -N1 --sdeefs=off true",
    "plugin": "srun -N1 true",
    "wrapper": f"srun -N1 --sdeefs=off {VENV_BIN / 'sdeefs-run'} -- true",
}


def script(steps: int) -> str:
    body = ["#!/bin/sh", f"for i in $(seq {steps}); do"]
    for name, command in CONTENDERS.items():
        body += ["  t0=$(date +%s%N)", f"  {command} || echo failed {name}",
                 f'  echo "{name} $(( $(date +%s%N) - t0 ))"']
    body.append("done")
    return "\n".join(body) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "out" / "jobs-steps.md"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("steps.py: run as root (it starts a SLURM cluster)", file=sys.stderr)
        return 2
    started = time.time()
    with open_grid(1, spank=True) as g:
        try:
            g.site.start(g.user)
            home = g.site.home(g.user)
            (home / "steps.sh").write_text(script(args.steps))
            out = home / "steps.out"
            env = {"SDEEFS_RUN_DIR": str(g.site.run_dir), "HOME": str(home),
                   "SDEEFS_CONFIG": str(g.site.config)}
            job = g.slurm.run([str(SHELL), "-c", f"sbatch --parsable -N1 -o {out} {home}/steps.sh"],
                              user=g.user, cwd=home, env=env).stdout.strip()
            state = g.slurm.wait_job(int(job), timeout=60 + args.steps * 5)
            text = out.read_text()
        finally:
            subprocess.run([str(VENV_BIN / "sdeefs"), "stop", g.user], env=g.site.env(),
                           capture_output=True)
    if state != "COMPLETED" or "failed" in text:
        print(f"steps.py: the job ended {state}:\n{text[-2000:]}", file=sys.stderr)
        return 1
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for line in text.splitlines():
        name, _, ns = line.partition(" ")
        if name in times and ns.isdigit():
            times[name].append(int(ns) / 1e6)
    rows = []
    base = statistics.median(times["bare"])
    # Steps of a round ran back to back: pair each with the bare step of its round.
    paired = {name: statistics.median(v - b for v, b in zip(values, times["bare"], strict=True))
              for name, values in times.items()}
    for name, values in times.items():
        values = sorted(values)
        median = statistics.median(values)
        rows.append(f"| {name} | `{CONTENDERS[name]}` | {len(values)} | {median:.1f} | "
                    f"{statistics.mean(values):.1f} | {values[int(len(values) * 0.9) - 1]:.1f} | "
                    f"{median - base:+.1f} | {paired[name]:+.1f} |")
    uname = os.uname()
    report = "\n".join([
        "# bench/jobs/steps.py: per-step start cost",
        "",
        f"- Command: `.venv/bin/python bench/jobs/steps.py --steps {args.steps}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(started))}; wall time "
        f"{(time.time() - started) / 60:.1f} min",
        f"- Kernel: {uname.sysname} {uname.release}; {os.cpu_count()} CPUs; load "
        f"{os.getloadavg()[0]:.1f}",
        f"- {args.steps} steps of each contender in one allocation (one node), interleaved "
        "round-robin, timed around srun in the batch script (ms)",
        "",
        "| contender | step | n | median ms | mean ms | p90 ms | median over bare | "
        "median of paired differences (same round) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
    ])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    Path(args.out).with_suffix(".json").write_text(json.dumps(times))
    chart = Chart(title="Job step start: srun true, sorted per contender",
                  subtitle=f"{args.steps} steps each, one allocation, interleaved",
                  x_label="step (sorted by time)", y_label="seconds",
                  series=[Series(name, [(i + 1, v / 1000) for i, v in enumerate(sorted(values))],
                                 PALETTE[k]) for k, (name, values) in enumerate(times.items())])
    Path(args.out).with_suffix(".svg").write_text(render(chart, x_ticks_as_bytes=False))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
