#!/usr/bin/env python3
"""bench/workflow: a 4-stage workflow of short tasks through SLURM, sdeefs vs a container
per task vs bare (issue 15, the OSv workflow seed).

The workflow (``bench/workflow/wfkit.py``, a Python program with its module): stage 1
generates TASKS input files, stage 2 transforms each, stage 3 analyses each, stage 4
reduces all analyses into TASKS outputs; 10 tasks a stage by default (40 tasks).  Every
task reads the previous stage's files from a shared work directory (the submitting user's
home, or ``/var/tmp`` for root) and is one job step, ``srun -N1 -n1 -w NODE --overlap``:
4 lanes (2 nodes x 2 CPUs) run the stage's tasks, lane k tasks k, k+4, ...; a stage ends
when its 4 lanes have.

Two shapes:

* ``chain``: one job per stage (``sbatch -N2 --exclusive``), stage s+1 submitted with
  ``--dependency=afterok:<stage s>``, all four submitted at once;
* ``steps``: one job (``sbatch -N2 --exclusive``) whose batch script runs the 4 stages.

Contenders (the same program everywhere):

* ``sdeefs``: user A logged in (``sdeefs start``: the PAM hook's work), installed the
  program *inside* the environment (``/usr/local``, which the host does not have), and
  types ``sh submit.sh`` in ``sdeefs-shell``: plain ``sbatch``/``srun``, the SPANK
  plugin puts every task into the job's environment on its node;
* ``bare``: user B, who has no sdeefs environment; the program installed on the host just
  for these runs, removed after each; SLURM's prolog and epilog do nothing for B's jobs (a
  site without sdeefs; ``--sdeefs-site``: they run sdeefs-prolog/-epilog, which find no
  environment, and the job runs bare);
* ``ch-run``: user B, one Charliecloud container per task, ``srun ... ch-run -b WORK IMG
  -- wf-task``; IMG is the host root plus the program: a read-only kernel overlay
  ``lowerdir=LAYER:/`` (LAYER holds only the program);
* ``podman``: root (rootful podman: rootless needs per-user storage), one container per
  task, ``podman run --rm --rootfs IMG:O -v WORK:WORK ... wf-task``; no prolog/epilog, as B.

Every job but sdeefs' is submitted with ``--sdeefs=off``.  Rounds interleave: every
round runs each (contender, shape) once, the order rotating round by round.

Measured per workflow: **makespan** (the submit script's first line, the clock before
the first ``sbatch``, to the end of the last task: the clock after its ``srun``
returned; the clock is CLOCK_MONOTONIC, read by a tiny C program ``WORK/mono``: the
wall clock of this VM was seen to step by 22 s in a run), **task wall** (``srun`` to its
return, per task, in the job script), the program's own time (``W`` line), how long
SLURM's prolog and epilog took per job and node (the cluster's prolog.sh/epilog.sh
wrapped to time themselves), and a digest of stage 4's outputs (the same for all).

Run (root; ~10 min for 5 rounds at load 10, one untimed warm-up workflow per contender
first)::

    .venv/bin/python bench/workflow/run.py --rounds 5 --out bench/out/workflow
    .venv/bin/python bench/workflow/plot.py bench/out/workflow/results.json \\
        bench/out/workflow.svg
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.workflow import wfkit  # noqa: E402

CONTENDERS = ("sdeefs", "bare", "ch-run", "podman")
SHAPES = ("chain", "steps")
STAGES = 4
LANES = (("n1", 0), ("n2", 1), ("n1", 2), ("n2", 3))  # (node, first task): 2 nodes x 2 CPUs
JOB_ARGS = ("-N2", "--exclusive")
PACKAGES = ("charliecloud", "podman")
# as bench/jobs/run.py runs podman in a SLURM step: its default rlimits are refused there
PODMAN_OPTS = ("--log-level=error", "--runtime", "runc", "--cgroup-manager", "cgroupfs")
PODMAN_RUN_OPTS = ("--rm", "--network=host", "--ipc=host")


class WorkflowFailed(RuntimeError):
    """A workflow did not complete: a job failed, a task failed or outputs are missing."""


@dataclass(frozen=True)
class Contender:
    """How one task runs: ``srun ... [prefix] wf-task ...``; ``submitter``: "inside" (the
    sdeefs user in sdeefs-shell), "plain" (user B on the login node) or "root"."""

    name: str
    prefix: tuple[str, ...] = ()
    submitter: str = "plain"
    sbatch_args: tuple[str, ...] = ("--sdeefs=off",)

    def words(self, work: str) -> str:
        return " ".join(shlex.quote(w.format(work=work)) for w in self.prefix)


def podman_script() -> str:
    """podman run as a job step can (bench/jobs/run.py): the step's own soft limits."""
    run = " ".join(shlex.quote(w) for w in ("podman", *PODMAN_OPTS, "run", *PODMAN_RUN_OPTS))
    return (f"#!/bin/bash\nn=$(ulimit -Sn); u=$(ulimit -Su)\n"
            f"[ \"$u\" = unlimited ] || [ \"$u\" -gt 4096 ] && u=4096\n"
            f"exec {run} --ulimit nofile=$n:$n --ulimit nproc=$u:$u \"$@\"\n")


