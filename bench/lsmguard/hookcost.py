#!/usr/bin/env python3
"""What the BPF LSM guard costs per call: lstat and open+close loops, with and without the
program (issue 16, branch lsmguard; bench only).

Usage (as root)::

    .venv/bin/python bench/lsmguard/hookcost.py [--calls N] [--rounds R] [--reps K]

On the test's stack (bench/lsmguard/stack.py: overlayfs over the mask and a host
directory), ``hookcost`` (hookcost.c: the best of R rounds of N calls, ns per call) runs
for every cell of: the program detached / attached; the task on the host (not guarded:
what every other process of the machine pays) / in the guarded user namespace; lstat /
open+close; of ``lower/a/b/c/file`` through the view (the real inode's hooks fire as
overlayfs calls down) / of the same file directly on the host.  The whole matrix is
repeated K times, alternating, and the minimum kept.  Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.lsmguard.stack import Holder, Loader, View, build, kernel_dev  # noqa: E402


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
    try:
        deep = view.lower / "a" / "b" / "c"
        deep.mkdir(parents=True)
        (deep / "file").write_text("data\n")
        targets = {"through the view": view.view / "a/b/c/file", "host directly": deep / "file"}
        hookcost = str(binaries / "hookcost")
        for _ in range(args.reps):
            for program in ("detached", "attached"):
                loader = (Loader(binaries / "lsmguard-load", holder.userns, 1000, 1000,
                                 devs=[kernel_dev(view.lower)]) if program == "attached"
                          else None)
                try:
                    for task in ("host task", "guarded task"):
                        for op in ("stat", "open"):
                            for where, path in targets.items():
                                argv = [hookcost, op, str(path), str(args.calls),
                                        str(args.rounds)]
                                if task == "guarded task":
                                    argv = holder.argv(argv)
                                out = subprocess.run(argv, capture_output=True, text=True)
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
        print()
        print("| task | call | path | program detached, ns | attached, ns | added, ns |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for task in ("host task", "guarded task"):
            for op in ("stat", "open"):
                for where in targets:
                    off = best[(task, op, where, "detached")]
                    on = best[(task, op, where, "attached")]
                    label = "lstat" if op == "stat" else "open+close"
                    print(f"| {task} | {label} | {where} | {off:.0f} | {on:.0f} | "
                          f"{on - off:+.0f} |")
    finally:
        holder.stop()
        view.destroy()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
