"""How much of an install the capture has journaled when it ends: the capture's drain alone.

Usage (as root; the release measured is the one on ``PYTHONPATH``)::

    PYTHONPATH=TREE .venv/bin/python bench/deploy/colddrain.py [--size 1G]

A new kernel-engine login view (``kernelview.py``), the data set copied in
(``rsync -a --inplace``), ``sync``; then the capture's barrier, timed.  Printed: its
seconds, the journal head before and after it, and the records (and Extent bytes) the
drain journaled.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench.deploy.kernelview import KernelView
from sdeefs import records as rec
from sdeefs.fs import capture
from sdeefs.journal import JournalTail

DATA = Path("/var/tmp/sdeefs-deploy-data")
WORK = Path("/var/tmp/coldsource-drain")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    view = KernelView(WORK / "login", "benchuser", WORK / "mnt")
    view.open()
    try:
        subprocess.run(["rsync", "-a", "--inplace", "--no-whole-file",
                        f"{DATA / args.size / 'tree'}/", f"{view.mnt}/"], check=True)
        os.sync()
        before = capture.request(view.state, "status")["head"]
        assert isinstance(before, int)
        start = time.perf_counter()
        after = capture.drain(view.state, 600)
        seconds = time.perf_counter() - start
        counts: collections.Counter[str] = collections.Counter()
        extent_bytes = 0
        tail = JournalTail(os.path.join(view.state, "journal"), before + 1)
        try:
            for entry in tail.poll(1 << 30):
                counts[type(entry.record).__name__] += 1
                if isinstance(entry.record, rec.Extent):
                    extent_bytes += entry.record.length
        finally:
            tail.close()
        print(json.dumps({"drain": round(seconds, 2), "head_before": before,
                          "head_after": after, "records": dict(counts),
                          "extent_bytes": extent_bytes, "load": os.getloadavg()[0]}))
    finally:
        view.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
