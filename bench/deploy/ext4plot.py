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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.deploy.whiskers import whisker_svg  # noqa: E402 - after the path is set

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
    chart = whisker_svg("Writing the 2G data set into the loop ext4: CPU seconds "
                        "(median, min..max)",
                        [(name, median, low, high, "#d62728" if cold else "#1f77b4")
                         for name, median, low, high, cold in bars],
                        width=WIDTH, left=LEFT, bar=BAR, gap=GAP, top=TOP)
    with open(args.out, "w") as f:
        f.write(chart)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
