"""fio's six modes in a job: the job's scratch and the user's files from the replica, paired.

Usage (as root)::

    .venv/bin/python bench/jobs/fio.py [--rounds 5] [--runtime 2] [--node-fs ext4] \
        [--wrapper] [--out bench/out/jobs-fio.md]

A real SLURM cluster of one node (tests/cluster, the SPANK plugin loaded as ``sdeefs
install-slurm`` sets it up) whose state (replica, jobs' scratch) is on ``--node-fs``: ext4
on a loop device with direct I/O (default: a node's local disk, whose page cache can be
dropped) or tmpfs (the test suite's nodes).  The user logs in and writes one 64 MiB file of
random bytes per mode into ``/var/tmp/bench-fio`` inside their environment (the login upper;
the node's replica follows).  The harness copies the same bytes to the node's filesystem for
the bare runs (the filesystem the node's replica and job scratch live on), syncs and drops
the page cache, and the user submits one job.  In it, round after round (order rotating),
each mode runs as one step of each variant, so every sdeefs step has a bare step of the same
round beside it:

* ``bare`` scratch: ``srun --sdeefs=off fio`` in a directory on the node's filesystem;
* ``sdeefs`` scratch: ``srun fio`` in ``/var/tmp/fio-s`` inside: the job's scratch upper
  (kernel overlayfs, upper on the node's filesystem);
* ``sdeefs`` tmp: ``srun fio`` in ``/tmp/fio-t`` inside: the job's /tmp (a plain directory on
  the node's filesystem, bound: launcher/compute/job.py; paired with bare scratch);
* ``sdeefs-run`` scratch (``--wrapper``): ``srun --sdeefs=off sdeefs-run -- fio`` in
  ``/var/tmp/fio-w``: the explicit form;
* ``bare`` replica: the node-local copy of the user's file, from the page cache (read once
  before the step; fio ``--invalidate=0``);
* ``sdeefs`` replica: the user's file as the job sees it (the replica, a middle layer of the
  overlay; the write modes copy it up into the job's scratch at open), the same way;
* ``bare``/``sdeefs`` replica_cold: the same files, one pass (no ``--time_based``) after
  fio dropped their pages (``--invalidate=1``: ``posix_fadvise(DONTNEED)``, which overlayfs
  hands to the file below; dirty pages first written out, ``sync``: sync(2), as the job's
  scratch upper is mounted volatile and an fsync there does not write).  The loop device
  reads its image with direct I/O: a cold read reaches the host's disk.

Before the rounds, one pass over each file (``first``: no ``--time_based``; the step's
wall time is recorded too): the first access in the job, right after replication, the page
cache dropped (cold on ext4).  Before the first pass of a mode that writes, one step gets
the file to write (ms, srun included), so that both write into a fresh copy of the user's
file: sdeefs opens it for writing (``: >> FILE``: the copy-up into the job's scratch
upper), bare copies it to the node's disk (``cp FILE FILE.job``, what a bare job does to
write into a copy of its input without changing it) and writes into the copy.  Both
copies go through the page cache in 64 KiB folios (splice's chunks); before this, bare
wrote into its file as fio's first pass had left it in the cache (1 MiB folios for write,
4 KiB ones for the random modes) and sdeefs into its copy-up (64 KiB), which is not the
overlay's cost (bench/RESULTS.md, branch jobwrite).

Sequential modes use 1 MiB blocks, random ones 4 KiB; psync; reads and writes summed (KiB/s).
Writes OUT (Markdown: overhead in % of time over bare, of each round's pair, median [min,
max]), OUT.json and OUT.svg.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from bench.jobs import plot  # noqa: E402
from bench.jobs.run import FIO_MODES, install_packages  # noqa: E402
from tests.cluster.test_slurm_jobs import open_grid  # noqa: E402
from tests.launcher.launcher_site import SHELL, VENV_BIN  # noqa: E402

INSIDE = "/var/tmp/bench-fio"  # the user's files, written at login


def fio(target: str, mode: str, size: str, runtime: int, cache: str = "warm") -> str:
    """fio on ``target`` (a directory's file ``data``, or a file), one terse line.
    ``cache``: "warm" (the file read once first, fio keeps the pages), "cold" (every
    filesystem synced, then fio drops its pages), "first" (as it is)."""
    bs = "1m" if mode in ("read", "write", "rw") else "4k"
    where = (f"--filename={target}" if not target.endswith("/") else
             f"--directory={target} --filename=data")
    timed = f"--runtime={runtime} --time_based" if runtime else ""
    run = (f"fio --name={mode} {where} --size={size} --rw={mode} --bs={bs} --ioengine=psync "
           f"{timed} --invalidate={1 if cache == 'cold' else 0} --minimal")
    if target.endswith("/") or cache == "first":
        return run
    if cache == "cold":  # sync(2), not fsync: a job's scratch upper is never synced (volatile)
        return f"sync; {run}"
    return f"cat {target} > /dev/null; {run}"


def step(name: str, key: str, srun: str, command: str) -> list[str]:
    """Shell lines: run one fio step, print ``R NAME KEY KiB/s STEP_MS``."""
    return ["t0=$(date +%s%N)",
            f"kbs=$({srun} sh -c {shlex.quote(command)} | awk -F';' '{{print $7 + $48}}')",
            f'echo "R {name} {key} ${{kbs:-0}} $(( ($(date +%s%N) - t0) / 1000000 ))"']


WRITING = ("write", "randwrite", "rw", "randrw")  # the modes that open the user's file to write


def bare_file(copy: Path, mode: str) -> str:
    """Bare's file of ``mode``: the node-local copy of the user's file, or for a mode that
    writes, a ``cp`` of it the job makes (module docstring)."""
    return f"{copy}/{mode}.job" if mode in WRITING else f"{copy}/{mode}"

# the key of each sdeefs variant's bare pair (by default the same key)
BARE_PAIR = {"tmp": "scratch"}


def variants(scratch: Path, copy: Path, mode: str, size: str, runtime: int,
             wrapper: bool = False) -> dict[str, tuple[str, str, str]]:
    """(contender, key) name -> (contender, srun prefix, fio command)."""
    off = "srun -N1 --sdeefs=off"
    run = f"{off} {VENV_BIN / 'sdeefs-run'} --"
    out = {
        f"bare:fio_{mode}_scratch": ("bare", off, fio(f"{scratch}/", mode, size, runtime)),
        f"sdeefs:fio_{mode}_scratch": ("sdeefs", "srun -N1",
                                       fio("/var/tmp/fio-s/", mode, size, runtime)),
        f"sdeefs:fio_{mode}_tmp": ("sdeefs", "srun -N1", fio("/tmp/fio-t/", mode, size, runtime)),
        f"bare:fio_{mode}_replica": ("bare", off, fio(bare_file(copy, mode), mode, size,
                                                      runtime)),
        f"sdeefs:fio_{mode}_replica": ("sdeefs", "srun -N1",
                                       fio(f"{INSIDE}/{mode}", mode, size, runtime)),
        f"bare:fio_{mode}_replica_cold": ("bare", off,
                                          fio(bare_file(copy, mode), mode, size, 0, "cold")),
        f"sdeefs:fio_{mode}_replica_cold": ("sdeefs", "srun -N1",
                                            fio(f"{INSIDE}/{mode}", mode, size, 0, "cold")),
    }
    if wrapper:
        out[f"sdeefs-run:fio_{mode}_scratch"] = ("sdeefs-run", run,
                                                 fio("/var/tmp/fio-w/", mode, size, runtime))
    return out


def job_script(scratch: Path, copy: Path, modes: list[str], size: str, runtime: int,
               rounds: int, wrapper: bool = False) -> str:
    lines = ["#!/bin/sh", "mkdir -p /var/tmp/fio-s /var/tmp/fio-w /tmp/fio-t"]
    for mode in modes:  # first pass over the user's files: right after replication
        for name in ("bare", "sdeefs"):
            if mode in WRITING:  # the open for writing apart: the copy-up (sdeefs) is in it
                srun = "srun -N1" + (" --sdeefs=off" if name == "bare" else "")
                get = (f"cp {copy}/{mode} {bare_file(copy, mode)}" if name == "bare" else
                       f": >> {INSIDE}/{mode}")
                lines += ["t0=$(date +%s%N)", f"{srun} sh -c {shlex.quote(get)}",
                          f'echo "R {name} fio_{mode}_open_ms $(( ($(date +%s%N) - t0) '
                          '/ 1000000 ))"']
            c, srun, command = variants(scratch, copy, mode, size, 0)[f"{name}:fio_{mode}_replica"]
            command = fio(bare_file(copy, mode) if name == "bare" else f"{INSIDE}/{mode}", mode,
                          size, 0, "first")
            lines += step(c, f"fio_{mode}_replica_first", srun, command)
            lines += [f'echo "R {c} fio_{mode}_replica_first_ms $(( ($(date +%s%N) - t0) '
                      '/ 1000000 ))"']
    for r in range(rounds):
        for mode in modes:
            v = variants(scratch, copy, mode, size, runtime, wrapper)
            names = list(v)
            for name in names[r % len(names):] + names[:r % len(names)]:
                c, srun, command = v[name]
                lines += step(c, name.split(":")[1], srun, command)
    return "\n".join(lines) + "\n"


def paired(raw: dict[str, dict[str, list[float]]], name: str, key: str
           ) -> list[float] | None:
    """Per round: % of time over bare (bare/contender - 1 of KiB/s), against the bare step
    of the same round (``BARE_PAIR``)."""
    mine = raw.get(name, {}).get(key)
    kind = key.split("_", 2)[2]
    bare = raw.get("bare", {}).get(key.replace(kind, BARE_PAIR.get(kind, kind)))
    if not mine or not bare or len(mine) != len(bare) or min(mine) <= 0:
        return None
    return [100 * (b / m - 1) for b, m in zip(bare, mine, strict=True)]


def cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):+.1f} % [{min(values):+.0f}, {max(values):+.0f}]"


def parse(text: str) -> dict[str, dict[str, list[float]]]:
    raw: dict[str, dict[str, list[float]]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "R":
            raw.setdefault(parts[1], {}).setdefault(parts[2], []).append(float(parts[3]))
    return raw


def shown(modes: list[str]) -> list[tuple[str, str]]:
    out = []
    for mode in modes:
        out += [(f"fio_{mode}_scratch", f"{mode}: job scratch /var/tmp (overlay)"),
                (f"fio_{mode}_tmp", f"{mode}: job /tmp"),
                (f"fio_{mode}_replica", f"{mode}: user's file, page cache"),
                (f"fio_{mode}_replica_cold", f"{mode}: user's file, cold")]
    return out


def normalized(raw: dict[str, dict[str, list[float]]], names: list[str],
               rows: list[tuple[str, str]]) -> dict[str, dict[str, list[float]]]:
    """``raw`` as plot.bars reads it, each round's value divided by its bare pair's (bare:
    1): the bars show the paired overheads."""
    out: dict[str, dict[str, list[float]]] = {"bare": {}}
    for key, _ in rows:
        out["bare"][key] = [1.0]
        for n in names:
            p = paired(raw, n, key)
            if p:
                out.setdefault(n, {})[key] = [1 / (1 + v / 100) for v in p]
    return out


def one(raw: dict[str, dict[str, list[float]]], name: str, key: str) -> str:
    values = raw.get(name, {}).get(key)
    return f"{statistics.median(values):.0f}" if values else "–"


def bare_median(raw: dict[str, dict[str, list[float]]], key: str) -> str:
    values = raw.get("bare", {}).get(key)
    return f"{statistics.median(values):.0f}" if values else "–"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=2)
    parser.add_argument("--size", default="64m")
    parser.add_argument("--modes", default=",".join(FIO_MODES))
    parser.add_argument("--node-fs", choices=("ext4", "tmpfs"), default="ext4",
                        help="the node's filesystem (replica, scratch, bare's files)")
    parser.add_argument("--wrapper", action="store_true",
                        help="also sdeefs-run (the explicit form) on the job's scratch")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "jobs-fio.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("fio.py: run as root (it starts a SLURM cluster)", file=sys.stderr)
        return 2
    install_packages()
    modes = args.modes.split(",")
    started = time.time()
    loads = [os.getloadavg()[0]]
    with open_grid(1, spank=True, node_fs=args.node_fs) as g:
        try:
            g.site.start(g.user)
            g.site.run(g.user, f"mkdir -p {INSIDE} && for m in {' '.join(modes)}; do "
                       f"head -c {args.size.upper()} /dev/urandom "
                       f"> {INSIDE}/$m; done; chmod -R a+rwX {INSIDE}", timeout=300)
            copy = g.base / "n1" / "copy"  # bare's: the same bytes on the node's fs
            scratch = g.base / "n1" / "scratch"
            for d in (copy, scratch):
                d.mkdir()
            subprocess.run(["cp", "-r", f"{g.site.upper(g.user)}{INSIDE}/.", str(copy)],
                           check=True)
            uid, gid = g.site.uid(g.user), os.stat(g.site.home(g.user)).st_gid
            for p in (copy, scratch, *copy.iterdir()):
                os.chown(p, uid, gid)
            g.sync(1)  # the replica holds the files (the prolog would wait for it too)
            subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=False)
            home = g.site.home(g.user)
            (home / "fio.sh").write_text(job_script(scratch, copy, modes, args.size,
                                                    args.runtime, args.rounds, args.wrapper))
            out = home / "fio.out"
            env = {"SDEEFS_RUN_DIR": str(g.site.run_dir), "HOME": str(home),
                   "SDEEFS_CONFIG": str(g.site.config)}
            job = g.slurm.run([str(SHELL), "-c", f"sbatch --parsable -N1 -o {out} {home}/fio.sh"],
                              user=g.user, cwd=home, env=env).stdout.strip()
            state = g.slurm.wait_job(int(job), timeout=600 + args.rounds * len(modes) * 8 * (
                args.runtime + 5))
            text = out.read_text() if out.exists() else ""
        finally:
            subprocess.run([str(VENV_BIN / "sdeefs"), "stop", g.user], env=g.site.env(),
                           capture_output=True)
    loads.append(os.getloadavg()[0])
    raw = parse(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".out").write_text(text)
    if state != "COMPLETED" or not raw.get("sdeefs"):
        print(f"fio.py: the job ended {state}:\n{text[-2000:]}", file=sys.stderr)
        return 1
    names: list[str] = [n for n in ("sdeefs", "sdeefs-run") if n in raw]
    rows = shown(modes)
    first_ms = [(f"fio_{m}_replica_first_ms", m) for m in modes]
    lines = [
        "# bench/jobs/fio.py: fio in a job, the job's scratch and the user's files",
        "",
        f"- Command: `.venv/bin/python bench/jobs/fio.py --rounds {args.rounds} "
        f"--runtime {args.runtime} --size {args.size} --modes {args.modes} "
        f"--node-fs {args.node_fs}{' --wrapper' if args.wrapper else ''}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; wall time "
        f"{(time.time() - started) / 60:.1f} min; kernel {os.uname().release}; "
        f"{os.cpu_count()} CPUs; 1-min load average before/after: "
        f"{', '.join(f'{x:.1f}' for x in loads)}",
        f"- The node's filesystem: {args.node_fs}"
        + (" (loop device, direct I/O to its image)" if args.node_fs == "ext4" else ""),
        "- % of time over bare (bare/contender − 1 of KiB/s), each round against the bare "
        "step of the same round, median [min, max] over the rounds; bare: its median KiB/s "
        "(the job's /tmp is paired with bare's scratch directory); the user's file, for the "
        "modes that write: a fresh copy on both sides (bare: `cp` in the job; sdeefs: the "
        "copy-up)",
        "",
        "| mode | bare scratch KiB/s | sdeefs /var/tmp (overlay) | sdeefs /tmp"
        + (" | sdeefs-run /var/tmp" if "sdeefs-run" in names else "")
        + " | bare file, page cache KiB/s | sdeefs file, page cache | bare file, cold KiB/s "
        "| sdeefs file, cold |",
        "| --- | ---: | ---: | ---:" + (" | ---:" if "sdeefs-run" in names else "")
        + " | ---: | ---: | ---: | ---: |",
        *(f"| {m} | {bare_median(raw, f'fio_{m}_scratch')} | "
          f"{cell(paired(raw, 'sdeefs', f'fio_{m}_scratch'))} | "
          f"{cell(paired(raw, 'sdeefs', f'fio_{m}_tmp'))} | "
          + (f"{cell(paired(raw, 'sdeefs-run', f'fio_{m}_scratch'))} | "
             if "sdeefs-run" in names else "")
          + f"{bare_median(raw, f'fio_{m}_replica')} | "
          f"{cell(paired(raw, 'sdeefs', f'fio_{m}_replica'))} | "
          f"{bare_median(raw, f'fio_{m}_replica_cold')} | "
          f"{cell(paired(raw, 'sdeefs', f'fio_{m}_replica_cold'))} |" for m in modes),
        "",
        "First pass over the user's files, right after replication, page cache dropped (one "
        "sample): the step opening the file for writing (srun included; sdeefs: the copy-up "
        "into the job's scratch), ms; then fio's pass, KiB/s, and its whole step, ms:",
        "",
        "| mode | bare open ms | sdeefs open (copy-up) ms | bare KiB/s | sdeefs KiB/s "
        "| bare ms | sdeefs ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {m} | {one(raw, 'bare', f'fio_{m}_open_ms')} | "
          f"{one(raw, 'sdeefs', f'fio_{m}_open_ms')} | "
          f"{one(raw, 'bare', f'fio_{m}_replica_first')} | "
          f"{one(raw, 'sdeefs', f'fio_{m}_replica_first')} | "
          f"{one(raw, 'bare', k)} | {one(raw, 'sdeefs', k)} |" for k, m in first_ms),
        "",
    ]
    report = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps({"raw": raw, "load": loads}))
    args.out.with_suffix(".out").write_text(text)  # the job's output: fio's own errors
    plot.bars(normalized(raw, names, rows), names, args.out.with_suffix(".svg"), rows,
              title="fio in a job, % of time over bare (paired)")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
