"""Horizontal bars with min..max whiskers, as one SVG: the deploy benches' CPU figures.

A bar is (label, median, min, max, colour); the chart scales to the largest max.
"""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import escape

Bar = tuple[str, float, float, float, str]


def whisker_svg(title: str, bars: Sequence[Bar], *, width: int, left: int, bar: int = 22,
                gap: int = 10, top: int = 40) -> str:
    """The chart: ``title`` above, one row a bar, its label left of it, its median right."""
    biggest = max(b[3] for b in bars) * 1.1
    height = top + len(bars) * (bar + gap) + 30
    scale = (width - left - 60) / biggest
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           f'<text x="10" y="20" font-size="14">{escape(title)}</text>']
    for i, (name, median, low, high, colour) in enumerate(bars):
        y = top + i * (bar + gap)
        out.append(f'<text x="{left - 6}" y="{y + bar / 2 + 4}" text-anchor="end">'
                   f'{escape(name)}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{median * scale:.1f}" height="{bar}" '
                   f'fill="{colour}"/>')
        if high > low:
            out.append(f'<line x1="{left + low * scale:.1f}" x2="{left + high * scale:.1f}" '
                       f'y1="{y + bar / 2}" y2="{y + bar / 2}" stroke="black"/>')
        out.append(f'<text x="{left + max(median, high) * scale + 4:.1f}" '
                   f'y="{y + bar / 2 + 4}">{median:.2f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
