"""A cold stream's CPU per run as stacked bars (SVG by hand): ``coldcpu.py``'s JSON lines.

Usage: ``.venv/bin/python bench/deploy/coldcpu_plot.py RESULTS.jsonl OUT.svg
[--tar SECONDS] [--title TEXT]``

One bar per run (origin CPU below, replica CPU above), in the order run; ``--tar`` draws
the CPU of ``tar -cf - . | tar -xf -`` of the same tree as a line to compare with.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from xml.sax.saxutils import escape

COLORS = {"origin": "#1f77b4", "replica": "#ff7f0e"}
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 640, 360, 60, 60, 40


def render(runs: list[dict[str, object]], tar: float | None, title: str) -> str:
    totals = [float(r["origin_cpu"]) + float(r["replica_cpu"]) for r in runs]  # type: ignore[arg-type]
    top = max([*totals, tar or 0.0]) * 1.15
    plot_h = HEIGHT - BOTTOM - TOP
    step = (WIDTH - LEFT - 20) / max(len(runs), 1)

    def y(value: float) -> float:
        return HEIGHT - BOTTOM - value / top * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="14">'
           f'{escape(title)}</text>',
           f'<line x1="{LEFT}" y1="{y(0)}" x2="{WIDTH - 20}" y2="{y(0)}" stroke="black"/>',
           f'<line x1="{LEFT}" y1="{y(0)}" x2="{LEFT}" y2="{TOP}" stroke="black"/>',
           f'<text x="16" y="{TOP + plot_h / 2}" transform="rotate(-90 16 {TOP + plot_h / 2})" '
           'text-anchor="middle">CPU seconds (user + system, both daemons)</text>']
    tick = 1.0 if top < 12 else 2.0
    value = 0.0
    while value <= top:
        out.append(f'<text x="{LEFT - 6}" y="{y(value) + 4}" text-anchor="end">{value:g}</text>')
        out.append(f'<line x1="{LEFT}" y1="{y(value)}" x2="{WIDTH - 20}" y2="{y(value)}" '
                   'stroke="#ddd"/>')
        value += tick
    for index, run in enumerate(runs):
        x = LEFT + index * step + step * 0.2
        width = step * 0.6
        origin, replica = float(run["origin_cpu"]), float(run["replica_cpu"])  # type: ignore[arg-type]
        for base, part, key in ((0.0, origin, "origin"), (origin, replica, "replica")):
            out.append(f'<rect x="{x:.1f}" y="{y(base + part):.1f}" width="{width:.1f}" '
                       f'height="{y(base) - y(base + part):.1f}" fill="{COLORS[key]}"/>')
        out.append(f'<text x="{x + width / 2:.1f}" y="{y(origin + replica) - 4:.1f}" '
                   f'text-anchor="middle">{origin + replica:.1f}</text>')
        out.append(f'<text x="{x + width / 2:.1f}" y="{HEIGHT - BOTTOM + 16}" '
                   f'text-anchor="middle">{escape(str(run["release"]))}</text>')
    if tar is not None:
        out.append(f'<line x1="{LEFT}" y1="{y(tar):.1f}" x2="{WIDTH - 20}" y2="{y(tar):.1f}" '
                   'stroke="#2ca02c" stroke-dasharray="6 4" stroke-width="2"/>')
        out.append(f'<text x="{WIDTH - 24}" y="{y(tar) - 6:.1f}" text-anchor="end" '
                   f'fill="#2ca02c">tar | tar: {tar:.2f} s</text>')
    for index, (key, color) in enumerate(COLORS.items()):
        lx = LEFT + 10 + index * 140
        out.append(f'<rect x="{lx}" y="{HEIGHT - 24}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{lx + 18}" y="{HEIGHT - 14}">{key} daemon</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tar", type=float)
    parser.add_argument("--title", default="A cold stream of the 1 GB set: CPU per run")
    args = parser.parse_args()
    runs = [r for r in (json.loads(line) for line in args.results.read_text().splitlines()
                        if line.strip()) if "origin_cpu" in r]  # (not the journal lines)
    args.out.write_text(render(runs, args.tar, args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
