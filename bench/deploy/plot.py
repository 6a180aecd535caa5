"""A small log-log line chart written as SVG by hand (no plotting library needed).

Used by ``run.py`` for deploy time against upper-layer size; generic enough for any
positive x/y series. Log-log because the sizes span three decades (5 MB to 2 GB) and the
times two or more: on linear axes everything below 100 MB would sit on the origin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22")
PAPER_COLOR = "#d62728"


@dataclass(frozen=True)
class Series:
    """A line with markers; ``dashed`` for secondary series (e.g. resubmissions)."""

    label: str
    points: Sequence[tuple[float, float]]
    color: str
    dashed: bool = False
    annotate_last: bool = False


@dataclass(frozen=True)
class Marker:
    """A lone reference point; ``upper_bound`` draws it as "at most" (arrow down)."""

    label: str
    x: float
    y: float
    color: str = PAPER_COLOR
    upper_bound: bool = False
    note: str = ""


@dataclass(frozen=True)
class Chart:
    title: str
    x_label: str
    y_label: str
    series: Sequence[Series]
    markers: Sequence[Marker] = field(default_factory=tuple)
    subtitle: str = ""


WIDTH, HEIGHT = 900, 540
LEFT, RIGHT, TOP, BOTTOM = 80, 300, 64, 64


def _decades(values: Sequence[float]) -> tuple[int, int]:
    low = math.floor(math.log10(min(values)))
    high = math.ceil(math.log10(max(values)))
    return low, max(high, low + 1)


def _fmt_bytes_tick(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value:g} B"


def _fmt_seconds_tick(value: float) -> str:
    return f"{value:g} s"


def _fmt_seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def render(chart: Chart, x_ticks_as_bytes: bool = True) -> str:
    """The SVG document for ``chart`` (log-log, decade grid, legend on the right)."""
    xs = [x for s in chart.series for x, _ in s.points] + [m.x for m in chart.markers]
    ys = [y for s in chart.series for _, y in s.points] + [m.y for m in chart.markers]
    xs = [x for x in xs if x > 0] or [1.0, 10.0]
    ys = [y for y in ys if y > 0] or [1.0, 10.0]
    x_lo, x_hi = _decades(xs)
    y_lo, y_hi = _decades(ys)
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (math.log10(x) - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (math.log10(y) - y_lo) / (y_hi - y_lo) * plot_h

    out: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Arial, sans-serif" '
        'font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="26" font-size="16" font-weight="bold">{escape(chart.title)}</text>',
    ]
    if chart.subtitle:
        out.append(f'<text x="{LEFT}" y="46" fill="#555">{escape(chart.subtitle)}</text>')
    # Grid: decades solid, 2x and 5x dotted.
    for decade in range(x_lo, x_hi + 1):
        for factor in (1, 2, 5):
            value = factor * 10.0**decade
            if decade == x_hi and factor > 1:
                continue
            x = px(value)
            style = 'stroke="#ccc"' if factor == 1 else 'stroke="#eee" stroke-dasharray="2,3"'
            out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}" {style}/>')
            if factor == 1:
                text = _fmt_bytes_tick(value) if x_ticks_as_bytes else f"{value:g}"
                out.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 18}" '
                           f'text-anchor="middle">{escape(text)}</text>')
    for decade in range(y_lo, y_hi + 1):
        for factor in (1, 2, 5):
            value = factor * 10.0**decade
            if decade == y_hi and factor > 1:
                continue
            y = py(value)
            style = 'stroke="#ccc"' if factor == 1 else 'stroke="#eee" stroke-dasharray="2,3"'
            out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + plot_w}" y2="{y:.1f}" '
                       f'{style}/>')
            if factor == 1:
                out.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">'
                           f'{escape(_fmt_seconds_tick(value))}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
               'stroke="#333"/>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 18}" text-anchor="middle">'
               f'{escape(chart.x_label)}</text>')
    out.append(f'<text transform="translate(22,{TOP + plot_h / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(chart.y_label)}</text>')

    labels: list[tuple[float, float, str, str]] = []
    for s in chart.series:
        points = sorted((x, y) for x, y in s.points if x > 0 and y > 0)
        if not points:
            continue
        dash = ' stroke-dasharray="6,4"' if s.dashed else ""
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" '
                   f'stroke-width="2"{dash}/>')
        for x, y in points:
            fill = "white" if s.dashed else s.color
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{fill}" '
                       f'stroke="{s.color}" stroke-width="1.5"><title>{escape(s.label)}: '
                       f'{_fmt_seconds(y)} at {_fmt_bytes_tick(x)}</title></circle>')
        if s.annotate_last:
            x, y = points[-1]
            labels.append((px(x) + 8, py(y) + 4, _fmt_seconds(y), s.color))
    # Value labels of nearby end points would print on top of each other: push each one
    # at least a line below the one above it.
    placed_y: float | None = None
    for x, y, text, color in sorted(labels, key=lambda item: item[1]):
        if placed_y is not None and y < placed_y + 15:
            y = placed_y + 15
        placed_y = y
        out.append(f'<text x="{x:.1f}" y="{y:.1f}" fill="{color}">{escape(text)}</text>')

    for m in chart.markers:
        x, y = px(m.x), py(m.y)
        if m.upper_bound:
            # "at most y": a bar at y with an arrow pointing down.
            out.append(f'<line x1="{x - 7:.1f}" y1="{y:.1f}" x2="{x + 7:.1f}" y2="{y:.1f}" '
                       f'stroke="{m.color}" stroke-width="2.5"/>')
            out.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{y + 26:.1f}" '
                       f'stroke="{m.color}" stroke-width="2"/>')
            out.append(f'<polygon points="{x - 5:.1f},{y + 20:.1f} {x + 5:.1f},{y + 20:.1f} '
                       f'{x:.1f},{y + 30:.1f}" fill="{m.color}"/>')
        else:
            out.append(f'<rect x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12" '
                       f'fill="{m.color}" transform="rotate(45 {x:.1f} {y:.1f})"/>')
        if m.note:
            # Points go near the top right of such charts: label a point on its left, a
            # bound (arrow below it) on its right.
            anchor, dx = ("start", 12) if m.upper_bound else ("end", -12)
            out.append(f'<text x="{x + dx:.1f}" y="{y + 4:.1f}" text-anchor="{anchor}" '
                       f'fill="{m.color}">{escape(m.note)}</text>')

    # Legend.
    lx, ly = LEFT + plot_w + 18, TOP + 8
    for s in chart.series:
        dash = ' stroke-dasharray="6,4"' if s.dashed else ""
        fill = "white" if s.dashed else s.color
        out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 28}" y2="{ly}" stroke="{s.color}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<circle cx="{lx + 14}" cy="{ly}" r="4" fill="{fill}" stroke="{s.color}"/>')
        out.append(f'<text x="{lx + 36}" y="{ly + 4}">{escape(s.label)}</text>')
        ly += 22
    for m in chart.markers:
        if m.upper_bound:
            out.append(f'<line x1="{lx + 7}" y1="{ly - 5}" x2="{lx + 21}" y2="{ly - 5}" '
                       f'stroke="{m.color}" stroke-width="2.5"/>')
            out.append(f'<polygon points="{lx + 9},{ly} {lx + 19},{ly} {lx + 14},{ly + 7}" '
                       f'fill="{m.color}"/>')
        else:
            out.append(f'<rect x="{lx + 9}" y="{ly - 5}" width="10" height="10" '
                       f'fill="{m.color}" transform="rotate(45 {lx + 14} {ly})"/>')
        for i, line in enumerate(_wrap(m.label, 34)):
            out.append(f'<text x="{lx + 36}" y="{ly + 4 + 15 * i}">{escape(line)}</text>')
        ly += 22 + 15 * (len(_wrap(m.label, 34)) - 1)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return [*lines, current] if current else lines


def write_svg(path: Path, chart: Chart) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(chart))