def make_contenders(image: Path, podman_run: Path) -> dict[str, Contender]:
    return {
        "sdeefs": Contender("sdeefs", submitter="inside", sbatch_args=()),
        "bare": Contender("bare"),
        "ch-run": Contender("ch-run", ("ch-run", "-b", "{work}", str(image), "--")),
        "podman": Contender("podman", (str(podman_run), "-v", "{work}:{work}", "-w", "{work}",
                                       "--rootfs", f"{image}:O"), submitter="root"),
    }


# --------------------------------------------------------------------------------------
# Scripts
# --------------------------------------------------------------------------------------


def stage_script(c: Contender, tasks: int, work: str) -> str:
    """``stage.sh STAGE``: the stage's tasks on 4 lanes; first a line ``B STAGE NOW_NS``
    (the batch script runs), then a line per task
    ``T STAGE INDEX NODE START_NS END_NS RC W <program seconds>``."""
    prefix = c.words(work)
    lanes = " & ".join(f"lane {node} {first}" for node, first in LANES if first < tasks)
    return f"""#!/bin/bash
st=$1
echo "B $st $({work}/mono)"
lane() {{
  for i in $(seq $2 {len(LANES)} {tasks - 1}); do
    t0=$({work}/mono)
    out=$(srun -N1 -n1 -w $1 --overlap {prefix} wf-task $st $i {tasks} {work} 2>&1)
    rc=$?
    t1=$({work}/mono)
    echo "T $st $i $1 $t0 $t1 $rc $(echo "$out" | grep '^W ' | tail -1)"
    [ $rc = 0 ] || echo "$out" | sed "s/^/E $st $i: /"
  done
}}
{lanes}
wait
"""


def steps_job(work: str) -> str:
    return "#!/bin/bash\n" + "".join(f"bash {work}/stage.sh {s}\n"
                                     for s in range(1, STAGES + 1))


