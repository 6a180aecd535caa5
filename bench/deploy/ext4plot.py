"""Bars (median, min..max whisker) of a writer's CPU into the compute fs: an SVG for RESULTS.md.

Usage: ``.venv/bin/python bench/deploy/ext4plot.py EXT4WRITE.jsonl [--coldcpu COLDCPU.jsonl]...
--out OUT.svg``: the writer's system CPU per pattern and memory state (``ext4write.py``
output: one bar per pattern and ``settle``), and, with ``--coldcpu``, the replica daemon's
CPU per memory state (``coldcpu.py --settle`` output, a ``settle`` field added per line, and
a ``pattern`` naming the release if there are several).
Blue: memory freed just before the write; red: free for 15 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
from xml.sax.saxutils import escape

WIDTH, BAR, GAP, LEFT, TOP = 700, 22, 10, 300, 40


def bars_of(path: str, key: str, label: str) -> list[tuple[str, float, float, float, bool]]:
    """(name, median, min, max, cold) per (pattern, settle) of a JSON-lines file."""
    groups: dict[tuple[str, float], list[float]] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if key not in row:
                continue
            name = row.get("pattern", label)
            groups.setdefault((name, float(row["settle"])), []).append(float(row[key]))
    out = []
    for (name, settle), values in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1])):
        state = "freed just before" if settle == 0 else f"free {settle:.0f} s"
        out.append((f"{name}, {state}", statistics.median(values), min(values), max(values),
                    settle > 0))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ext4write")
    parser.add_argument("--coldcpu", action="append", default=[])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    bars = bars_of(args.ext4write, "sys", "")
    for path in args.coldcpu:
        bars += bars_of(path, "replica_cpu", "replica daemon, 2G cold stream (all CPU)")
    top = max(b[3] for b in bars) * 1.1
    height = TOP + len(bars) * (BAR + GAP) + 30
    scale = (WIDTH - LEFT - 60) / top
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           '<text x="10" y="20" font-size="14">Writing the 2G data set into the loop ext4: '
           'CPU seconds (median, min..max)</text>']
    for i, (name, median, low, high, cold) in enumerate(bars):
        y = TOP + i * (BAR + GAP)
        colour = "#d62728" if cold else "#1f77b4"
        out.append(f'<text x="{LEFT - 6}" y="{y + BAR / 2 + 4}" text-anchor="end">'
                   f'{escape(name)}</text>')
        out.append(f'<rect x="{LEFT}" y="{y}" width="{median * scale:.1f}" height="{BAR}" '
                   f'fill="{colour}"/>')
        if high > low:
            out.append(f'<line x1="{LEFT + low * scale:.1f}" x2="{LEFT + high * scale:.1f}" '
                       f'y1="{y + BAR / 2}" y2="{y + BAR / 2}" stroke="black"/>')
        out.append(f'<text x="{LEFT + max(median, high) * scale + 4:.1f}" '
                   f'y="{y + BAR / 2 + 4}">{median:.2f}</text>')
    out.append("</svg>")
    with open(args.out, "w") as f:
        f.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
