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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.deploy.whiskers import whisker_svg  # noqa: E402 - after the path is set

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
    colours = ["#d62728" if "main" in b[0] or "BLAKE2b" in b[0] else "#1f77b4" for b in bars]
    chart = whisker_svg("CPU seconds per GiB (median, min..max)",
                        [(*b, colour) for b, colour in zip(bars, colours, strict=True)],
                        width=WIDTH, left=LEFT, bar=BAR, gap=GAP, top=TOP)
    with open(args.out, "w") as f:
        f.write(chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
