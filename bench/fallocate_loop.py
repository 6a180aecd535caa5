"""fallocate(2) through a view: per-call latency of each mode, and a large preallocation.

    bench/fallocate_loop.py DIR [DIR ...]    (each DIR: a directory in a view, or native)

For each DIR: a 64 MiB file, then N calls at random 4 KiB-aligned offsets of each mode
(0 within the file, KEEP_SIZE past its end, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE|KEEP_SIZE),
median microseconds per call; then ``fallocate -l 1G`` of a new file (one call), wall
time.  Through sdeefs every call is one journaled Fallocate record (issue 9 item 5).
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time

from sdeefs.sysio import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)

N = 2000
SIZE = 64 << 20
MODES = {
    "0 (allocate)": 0,
    "KEEP_SIZE (past the end)": FALLOC_FL_KEEP_SIZE,
    "PUNCH_HOLE": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "ZERO_RANGE": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
}


def measure(directory: str) -> dict[str, float]:
    path = os.path.join(directory, "fallocate-bench")
    rng = random.Random(1)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    results = {}
    try:
        os.pwrite(fd, b"x" * (1 << 20), 0)
        fallocate(fd, 0, 0, SIZE)
        for name, mode in MODES.items():
            times = []
            for _ in range(N):
                offset = rng.randrange(SIZE // 4096) * 4096
                if mode == FALLOC_FL_KEEP_SIZE:
                    offset += SIZE
                start = time.perf_counter_ns()
                fallocate(fd, mode, offset, 4096)
                times.append(time.perf_counter_ns() - start)
            results[name] = statistics.median(times) / 1000
    finally:
        os.close(fd)
        os.unlink(path)
    big = os.path.join(directory, "fallocate-1g")
    fd = os.open(big, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        fallocate(fd, 0, 0, 1 << 30)
        results["1 GiB in one call (ms)"] = (time.perf_counter() - start) * 1000
    finally:
        os.close(fd)
        os.unlink(big)
    return results


def main() -> None:
    for directory in sys.argv[1:]:
        for name, value in measure(directory).items():
            unit = "" if "ms" in name else " µs"
            print(f"{directory}\t{name}\t{value:.1f}{unit}")


if __name__ == "__main__":
    main()
