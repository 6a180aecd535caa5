#!/usr/bin/env python3
"""A quick A/B of a first walk through a guard-like FUSE layer (issue 16, branch guardring).

Usage (as root, the repository's venv)::

    .venv/bin/python bench/guardring/ab.py [--lower DIR] [--rounds N] [--layers a,b,...]
        [--strace] [--perf]

Each round mounts, for every layer kind in turn (order rotated each round), kernel
overlayfs over ``--lower`` (default /usr/include) with the upper in a fresh tmpfs, the
layer kind between them as the login view stacks the guard (``userxattr``), and times
``find -fprintf /dev/null '%i %s %m %n %T@'`` twice: a first walk (every entry asks the
layer) and a repeated one.  Layer kinds: ``overlay`` (none), ``guardc`` (sdeefs-guard, C;
``guardc-noslice``, ``guardc-nokeeper``, ``guardc-nowatch``: its variants, see GUARD_ENV),
``read`` / ``ring`` / ``ring-nopin`` / ``ring-nodefer`` (bench/guardring/ringproto: the
transport alone, over /dev/fuse or io_uring), ``shown`` (ringproto --shown 1: every entry a
positive one, listed by READDIRPLUS).  ``--strace``: one extra first walk per FUSE layer under
``strace -c -f`` of its daemon (the syscalls per request); ``--perf``: the same under
``perf stat`` (context switches, CPU).  Not a bench of record: bench/install/run.py is.
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

REPO = Path(__file__).resolve().parents[2]
PROTO_SRC = REPO / "bench" / "guardring" / "ringproto.c"
GUARD_HELPER = r"""
import sys
from sdeefs.config import GuardDaemon
from sdeefs.fs.mount import GuardRequest, mount_guard
from sdeefs.identity import Identity
mountpoint, lower, log = sys.argv[1:4]
ids = Identity.build(1000, 1000, (), (100000, 65536), (100000, 65536), 1000)
mount_guard(GuardRequest(mountpoint=mountpoint, lower=lower, ids=ids,
                         deny=("/etc/ssh/ssh_host_*_key",), log=log, daemon=GuardDaemon("c")))
"""
FIND_FORMAT = "%i %s %m %n %T@\n"
# sdeefs-guard variants: its environment
GUARD_ENV: dict[str, dict[str, str]] = {
    "guardc": {},
    "guardc-noslice": {"SDEEFS_GUARD_SLICE_US": "0"},  # no short EEVDF slice
    "guardc-nokeeper": {"SDEEFS_GUARD_KEEPER": "0"},
    "guardc-nowatch": {"SDEEFS_GUARD_NO_INOTIFY": "1"},  # short timeouts, no listed lookups
}


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


class Layer:
    def __init__(self, kind: str, lower: Path, work: Path, proto: Path) -> None:
        self.kind, self.lower, self.work, self.proto = kind, lower, work, proto
        self.fuse = work / "fuse"
        self.pids: list[int] = []

    def mount(self) -> list[str]:
        if self.kind == "overlay":
            return [str(self.lower)]
        self.fuse.mkdir()
        if self.kind.startswith("guardc"):
            env = {**os.environ, **GUARD_ENV[self.kind]}
            run([sys.executable, "-c", GUARD_HELPER, str(self.fuse), str(self.lower),
                 str(self.work / "guard.log")], cwd=REPO, env=env)
        else:
            mode, *opts = {"read": ["read"], "ring": ["ring"],
                           "ring-nopin": ["ring", "--pin", "0"],
                           "ring-nodefer": ["ring", "--defer", "0"],
                           "shown": ["read", "--shown", "1"]}[self.kind]
            before = set(pids_of(self.proto))
            with (self.work / "proto.log").open("w") as log:  # the daemon keeps it open
                subprocess.run([str(self.proto), mode, str(self.lower), str(self.fuse), *opts],
                               check=True, stdout=log, stderr=log)
            self.pids = [p for p in pids_of(self.proto) if p not in before]
        if self.kind.startswith("guardc"):
            self.pids = guard_pids(self.fuse)
        return [str(self.fuse), str(self.lower)]

    def unmount(self) -> None:
        if self.kind != "overlay":
            subprocess.run(["umount", "-l", str(self.fuse)], check=False)


def pids_of(binary: Path) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "exe") == str(binary):
                    out.append(int(entry.name))
            except OSError:
                pass
    return out


def guard_pids(mountpoint: Path) -> list[int]:
    """sdeefs-guard processes (keeper and server) whose command line names ``mountpoint``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"sdeefs-guard") and str(mountpoint).encode() in cmd:
                out.append(int(entry.name))
    return out


