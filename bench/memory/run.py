#!/usr/bin/env python3
"""The fuse engine daemon's memory: bounded by ``--node-limit``, not by the tree touched.

Issue 14, item 4.  One ``sdeefs mount --engine fuse`` over the host root (lower ``/``,
upper and state in a scratch directory under /var/tmp) per contender, side by side in one
run: the default node limit, and no effective limit (``--node-limit 1000000000``, the
daemon as it was).  For each, the daemon's RSS (``/proc/PID/status`` VmRSS):

1. after the mount;
2. after a first-pass ``find`` over ``VIEW/usr`` (every entry looked up once);
3. after creating ``--files`` small files in ``--dirs`` directories inside the view
   (``bench/install/mkfiles.c``: open, one 300-byte write, close per file);
4. every ``--sample`` seconds of a soak of ``--soak`` seconds of mixed operations: a
   ``find`` over a quarter of /usr/share, then creating, stat-ing, renaming, reading and
   deleting 2,000 files; RSS first, last and highest of the soak are reported.

Run as root from a checkout (``.venv`` made by scripts/setup.sh)::

    bench/memory/run.py                       # 100,000 files, a 10-minute soak
    bench/memory/run.py --files 20000 --soak 60 --out bench/out/memory.md
    bench/memory/run.py --soak 3600 --bounded-only --out bench/out/memory-soak.md

Writes a Markdown table (``--out``) and an SVG of RSS against time next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SDEEFS = [str(REPO / ".venv" / "bin" / "python"), "-m", "sdeefs"]
UNLIMITED = 1_000_000_000


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def daemon_pid(state: Path) -> int:
    sys.path.insert(0, str(REPO))
    from sdeefs.fs.daemon import daemon_pid as find

    pid = find(str(state))
    if pid is None:
        raise RuntimeError(f"no daemon for {state}")
    return pid


@contextlib.contextmanager
def fuse_view(scratch: Path, node_limit: int) -> Iterator[tuple[Path, int]]:
    upper, state, mnt = scratch / "upper", scratch / "state", scratch / "mnt"
    for d in (upper, state, mnt):
        d.mkdir(parents=True)
    subprocess.run([*SDEEFS, "mount", "--engine", "fuse", "--lower", "/", "--upper", str(upper),
                    "--state", str(state), "--node-limit", str(node_limit), str(mnt)],
                   check=True)
    try:
        yield mnt, daemon_pid(state)
    finally:
        subprocess.run([*SDEEFS, "umount", str(mnt)], check=False)


def find(top: Path) -> float:
    start = time.monotonic()
    subprocess.run(["find", str(top)], stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - start


def churn(work: Path, round_no: int) -> None:
    """2,000 files made, stat-ed, renamed, read and deleted."""
    d = work / f"r{round_no % 4}"
    d.mkdir(exist_ok=True)
    for i in range(2000):
        (d / f"f{i}").write_bytes(b"y" * 300)
    for i in range(2000):
        os.stat(d / f"f{i}")
        os.rename(d / f"f{i}", d / f"g{i}")
    for i in range(2000):
        (d / f"g{i}").read_bytes()
        os.unlink(d / f"g{i}")


def measure(name: str, node_limit: int, mkfiles: Path, args: argparse.Namespace,
            scratch: Path) -> dict[str, object]:
    series: list[tuple[float, float]] = []
    with fuse_view(scratch / name, node_limit) as (mnt, pid):
        t0 = time.monotonic()

        def sample() -> float:
            value = rss_mib(pid)
            series.append((time.monotonic() - t0, value))
            return value

        at_mount = sample()
        find_s = find(mnt / "usr")
        after_find = sample()
        start = time.monotonic()
        subprocess.run([str(mkfiles), str(mnt / "tmp" / "sdeefs-bench-memory"), str(args.files),
                        str(args.dirs), "300"], stdout=subprocess.DEVNULL, check=True)
        create_s = time.monotonic() - start
        after_files = sample()
        shares = sorted(p for p in (mnt / "usr" / "share").iterdir() if p.is_dir())
        work = mnt / "tmp" / "sdeefs-bench-soak"
        work.mkdir()
        soak: list[float] = []
        end, next_sample, round_no = time.monotonic() + args.soak, 0.0, 0
        while time.monotonic() < end:
            quarter = shares[round_no % 4::4]
            subprocess.run(["find", *map(str, quarter)], stdout=subprocess.DEVNULL, check=False)
            churn(work, round_no)
            round_no += 1
            if time.monotonic() >= next_sample:
                soak.append(sample())
                next_sample = time.monotonic() + args.sample
        soak.append(sample())
    return {"name": name, "limit": node_limit, "mount": at_mount, "find": after_find,
            "find_s": find_s, "files": after_files, "create_s": create_s,
            "soak_first": soak[0], "soak_last": soak[-1], "soak_max": max(soak),
            "rounds": round_no, "series": series}


def svg(results: list[dict[str, object]], path: Path) -> None:
    width, height, pad = 640, 320, 50
    tmax = max(t for r in results for t, _ in r["series"]) or 1  # type: ignore[attr-defined]
    vmax = max(v for r in results for _, v in r["series"]) * 1.1  # type: ignore[attr-defined]
    colours = ("#1f77b4", "#d62728")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="sans-serif" font-size="12">',
             f'<text x="{pad}" y="20">sdeefs fuse engine daemon RSS (MiB) against time (s)</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" '
             'stroke="black"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{pad}" y2="30" stroke="black"/>']
    for frac in (0, 0.5, 1):
        y = height - pad - frac * (height - pad - 30)
        parts.append(f'<text x="5" y="{y:.0f}">{frac * vmax:.0f}</text>')
    parts.append(f'<text x="{width - 60}" y="{height - pad + 20}">{tmax:.0f} s</text>')
    for i, r in enumerate(results):
        points = " ".join(
            f"{pad + t / tmax * (width - pad - 10):.1f},"
            f"{height - pad - v / vmax * (height - pad - 30):.1f}"
            for t, v in r["series"])  # type: ignore[attr-defined]
        parts.append(f'<polyline fill="none" stroke="{colours[i % 2]}" points="{points}"/>')
        parts.append(f'<text x="{width - 250}" y="{45 + 15 * i}" fill="{colours[i % 2]}">'
                     f'{r["name"]} (node limit {r["limit"]:,})</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dirs", type=int, default=100)
    parser.add_argument("--soak", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--sample", type=float, default=10.0)
    parser.add_argument("--limit", type=int, default=50_000, help="the bounded contender's")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "memory.md")
    parser.add_argument("--bounded-only", action="store_true",
                        help="measure only the bounded daemon (a long soak in half the time)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/memory: run as root (it mounts)", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="sdeefs-bench-memory-", dir="/var/tmp"))
    try:
        mkfiles = scratch / "mkfiles"
        subprocess.run(["gcc", "-O2", "-o", str(mkfiles), str(REPO / "bench" / "install" /
                                                               "mkfiles.c")], check=True)
        results = [measure("bounded", args.limit, mkfiles, args, scratch)]
        if not args.bounded_only:
            results.append(measure("unbounded", UNLIMITED, mkfiles, args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    lines = [f"`bench/memory/run.py --files {args.files} --soak {args.soak:g}` "
             f"({time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.1f})", "",
             "| daemon | mounted | after find /usr | after files | soak first / last / max "
             "| find s | create s | soak rounds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['name']} (limit {r['limit']:,}) | {r['mount']:.0f} MiB "
                     f"| {r['find']:.0f} MiB | {r['files']:.0f} MiB | {r['soak_first']:.0f} / "
                     f"{r['soak_last']:.0f} / {r['soak_max']:.0f} MiB | {r['find_s']:.1f} "
                     f"| {r['create_s']:.1f} | {r['rounds']} |")
    table = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    svg(results, args.out.with_suffix(".svg"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
