"""Per-step start and 100 environment starts: bare SLURM vs sdeefs vs Charliecloud vs podman.

Usage (as root)::

    .venv/bin/python bench/jobs/steps.py [--steps 100] [--starts 100] \\
        [--out bench/out/jobs-steps.md]

A real SLURM cluster of one node (tests/cluster: slurmctld and slurmd in network namespaces,
the shipped prolog/epilog, the user's replica, the SPANK plugin loaded by the plugstack line
``sdeefs install-slurm`` writes).  The user logs in (their environment streams to the node).
Every time below is taken with ``date +%s%N`` on the one host clock: before ``srun``, by the
task itself as its exec'd program (``date +%s%N`` is the task: "to exec"), and after srun
returns ("round trip").

**Per-step start** (``--steps`` rounds, all in one allocation, one step of each contender per
round, the contenders' order rotating each round; the paired difference is a contender's step
minus the bare step of the same round):

* user's job (its batch script runs in the environment, as every job of a user does):
  ``bare`` = ``srun --sdeefs=off date``; ``sdeefs`` = ``srun date`` (the plugin: the task
  joins the job's environment); ``sdeefs-run`` = ``srun --sdeefs=off sdeefs-run -- date``
  (the explicit form: Python, then ``sdeefs-enter join``); ``ch-run`` = ``srun --sdeefs=off
  ch-run IMG -- date``;
* root's job (rootful podman: rootless needs subordinate ids and per-user storage):
  ``bare`` and ``podman`` = ``srun --sdeefs=off podman run --rm --rootfs IMG:O date``.

**Environment starts** (the paper's table 3; ``--starts`` rounds, order rotating): each start
is a new single-node job, ``srun -N1 date`` typed on the login node, so SLURM allocates,
the prolog runs, the task starts, the epilog ends it:

* ``bare``: a second user who never logged in with sdeefs (the prolog finds no environment
  and lets the job run as usual), ``srun -N1 date``;
* ``sdeefs``: the user, ``srun -N1 date``: the prolog waits for the replica's barrier and
  starts the job's environment, the task joins it;
* ``ch-run``: the second user, ``srun -N1 ch-run IMG -- date``;
* ``podman``: root, ``srun -N1 podman run --rm --rootfs IMG:O date``.

IMG, for both container peers, is the host's own root bind-mounted read-only (the same
software as bare and as the environment's lower).  Writes OUT (Markdown), OUT.json (every
time) and OUT.svg (sorted per-step times and per-start times, log-log).
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

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from bench.deploy.plot import PALETTE, Chart, Series, render  # noqa: E402
from bench.jobs.run import host_image, install_packages, podman_script  # noqa: E402
from tests.cluster.test_slurm_jobs import open_grid  # noqa: E402
from tests.launcher.launcher_site import SHELL, VENV_BIN  # noqa: E402

STAMP = "date +%s%N"


def step_commands(image: Path, podman: Path) -> dict[str, dict[str, str]]:
    """Per job (user's, root's): contender -> the step, srun included."""
    return {
        "user": {
            "bare": f"srun -N1 --sdeefs=off {STAMP}",
            "sdeefs": f"srun -N1 {STAMP}",
            "sdeefs-run": f"srun -N1 --sdeefs=off {VENV_BIN / 'sdeefs-run'} -- {STAMP}",
            "ch-run": f"srun -N1 --sdeefs=off ch-run {image} -- {STAMP}",
        },
        "root": {
            "bare": f"srun -N1 --sdeefs=off {STAMP}",
            "podman": f"srun -N1 --sdeefs=off {podman} --rootfs {image}:O {STAMP}",
        },
    }


def timed_lines(name: str, command: str) -> list[str]:
    """Shell lines printing ``T name BEFORE EXEC AFTER`` (ns) for one run of ``command``."""
    return ["t0=$(date +%s%N)", f"e=$({command} | tail -1) || e=failed",
            f'echo "T {name} $t0 $e $(date +%s%N)"']


def rotating(names: list[str], rounds: int) -> list[list[str]]:
    return [names[r % len(names):] + names[:r % len(names)] for r in range(rounds)]


def batch_script(commands: dict[str, str], rounds: int) -> str:
    body = ["#!/bin/sh"]
    for order in rotating(list(commands), rounds):
        for name in order:
            body += timed_lines(name, commands[name])
    return "\n".join(body) + "\n"


def starts_script(commands: dict[str, tuple[str, str]], rounds: int, work: Path) -> str:
    """The login node's driver (root): each start a new job, as its user."""
    body = ["#!/bin/sh", f"cd {shlex.quote(str(work))}"]
    for order in rotating(list(commands), rounds):
        for name in order:
            user, command = commands[name]
            body += timed_lines(name, f"{'runuser -u ' + user + ' -- ' if user else ''}"
                                f"{command}")
    return "\n".join(body) + "\n"


