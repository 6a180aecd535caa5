#!/usr/bin/env python3
"""Figures of bench/jobs, SVG by hand (no plotting library): overhead per benchmark.

``plot.py RESULTS.json OUT.svg`` writes OUT.svg (overhead of each contender over bare per
benchmark: the median as a bar, min-max as a whisker, in % of time: throughput metrics
are turned into time as bare/contender - 1) and OUT-steps.svg (ms per job step), and
prints the Markdown table of bench/RESULTS.md.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from xml.sax.saxutils import escape

PALETTE = {"sdeefs": "#1f77b4", "ch-run": "#ff7f0e", "podman": "#2ca02c",
           "sdeefs-run": "#9467bd", "bare": "#7f7f7f"}
# the benchmark keys shown, in order, with a label (all are higher-is-better throughputs)
SHOWN = [("sysbench_eps", "sysbench cpu"), ("hpcc1_HPL_Tflops", "HPL 1 rank"),
         ("hpcc1_SingleDGEMM_Gflops", "DGEMM"), ("hpcc1_SingleSTREAM_Triad", "STREAM triad"),
         ("hpcc1_SingleRandomAccess_GUPs", "RandomAccess"), ("hpcc1_SingleFFT_Gflops", "FFT"),
         ("hpcc2_HPL_Tflops", "HPL 2 ranks/2 nodes"), ("hpcc2_MPIFFT_Gflops", "MPI FFT 2 nodes"),
         ("fio_read_kbs", "fio read"), ("fio_write_kbs", "fio write"),
         ("fio_randread_kbs", "fio randread"), ("fio_randwrite_kbs", "fio randwrite"),
         ("fio_rw_kbs", "fio rw"), ("fio_randrw_kbs", "fio randrw")]


def overheads(raw: dict[str, dict[str, list[float]]], name: str, key: str
              ) -> tuple[float, float, float] | None:
    """(median, best, worst) time overhead in % of ``name`` over bare for ``key``."""
    bare, mine = raw.get("bare", {}).get(key), raw.get(name, {}).get(key)
    if not bare or not mine or min(mine) <= 0:
        return None
    base = statistics.median(bare)
    return tuple(100 * (base / v - 1) for v in (statistics.median(mine), max(mine), min(mine)))  # type: ignore[return-value]


def bars(raw: dict[str, dict[str, list[float]]], names: list[str], out: Path,
         shown: list[tuple[str, str]] = SHOWN,
         title: str = "Job overhead over bare srun, % of time") -> None:
    rows = [(k, label) for k, label in shown if any(overheads(raw, n, k) for n in names)]
    values = [o for k, _ in rows for n in names if (o := overheads(raw, n, k))]
    lo = min([-5.0, *(v[1] for v in values)])
    hi = max([5.0, *(v[2] for v in values)])
    hi = min(hi, 200.0)
    left, width, bar, gap = 230, 520, 9, 8
    height = 60 + len(rows) * (len(names) * bar + gap) + 40

    def x(v: float) -> float:
        return left + (min(max(v, lo), hi) - lo) / (hi - lo) * width

    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 40}" '
           f'height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="18" font-size="13">{escape(title)} '
           '(bar: median, whisker: min-max over rounds)</text>']
    for tick in range(int(lo // 10) * 10, int(hi) + 1, 10 if hi - lo < 120 else 25):
        if tick < lo:
            continue
        svg.append(f'<line x1="{x(tick):.1f}" y1="30" x2="{x(tick):.1f}" y2="{height - 35}" '
                   f'stroke="{"#000" if tick == 0 else "#ddd"}"/>')
        svg.append(f'<text x="{x(tick):.1f}" y="{height - 22}" text-anchor="middle">'
                   f'{tick}%</text>')
    y = 40
    for key, label in rows:
        svg.append(f'<text x="{left - 6}" y="{y + len(names) * bar / 2 + 4:.1f}" '
                   f'text-anchor="end">{escape(label)}</text>')
        for n in names:
            o = overheads(raw, n, key)
            if o is not None:
                med, best, worst = o
                x0, x1 = sorted((x(0), x(med)))
                svg.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1):.1f}" '
                           f'height="{bar - 1}" fill="{PALETTE.get(n, "#333")}"/>')
                svg.append(f'<line x1="{x(best):.1f}" y1="{y + bar / 2:.1f}" x2="{x(worst):.1f}" '
                           f'y2="{y + bar / 2:.1f}" stroke="#000"/>')
            y += bar
        y += gap
    for i, n in enumerate(names):
        svg.append(f'<rect x="{left + i * 110}" y="{height - 14}" width="10" height="10" '
                   f'fill="{PALETTE.get(n, "#333")}"/><text x="{left + i * 110 + 14}" '
                   f'y="{height - 5}">{escape(n)}</text>')
    svg.append("</svg>")
    out.write_text("\n".join(svg))


def steps(raw: dict[str, dict[str, list[float]]], out: Path) -> None:
    names = [n for n in raw if raw[n].get("step_ms")]
    top = max(max(raw[n]["step_ms"]) for n in names) * 1.1
    left, width, bar = 110, 480, 22
    height = 50 + len(names) * (bar + 6) + 30
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" '
           f'height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="18" font-size="13">Per job step: srun -N1 -n1 [prefix] '
           '/bin/true, ms (median, min-max)</text>']
    y = 34
    for n in names:
        v = raw[n]["step_ms"]
        med = statistics.median(v)
        svg.append(f'<text x="{left - 6}" y="{y + bar / 2 + 4}" text-anchor="end">'
                   f'{escape(n)}</text>')
        svg.append(f'<rect x="{left}" y="{y}" width="{med / top * width:.1f}" height="{bar}" '
                   f'fill="{PALETTE.get(n, "#333")}"/>')
        svg.append(f'<line x1="{left + min(v) / top * width:.1f}" y1="{y + bar / 2}" '
                   f'x2="{left + max(v) / top * width:.1f}" y2="{y + bar / 2}" stroke="#000"/>')
        svg.append(f'<text x="{left + max(v) / top * width + 6:.1f}" y="{y + bar / 2 + 4}">'
                   f'{med:.0f} ms</text>')
        y += bar + 6
    svg.append("</svg>")
    out.write_text("\n".join(svg))


def table(raw: dict[str, dict[str, list[float]]], names: list[str],
          shown: list[tuple[str, str]] = SHOWN) -> str:
    """Bare's median, and each contender's median overhead [best, worst] in % of time."""
    head = ["benchmark", "bare (median)", *names]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    steps = raw.get("bare", {}).get("step_ms")
    if steps:
        cells = [f"{statistics.median(raw[n]['step_ms']):.0f} ms "
                 f"[{min(raw[n]['step_ms']):.0f}–{max(raw[n]['step_ms']):.0f}]"
                 if raw.get(n, {}).get("step_ms") else "–" for n in names]
        lines.append(f"| job step (srun, /bin/true) | {statistics.median(steps):.0f} ms | "
                     + " | ".join(cells) + " |")
    for key, label in shown:
        bare = raw.get("bare", {}).get(key)
        if not bare:
            continue
        cells = []
        for n in names:
            o = overheads(raw, n, key)
            cells.append(f"{o[0]:+.1f} % [{o[1]:+.0f}, {o[2]:+.0f}]" if o else "–")
        lines.append(f"| {label} | {statistics.median(bare):.4g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    data = json.loads(Path(argv[0]).read_text())
    raw = data["raw"]
    out = Path(argv[1])
    names = [n for n in data["contenders"] if n != "bare" and n in raw]
    bars(raw, names, out)
    if any(raw[n].get("step_ms") for n in raw):  # runs before bench/jobs/steps.py
        steps(raw, out.with_name(out.stem + "-steps.svg"))
    print(table(raw, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
