"""The workflow's program: four stages of short tasks over files in a shared work directory.

This file is *installed* (it is the software of the benchmark, not part of the harness):
``install_tree`` lays it out as a user installs a Python tool, ::

    /usr/local/lib/python3.11/dist-packages/wfkit.py   this module (stdlib only)
    /usr/local/bin/wf-task                              ``#!/usr/bin/python3`` entry point

inside the user's environment at login (sdeefs), into a container image (ch-run, podman),
or on the host for the bare runs only.  ``wf-task STAGE INDEX TASKS WORK`` runs task
INDEX (0-based) of stage STAGE (1-4) of a workflow of TASKS tasks per stage:

1. generate: ``VALUES`` pseudo-random normal values (seeded by INDEX), ``WORK/s1/I.bin``
   (array of doubles, native order);
2. transform: reads ``s1/I.bin``, maps ``exp(v / 4)``, sorts, writes ``s2/I.bin``;
3. analyse: reads ``s2/I.bin``: a histogram over ``EDGES``, count, sum, sum of squares and
   the quartiles, ``s3/I.json``;
4. reduce: reads every ``s3/*.json`` (all TASKS of them) and, for the histogram buckets
   ``b`` with ``b % TASKS == INDEX``, writes the totals and the global mean to ``s4/I.json``.

The outputs are deterministic (the same Python on the same machine): ``digest(WORK)``
proves every contender did the same work.  The task prints one line, ``W <seconds>``:
its own time from the interpreter's first line of ``wf-task`` to the end.
"""

from __future__ import annotations

import array
import bisect
import hashlib
import json
import math
import os
import random
import sys
from pathlib import Path

VALUES = 60_000
EDGES = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)  # 10 buckets
BUCKETS = len(EDGES) + 1
SITE = "usr/local/lib/python3.11/dist-packages"

ENTRY = """#!/usr/bin/python3
import time
_t0 = time.perf_counter()
import sys
import wfkit
wfkit.main(sys.argv[1:])
print(f"W {time.perf_counter() - _t0:.6f}")
"""


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _doubles(path: Path) -> array.array[float]:
    values = array.array("d")
    values.frombytes(path.read_bytes())
    return values


def generate(index: int, work: Path) -> None:
    rng = random.Random(index)
    values = array.array("d", (rng.gauss(0.0, 1.0) for _ in range(VALUES)))
    _write(work / "s1" / f"{index}.bin", values.tobytes())


def transform(index: int, work: Path) -> None:
    values = sorted(math.exp(v / 4) for v in _doubles(work / "s1" / f"{index}.bin"))
    _write(work / "s2" / f"{index}.bin", array.array("d", values).tobytes())


def analyse(index: int, work: Path) -> None:
    values = _doubles(work / "s2" / f"{index}.bin")
    histogram = [0] * BUCKETS
    total = squares = 0.0
    for v in values:
        histogram[bisect.bisect_right(EDGES, v)] += 1
        total += v
        squares += v * v
    n = len(values)
    quartiles = [values[min(n - 1, n * q // 4)] for q in (1, 2, 3)]
    _write(work / "s3" / f"{index}.json", json.dumps(
        {"n": n, "sum": total, "squares": squares, "histogram": histogram,
         "quartiles": quartiles}, sort_keys=True).encode())


def reduce(index: int, tasks: int, work: Path) -> None:
    parts = [json.loads((work / "s3" / f"{i}.json").read_bytes()) for i in range(tasks)]
    n = sum(p["n"] for p in parts)
    mean = sum(p["sum"] for p in parts) / n
    variance = sum(p["squares"] for p in parts) / n - mean * mean
    buckets = {b: sum(p["histogram"][b] for p in parts)
               for b in range(BUCKETS) if b % tasks == index}
    _write(work / "s4" / f"{index}.json", json.dumps(
        {"n": n, "mean": mean, "variance": variance, "buckets": buckets},
        sort_keys=True).encode())


def run(stage: int, index: int, tasks: int, work: Path) -> None:
    (work / f"s{stage}").mkdir(exist_ok=True)
    if stage == 1:
        generate(index, work)
    elif stage == 2:
        transform(index, work)
    elif stage == 3:
        analyse(index, work)
    elif stage == 4:
        reduce(index, tasks, work)
    else:
        raise ValueError(f"no stage {stage}")


def digest(work: Path) -> str:
    """sha256 over every output of stage 4, in name order."""
    h = hashlib.sha256()
    for path in sorted((work / "s4").glob("*.json")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def install_tree(root: Path) -> list[Path]:
    """Lay the program out under ``root`` (``/`` for a real install); returns the files."""
    site = root / SITE
    site.mkdir(parents=True, exist_ok=True)
    (root / "usr/local/bin").mkdir(parents=True, exist_ok=True)
    module = site / "wfkit.py"
    module.write_bytes(Path(__file__).read_bytes())
    entry = root / "usr/local/bin/wf-task"
    entry.write_text(ENTRY)
    entry.chmod(0o755)
    module.chmod(0o644)
    return [entry, module]


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        print("usage: wf-task STAGE INDEX TASKS WORK", file=sys.stderr)
        raise SystemExit(2)
    run(int(argv[0]), int(argv[1]), int(argv[2]), Path(argv[3]))


if __name__ == "__main__":
    main(sys.argv[1:])
