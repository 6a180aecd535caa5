#!/usr/bin/env python3
"""What fio's sequential read through a fresh view is made of: the first pass and the rest.

Usage (as root)::

    .venv/bin/python bench/fio/first_read.py [--reps N] [--mib M] [--base-tree DIR]
        [--out FILE]

``bench/fio/run.py``'s "fio read (1M)" reads a 256 MiB lower file for 5 s through a
freshly mounted view: the first pass goes through the daemon (FUSE contenders), every
later one comes from the view's own page cache.  This reads such a file twice per fresh
mount, 1 MiB at a time, and reports for each pass its throughput and, for FUSE
contenders, the CPU seconds their daemon spent (utime + stime from /proc), median and
min..max of ``--reps`` mounts taken round-robin.  Contenders: those of bench/fio
(``--base-tree``: sdeefs-fuse-base, the fuse engine of another checkout) and
``sdeefs-fuse-nowb`` (``--no-writeback-cache``: what the writeback cache costs a
cached read).  Everything mounted or started is removed at the end, also on errors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import (  # noqa: E402
    BenchSession,
    Contender,
    MountedView,
    SdeefsContender,
    log,
    require_root,
    standard_contenders,
)

MIB = 1 << 20


def daemon_pid(mounted: MountedView) -> int | None:
    if mounted.dirs is not None and isinstance(mounted.contender, SdeefsContender):
        try:
            return int((mounted.dirs.state / "lock").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
    return mounted.daemons[0].pid if mounted.daemons else None


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_pass(path: Path, pid: int | None) -> tuple[float, float]:
    """(MiB/s, daemon CPU seconds) of one sequential read of ``path`` in 1 MiB reads."""
    buf = bytearray(MIB)
    cpu = cpu_seconds(pid)
    fd = os.open(path, os.O_RDONLY)
    started = time.perf_counter()
    total = 0
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    return total / MIB / elapsed, cpu_seconds(pid) - cpu


def summary(values: list[float], fmt: str) -> str:
    return (f"{format(statistics.median(values), fmt)} "
            f"({format(min(values), fmt)}..{format(max(values), fmt)})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mib", type=int, default=256, help="size of the lower file")
    parser.add_argument("--base-tree", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = parser.parse_args(argv)
    require_root()
    known = standard_contenders(base_tree=args.base_tree)
    names = ["native", "overlay", "fuse-overlayfs",
             *(["sdeefs-fuse-base"] if args.base_tree else []), "sdeefs-fuse"]
    contenders: list[Contender] = [known[n] for n in names]
    contenders.append(SdeefsContender("sdeefs-fuse-nowb", "fuse", ["--no-writeback-cache"]))
    samples: dict[tuple[str, str], list[float]] = {}
    with BenchSession("sdeefs-bench-firstread-") as session:
        assert session.mounts is not None
        lower = session.scratch / "lower"
        lower.mkdir()
        with open(lower / "read.dat", "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(MIB))
        for contender in contenders:
            contender.prepare(lower, session.scratch, session.tracker)
        for rep in range(args.reps):
            for offset in range(len(contenders)):
                contender = contenders[(rep + offset) % len(contenders)]
                with open(lower / "read.dat", "rb") as f:  # the lower file in the page cache
                    while f.read(8 * MIB):
                        pass
                mounted = session.mounts.mount(contender, lower, f"{contender.name}-{rep}")
                try:
                    pid = daemon_pid(mounted)
                    first, first_cpu = read_pass(mounted.view / "read.dat", pid)
                    second, second_cpu = read_pass(mounted.view / "read.dat", pid)
                finally:
                    session.mounts.release(mounted)
                for key, value in (("first", first), ("first_cpu", first_cpu),
                                   ("second", second), ("second_cpu", second_cpu)):
                    samples.setdefault((key, contender.name), []).append(value)
                log(f"rep {rep + 1}/{args.reps} {contender.name}: first {first:.0f} MiB/s "
                    f"(daemon {first_cpu:.2f} s), second {second:.0f} MiB/s")
    lines = ["| contender | first pass MiB/s | daemon CPU s, first pass | second pass MiB/s |",
             "| --- | ---: | ---: | ---: |"]
    for contender in contenders:
        get = {key: samples.get((key, contender.name), [0.0])
               for key in ("first", "first_cpu", "second")}
        lines.append(f"| {contender.name} | {summary(get['first'], '.0f')} | "
                     f"{summary(get['first_cpu'], '.2f')} | {summary(get['second'], '.0f')} |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"{args.mib} MiB, median (min..max) of {args.reps}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