def submit_script(c: Contender, shape: str, work: str) -> str:
    args = " ".join(shlex.quote(a) for a in (*JOB_ARGS, *c.sbatch_args))
    lines = ["#!/bin/sh", "set -e", f"cd {work}", f'echo "SUBMIT $({work}/mono)"']
    if shape == "steps":
        lines += [f"j=$(sbatch --parsable {args} -J wf -o {work}/out-steps.txt {work}/job.sh)",
                  'echo "JOBS $j"']
    else:
        dep = ""
        for s in range(1, STAGES + 1):
            lines.append(f"j{s}=$(sbatch --parsable {args} {dep}-J wf{s} "
                         f"-o {work}/out-{s}.txt {work}/stage.sh {s})")
            dep = f"--dependency=afterok:$j{s} "
        lines.append('echo "JOBS' + "".join(f" $j{s}" for s in range(1, STAGES + 1)) + '"')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    stage: int
    index: int
    node: str
    start: float  # seconds (epoch)
    end: float
    program: float  # the program's own seconds

    @property
    def wall(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Run:
    """One workflow: contender, shape, round and what it measured."""

    contender: str
    shape: str
    round: int
    submitted: float
    tasks: tuple[Task, ...]
    digest: str
    load: float  # 1-min load average when it started
    began: tuple[tuple[int, float], ...]  # (stage, when its script began), B lines
    jobs: tuple[int, ...] = ()
    hooks: tuple[tuple[str, float], ...] = ()  # ("prolog" | "epilog", seconds) per job+node

    @property
    def makespan(self) -> float:
        return max(t.end for t in self.tasks) - self.submitted

    def waits(self) -> list[float]:
        """Seconds from submission (stage 1) or the previous stage's last task's end to
        the stage's first task's start: scheduling, prolog, epilog, the step's start."""
        out = []
        previous = self.submitted
        for stage in range(1, STAGES + 1):
            mine = [t for t in self.tasks if t.stage == stage]
            out.append(min(t.start for t in mine) - previous)
            previous = max(t.end for t in mine)
        return out

    def as_json(self) -> dict[str, Any]:
        return {"contender": self.contender, "shape": self.shape, "round": self.round,
                "makespan": self.makespan, "digest": self.digest, "load": self.load,
                "task_wall": [t.wall for t in self.tasks],
                "task_program": [t.program for t in self.tasks],
                "waits": self.waits(), "jobs": list(self.jobs),
                "prolog": [t for k, t in self.hooks if k == "prolog"],
                "epilog": [t for k, t in self.hooks if k == "epilog"],
                "script_began": [[st, t - self.submitted] for st, t in self.began],
                "stages": [[t.stage, t.index, t.node, t.start - self.submitted,
                            t.end - self.submitted] for t in self.tasks]}


def parse_tasks(text: str) -> tuple[list[Task], list[str], dict[int, float]]:
    """The T lines of the job outputs, the failures (non-zero exits, E lines) and when
    each stage's script began (B lines)."""
    tasks: list[Task] = []
    errors: list[str] = []
    began: dict[int, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "B":
            began[int(parts[1])] = int(parts[2]) / 1e9
        elif line.startswith("E "):
            errors.append(line)
        elif len(parts) >= 7 and parts[0] == "T":
            if parts[6] != "0" or len(parts) < 9:
                errors.append(line)
                continue
            tasks.append(Task(int(parts[1]), int(parts[2]), parts[3], int(parts[4]) / 1e9,
                              int(parts[5]) / 1e9, float(parts[8])))
    return tasks, errors, began


def dump(data: dict[str, Any]) -> str:
    """JSON with one line per key (a run per line under "runs"): small and diffable."""
    lines = []
    for key, value in data.items():
        if key == "runs":
            inner = ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in value)
            lines.append(f'"runs": [\n  {inner}\n ]')
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, separators=(',', ':'))}")
    return "{\n " + ",\n ".join(lines) + "\n}\n"


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "n": len(values)}


