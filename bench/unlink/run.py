#!/usr/bin/env python3
"""Removing names through the fuse engine: rm of files only in the lower, and of files
made in the view (issue 9: the unlink and rename path asks whether the removed file is
still only in the lower, and then tells the kernel to fetch its attributes again).

Usage (as root, from the tree to measure)::

    .venv/bin/python bench/unlink/run.py [--files N] [--reps N]

Each repetition mounts a fresh view (empty upper) over a lower of N files, then times
``rm`` of N lower files in one directory, and of N files created in the view; prints
the medians (seconds) as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TREE = Path(__file__).resolve().parents[2]


def sdeefs(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(TREE)}
    subprocess.run([sys.executable, "-m", "sdeefs", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, cwd="/")


def one(root: Path, files: int) -> tuple[float, float]:
    lower, upper, state, mnt = (root / n for n in ("lower", "upper", "state", "mnt"))
    for d in (lower / "l", upper, mnt):
        d.mkdir(parents=True)
    for i in range(files):
        (lower / "l" / f"f{i}").write_bytes(b"x")
    sdeefs("mount", "--engine", "fuse", "--lower", str(lower), "--upper", str(upper),
           "--state", str(state), str(mnt))
    try:
        (mnt / "u").mkdir()
        for i in range(files):
            (mnt / "u" / f"f{i}").write_bytes(b"x")
        began = time.perf_counter()
        subprocess.run(["rm", "-r", str(mnt / "l")], check=True)
        lower_s = time.perf_counter() - began
        began = time.perf_counter()
        subprocess.run(["rm", "-r", str(mnt / "u")], check=True)
        upper_s = time.perf_counter() - began
    finally:
        sdeefs("umount", str(mnt))
    return lower_s, upper_s


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    lowers, uppers = [], []
    for _ in range(args.reps):
        root = Path(tempfile.mkdtemp(prefix="sdeefs-unlink-", dir="/var/tmp"))
        try:
            lower_s, upper_s = one(root, args.files)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        lowers.append(lower_s)
        uppers.append(upper_s)
    print(json.dumps({"tree": str(TREE), "files": args.files,
                      "rm_lower_s": statistics.median(lowers),
                      "rm_upper_s": statistics.median(uppers)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
