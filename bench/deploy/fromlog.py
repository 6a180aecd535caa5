"""The table and plot of a ``bench/deploy/run.py`` run from its progress log, for a run
stopped before its end (``run.py`` writes its report only when every size is done).

Usage: ``.venv/bin/python bench/deploy/fromlog.py LOG OUT.md`` (also writes ``OUT.svg``).
Only the lines of timed full deploys are read: ``[ T s] SIZE full #REP METHOD: S s, ...``.
"""

from __future__ import annotations

import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.deploy.plot import PALETTE, Chart, Series, render  # noqa: E402
from bench.deploy.run import parse_size  # noqa: E402

LINE = re.compile(r"\]\s+(\S+) full #(\d+) (\S+): ([0-9.]+) s,")


def main() -> int:
    log, out = Path(sys.argv[1]), Path(sys.argv[2])
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    reps: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for line in log.read_text().splitlines():
        match = LINE.search(line)
        if match:
            size, rep, method, seconds = match.groups()
            cells[(size, method)].append(float(seconds))
            reps[(size, rep)][method] = float(seconds)
    sizes = sorted({s for s, _ in cells}, key=parse_size)
    methods = ["tar", "rsync", "sdeefs-cold", "sdeefs-cold-base", "sdeefs"]
    methods = [m for m in methods if any((s, m) in cells for s in sizes)]

    def cell(size: str, method: str) -> str:
        values = cells.get((size, method))
        if not values:
            return "–"
        text = f"{statistics.median(values):.3g}"
        return text + (f" ({min(values):.3g}..{max(values):.3g})" if len(values) > 1 else "")

    rows = ["| upper | " + " | ".join(methods) + " | sdeefs-cold / tar |",
            "|---|" + "---:|" * (len(methods) + 1)]
    for size in sizes:
        ratio = "–"
        tar, cold = cells.get((size, "tar")), cells.get((size, "sdeefs-cold"))
        if tar and cold:
            ratio = f"{statistics.median(tar) / statistics.median(cold):.2f}x"
        rows.append(f"| {size} | " + " | ".join(cell(size, m) for m in methods)
                    + f" | {ratio} |")
    per_rep = ["| upper | repetition | " + " | ".join(methods) + " |",
               "|---|---:|" + "---:|" * len(methods)]
    for size, rep in sorted(reps, key=lambda k: (parse_size(k[0]), int(k[1]))):
        got = reps[(size, rep)]
        per_rep.append(f"| {size} | #{rep} | " + " | ".join(
            f"{got[m]:.3g}" if m in got else "–" for m in methods) + " |")
    out.write_text("Median seconds (min..max) of full deploys, from the log "
                   f"{log.name}:\n\n" + "\n".join(rows) + "\n\nEach repetition:\n\n"
                   + "\n".join(per_rep) + "\n")
    series = [Series(method, [(float(parse_size(s)), statistics.median(cells[(s, method)]))
                              for s in sizes if cells.get((s, method))],
                     PALETTE[i % len(PALETTE)], annotate_last=True)
              for i, method in enumerate(methods)]
    chart = Chart(title="A cold stream against tar (issue 16, branch coldwire)",
                  subtitle="full deploy to an empty compute node, median; one run, "
                           "methods interleaved", x_label="upper layer size (bytes, log scale)",
                  y_label="time to deploy (seconds, log scale)", series=series)
    out.with_suffix(".svg").write_text(render(chart))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