def summary(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Per shape and contender: makespan and the per-round median task wall (min/median/
    max over rounds), the median task wall and program time over all tasks, and the
    overhead of the median task wall over bare's."""
    out: dict[str, dict[str, Any]] = {}
    for shape in SHAPES:
        rows: dict[str, Any] = {}
        for name in CONTENDERS:
            mine = [r for r in runs if r.shape == shape and r.contender == name]
            if not mine:
                continue
            walls = [t.wall for r in mine for t in r.tasks]
            rows[name] = {
                "makespan": spread([r.makespan for r in mine]),
                "round_task_wall": spread([statistics.median(t.wall for t in r.tasks)
                                           for r in mine]),
                "task_wall": statistics.median(walls),
                "task_program": statistics.median(t.program for r in mine for t in r.tasks),
                # the time between stages (stage 1: from submission), summed per workflow
                "waits": spread([sum(r.waits()) for r in mine]),
            }
            for hook in ("prolog", "epilog"):
                times = [t for r in mine for k, t in r.hooks if k == hook]
                if times:
                    rows[name][hook] = spread(times)
        bare = rows.get("bare")
        for row in rows.values():
            if bare is not None:
                row["makespan_vs_bare"] = row["makespan"]["median"] / bare["makespan"]["median"]
                row["task_overhead_s"] = row["task_wall"] - bare["task_wall"]
        if "sdeefs" in rows:
            for peer in ("ch-run", "podman"):
                if peer in rows:
                    rows["sdeefs"][f"shorter_than_{peer}"] = 1 - (
                        rows["sdeefs"]["makespan"]["median"] / rows[peer]["makespan"]["median"])
        out[shape] = rows
    return out


# --------------------------------------------------------------------------------------
# Running workflows on the grid
# --------------------------------------------------------------------------------------


@dataclass
class Bench:
    """A run: the grid (tests/cluster/test_slurm_jobs.Grid), users, image, results."""

    grid: Any
    tasks: int
    contenders: list[Contender]
    shapes: list[str]
    plain_user: str
    root_work: Path
    out: Path | None
    clock: Path = Path("mono")  # build_clock's program, copied into every work directory
    runs: list[Run] = field(default_factory=list)
    log: Callable[[str], None] = print

    def work_dir(self, c: Contender, tag: str) -> Path:
        g = self.grid
        if c.submitter == "root":
            base = self.root_work
        else:
            base = g.site.home(g.user if c.submitter == "inside" else self.plain_user)
        return base / "wf" / tag

    def submit(self, c: Contender, work: Path) -> str:
        g = self.grid
        argv = ["sh", str(work / "submit.sh")]
        if c.submitter == "inside":  # typed in the login environment, as test_spank does
            from tests.launcher.launcher_site import SHELL

            home = g.site.home(g.user)
            return str(g.slurm.run([str(SHELL), "-c", shlex.join(argv)], user=g.user, cwd=home,
                                   env={"SDEEFS_RUN_DIR": str(g.site.run_dir),
                                        "HOME": str(home), "SDEEFS_CONFIG": str(g.site.config),
                                        "SHELL": "/bin/sh"}).stdout)
        user = None if c.submitter == "root" else self.plain_user
        env = {} if user is None else {"HOME": str(g.site.home(user)), "USER": user}
        return str(g.slurm.run(argv, user=user, cwd=work, env=env).stdout)

    def wait(self, jobs: Sequence[int], timeout: float) -> list[str]:
        """Wait for the jobs in order; a failed one cancels those after it."""
        g = self.grid
        states = []
        deadline = time.monotonic() + timeout
        for k, job in enumerate(jobs):
            while True:
                state = g.slurm.job_state(job)
                if state is None or state in TERMINAL:
                    break
                if time.monotonic() > deadline:
                    state = "TIMEOUT(bench)"
                    break
                time.sleep(0.25)
            states.append(state or "UNKNOWN")
            if state not in ("COMPLETED", None):
                rest = [str(j) for j in jobs[k + 1:]]
                if rest:
                    g.slurm.run(["scancel", *rest], check=False)
                break
        return states

    def run_one(self, c: Contender, shape: str, rnd: int) -> Run:
        work = self.work_dir(c, f"{c.name}-{shape}-{rnd}")
        owner = (None if c.submitter == "root" else
                 self.grid.user if c.submitter == "inside" else self.plain_user)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "stage.sh").write_text(stage_script(c, self.tasks, str(work)))
        (work / "job.sh").write_text(steps_job(str(work)))
        (work / "submit.sh").write_text(submit_script(c, shape, str(work)))
        shutil.copy(self.clock, work / "mono")
        if owner is not None:
            subprocess.run(["chown", "-R", f"{owner}:", str(work.parent)], check=True)
        load = os.getloadavg()[0]
        out = self.submit(c, work)
        submitted = jobs = None
        for line in out.splitlines():
            if line.startswith("SUBMIT "):
                submitted = int(line.split()[1]) / 1e9
            elif line.startswith("JOBS "):
                jobs = [int(j) for j in line.split()[1:]]
        if submitted is None or not jobs:
            raise WorkflowFailed(f"{c.name}/{shape}: submission printed {out!r}")
        states = self.wait(jobs, timeout=120 + 20 * self.tasks)
        outputs = sorted(work.glob("out-*.txt"))
        text = "\n".join(p.read_text(errors="replace") for p in outputs)
        tasks, errors, began = parse_tasks(text)
        try:
            if errors or len(tasks) != STAGES * self.tasks or \
                    any(s not in ("COMPLETED", "UNKNOWN") for s in states):
                raise WorkflowFailed(f"{c.name}/{shape}: jobs {states}, {len(tasks)} tasks, "
                                     f"{len(errors)} failed:\n" + "\n".join(errors[:8])
                                     + "\n" + text[-1500:])
            return Run(c.name, shape, rnd, submitted, tuple(tasks), wfkit.digest(work), load,
                       tuple(sorted(began.items())), tuple(jobs), self.hook_times(jobs))
        finally:
            if self.out is not None:
                for p in outputs:
                    shutil.copy(p, self.out / f"{c.name}-{shape}-{rnd}-{p.name}")
            shutil.rmtree(work, ignore_errors=True)

    def run_rounds(self, rounds: int, only: Sequence[tuple[str, str]] = (),
                   warmup: bool = False) -> None:
        """``rounds`` rounds of every (contender, shape), or of the pairs ``only``;
        ``warmup``: first one untimed workflow (steps) per contender (a user's first job
        on a node scans its private files once a day; caches of the container peers)."""
        combos = [(c, s) for c in self.contenders for s in self.shapes
                  if not only or (c.name, s) in only]
        if warmup:
            for c in self.contenders:
                began = time.monotonic()
                with self.installed_for(c):
                    self.run_one(c, "steps", -1)
                self.log(f"warm-up {c.name}: {time.monotonic() - began:.0f} s")
        for rnd in range(rounds):
            k = rnd % len(combos)
            for c, shape in combos[k:] + combos[:k]:
                began = time.monotonic()
                with self.installed_for(c):
                    run = self.run_one(c, shape, rnd)
                self.runs.append(run)
                self.log(f"round {rnd + 1}/{rounds} {c.name:7} {shape:6} makespan "
                         f"{run.makespan:6.2f} s, task wall median "
                         f"{statistics.median(t.wall for t in run.tasks) * 1000:5.0f} ms "
                         f"({time.monotonic() - began:.0f} s, load {run.load:.1f})")
                self.save()

    def hook_times(self, jobs: Sequence[int]) -> tuple[tuple[str, float], ...]:
        """How long SLURM's Prolog and Epilog took for these jobs (timed_hooks), waiting
        a moment for the epilogs (slurmctld may report a job over before they end)."""
        log = self.grid.base / HOOK_TIMES
        wanted = {str(j) for j in jobs}
        found: list[tuple[str, float]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = []
            for line in (log.read_text().splitlines() if log.exists() else []):
                parts = line.split()
                if len(parts) == 5 and parts[0] in wanted:
                    found.append((parts[2], (int(parts[4]) - int(parts[3])) / 1e9))
            if sum(k == "epilog" for k, _ in found) >= 2 * len(jobs):
                break
            time.sleep(0.2)
        return tuple(found)

    @contextmanager
    def installed_for(self, c: Contender) -> Iterator[None]:
        """bare: the program on the host for this run only."""
        if c.name != "bare":
            yield
            return
        files = wfkit.install_tree(Path("/"))
        try:
            yield
        finally:
            for f in files:
                f.unlink(missing_ok=True)

    def data(self) -> dict[str, Any]:
        """What results.json holds (bench/workflow/plot.py reads it)."""
        return {"tasks_per_stage": self.tasks, "contenders": [c.name for c in self.contenders],
                "shapes": self.shapes, "runs": [r.as_json() for r in self.runs],
                "summary": summary(self.runs)}

    def save(self) -> None:
        if self.out is not None:
            (self.out / "results.json").write_text(dump(self.data()))


HOOK_TIMES = "hook-times.log"
MONO_C = r"""#include <stdio.h>
#include <time.h>
int main(void)
{
    struct timespec t;
    if (clock_gettime(CLOCK_MONOTONIC, &t) != 0)
        return 1;
    printf("%lld%09ld\n", (long long)t.tv_sec, t.tv_nsec);
    return 0;
}
"""


def build_clock(directory: Path) -> Path:
    """``DIRECTORY/mono``: prints CLOCK_MONOTONIC in ns (one clock for every node here)."""
    source = directory / "mono.c"
    source.write_text(MONO_C)
    subprocess.run(["cc", "-O2", "-o", str(directory / "mono"), str(source)], check=True)
    (directory / "mono").chmod(0o755)
    return directory / "mono"


def timed_hooks(base: Path, without: Sequence[str], clock: Path) -> None:
    """Make open_grid's prolog.sh and epilog.sh note how long they take: a line
    ``JOB NODE prolog|epilog START_NS END_NS`` in BASE/hook-times.log; for the users
    ``without`` they do nothing (their jobs run as on a site without sdeefs: the peers'
    and bare's baseline; their jobs say ``--sdeefs=off``, so the plugin asks for nothing)."""
    users = "|".join(without) or "''"  # '': no user (SLURM_JOB_USER is set)
    for which in ("prolog", "epilog"):
        script = base / f"{which}.sh"
        lines = script.read_text().splitlines()
        command = "\n".join("  " + line.replace("exec ", "", 1) for line in lines[1:])
        script.write_text(f'#!/bin/sh\nt0=$({clock})\nrc=0\ncase "$SLURM_JOB_USER" in\n'
                          f"{users}) ;;\n*)\n{command}\n  rc=$?;;\nesac\n"
                          f'echo "$SLURM_JOB_ID $SLURMD_NODENAME {which} $t0 $({clock})" '
                          f">> {base / HOOK_TIMES}\nexit $rc\n")


TERMINAL = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
                      "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT",
                      "REVOKED"})


