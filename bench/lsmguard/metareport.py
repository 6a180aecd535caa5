#!/usr/bin/env python3
"""Tables and a figure from ``vm.py meta`` runs (bench/lsmguard/metaguest.py's META-JSON).

Usage::

    python3 bench/lsmguard/metareport.py --out bench/out/lsmmeasure \\
        --run "6.12, icount=LOG" [--run "LABEL=LOG" ...] [--svg-runs "LABEL;LABEL"]

Writes OUT.md (per run: each walk's median, min-max and the ratios to the plain overlay's
median; the spread of the samples, as a check of the clock's determinism), OUT.json (the
runs' raw samples) and OUT.svg (the ratios of the runs named by --svg-runs, default all;
time / plain overlay's, log scale, the goals of issue 16 as lines: first pass <= 2x,
repeated <= 1.1x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.install import plot  # noqa: E402

CONTENDERS = {
    "overlay": "plain overlay",
    "bpf": "login view, BPF guard (guard=bpf)",
    "bpf-off": "same stack, program detached",
    "c": "login view, FUSE guard (guard=c)",
    "bpf-nodeny": "BPF guard, empty deny list",
    "overlay-attached": "plain overlay, program attached (host task)",
}
OPS = {"find": "find + lstat", "ls": "ls -R", "stat": "stat of every path"}
COLORS = {"bpf": "#1f77b4", "bpf-off": "#2ca02c", "c": "#ff7f0e", "bpf-nodeny": "#9467bd",
          "overlay-attached": "#8c564b"}


def load(log: Path) -> dict[str, Any]:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("META-JSON "):
            return json.loads(line[len("META-JSON "):])  # type: ignore[no-any-return]
    raise SystemExit(f"metareport: no META-JSON line in {log}")


def ms(ns: float) -> str:
    return f"{ns / 1e6:.1f}"


def spread(values: list[int]) -> str:
    return f"{(max(values) - min(values)) / statistics.median(values) * 100:.2f} %"


def table(run: dict[str, Any]) -> list[str]:
    samples = run["samples"]
    present = [c for c in CONTENDERS if c in samples]
    others = [c for c in present if c != "overlay"]
    head = (["walk", "pass"] + [f"{c} ms" for c in present]
            + [f"{c} / overlay" for c in others] + ["spread (max-min)/median"])
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * (
        len(head) - 2)) + " |"]
    for op in OPS:
        for kind in ("first", "repeated"):
            base = statistics.median(samples["overlay"][op][kind])
            cells = [OPS[op], kind]
            worst = []
            for c in present:
                values = samples[c][op][kind]
                cells.append(f"{ms(statistics.median(values))} ({ms(min(values))}–"
                             f"{ms(max(values))})")
                worst.append(f"{c} {spread(values)}")
            for c in others:
                ratio = statistics.median(samples[c][op][kind]) / base
                cells.append(f"**{ratio:.2f}x**")
            cells.append(", ".join(worst))
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--run", action="append", required=True, help="LABEL=LOG")
    parser.add_argument("--svg-runs", default="")
    args = parser.parse_args()
    runs = {}
    for spec in args.run:
        label, _, log = spec.partition("=")
        runs[label] = load(Path(log))
    md = []
    for label, run in runs.items():
        per_instruction = run.get("spin_ns_per_instruction", float("nan"))
        entries = {c: v for c, v in run["entries"].items()}
        md += [f"### {label}", "",
               f"Kernel {run['kernel']}, clocksource {run['clocksource']}, "
               f"{run['rounds']} rounds (one first pass and {run['repeats']} repeated passes "
               f"each: medians of {run['rounds']} and {run['rounds'] * run['repeats']}); "
               f"entries seen: {entries}; the disk's reads + writes during each walk's timed "
               "passes (in a view, where /sys is not: during the walker's whole run): "
               f"{run['disk_reads']}; clock check: {per_instruction:.4f} ns "
               f"per instruction of a counted loop; bpf_jit_enable {run.get('bpf_jit_enable')}.",
               "", *table(run), ""]
        startup = {c: {op: f"{ms(statistics.median(v))}" for op, v in ops.items()}
                   for c, ops in run["startup"].items()}
        md += [f"The tool's own start (the same command in an empty directory, ms): {startup}",
               ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(md))
    args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    chosen = [r for r in args.svg_runs.split(";") if r] or list(runs)
    groups = []
    for label in chosen:
        samples = runs[label]["samples"]
        for op in OPS:
            for kind in ("first", "repeated"):
                base = statistics.median(samples["overlay"][op][kind])
                bars = [plot.Bar(CONTENDERS[c], statistics.median(samples[c][op][kind]) / base,
                                 statistics.median(samples[c][op][kind]) / 1e9)
                        for c in COLORS if c in samples]
                short = {"find": "find", "ls": "ls -R", "stat": "stat"}[op]
                groups.append(plot.Group(f"{label}: {short}, {kind}", bars))
    chart = plot.BarChart(
        title="Metadata walks through the login view vs plain overlayfs (issue 16)",
        subtitle="Debian 12's kernels under qemu; bench/install's tree (11,644 entries); "
                 "medians; bar = time / plain overlay's",
        axis_label="time / plain kernel overlayfs (log scale; shorter is better)",
        groups=groups, colors={CONTENDERS[c]: COLORS[c] for c in COLORS},
        goals=(plot.GoalLine(2.0, "first pass goal 2x"),
               plot.GoalLine(1.1, "repeated goal 1.1x", "#9467bd")))
    plot.write_svg(args.out.with_suffix(".svg"), chart)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
