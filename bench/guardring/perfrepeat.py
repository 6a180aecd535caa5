"""Where a repeated walk through the guard spends its time (issue 16): perf of repeated finds.

Usage (as root; ``perf`` installed)::

    .venv/bin/python bench/guardring/perfrepeat.py overlay|guardc [--lower /usr/include]

Stacks kernel overlayfs over ``--lower`` as ``ab.py`` does (upper in a fresh tmpfs; ``guardc``:
sdeefs-guard in C as a second lower above the host directory), walks it twice to fill the
caches, times 15 repeated ``find -fprintf`` walks (median, min), then records 30 more under
``perf record -g`` into ``/tmp/perfrepeat-KIND.data``; compare two kinds with
``perf report -i FILE --children --sort sym``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import ab  # bench/guardring/ab.py: run as a script, its directory is on sys.path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["overlay", "guardc"])
    parser.add_argument("--lower", type=Path, default=Path("/usr/include"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="perfrepeat-") as tmp:
        work = Path(tmp)
        ab.run(["mount", "-t", "tmpfs", "-o", "size=64m", "perfrepeat-upper", str(work)])
        layer = ab.Layer(args.kind, args.lower, work, Path("/nonexistent"))
        view = work / "view"
        mounted = False
        try:
            for name in ("upper", "wd", "view"):
                (work / name).mkdir()
            lowers = layer.mount()
            ab.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={':'.join(lowers)},upperdir={work}/upper,workdir={work}/wd,"
                    "userxattr", str(view)])
            mounted = True
            find = ["find", str(view), "-fprintf", "/dev/null", ab.FIND_FORMAT]
            ab.run(find)
            ab.run(find)
            times = []
            for _ in range(15):
                start = time.perf_counter()
                ab.run(find)
                times.append(time.perf_counter() - start)
            print(f"{args.kind}: repeated walk median {statistics.median(times):.4f} s, "
                  f"min {min(times):.4f} s")
            loop = (f"for i in $(seq 30); do find {view} -fprintf /dev/null "
                    f"'{ab.FIND_FORMAT}'; done")
            subprocess.run(["perf", "record", "-q", "-g", "-F", "2999", "-o",
                            f"/tmp/perfrepeat-{args.kind}.data", "--", "sh", "-c", loop],
                           check=True)
        finally:
            if mounted:
                subprocess.run(["umount", str(view)], check=False)
            layer.unmount()
            subprocess.run(["umount", "-l", str(work)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
