#!/usr/bin/env python3
"""What the BPF LSM guard costs per call: lstat and open+close loops, with and without the
program (issue 16, branch lsmguard; bench only).

Usage (as root)::

    .venv/bin/python bench/lsmguard/hookcost.py [--calls N] [--rounds R] [--reps K]

On the test's stack (bench/lsmguard/stack.py: overlayfs over the mask and a host
directory), ``hookcost`` (hookcost.c: the best of R rounds of N calls, ns per call) runs
for every cell of: the programs detached / the LSM programs attached (where the kernel
loads them) / the decision alone at every system call's entry (``--body-cost``: the same
code on the sys_enter BTF tracepoint, for the task's working directory, a host
directory: what the program's own work costs once per call, where no LSM program can be
attached; it denies nothing) / an empty program there (``--empty-cost``: the traced
system call entry's own cost, subtracted); the task on the host (not guarded:
what every other process of the machine pays) / in the guarded user namespace; lstat /
open+close; of ``lower/a/b/c/file`` through the view (the real inode's hooks fire as
overlayfs calls down) / of the same file directly on the host.  The whole matrix is
repeated K times, alternating, and the minimum kept.  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.lsmguard.stack import (  # noqa: E402
    Holder,
    Loader,
    View,
    build,
    kernel_dev,
    loadable,
)

BODY_REPEAT = 32  # lsmguard.bpf.c


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lsmguard-cost-", dir="/var/tmp"))
    binaries = build(scratch / "build")
    view = View.create(scratch)
    holder = Holder()
    best: dict[tuple[str, str, str, str], float] = {}
    per_decision: dict[str, list[float]] = {"host task": [], "guarded task": []}
    try:
        deep = view.lower / "a" / "b" / "c"
        deep.mkdir(parents=True)
        (deep / "file").write_text("data\n")
        targets = {"through the view": view.view / "a/b/c/file", "host directly": deep / "file"}
        hookcost = str(binaries / "hookcost")
        why = loadable(binaries)
        programs = ["detached", *(["lsm"] if why is None else []), "empty", "body"]
        for _ in range(args.reps):
            for program in programs:
                loader = (Loader(binaries / "lsmguard-load", holder.userns, 1000, 1000,
                                 devs=[kernel_dev(view.lower)], body_cost=program == "body",
                                 empty_cost=program == "empty", counts=scratch / "counts")
                          if program != "detached" else None)
                try:
                    for task in ("host task", "guarded task"):
                        for op in ("stat", "open"):
                            for where, path in targets.items():
                                argv = [hookcost, op, str(path), str(args.calls),
                                        str(args.rounds)]
                                if task == "guarded task":
                                    argv = holder.argv(argv)
                                before = loader.counts() if program == "body" else None
                                out = subprocess.run(argv, capture_output=True, text=True,
                                                     cwd="/")
                                if loader is not None and before is not None:
                                    after = loader.counts()
                                    slot = ("body_ns_guarded" if task == "guarded task"
                                            else "body_ns_host")
                                    spent = after.hooks[slot][0] - before.hooks[slot][0]
                                    times = after.hooks[slot][1] - before.hooks[slot][1]
                                    if times:
                                        per_decision[task].append(spent / times / BODY_REPEAT)
                                if out.returncode != 0:
                                    raise RuntimeError(f"{' '.join(argv)}: {out.stderr}")
                                key = (task, op, where, program)
                                value = float(out.stdout)
                                best[key] = min(best.get(key, value), value)
                finally:
                    if loader is not None:
                        loader.stop()
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; "
              f"{platform.release()}; load {Path('/proc/loadavg').read_text().split()[:3]}; "
              f"best of {args.rounds} x {args.calls:,} calls, min over {args.reps} reps")
        if why is not None:
            print(f"LSM programs not measured: {why}")
        print()
        for task, values in per_decision.items():
            print(f"* one decision, timed inside the program (bpf_ktime_get_ns around "
                  f"{BODY_REPEAT} at each system call; per loop the mean, then the median "
                  f"of the loops): {task} {statistics.median(values):.0f} ns"
                  if values else f"* {task}: no sample")
        print()
        print("| task | call | path | detached, ns | LSM programs attached, ns | "
              "empty program at sys_enter, ns | the decision at sys_enter, ns | "
              "the decision alone, ns |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for task in ("host task", "guarded task"):
            for op in ("stat", "open"):
                for where in targets:
                    off = best[(task, op, where, "detached")]
                    cells = []
                    for program in ("lsm", "empty", "body"):
                        on = best.get((task, op, where, program))
                        cells.append(f"{on:.0f} ({on - off:+.0f})" if on is not None
                                     else "cannot load here")
                    empty = best[(task, op, where, "empty")]
                    body = best[(task, op, where, "body")]
                    cells.append(f"{body - empty:+.0f}")
                    label = "lstat" if op == "stat" else "open+close"
                    print(f"| {task} | {label} | {where} | {off:.0f} | {' | '.join(cells)} |")
    finally:
        holder.stop()
        view.destroy()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