def parse(text: str) -> dict[str, list[tuple[float, float]]]:
    """contender -> [(ms to exec, ms round trip)], in the order run; failures raise."""
    out: dict[str, list[tuple[float, float]]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 5 or parts[0] != "T":
            continue
        if not parts[3].isdigit():
            raise RuntimeError(f"a step of {parts[1]} failed:\n{text[-2000:]}")
        t0, e, t1 = int(parts[2]), int(parts[3]), int(parts[4])
        out.setdefault(parts[1], []).append(((e - t0) / 1e6, (t1 - t0) / 1e6))
    return out


def median_ci(values: list[float]) -> tuple[float, float, float]:
    """Median and its distribution-free ~95 % confidence interval (order statistics)."""
    v = sorted(values)
    n = len(v)
    half = 0.98 * math.sqrt(n)
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half) - 1)
    return statistics.median(v), v[lo], v[hi]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def table(times: dict[str, list[tuple[float, float]]], which: int, paired: bool) -> list[str]:
    """Markdown rows: per contender the median (IQR) and the difference to bare: paired
    (same round) or of medians."""
    bare = [t[which] for t in times["bare"]]
    rows = []
    for name, ts in times.items():
        v = [t[which] for t in ts]
        q1, q3 = quartiles(v)
        if paired:
            d = [a - b for a, b in zip(v, bare, strict=False)]
            m, lo, hi = median_ci(d)
            d1, d3 = quartiles(d)
            over = f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}] (IQR {d1:+.1f} … {d3:+.1f})"
        else:
            over = f"{statistics.median(v) - statistics.median(bare):+.1f}"
        rows.append(f"| {name} | {len(v)} | {statistics.median(v):.1f} ({q1:.1f} … {q3:.1f}) | "
                    f"{over} | {sum(v) / 1000:.1f} s |")
    return rows


def chart(title: str, subtitle: str, times: dict[str, list[tuple[float, float]]]) -> str:
    names = sorted(times)
    return render(Chart(title=title, subtitle=subtitle, x_label="rank (sorted by time)",
                        y_label="seconds, srun to the task's exec",
                        series=[Series(n, [(i + 1, max(t, 0.1) / 1000) for i, t in enumerate(
                            sorted(x[0] for x in times[n]))], PALETTE[k % len(PALETTE)])
                                for k, n in enumerate(names)]), x_ticks_as_bytes=False)


