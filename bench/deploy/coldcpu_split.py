"""Where a daemon's samples go, from ``coldcpu.py --pyspy``'s raw collapsed stacks.

Usage::

    python bench/deploy/coldcpu_split.py FILE.txt [--top N]

Prints, per thread, its samples and the ``sdeefs`` functions they were in (inclusive:
the innermost ``sdeefs/`` frame of each stack, and what it was doing below it: the
native or library frame at the leaf).  Stacks whose leaf is a wait (poll, epoll,
futex, a lock, select) are counted apart: py-spy's idle detection does not see every
wait of a native stack, and a wait costs no CPU.
"""

from __future__ import annotations

import argparse
import collections
import re

WAITS = ("poll", "epoll_wait", "futex", "acquire", "select", "sleep", "wait (threading",
         "_wait_for_tstate_lock", "recv_into (trio", "sem_wait", "pthread_cond")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    waits: collections.Counter[str] = collections.Counter()
    with open(args.file) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            frames = stack.split(";")
            thread = re.sub(r"\s*\(\d+\)", "", frames[0])
            leaf = frames[-1]
            n = int(count)
            if any(w in leaf for w in WAITS):
                waits[thread] += n
                continue
            totals[thread] += n
            ours = [f for f in frames if "sdeefs/" in f]
            where = re.sub(r" \(.*", "", ours[-1]) if ours else "(no sdeefs frame)"
            below = re.sub(r" \((.*?)(:\d+)?\)$", r" [\1]", leaf) if leaf not in ours[-1:] \
                else "(python)"
            threads[thread][f"{where} <- {below}"] += n
    for thread, total in totals.most_common():
        print(f"{thread}: {total} samples on CPU ({waits[thread]} waiting)")
        for what, n in threads[thread].most_common(args.top):
            print(f"   {100 * n / total:5.1f}%  {what}")


if __name__ == "__main__":
    main()
