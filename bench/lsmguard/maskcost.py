#!/usr/bin/env python3
"""What a login or job start pays for its mask on the ext4 image (Linux < 6.6) against the
tmpfs (sdeefs/fs/mask.py), side by side, on this machine.

Usage (root)::

    .venv/bin/python bench/lsmguard/maskcost.py [--rounds N] [--svg bench/out/FILE.svg]

For each of two specs, each round builds the mask twice, once on each backing,
alternating which goes first, then unmounts it as a teardown does (``view.detach``): the
same spec, the same lower (``/``).  ``login``: the spec a login or job mask has here (the
default deny list, the environment's mountpoints and the cached scan of root-only host
entries: a whiteout each, ~320 on this VM, thousands on a busy host);
``small``: the always-emptied directories only, the fixed cost of each
backing.  Printed per backing: median wall seconds of build + teardown, and the CPU
seconds of this process plus its children (mount, mkfs.ext4, umount) per round (the
loop device's kernel worker is not counted).  The tmpfs is the baseline: it is what a
kernel with user xattrs on tmpfs builds.  ``--svg``: the medians and minima as bars.
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


Times = dict[MaskBacking, list[tuple[float, float]]]


def spec_named(name: str, work: str) -> MaskSpec:
    if name == "login":
        config = SiteConfig(run_dir=work)
        return view.mask_spec(config, view.User("maskcost", 60999, 60999, "/home/maskcost"))
    return MaskSpec(empty_dirs=tuple(os.fsencode(p.lstrip("/")) for p in view.ALWAYS_EMPTY))


def measure(spec: MaskSpec, rounds: int, work: str) -> Times:
    target = os.path.join(work, "mask")
    times: Times = {b: [] for b in MaskBacking}
    for round_no in range(rounds):
        order = list(MaskBacking) if round_no % 2 == 0 else list(reversed(MaskBacking))
        for backing in order:
            times[backing].append(one(target, spec, backing))
    return times


def table(times: Times) -> str:
    base_wall = statistics.median(w for w, _ in times[MaskBacking.TMPFS])
    base_cpu = statistics.median(c for _, c in times[MaskBacking.TMPFS])
    rows = ["| backing | wall median s | wall min s | CPU median s | wall / tmpfs | CPU / tmpfs |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for backing, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        rows.append(f"| {backing.value} | {wall:.3f} | {min(w for w, _ in runs):.3f} | "
                    f"{cpu:.3f} | {wall / base_wall:.2f}x | {cpu / base_cpu:.2f}x |")
    return "\n".join(rows)


def svg(results: dict[str, Times], title: str) -> str:
    """Grouped bars: per spec, the median wall ms of each backing (its minimum as a tick)."""
    width, height, left, bottom, top = 560, 300, 60, 40, 40
    peak = max(statistics.median(w for w, _ in runs) for times in results.values()
               for runs in times.values()) * 1000 * 1.15
    colours = {MaskBacking.TMPFS: "#4c78a8", MaskBacking.IMAGE: "#e45756"}
    plot_h = height - bottom - top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="12">',
             f'<text x="{width / 2}" y="20" text-anchor="middle">{title}</text>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" '
             f'y2="{height - bottom}" stroke="black"/>',
             f'<text x="15" y="{top + plot_h / 2}" transform="rotate(-90 15 {top + plot_h / 2})"'
             ' text-anchor="middle">build + unmount, ms (median; tick: min)</text>']
    group_w = (width - left - 20) / len(results)
    for g, (name, times) in enumerate(results.items()):
        x0 = left + 10 + g * group_w
        for b, backing in enumerate(MaskBacking):
            runs = times[backing]
            ms = statistics.median(w for w, _ in runs) * 1000
            low = min(w for w, _ in runs) * 1000
            bar_h = plot_h * ms / peak
            x = x0 + b * (group_w / 2 - 10)
            y = height - bottom - bar_h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{group_w / 2 - 20:.1f}" '
                         f'height="{bar_h:.1f}" fill="{colours[backing]}"/>')
            ly = height - bottom - plot_h * low / peak
            parts.append(f'<line x1="{x:.1f}" y1="{ly:.1f}" x2="{x + group_w / 2 - 20:.1f}" '
                         f'y2="{ly:.1f}" stroke="black" stroke-width="2"/>')
            parts.append(f'<text x="{x + (group_w / 2 - 20) / 2:.1f}" y="{y - 4:.1f}" '
                         f'text-anchor="middle">{backing.value} {ms:.0f}</text>')
        parts.append(f'<text x="{x0 + group_w / 2 - 10:.1f}" y="{height - bottom + 18}" '
                     f'text-anchor="middle">spec {name}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--svg", type=Path, help="write the bars here")
    args = parser.parse_args()
    results: dict[str, Times] = {}
    with tempfile.TemporaryDirectory(prefix="sdeefs-maskcost-") as work:
        for name in ("login", "small"):
            spec = spec_named(name, work)
            print(f"spec {name}: {len(spec.empty_dirs)} emptied, {len(spec.hidden)} hidden, "
                  f"{len(spec.mountpoints)} mountpoints")
            results[name] = measure(spec, args.rounds, work)
            print(table(results[name]))
    if args.svg:
        args.svg.write_text(svg(results, f"the mask on tmpfs vs on its ext4 image, "
                                          f"{args.rounds} rounds"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