def one(kind: str, lower: Path, proto: Path, wrap: str | None) -> tuple[float, float, str]:
    with tempfile.TemporaryDirectory(prefix="guardring-ab-") as tmp:
        work = Path(tmp)
        run(["mount", "-t", "tmpfs", "-o", "size=64m", "ab-upper", str(work)])
        view = work / "view"
        layer = Layer(kind, lower, work, proto)
        mounted_view = False
        try:
            for d in ("upper", "wd", "view"):
                (work / d).mkdir()
            lowers = layer.mount()
            run(["mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={':'.join(lowers)},upperdir={work}/upper,workdir={work}/wd,"
                 "userxattr", str(view)])
            mounted_view = True
            find = ["find", str(view), "-fprintf", "/dev/null", FIND_FORMAT]
            note = ""
            tracer = None
            if wrap and layer.pids:
                pid = layer.pids[-1]  # the server (the keeper forks it last)
                argv = (["strace", "-c", "-f", "-p", str(pid), "-o", str(work / "trace")]
                        if wrap == "strace" else
                        ["perf", "stat", "-e", "context-switches,cpu-migrations,task-clock",
                         "-p", str(pid), "-o", str(work / "trace")])
                tracer = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            start = time.perf_counter()
            run(find)
            first = time.perf_counter() - start
            if tracer is not None:
                tracer.send_signal(2)
                tracer.wait(30)
                note = (work / "trace").read_text()
            start = time.perf_counter()
            run(find)
            second = time.perf_counter() - start
            return first, second, note
        finally:
            if mounted_view:
                subprocess.run(["umount", str(view)], check=False)
            layer.unmount()
            subprocess.run(["umount", "-l", str(work)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--lower", type=Path, default=Path("/usr/include"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", default="overlay,guardc,read,ring")
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--perf", action="store_true")
    args = parser.parse_args()
    proto = Path(tempfile.gettempdir()) / f"ringproto-{os.getpid()}"
    run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(proto), str(PROTO_SRC)])
    kinds = args.layers.split(",")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    try:
        for r in range(args.rounds):
            load = Path("/proc/loadavg").read_text().split()[0]
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for kind in order:
                first, second, _ = one(kind, args.lower, proto, None)
                times[kind].append((first, second))
                print(f"round {r + 1} (load {load}) {kind:11} first {first:.3f} s  "
                      f"repeated {second:.3f} s", flush=True)
        for wrap in [w for w in ("strace", "perf") if getattr(args, w)]:
            for kind in kinds:
                if kind != "overlay":
                    first, _, note = one(kind, args.lower, proto, wrap)
                    print(f"--- {wrap} {kind} (first walk {first:.3f} s under it)\n{note}")
    finally:
        proto.unlink(missing_ok=True)
    print("\nmedian (min) of first / repeated walks:")
    base = statistics.median(t[0] for t in times.get("overlay", [(0.0, 0.0)])) or None
    for kind, values in times.items():
        f = [v[0] for v in values]
        s = [v[1] for v in values]
        ratio = f" = {statistics.median(f) / base:.2f}x overlay" if base else ""
        print(f"  {kind:11} {statistics.median(f):.3f} ({min(f):.3f}) / "
              f"{statistics.median(s):.3f} ({min(s):.3f}) s{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
