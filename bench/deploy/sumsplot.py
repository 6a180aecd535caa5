"""Bars (median, min..max whisker) of the block sums' CPU per GiB: an SVG for RESULTS.md.

Usage: ``.venv/bin/python bench/deploy/sumsplot.py DRAIN.jsonl... --speed SPEED.jsonl
--out OUT.svg``: the capture process's CPU per GiB read over a 1G install (``colddrain.py``
A/B output: a ``release`` line before each run) and each function's CPU per GiB of sums
(``sumspeed.py`` output).
"""

from __future__ import annotations

import argparse
import json
import statistics

WIDTH, BAR, GAP, LEFT, TOP = 640, 26, 14, 250, 40


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("drain", nargs="+")
    parser.add_argument("--speed", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    runs: dict[str, list[float]] = {}
    for path in args.drain:
        release = ""
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if "release" in row:
                    release = row["release"]
                else:
                    runs.setdefault(release, []).append(
                        row["capture_cpu"] / (row["capture_read_bytes"] / 2**30))
    names = {"sumsfast-base": "capture, 1G install: main (libsodium BLAKE2b)",
             "sumsfast": "capture, 1G install: sumsfast (BLAKE3)"}
    bars = [(names.get(k, k), statistics.median(v), min(v), max(v)) for k, v in runs.items()]
    with open(args.speed) as f:
        for line in f:
            row = json.loads(line)
            if "cpu_s_per_gib" in row:
                value = row["cpu_s_per_gib"]
                bars.append((f"sums alone: {row['contender']}", value, value, value))
    top = max(b[3] for b in bars) * 1.1
    height = TOP + len(bars) * (BAR + GAP) + 30
    scale = (WIDTH - LEFT - 60) / top
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           '<text x="10" y="20" font-size="14">CPU seconds per GiB (median, min..max)'
           '</text>']
    for i, (name, median, low, high) in enumerate(bars):
        y = TOP + i * (BAR + GAP)
        colour = "#d62728" if "main" in name or "BLAKE2b" in name else "#1f77b4"
        out.append(f'<text x="{LEFT - 6}" y="{y + BAR / 2 + 4}" text-anchor="end">'
                   f'{name}</text>')
        out.append(f'<rect x="{LEFT}" y="{y}" width="{median * scale:.1f}" height="{BAR}" '
                   f'fill="{colour}"/>')
        if high > low:
            out.append(f'<line x1="{LEFT + low * scale:.1f}" x2="{LEFT + high * scale:.1f}" '
                       f'y1="{y + BAR / 2}" y2="{y + BAR / 2}" stroke="black"/>')
        out.append(f'<text x="{LEFT + high * scale + 6:.1f}" y="{y + BAR / 2 + 4}">'
                   f'{median:.2f}</text>')
    out.append("</svg>")
    with open(args.out, "w") as f:
        f.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