@contextmanager
def container_image() -> Iterator[tuple[Path, Path]]:
    """(IMG, podman-run): IMG = the host root plus the program, a read-only overlay."""
    base = Path(tempfile.mkdtemp(prefix="sdeefs-wf-img-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    layer, image = base / "layer", base / "img"
    layer.mkdir()
    image.mkdir()
    podman_run = base / "podman-run"
    podman_run.write_text(podman_script())
    podman_run.chmod(0o755)
    try:
        # on a file system of its own: a layer below "/" overlaps the "/" layer (ELOOP)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs",
                        str(layer)], check=True)
        wfkit.install_tree(layer)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={layer}:/",
                        str(image)], check=True)
        yield image, podman_run
    finally:
        for mount in (image, layer):
            subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def install_at_login(g: Any) -> None:
    """What user A does after logging in: the program into the environment's /usr/local."""
    src = g.site.home(g.user) / "wf-src"
    src.mkdir(exist_ok=True)
    shutil.copy(Path(wfkit.__file__), src / "wfkit.py")
    subprocess.run(["chown", "-R", f"{g.user}:", str(src)], check=True)
    g.site.run(g.user, f"/usr/bin/python3 -c 'import sys; sys.path.insert(0, \"{src}\"); "
               "import wfkit, pathlib; wfkit.install_tree(pathlib.Path(\"/\"))' && "
               f"rm -rf {src} && wf-task 1 0 1 /tmp && test -s /tmp/s1/0.bin && rm -rf /tmp/s1")
    if Path("/usr/local/bin/wf-task").exists():
        raise WorkflowFailed("the host has /usr/local/bin/wf-task: sdeefs' runs would not "
                             "prove the program comes from the environment")


