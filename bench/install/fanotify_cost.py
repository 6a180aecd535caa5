#!/usr/bin/env python3
"""What the capture's fanotify mark costs the writer, before any sdeefs code runs.

Usage (as root, with the repository's venv)::

    .venv/bin/python bench/install/fanotify_cost.py [--files 100000] [--rounds 2]

Per round, two fresh ext4 layer images (``sdeefs.fs.image``): one plain, one with the
capture's fanotify group and filesystem mark on its upper (``capture.MASK``, the same
``fan.Group.open`` the capture uses) and nobody reading the queue.  ``mkfiles``
(bench/install/mkfiles.c) creates FILES files of 300 B in FILES/100 directories; the
wall clock and the writer's CPU time (user + system of the child) are printed.  The
difference of CPU is what the kernel spends queuing events in the writer's syscalls.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sdeefs.fs import capture as cap  # noqa: E402
from sdeefs.fs import image  # noqa: E402

HERE = Path(__file__).resolve().parent


def one_run(scratch: Path, mkfiles: Path, files: int, marked: bool, mask: int = cap.MASK
            ) -> tuple[float, float]:
    """(wall s, writer CPU s) of creating ``files`` files, with or without the mark."""
    img, layer = scratch / "layer.img", scratch / "layer"
    layer.mkdir(parents=True)
    image.create_image(str(img), 4 << 30)
    image.mount_image(str(img), str(layer))
    group = None
    try:
        image.prepare_layer(str(layer), 0, 0)
        if marked:
            group = cap.fan.Group.open(True)
            group.mark_filesystem(str(layer / "upper"), mask)
        subprocess.run(["sync"], check=True)
        before, wall = os.times(), time.perf_counter()
        subprocess.run([str(mkfiles), str(layer / "upper" / "w"), str(files),
                        str(max(files // 100, 1)), "300"], check=True, stdout=subprocess.DEVNULL)
        wall, after = time.perf_counter() - wall, os.times()
        cpu = (after.children_user - before.children_user) + \
            (after.children_system - before.children_system)
        return wall, cpu
    finally:
        if group is not None:
            group.close()
        image.unmount_image(str(layer))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("fanotify_cost: needs root (loop mounts, fanotify)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdeefs-fan-cost-", dir="/var/tmp") as tmp:
        mkfiles = Path(tmp) / "mkfiles"
        subprocess.run(["gcc", "-O2", "-o", str(mkfiles), str(HERE / "mkfiles.c")], check=True)
        for round_no in range(args.rounds):
            for marked in (False, True):
                wall, cpu = one_run(Path(tmp) / f"r{round_no}-{int(marked)}", mkfiles,
                                    args.files, marked)
                load = os.getloadavg()[0]
                rows.append((round_no + 1, marked, wall, cpu, load))
    print(f"{args.files:,} files of 300 B, mkfiles into a layer image's upper:\n")
    print("| round | fanotify mark | wall s | writer CPU s | CPU µs/file | load |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for round_no, marked, wall, cpu, load in rows:
        print(f"| {round_no} | {'capture.MASK, not read' if marked else 'none'} | {wall:.2f} | "
              f"{cpu:.2f} | {cpu / args.files * 1e6:.1f} | {load:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
