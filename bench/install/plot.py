"""Grouped horizontal bars written as SVG by hand (no plotting library), for ``run.py``.

One group per workload, one bar per contender; a bar's length is the contender's
speed relative to a reference (kernel overlayfs): reference time / contender time,
so longer is faster and 1 is the reference.  The axis is logarithmic because the
contenders span three decades (sdeefs' FUSE engines at ~0.01x, tmpfs above 1x), and
the goals of the issue are drawn as vertical lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

PALETTE = ("#7f7f7f", "#1f77b4", "#2ca02c", "#98df8a", "#ff7f0e", "#9467bd", "#8c564b",
           "#d62728", "#17becf", "#e377c2")


@dataclass(frozen=True)
class Bar:
    contender: str
    ratio: float  # reference time / contender time; > 1 is faster than the reference
    seconds: float  # the contender's median, printed beside the bar
    label: str = ""  # printed in place of the seconds if given (bench/fio: throughputs)


@dataclass(frozen=True)
class Group:
    label: str
    bars: Sequence[Bar]


@dataclass(frozen=True)
class GoalLine:
    ratio: float
    label: str
    color: str = "#d62728"


@dataclass(frozen=True)
class BarChart:
    title: str
    subtitle: str
    axis_label: str
    groups: Sequence[Group]
    colors: dict[str, str]
    goals: Sequence[GoalLine] = field(default_factory=tuple)


WIDTH = 1000
LEFT, RIGHT, TOP = 230, 140, 92
BAR_H, BAR_GAP, GROUP_GAP = 13, 2, 26
LEGEND_ROW = 20


def _bounds(values: Sequence[float]) -> tuple[int, int]:
    low = math.floor(math.log10(min(values)))
    high = math.ceil(math.log10(max(values)))
    return low, max(high, low + 1)


def _ratio_text(value: float) -> str:
    return f"{value:.3f}x" if value < 0.1 else f"{value:.2f}x"


def _seconds_text(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s" if value < 10 \
        else f"{value:.1f} s"


def _bar_text(bar: Bar) -> str:
    return bar.label or _seconds_text(bar.seconds)


def render(chart: BarChart) -> str:
    ratios = [bar.ratio for group in chart.groups for bar in group.bars if bar.ratio > 0]
    ratios += [goal.ratio for goal in chart.goals]
    low, high = _bounds(ratios or [0.1, 1.0])
    plot_w = WIDTH - LEFT - RIGHT
    legend = list(chart.colors)
    group_heights = [len(g.bars) * (BAR_H + BAR_GAP) for g in chart.groups]
    plot_h = sum(group_heights) + GROUP_GAP * (len(chart.groups) + 1)
    legend_rows = math.ceil(len(legend) / 4)
    height = TOP + plot_h + 50 + legend_rows * LEGEND_ROW + 20

    def px(ratio: float) -> float:
        return LEFT + (math.log10(ratio) - low) / (high - low) * plot_w

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Arial, sans-serif" '
        'font-size="11">',
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="20" y="26" font-size="16" font-weight="bold">{escape(chart.title)}</text>',
        f'<text x="20" y="46" fill="#555">{escape(chart.subtitle)}</text>',
    ]
    bottom = TOP + plot_h
    for decade in range(low, high + 1):
        for factor in (1, 2, 5):
            value = factor * 10.0**decade
            if decade == high and factor > 1:
                continue
            x = px(value)
            style = 'stroke="#ccc"' if factor == 1 else 'stroke="#eee" stroke-dasharray="2,3"'
            out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{bottom}" {style}/>')
            if factor == 1 or high - low <= 2:
                out.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">'
                           f'{value:g}x</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{bottom + 36}" text-anchor="middle">'
               f'{escape(chart.axis_label)}</text>')
    y = TOP + GROUP_GAP
    for group, group_h in zip(chart.groups, group_heights, strict=True):
        out.append(f'<text x="{LEFT - 10}" y="{y + group_h / 2 + 4:.1f}" text-anchor="end" '
                   f'font-weight="bold">{escape(group.label)}</text>')
        for bar in group.bars:
            color = chart.colors.get(bar.contender, "#333")
            if bar.ratio > 0:
                x0, x1 = px(10.0**low), px(bar.ratio)
                out.append(f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0, 1):.1f}" '
                           f'height="{BAR_H}" fill="{color}"><title>{escape(bar.contender)}: '
                           f'{_ratio_text(bar.ratio)}, {escape(_bar_text(bar))}'
                           '</title></rect>')
                out.append(f'<text x="{x1 + 4:.1f}" y="{y + BAR_H - 2:.1f}" fill="#333">'
                           f'{_ratio_text(bar.ratio)} ({escape(_bar_text(bar))})</text>')
            else:
                out.append(f'<text x="{LEFT + 4}" y="{y + BAR_H - 2:.1f}" fill="#999">'
                           f'{escape(bar.contender)}: no result</text>')
            y += BAR_H + BAR_GAP
        y += GROUP_GAP
        out.append(f'<line x1="{LEFT}" y1="{y - GROUP_GAP / 2:.1f}" x2="{LEFT + plot_w}" '
                   f'y2="{y - GROUP_GAP / 2:.1f}" stroke="#ddd"/>')
    for index, goal in enumerate(chart.goals):
        x = px(goal.ratio)
        label_y = TOP - 10 - 13 * (index % 2)  # neighbouring goals' labels must not overlap
        out.append(f'<line x1="{x:.1f}" y1="{label_y + 4}" x2="{x:.1f}" y2="{bottom}" '
                   f'stroke="{goal.color}" stroke-width="1.5" stroke-dasharray="6,3"/>')
        out.append(f'<text x="{x:.1f}" y="{label_y}" text-anchor="middle" '
                   f'fill="{goal.color}">{escape(goal.label)}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
               'stroke="#333"/>')
    ly = bottom + 56
    for index, name in enumerate(legend):
        lx = 20 + (index % 4) * 240
        row_y = ly + (index // 4) * LEGEND_ROW
        out.append(f'<rect x="{lx}" y="{row_y - 10}" width="14" height="12" '
                   f'fill="{chart.colors[name]}"/>')
        out.append(f'<text x="{lx + 20}" y="{row_y}">{escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_svg(path: Path, chart: BarChart) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(chart))
