"""What each thread of the sdeefs-replicad processes is doing, sampled: on CPU or waiting where.

Usage (as root, beside a benchmark)::

    python3 bench/deploy/threadstates.py SECONDS OUT.jsonl
    python3 bench/deploy/threadstates.py --summary OUT.jsonl FROM TO

Every 10 ms for SECONDS, one line per thread of every ``sdeefs-replicad`` process: seconds
since the start, the side (``replica``: started with ``--replica-dir``; else ``origin``),
the thread's name, its state (``/proc/PID/task/TID/stat``: R running or runnable, S
sleeping, D uninterruptible) and, unless running, the top of its kernel stack (where it
waits).  ``--summary`` counts the samples between FROM and TO seconds (a benchmark's timed
window) by side, thread, state and stack.  An off-CPU view without ``perf sched`` or BPF
tools: which thread the others wait for.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import time

SKIP = ("entry_SYSCALL", "do_syscall")


def sample(seconds: float, out_path: str) -> None:
    start = time.monotonic()
    with open(out_path, "w") as out:
        while (now := time.monotonic() - start) < seconds:
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                    if b"sdeefs-replicad" not in cmd:
                        continue
                    side = "replica" if b"--replica-dir" in cmd else "origin"
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        task = f"/proc/{pid}/task/{tid}"
                        with open(f"{task}/comm") as f:
                            comm = f.read().strip()
                        with open(f"{task}/stat") as f:
                            state = f.read().rsplit(")", 1)[1].split()[0]
                        top = ""
                        if state != "R":
                            with open(f"{task}/stack") as f:
                                frames = [line.split(" ", 1)[1].split("+")[0]
                                          for line in f.read().splitlines() if line]
                            top = " < ".join(fn for fn in frames[:5] if not fn.startswith(SKIP))
                        out.write(json.dumps([round(now, 3), side, comm, state, top]) + "\n")
                except (OSError, IndexError):  # a thread or process that ended meanwhile
                    pass
            time.sleep(0.01)


def summary(path: str, first: float, last: float) -> None:
    counts: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
    rounds = set()
    with open(path) as f:
        for line in f:
            at, side, comm, state, top = json.loads(line)
            if first <= at <= last:
                rounds.add(at)
                counts[(side, comm, state, top)] += 1
    print(f"{len(rounds)} sample rounds between {first} and {last} s")
    for (side, comm, state, top), n in counts.most_common(30):
        print(f"{n:6d}  {side:8s} {comm:16s} {state} {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", action="store_true")
    parser.add_argument("args", nargs="+")
    args = parser.parse_args()
    if args.summary:
        path, first, last = args.args
        summary(path, float(first), float(last))
    else:
        seconds, out = args.args
        sample(float(seconds), out)


if __name__ == "__main__":
    main()
