"""sdeefs-cold-kernel against tar, run by run: one SVG dot plot of the speed ratio.

Usage::

    python3 bench/deploy/ratioplot.py OUT.svg GROUP=RUN.json [GROUP=RUN.json ...]

Each RUN.json is a ``bench/deploy/run.py`` report; every run gives one dot per upper size
(tar's median over sdeefs-cold-kernel's median: above 1, the stream is faster), placed
in the column of its GROUP (columns in the order first named).  The line at 1 is the
issue's bar (at least as fast as tar).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

WIDTH, HEIGHT, LEFT, TOP, BOTTOM = 760, 380, 60, 30, 70
COLOURS = {"1G": "#1f77b4", "2G": "#d62728"}
METHOD = "sdeefs-cold-kernel"


def ratios(path: Path) -> dict[str, float]:
    """size -> tar's median / the stream's median, for the sizes both ran."""
    medians: dict[tuple[str, str], float] = {}
    for result in json.loads(path.read_text())["results"]:
        if result["samples"]:
            medians[(result["size"], result["method"])] = statistics.median(
                s["seconds"] for s in result["samples"])
    return {size: medians[(size, "tar")] / medians[(size, METHOD)]
            for size, method in medians if method == METHOD and (size, "tar") in medians}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in arg for arg in argv[1:]):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    groups: dict[str, list[dict[str, float]]] = {}
    for arg in argv[1:]:
        group, _, path = arg.partition("=")
        groups.setdefault(group, []).append(ratios(Path(path)))
    top = max(1.6, max(r for runs in groups.values() for run in runs for r in run.values()))
    plot_w, plot_h = WIDTH - LEFT - 20, HEIGHT - TOP - BOTTOM

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             'font-family="sans-serif" font-size="12">',
             f'<text x="{LEFT}" y="18">cold stream vs tar over a socket: tar time / sdeefs '
             'time per run (above 1: sdeefs faster)</text>']
    for tick in [t / 10 for t in range(0, int(top * 10) + 1, 2)]:
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - 20}" y1="{y(tick):.1f}" '
                     f'y2="{y(tick):.1f}" stroke="{"#000" if tick == 1 else "#ddd"}"/>')
        parts.append(f'<text x="{LEFT - 8}" y="{y(tick) + 4:.1f}" text-anchor="end">'
                     f'{tick:.1f}</text>')
    column = plot_w / len(groups)
    for index, (group, runs) in enumerate(groups.items()):
        centre = LEFT + column * (index + 0.5)
        for line, text in enumerate(group.split("/")):
            parts.append(f'<text x="{centre:.1f}" y="{HEIGHT - BOTTOM + 18 + 14 * line}" '
                         f'text-anchor="middle">{text}</text>')
        for offset, size in ((-12, "1G"), (12, "2G")):
            for run in runs:
                if size in run:
                    parts.append(f'<circle cx="{centre + offset:.1f}" cy="{y(run[size]):.1f}" '
                                 f'r="4" fill="{COLOURS[size]}" fill-opacity="0.7"/>')
    for index, (size, colour) in enumerate(COLOURS.items()):
        parts.append(f'<circle cx="{WIDTH - 120 + 50 * index}" cy="{HEIGHT - 12}" r="4" '
                     f'fill="{colour}"/><text x="{WIDTH - 112 + 50 * index}" '
                     f'y="{HEIGHT - 8}">{size}</text>')
    parts.append("</svg>")
    Path(argv[0]).write_text("\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