def available(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The contenders whose tools exist here, and why the others are left out."""
    missing = {"ch-run": "ch-run", "podman": "podman"}
    keep, left = [], {}
    for name in names:
        tool = missing.get(name)
        if tool is not None and shutil.which(tool) is None:
            left[name] = f"{tool} is not installed"
        else:
            keep.append(name)
    return keep, left


@contextmanager
def open_bench(tasks: int, names: Sequence[str], shapes: Sequence[str], out: Path | None,
               log: Callable[[str], None] = print, engine: str = "hybrid",
               bare_site: bool = True) -> Iterator[Bench]:
    """The SLURM test cluster with the plugin, user A logged in with the program installed,
    user B without an environment, the container image; all gone afterwards.
    ``bare_site``: B's and root's jobs skip the prolog and epilog (a site without
    sdeefs); else they run them (sdeefs-prolog finds no environment: the job runs bare)."""
    from tests.cluster.test_slurm_jobs import open_grid

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    root_work = Path(tempfile.mkdtemp(prefix="sdeefs-wf-root-", dir="/var/tmp"))
    try:
        with container_image() as (image, podman_run), open_grid(2, spank=True,
                                                                  engine=engine) as g:
            try:
                plain = g.site.add_user()
                mono = build_clock(image.parent)
                timed_hooks(g.base, without=(plain, "root") if bare_site else (),
                            clock=mono)
                began = time.monotonic()
                g.site.start(g.user)
                install_at_login(g)
                log(f"user logged in and installed the program ({time.monotonic() - began:.1f}"
                    " s)")
                every = make_contenders(image, podman_run)
                yield Bench(g, tasks, [every[n] for n in names], list(shapes), plain,
                            root_work, out, clock=mono, log=log)
            finally:  # the login environment names the cluster's munge directory
                g.site.sdeefs("stop", g.user, check=False)
    finally:
        shutil.rmtree(root_work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=10, help="tasks per stage (4 stages)")
    parser.add_argument("--only", default=",".join(CONTENDERS), help="contenders, commas")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--engine", default="hybrid", help="the login environment's engine")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "workflow")
    parser.add_argument("--sdeefs-site", action="store_true",
                        help="bare and the peers' jobs run sdeefs' prolog and epilog too "
                        "(default: skipped for them, as on a site without sdeefs)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="no untimed first workflow per contender")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install charliecloud and podman")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("run.py: run as root (it starts a SLURM cluster)", file=sys.stderr)
        return 2
    if not args.no_install:
        subprocess.run(["bash", "-c", f". {REPO}/scripts/apt.sh && apt_install "
                        + " ".join(PACKAGES)], check=True)
    from tests.conftest import install_runtime

    install_runtime()  # as the tests do: the runtime in /var/tmp/sdeefs-test/<checkout>
    names, left = available([n for n in args.only.split(",") if n])
    for name, reason in left.items():
        print(f"run.py: {name} left out: {reason}", file=sys.stderr)
    started = time.time()

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # the clean-up below runs

    signal.signal(signal.SIGTERM, interrupt)
    with open_bench(args.tasks, names, args.shapes.split(","), args.out,
                    log=lambda m: print(m, file=sys.stderr, flush=True),
                    engine=args.engine, bare_site=not args.sdeefs_site) as b:
        b.run_rounds(args.rounds, warmup=not args.no_warmup)
    uname = os.uname()
    data = json.loads((args.out / "results.json").read_text())
    data["host"] = {"command": shlex.join(["bench/workflow/run.py", *(argv or sys.argv[1:])]),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
                    "minutes": (time.time() - started) / 60,
                    "kernel": f"{uname.sysname} {uname.release}", "cpus": os.cpu_count(),
                    "left_out": left}
    (args.out / "results.json").write_text(dump(data))
    digests = {r["digest"] for r in data["runs"]}
    print(json.dumps(data["summary"], indent=1))
    if len(digests) != 1:
        print(f"run.py: the contenders' outputs differ: {digests}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
