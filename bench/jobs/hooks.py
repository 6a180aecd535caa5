"""The prolog's and epilog's own time per job, and srun's: a user with an environment vs without.

Usage (as root)::

    .venv/bin/python bench/jobs/hooks.py [--jobs 8] [--gap 1]

One node of the test cluster with the SPANK plugin (tests/cluster).  Its Prolog/Epilog are
wrapped to log their own wall time; the user logs in, a second user never does (the prolog
finds no environment).  ``--jobs`` rounds of ``srun -N1 true`` as each user, ``--gap``
seconds apart (0: back to back, the next job may wait for the last one's epilog).  Prints the
times (ms) per user and kind; the first job of the user includes the private scan.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from tests.cluster.test_slurm_jobs import open_grid  # noqa: E402
from tests.launcher.launcher_site import VENV_BIN  # noqa: E402


def hook(base: Path, config: Path, which: str) -> str:
    return (f"#!/bin/sh\nt0=$(date +%s%N)\nSDEEFS_CONFIG={config} {VENV_BIN}/sdeefs-{which} "
            f"2>>{base}/{which}-n1.log\nrc=$?\n"
            f"echo \"{which} $SLURM_JOB_USER $(( ($(date +%s%N) - t0) / 1000000 ))\" "
            f">> {base}/times\nexit $rc\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--gap", type=float, default=1)
    args = parser.parse_args(argv)
    with open_grid(1, spank=True) as g:
        second = g.site.add_user()
        try:
            g.site.start(g.user)
            for which in ("prolog", "epilog"):
                (g.base / f"{which}.sh").write_text(hook(g.base, g.site.config, which))
            for _ in range(args.jobs):
                for user in (second, g.user):
                    t0 = time.monotonic()
                    g.slurm.run(["srun", "-N1", "true"], user=user, cwd="/tmp")
                    with open(g.base / "times", "a") as f:
                        f.write(f"srun {user} {(time.monotonic() - t0) * 1000:.0f}\n")
                    time.sleep(args.gap)
            text = (g.base / "times").read_text()
        finally:
            subprocess.run([str(VENV_BIN / "sdeefs"), "stop", g.user], env=g.site.env(),
                           capture_output=True)
    names = {g.user: "sdeefs (logged in)", second: "bare (no environment)"}
    rows: dict[tuple[str, str], list[int]] = {}
    for line in text.splitlines():
        kind, user, ms = line.split()
        rows.setdefault((names.get(user, user), kind), []).append(int(ms))
    for (user, kind), values in sorted(rows.items()):
        print(f"{user:24} {kind:7} median {statistics.median(values):6.0f} ms  all: "
              f"{' '.join(map(str, values))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
