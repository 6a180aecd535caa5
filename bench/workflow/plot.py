#!/usr/bin/env python3
"""Figure and table of bench/workflow, SVG by hand (no plotting library, as bench/jobs).

``plot.py RESULTS.json OUT.svg`` writes OUT.svg: per shape (chain of jobs, steps of one
job), each contender's makespan (bar: median over rounds, whisker: min-max) split into
the time spent waiting between stages (scheduling, prolog/epilog, light) and the rest
(tasks running, dark); a dashed line at bare's median + 5 % (the issue's goal); and
beside it the median task wall (srun to its return) with the program's own time inside.
It prints the Markdown table of bench/RESULTS.md.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

PALETTE = {"sdeefs": "#1f77b4", "bare": "#7f7f7f", "ch-run": "#ff7f0e", "podman": "#2ca02c"}
LIGHT = {"sdeefs": "#aec7e8", "bare": "#c7c7c7", "ch-run": "#ffbb78", "podman": "#98df8a"}
SHAPE_LABEL = {"chain": "chain of 4 jobs (afterok)", "steps": "one job, steps"}


def _runs(data: dict[str, Any], shape: str, name: str) -> list[dict[str, Any]]:
    return [r for r in data["runs"] if r["shape"] == shape and r["contender"] == name]


def svg(data: dict[str, Any]) -> str:
    names = [n for n in data["contenders"] if any(r["contender"] == n for r in data["runs"])]
    shapes = [s for s in data["shapes"] if any(r["shape"] == s for r in data["runs"])]
    top = max(r["makespan"] for r in data["runs"]) * 1.08
    walls = {(s, n): statistics.median(w for r in _runs(data, s, n) for w in r["task_wall"])
             for s in shapes for n in names if _runs(data, s, n)}
    progs = {(s, n): statistics.median(w for r in _runs(data, s, n) for w in r["task_program"])
             for s in shapes for n in names if _runs(data, s, n)}
    wall_top = max(walls.values()) * 1.15
    left, width, gap_x, width2, bar = 150, 430, 60, 230, 16
    height = 70 + len(shapes) * (len(names) * (bar + 4) + 30) + 40
    x2 = left + width + gap_x
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{x2 + width2 + 60}" '
           f'height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="10" y="18" font-size="13">bench/workflow: 4 stages x '
           f'{data["tasks_per_stage"]} tasks through SLURM (2 nodes); makespan, s '
           '(median, min-max over rounds)</text>',
           f'<text x="{left}" y="38">makespan (light: waiting between stages; dashed: '
           'bare + 5 %)</text>',
           f'<text x="{x2}" y="38">task wall, ms (dark: the program itself)</text>']
    y = 50
    for shape in shapes:
        out.append(f'<text x="10" y="{y + 10}" font-weight="bold">'
                   f'{escape(SHAPE_LABEL.get(shape, shape))}</text>')
        y += 16
        bare = _runs(data, shape, "bare")
        first = y
        for n in names:
            runs = _runs(data, shape, n)
            if not runs:
                continue
            spans = [r["makespan"] for r in runs]
            med = statistics.median(spans)
            wait = statistics.median(sum(r["waits"]) for r in runs)

            def x(v: float) -> float:
                return left + v / top * width

            out.append(f'<text x="{left - 6}" y="{y + bar - 4}" text-anchor="end">'
                       f'{escape(n)}</text>')
            out.append(f'<rect x="{left}" y="{y}" width="{x(med) - left:.1f}" height="{bar}" '
                       f'fill="{PALETTE.get(n, "#333")}"/>')
            out.append(f'<rect x="{left}" y="{y}" width="{x(min(wait, med)) - left:.1f}" '
                       f'height="{bar}" fill="{LIGHT.get(n, "#ccc")}"/>')
            out.append(f'<line x1="{x(min(spans)):.1f}" y1="{y + bar / 2}" '
                       f'x2="{x(max(spans)):.1f}" y2="{y + bar / 2}" stroke="#000"/>')
            out.append(f'<text x="{x(max(spans)) + 5:.1f}" y="{y + bar - 4}">{med:.1f} s'
                       '</text>')
            wall, prog = walls[(shape, n)], progs[(shape, n)]
            out.append(f'<rect x="{x2}" y="{y}" width="{wall / wall_top * width2:.1f}" '
                       f'height="{bar}" fill="{LIGHT.get(n, "#ccc")}"/>')
            out.append(f'<rect x="{x2}" y="{y + 4}" width="{prog / wall_top * width2:.1f}" '
                       f'height="{bar - 8}" fill="{PALETTE.get(n, "#333")}"/>')
            out.append(f'<text x="{x2 + wall / wall_top * width2 + 5:.1f}" y="{y + bar - 4}">'
                       f'{wall * 1000:.0f}</text>')
            y += bar + 4
        if bare:
            goal = left + statistics.median(r["makespan"] for r in bare) * 1.05 / top * width
            out.append(f'<line x1="{goal:.1f}" y1="{first - 3}" x2="{goal:.1f}" y2="{y}" '
                       'stroke="#d62728" stroke-dasharray="4,3"/>')
        y += 14
    for tick in range(0, int(top) + 1, max(1, int(top / 8))):
        xt = left + tick / top * width
        out.append(f'<line x1="{xt:.1f}" y1="{y}" x2="{xt:.1f}" y2="{y + 4}" stroke="#000"/>'
                   f'<text x="{xt:.1f}" y="{y + 16}" text-anchor="middle">{tick}</text>')
    out.append(f'<line x1="{left}" y1="{y}" x2="{left + width}" y2="{y}" stroke="#000"/>')
    out.append("</svg>")
    return "\n".join(out)


def table(data: dict[str, Any]) -> str:
    lines = ["| shape | contender | makespan s, median [min–max] | vs bare | sdeefs shorter by "
             "| waiting between stages s | task wall ms (median) | over bare ms | program ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, rows in data["summary"].items():
        for name, row in rows.items():
            m = row["makespan"]
            shorter = ("" if name == "sdeefs" or "sdeefs" not in rows else
                       f"{100 * (1 - rows['sdeefs']['makespan']['median'] / m['median']):.0f} %")
            lines.append(
                f"| {shape} | {name} | {m['median']:.2f} [{m['min']:.2f}–{m['max']:.2f}] | "
                f"{row.get('makespan_vs_bare', float('nan')):.3f} | {shorter} | "
                f"{row['waits']['median']:.2f} | {row['task_wall'] * 1000:.0f} | "
                f"{row.get('task_overhead_s', float('nan')) * 1000:+.0f} | "
                f"{row['task_program'] * 1000:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: plot.py RESULTS.json OUT.svg", file=sys.stderr)
        return 2
    data = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(svg(data))
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
