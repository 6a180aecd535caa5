"""What a crash of the guard costs its view: sdeefs-guard's takeover (guard.c "surviving a
crash", issue 14 item 5).

The guard (the C daemon, with its keeper) over the host root for a test user, under kernel
overlayfs as the launcher stacks it (lowers = guard:/, upper and work on a tmpfs); a walk of
DIR through the view makes the kernel hold a node for every directory in it.  Then, KILLS
times: kill -9 of the server, and the time until a lookup of a name never seen (one the
guard must answer itself) succeeds again: the takeover as a process inside sees it.  The
guard's log says how long the replay and the new watches took.  Also: the keeper's and the
server's RSS, and the node table's log (the memfd's pages).

    .venv/bin/python bench/guardkeep/run.py [--dir /usr] [--kills 5]

Prints the guard's log (stderr), then a markdown table row (stdout).

Needs root (mounts); everything it mounts or starts is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sdeefs.config import GuardDaemon  # noqa: E402
from sdeefs.fs.daemon import keeper_pids  # noqa: E402
from sdeefs.fs.mount import GuardRequest, mount_guard  # noqa: E402
from sdeefs.identity import Identity  # noqa: E402

USER = Identity.build(4242, 4343, (4444,), (200000, 65536), (300000, 65536), 1000)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def log_kib(keeper: int) -> int:
    """The node table's log: the pages of the keeper's memfd."""
    for fd in os.listdir(f"/proc/{keeper}/fd"):
        if "sdeefs-guard-nodes" in os.readlink(f"/proc/{keeper}/fd/{fd}"):
            return os.stat(f"/proc/{keeper}/fd/{fd}").st_blocks // 2
    return 0


def walk(view: Path) -> tuple[int, float]:
    began = time.monotonic()
    dirs = sum(len(d) for _, d, _ in os.walk(view))
    return dirs, time.monotonic() - began


def takeover_ms(keeper: int, probe: Path, i: int) -> float:
    server = keeper_pids_of(keeper)[1]
    began = time.monotonic()
    os.kill(server, signal.SIGKILL)
    k = 0
    while True:
        try:
            os.lstat(probe / f"never-seen-{i}-{k}")
        except FileNotFoundError:
            return (time.monotonic() - began) * 1e3
        k += 1


def keeper_pids_of(keeper: int) -> list[int]:
    with open(f"/proc/{keeper}/task/{keeper}/children") as f:
        return [keeper, *map(int, f.read().split())]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dir", default="/usr", help="the host directory walked (default /usr)")
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdeefs-guardkeep-") as tmp:
        base = Path(tmp)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(base)], check=True)
        mounts = [base]
        try:
            for name in ("guard", "upper", "work", "view"):
                (base / name).mkdir()
            mount_guard(GuardRequest(str(base / "guard"), "/", USER, deny=("/etc/shadow",),
                                     log=str(base / "guard.log"), daemon=GuardDaemon.C,
                                     pid_file=str(base / "guard.pid")))
            mounts.append(base / "guard")
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={base / 'guard'}:/,upperdir={base / 'upper'},"
                            f"workdir={base / 'work'},xino=on", str(base / "view")], check=True)
            mounts.append(base / "view")
            keeper = keeper_pids(str(base / "guard.pid"))[0]
            walked = base / "view" / args.dir.lstrip("/")
            dirs, first = walk(walked)
            rss = (rss_kib(keeper), rss_kib(keeper_pids_of(keeper)[1]))
            log = log_kib(keeper)
            times = []
            for i in range(args.kills):
                times.append(takeover_ms(keeper, walked, i))
                time.sleep(7.0)  # more than KEEP_BURST kills in KEEP_WINDOW s fail closed
            _, again = walk(walked)
            print((base / "guard.log").read_text(), file=sys.stderr)
            replays = [float(m) for m in re.findall(r"watched in ([0-9.]+) ms",
                                                    (base / "guard.log").read_text())]
        finally:
            for path in reversed(mounts):
                subprocess.run(["umount", "-l", str(path)], check=False)
    print(f"| walked | directories | first walk | kill -9 -> next fresh lookup answered "
          f"(median of {args.kills}, max) | replay + watches (median) | walk after | "
          f"keeper RSS | server RSS | node log |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.dir} | {dirs:,} | {first:.2f} s | {statistics.median(times):.0f} ms, "
          f"{max(times):.0f} ms | {statistics.median(replays):.0f} ms | {again:.2f} s | "
          f"{rss[0] / 1024:.1f} MiB | {rss[1] / 1024:.1f} MiB | {log / 1024:.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
