"""How much of an install the capture has journaled when it ends: the capture's drain alone.

Usage (as root; the release measured is the one on ``PYTHONPATH``)::

    PYTHONPATH=TREE .venv/bin/python bench/deploy/colddrain.py [--size 1G] [--runs N]
        [--pyspy OUT] [--work DIR]

A new kernel-engine login view (``kernelview.py``), the data set copied in
(``rsync -a --inplace``), ``sync``; then the capture's barrier, timed.  Printed: its
seconds, the journal head before and after it, and the records (and Extent bytes) the
drain journaled, the capture's counters (``status``) before and after, and how many
committed batches the drain's records came in (``batches``), and the CPU the capture's
process spent over the copy and the drain (``capture_cpu``: user + system seconds from
/proc, with the file data it read then, ``capture_read_bytes``, and its counters' seconds
over the same span, ``capture_seconds``).  ``--pyspy OUT``: py-spy
records the capture's threads over the drain alone (``OUT.N.txt``, collapsed stacks,
idle frames kept), attached before the copy, so over the copy and the drain.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
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
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--pyspy", help="py-spy binary and output prefix: BIN:PREFIX")
    parser.add_argument("--work", type=Path, default=WORK)
    args = parser.parse_args()
    for run in range(args.runs):
        one(args.size, args.work, args.pyspy, run)
    return 0


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def seconds_between(before: dict[str, object], after: dict[str, object]) -> dict[str, float]:
    """The capture's ``status`` seconds (``capture.Counters``) spent between two answers."""
    start, end = before["seconds"], after["seconds"]
    assert isinstance(start, dict)
    assert isinstance(end, dict)
    return {key: round(end[key] - start.get(key, 0.0), 3) for key in end}


def one(size: str, work: Path, pyspy: str | None, run: int) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    view = KernelView(work / "login", "benchuser", work / "mnt")
    view.open()
    spy = None
    capture_pid = int(Path(view.state, "capture", "lock").read_text())
    try:
        cpu_before = process_cpu(capture_pid)
        status_start = capture.request(view.state, "status")
        read_before = status_start["read_bytes"]
        if pyspy:  # attached before the copy: its attaching does not delay the drain
            binary, prefix = pyspy.split(":", 1)
            pid = int(Path(view.state, "capture", "lock").read_text())
            spy = subprocess.Popen([binary, "record", "--pid", str(pid), "--idle", "--threads",
                                    "--native", "--rate", "250", "--format", "raw",
                                    "-o", f"{prefix}.{run}.txt"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        subprocess.run(["rsync", "-a", "--inplace", "--no-whole-file",
                        f"{DATA / size / 'tree'}/", f"{view.mnt}/"], check=True)
        os.sync()
        status_before = capture.request(view.state, "status")
        before = status_before["head"]
        assert isinstance(before, int)
        start = time.perf_counter()
        after = capture.drain(view.state, 600)
        seconds = time.perf_counter() - start
        cpu = process_cpu(capture_pid) - cpu_before
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(30)
            spy = None
        status_after = capture.request(view.state, "status")
        counts: collections.Counter[str] = collections.Counter()
        extent_bytes = 0
        batches = 0
        tail = JournalTail(os.path.join(view.state, "journal"), before + 1)
        try:
            for entry in tail.poll(1 << 30):
                counts[type(entry.record).__name__] += 1
                batches += isinstance(entry.record, rec.Commit)
                if isinstance(entry.record, rec.Extent):
                    extent_bytes += entry.record.length
        finally:
            tail.close()
        read = status_after["read_bytes"]
        assert isinstance(read, int)
        assert isinstance(read_before, int)
        print(json.dumps({"drain": round(seconds, 2), "head_before": before,
                          "capture_cpu": round(cpu, 2),
                          "capture_read_bytes": read - read_before,
                          "capture_seconds": seconds_between(status_start, status_after),
                          "head_after": after, "records": dict(counts),
                          "extent_bytes": extent_bytes, "batches": batches,
                          "status_before": status_before, "status_after": status_after,
                          "load": os.getloadavg()[0]}), flush=True)
    finally:
        if spy is not None:
            spy.kill()
            spy.wait()
        view.remove()


if __name__ == "__main__":
    raise SystemExit(main())
