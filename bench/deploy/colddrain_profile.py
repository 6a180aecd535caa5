"""Where the capture's worker thread spent its wall time, from ``colddrain.py --pyspy``.

Usage::

    python3 bench/deploy/colddrain_profile.py OUT.0.txt [OUT.1.txt ...]

Each file: py-spy's collapsed stacks (``--format raw --idle --threads --native``) of the
capture over one copy and drain.  Every sample of the trio worker thread is put in one
category by the frames it holds (the first rule that matches, in the order below).
"""

from __future__ import annotations

import collections
import sys

RATE = 250  # samples per second (colddrain.py's --rate)


def category(stack: str) -> str:
    if not any(k in stack for k in ("Capture._batch", "Capture._read_events", "_sync",
                                    "Capture._checkpoint")):
        return "idle (no job)" if "capture (outcome" not in stack else "other job"
    if "Capture._read_events" in stack:
        return "read events"
    if "Capture._sync" in stack or "Journal.sync" in stack:
        return "fdatasync"
    if "read_sums" in stack:
        # libsodium's BLAKE2b in C (before branch sumsfast), BLAKE3 per block since
        if any(k in stack for k in ("sodium", "block_sums", "data_sums", "blocksums")):
            return "big files: block sums"
        return "big files: preadv"
    if "_observe" in stack:
        if "data_sums" in stack:
            return "small files (read by C): block sums"
        if "examine" in stack:
            return "examine (C: lstat, handle, xattrs, read <= 1 MiB)"
        return "observe: other"
    if "append_many" in stack or "Journal.append" in stack:
        return "journal writes"
    if "_plan_and_emit" in stack:
        return "decide + emit (Python)"
    return "batch: other"


def main() -> int:
    for path in sys.argv[1:]:
        counts: collections.Counter[str] = collections.Counter()
        with open(path) as f:
            for line in f:
                stack, _, n = line.rstrip().rpartition(" ")
                if "Trio thread" in stack.split(";")[0]:
                    counts[category(stack)] += int(n)
        total = sum(counts.values())
        print(f"{path}: {total / RATE:.2f} s of the worker thread")
        for name, n in counts.most_common():
            print(f"  {n / RATE:6.2f} s  {100 * n / total:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
