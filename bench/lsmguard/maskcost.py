#!/usr/bin/env python3
"""What a login or job start pays for its mask on the ext4 image (Linux < 6.6) against the
tmpfs (sdeefs/fs/mask.py), side by side, on this machine.

Usage (root)::

    .venv/bin/python bench/lsmguard/maskcost.py [--rounds N] [--spec login|small]

Each round builds the mask twice, once on each backing, alternating which goes first,
then unmounts it as a teardown does (``view.detach``): the same spec, the same lower
(``/``).  ``login``: the spec a login or job mask has here (the default deny list, the
environment's mountpoints and the cached scan of root-only host entries: thousands of
whiteouts); ``small``: the always-emptied directories only, the fixed cost of each
backing.  Printed per backing: median wall seconds of build + teardown, and the CPU
seconds of this process plus its children (mount, mkfs.ext4, umount) per round.  The
tmpfs is the baseline: it is what a kernel with user xattrs on tmpfs builds.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launcher import view  # noqa: E402
from sdeefs.config import SiteConfig  # noqa: E402
from sdeefs.fs import mask  # noqa: E402
from sdeefs.fs.mask import MaskBacking, MaskSpec  # noqa: E402


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def one(target: str, spec: MaskSpec, backing: MaskBacking) -> tuple[float, float]:
    os.environ[mask.BACKING_ENV] = backing.value
    cpu, wall = cpu_seconds(), time.monotonic()
    assert mask.build_mask(target, "/", spec, view.MASK_OPAQUE)
    view.detach(target)
    return time.monotonic() - wall, cpu_seconds() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--spec", choices=("login", "small"), default="login")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdeefs-maskcost-") as work:
        if args.spec == "login":
            config = SiteConfig(run_dir=work)
            user = view.User("maskcost", 60999, 60999, "/home/maskcost")
            spec = view.mask_spec(config, user)
        else:
            spec = MaskSpec(empty_dirs=tuple(os.fsencode(p.lstrip("/"))
                                             for p in view.ALWAYS_EMPTY))
        print(f"spec {args.spec}: {len(spec.empty_dirs)} emptied, {len(spec.hidden)} hidden, "
              f"{len(spec.mountpoints)} mountpoints")
        target = os.path.join(work, "mask")
        times: dict[MaskBacking, list[tuple[float, float]]] = {b: [] for b in MaskBacking}
        for round_no in range(args.rounds):
            order = list(MaskBacking) if round_no % 2 == 0 else list(reversed(MaskBacking))
            for backing in order:
                times[backing].append(one(target, spec, backing))
    base_wall = statistics.median(w for w, _ in times[MaskBacking.TMPFS])
    base_cpu = statistics.median(c for _, c in times[MaskBacking.TMPFS])
    print("| backing | wall median s | wall min s | CPU median s | wall / tmpfs | CPU / tmpfs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for backing, rows in times.items():
        wall = statistics.median(w for w, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        print(f"| {backing.value} | {wall:.3f} | {min(w for w, _ in rows):.3f} | {cpu:.3f} | "
              f"{wall / base_wall:.2f}x | {cpu / base_cpu:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