def measure(steps: int, starts: int, work: Path, image: Path) -> dict[str, object]:
    podman = work / "podman-run"
    cmds = step_commands(image, podman)
    result: dict[str, object] = {}
    with open_grid(1, spank=True) as g:
        second = g.site.add_user()  # never logs in with sdeefs: bare jobs
        try:
            g.site.start(g.user)
            home = g.site.home(g.user)
            env = {"SDEEFS_RUN_DIR": str(g.site.run_dir), "HOME": str(home),
                   "SDEEFS_CONFIG": str(g.site.config)}
            loads = [os.getloadavg()[0]]
            if steps:
                (home / "steps.sh").write_text(batch_script(cmds["user"], steps))
                out = home / "steps.out"
                job = g.slurm.run([str(SHELL), "-c", f"sbatch --parsable -N1 -o {out} "
                                   f"{home}/steps.sh"], user=g.user, cwd=home, env=env)
                state = g.slurm.wait_job(int(job.stdout.strip()), timeout=120 + steps * 10)
                text = out.read_text() if out.exists() else ""
                if state != "COMPLETED":
                    raise RuntimeError(f"the user's job ended {state}:\n{text[-2000:]}")
                result["steps_user"] = parse(text)
                loads.append(os.getloadavg()[0])
                out = work / "steps-root.out"
                job_id = g.slurm.sbatch(batch_script(cmds["root"], steps),
                                        ["-N1", "--sdeefs=off", "-o", str(out)], cwd=work)
                state = g.slurm.wait_job(job_id, timeout=120 + steps * 10)
                text = out.read_text() if out.exists() else ""
                if state != "COMPLETED":
                    raise RuntimeError(f"root's job ended {state}:\n{text[-2000:]}")
                result["steps_root"] = parse(text)
                loads.append(os.getloadavg()[0])
            if starts:
                driver = work / "starts.sh"
                driver.write_text(starts_script({
                    "bare": (second, f"srun -N1 {STAMP}"),
                    "sdeefs": (g.user, f"srun -N1 {STAMP}"),
                    "ch-run": (second, f"srun -N1 ch-run {image} -- {STAMP}"),
                    "podman": ("", f"srun -N1 {podman} --rootfs {image}:O {STAMP}"),
                }, starts, work))
                text = g.slurm.run(["sh", str(driver)], timeout=120 + starts * 40,
                                   env={"SDEEFS_CONFIG": str(g.site.config)}).stdout
                result["starts"] = parse(text)
                loads.append(os.getloadavg()[0])
            result["load"] = loads
        finally:
            subprocess.run([str(VENV_BIN / "sdeefs"), "stop", g.user], env=g.site.env(),
                           capture_output=True)
    return result


def report(result: dict[str, object], args: argparse.Namespace, started: float) -> str:
    uname = os.uname()
    loads: list[float] = result.get("load", [])  # type: ignore[assignment]
    lines = [
        "# bench/jobs/steps.py: per-step start and environment starts",
        "",
        f"- Command: `.venv/bin/python bench/jobs/steps.py --steps {args.steps} "
        f"--starts {args.starts}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; wall time "
        f"{(time.time() - started) / 60:.1f} min; kernel {uname.release}; {os.cpu_count()} CPUs; "
        f"1-min load average at the start and after each part: "
        f"{', '.join(f'{x:.1f}' for x in loads)}",
        "- ms; median (IQR); the difference to bare is the median of the paired differences "
        "(same round) with its ~95 % confidence interval [order statistics] and their IQR",
        "",
    ]
    head = ["| contender | n | median ms (IQR) | over bare, ms | total |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for key, title in (("steps_user", "Per-step start in the user's job: srun to the task's "
                        "exec"), ("steps_root", "Per-step start in root's job (podman): srun to "
                                  "the task's exec")):
        if key in result:
            times = result[key]
            lines += [f"## {title}", "", *head, *table(times, 0, True), "",  # type: ignore[arg-type]
                      "Round trip (srun returned):", "", *head,
                      *table(times, 1, True), ""]  # type: ignore[arg-type]
    if "starts" in result:
        lines += ["## Environment starts: a new single-node job each, srun to the task's exec",
                  "", *head, *table(result["starts"], 0, True), "",  # type: ignore[arg-type]
                  "Round trip (srun returned, the epilog included):", "", *head,
                  *table(result["starts"], 1, True), ""]  # type: ignore[arg-type]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--starts", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "jobs-steps.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("steps.py: run as root (it starts a SLURM cluster)", file=sys.stderr)
        return 2
    install_packages()
    started = time.time()
    with host_image() as (image, work):
        (work / "podman-run").write_text(podman_script(image))
        (work / "podman-run").chmod(0o755)
        try:
            result = measure(args.steps, args.starts, work, image)
        except RuntimeError as exc:
            print(f"steps.py: {exc}", file=sys.stderr)
            return 1
    text = report(result, args, started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(result))
    svgs = []
    for key, title in (("steps_user", "Job step start (user's job)"),
                       ("steps_root", "Job step start (root's job: podman)"),
                       ("starts", "Environment start: a new job each")):
        if key in result:
            path = args.out.with_name(f"{args.out.stem}-{key.replace('_', '-')}.svg")
            path.write_text(chart(title, "srun to the task's exec, sorted per contender",
                                  result[key]))  # type: ignore[arg-type]
            svgs.append(path)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
