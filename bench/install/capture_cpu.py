#!/usr/bin/env python3
"""The kernel engine's capture: CPU seconds per file created, its C and Python paths.

Usage (as root, with the repository's venv)::

    .venv/bin/python bench/install/capture_cpu.py [--files 10000] [--dirs 100] [--rounds 3]
        [--tree DIR]

``--tree DIR``: import sdeefs from DIR instead (e.g. ``git archive COMMIT`` unpacked
there): the same measurement of an older capture, which has its Python path only.

What it measures: an ext4 layer image (``sdeefs.fs.image``) with an empty upper, a
capture (``sdeefs.fs.capture.Capture``, in this process, no trio) watching it; ``mkfiles``
(bench/install/mkfiles.c) creates FILES files of 300 bytes in DIRS directories in the
upper; then the capture reads the queued events and journals them (``_read_events``,
``_batch`` until nothing is left) and the process CPU time of that is divided by FILES.
One batch for everything: the streaming case (a batch every 0.25 s while a writer
runs) costs more per file.  CPU time, not wall clock, so that it means something on a
loaded machine; the wall clock is printed too.  Each round makes a new image for each
path, alternating C and Python.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--tree" in sys.argv:  # before anything imports sdeefs
    sys.path.insert(0, os.path.abspath(sys.argv[sys.argv.index("--tree") + 1]))
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import attrs  # noqa: E402

from sdeefs.fs import capture as cap  # noqa: E402
from sdeefs.fs import image  # noqa: E402
from sdeefs.fs import reconcile as rc  # noqa: E402
from sdeefs.fs.model import Model  # noqa: E402
from sdeefs.journal import Journal  # noqa: E402

HAS_NATIVE = "native" in attrs.fields_dict(rc.Reconciler)

HERE = Path(__file__).resolve().parent


def one_run(scratch: Path, mkfiles: Path, files: int, dirs: int, native: bool
            ) -> tuple[float, float, int]:
    """(CPU s, wall s, records) of journaling ``files`` new files."""
    img, layer, state = scratch / "layer.img", scratch / "layer", scratch / "state"
    layer.mkdir()
    state.mkdir()
    image.create_image(str(img), 4 << 30)
    image.mount_image(str(img), str(layer))
    parts: list[object] = []
    try:
        image.prepare_layer(str(layer), 0, 0)
        journal = Journal.open(str(state / "journal"))
        upper = rc.Upper.open(str(layer / "upper"))
        group = cap.fan.Group.open(True)
        lock = os.open(os.devnull, os.O_RDONLY)
        parts = [journal, upper, group]
        group.mark_filesystem(str(layer / "upper"), cap.MASK)
        model = Model.empty(b"\0" * 16)
        extra = {"native": native} if HAS_NATIVE else {}
        capture = cap.Capture(cap.Config(str(layer), str(state)), journal, model, upper,
                              rc.Reconciler(model, upper, **extra), group, lock, **extra)
        capture.dirty.full = True
        capture._batch()  # the start's scan of the empty upper
        subprocess.run([str(mkfiles), str(layer / "upper" / "w"), str(files), str(dirs), "300"],
                       check=True, stdout=subprocess.DEVNULL)
        cpu, wall = time.process_time(), time.perf_counter()
        while capture._read_events() or capture.dirty:
            capture._batch()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        os.close(lock)
        return cpu, wall, capture.counters.records
    finally:
        for part in parts:
            part.close()  # type: ignore[attr-defined]
        image.unmount_image(str(layer))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--dirs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", help="import sdeefs from this directory")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("capture_cpu: needs root (loop mounts, fanotify)", file=sys.stderr)
        return 2
    paths = [False] + ([True] if HAS_NATIVE and rc.capturec is not None else [])
    samples: dict[bool, list[tuple[float, float, int]]] = {p: [] for p in paths}
    with tempfile.TemporaryDirectory(prefix="sdeefs-capture-cpu-", dir="/var/tmp") as tmp:
        mkfiles = Path(tmp) / "mkfiles"
        subprocess.run(["gcc", "-O2", "-o", str(mkfiles), str(HERE / "mkfiles.c")], check=True)
        for round_no in range(args.rounds):
            for native in paths:
                scratch = Path(tmp) / f"r{round_no}-{'c' if native else 'py'}"
                scratch.mkdir()
                samples[native].append(one_run(scratch, mkfiles, args.files, args.dirs,
                                               native))
                cpu, wall, _ = samples[native][-1]
                print(f"round {round_no + 1} {'C' if native else 'Python'}: cpu {cpu:.3f} s, "
                      f"wall {wall:.3f} s", file=sys.stderr)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{args.files:,} files of 300 B in {args.dirs} dirs, one batch, {args.rounds} "
          f"rounds (load at the end {load}); sdeefs from {Path(cap.__file__).parents[2]}:\n")
    print("| capture path | CPU us/file (median) | min | wall s (median) | records/file |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for native, runs in samples.items():
        per = [cpu / args.files * 1e6 for cpu, _, _ in runs]
        print(f"| {'C (sdeefs.fs._capturec)' if native else 'Python only'} | "
              f"{statistics.median(per):.1f} | {min(per):.1f} | "
              f"{statistics.median(w for _, w, _ in runs):.3f} | "
              f"{runs[0][2] / args.files:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
