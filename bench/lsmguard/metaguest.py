"""Metadata walks through a login view with the BPF guard, end to end (issue 16): run in the
guest by ``bench/lsmguard/vm.py meta [--icount]``; bench/lsmguard/metareport.py turns what it
prints into tables and a figure.

Usage (in the guest, as root; vm.py sets the environment as for ``product``)::

    python3 bench/lsmguard/metaguest.py run [--rounds N] [--repeats R]
        [--contenders overlay,bpf,bpf-off,c]
    python3 bench/lsmguard/metaguest.py walk OP DIR PASSES     (the timed part; see below)

The tree is /srv/sdeefs-meta/tree on the guest's root filesystem (the views' lower):
bench/install's meta tree (its Python standard library and /usr/include, without byte code
and site-packages), copied there by vm.py, with /srv/sdeefs-meta/list (every entry's path
relative to the tree, NUL-separated) and an empty directory /srv/sdeefs-meta/empty.

The set of walks (``OPS``), each started in the tree's directory, output to /dev/null:

* ``find``: ``find . -fprintf /dev/null '%i %s %m %n %T@\\n'``: an lstat of every entry
  (bench/install's meta pass), relative to the directory being read;
* ``ls``: ``ls -R .``: every directory listed (no stat: the types come from readdir);
* ``stat``: ``xargs -0 -a ../list stat --printf '%i\\n'``: a statx of every entry by its path
  from the tree's directory (every component looked up again).

Contenders (``run``), round-robin, the order rotated each round:

* ``overlay``: plain kernel overlayfs of the same layers, as bench/install's overlay-img:
  ``userxattr``, upper on an ext4 image on a loop device, lower the guest's ``/``; walked
  by root;
* ``bpf``: the login view as a login has it: ``launcher.env.ensure`` with engine kernel and
  ``guard = "bpf"`` (layer image + capture daemon, the mask with its start-time scan, the
  idmapped lower, ``sdeefs-enter start``, the product's program loaded and pinned by
  launcher/login/bpfguard.py, the user's key in its map), walked by root inside
  (``sdeefs-shell -c`` as the user: the walking task is in the guarded user namespace);
  checked guarded: a root-only file made after the start is ENOENT inside;
* ``bpf-off``: the same environment after ``BpfGuard.detach_all()`` (the program
  detached; checked: that file now reads inside): the stack without the program;
* ``c``: ``guard = "c"``: the FUSE guard layer (sdeefs-guard) between mask and lower;
* ``overlay-attached`` (only when named): ``overlay`` walked by the host's root while a
  bpf environment runs (the program attached, its key in the map): what the program costs
  a task it does not guard (every other process of the login node);
* ``bpf-nodeny`` (only when named): ``bpf`` with an empty deny list (``deny = []``: the
  program's sleepable part, bpf_d_path and the patterns, returns at once): what the deny
  globs' late matching costs.

A fresh environment (and a fresh overlay mount) for each contender in each round.  Each
walk: ``sync``, ``echo 2 > /proc/sys/vm/drop_caches`` (dentries and inodes, of every
filesystem: the lower's, the layers', the view's), then the walk PASSES times in one
process (pass 1 "first", the others "repeated").  Only dentries and inodes are dropped,
not the page cache: the lower's directory and inode-table blocks stay in memory, so a
first pass rebuilds every dentry and inode without waiting for the disk (which an
instruction count cannot measure: the guest idles meanwhile); the disk's reads during each
walk are counted (``/sys/block/vda/stat``, reads and writes) to show that none happened
(the walks write nothing either: a journal commit waited for would count).

``walk`` times each pass with CLOCK_MONOTONIC in the guest: under ``vm.py --icount`` one
ns per guest instruction (vm.py's ``boot`` says what that leaves out), else the emulated
machine's wall time under TCG (slow and distorted, a cross-check only).  The cost of
starting the tool (the same walk of an empty directory) is measured too.

Output: progress lines, and one line ``META-JSON {...}`` (``samples``: contender -> op ->
{"first": [ns...], "repeated": [ns...]}; ``startup``: contender -> op -> [ns...];
``entries``: contender -> entries the walk saw; ``disk_reads``: contender -> reads
during walks; ``hooks``: op -> the program's hook calls in one pass, counted once, untimed,
after the first round's bpf walks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

META = Path("/srv/sdeefs-meta")
TREE, LIST, EMPTY = META / "tree", META / "list", META / "empty"
EMPTY_LIST = META / "emptylist"  # ".": stat's start-up cost, run in EMPTY
LATE = META / "late-secret"  # root-only, made after each environment's start
OPS: dict[str, list[str]] = {
    "find": ["find", ".", "-fprintf", "/dev/null", "%i %s %m %n %T@\n"],
    "ls": ["ls", "-R", "."],
    # the list beside the tree, read through the same view
    "stat": ["xargs", "-0", "-a", f"../{LIST.name}", "stat", "--printf", "%i\n"],
}
CONTENDERS = ("overlay", "bpf", "bpf-off", "c")  # and bpf-nodeny, on request
RUN_DIR = Path("/run/sdeefs-meta")
BASE = Path("/var/lib/sdeefs-meta")
PLAIN = RUN_DIR / "plain"  # the plain overlay's image, its mount, the merged view


def walk(op: str, directory: str, passes: int, counted: bool = True) -> dict[str, Any]:
    """Run ``op`` ``passes`` times in ``directory``; the monotonic ns of each, the disk's
    reads during them, and the ns of the same tool run in an empty directory (twice, after
    an untimed run that brings its binary back into memory: drop_caches dropped its inode
    and so its pages, which must not be read from the disk during the timed passes)."""
    empty = str(Path(directory).parent / "empty")
    argv = OPS[op]
    empty_argv = (["xargs", "-0", "-a", f"../{EMPTY_LIST.name}", *argv[4:]] if op == "stat"
                  else argv)
    if directory == empty:  # (hooks_per_walk's control: the empty directory itself)
        argv = empty_argv
    times, startup = [], []
    with open(os.devnull, "wb") as null:
        for i in range(3):
            start = time.monotonic_ns()
            subprocess.run(empty_argv, cwd=empty, stdout=null, check=True)
            if i:
                startup.append(time.monotonic_ns() - start)
        before = disk_reads()
        for _ in range(passes):
            start = time.monotonic_ns()
            subprocess.run(argv, cwd=directory, stdout=null, check=True)
            times.append(time.monotonic_ns() - start)
        after = disk_reads()
    entries = (sum(len(d) + len(f) for _, d, f in os.walk(directory))  # untimed, after
               if counted else None)
    return {"ns": times, "startup": startup, "entries": entries,
            "disk_reads": None if before is None or after is None else after - before}


# -- the driver (root on the guest's host side) ---------------------------------------------


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def disk_reads() -> int | None:
    """Reads and writes completed by the guest's disk (None where /sys is not there: inside
    a view): a walk that waited for the disk would count the wait's virtual time too."""
    try:
        fields = Path("/sys/block/vda/stat").read_text().split()
    except OSError:
        return None
    return int(fields[0]) + int(fields[4])


class Contender:
    """Where a walk runs: ``walker(argv)`` runs the walker's argv there, its stdout."""

    def __init__(self, name: str, directory: str, walker: Callable[[list[str]], str]) -> None:
        self.name, self.directory, self.walker = name, directory, walker


def measure(contender: Contender, repeats: int, out: dict[str, Any]) -> None:
    """Every op once (first pass + ``repeats`` repeated) and its start-up cost, into out."""
    me = str(Path(__file__).resolve())
    name = contender.name
    for op in OPS:
        drop_caches()
        before = disk_reads()
        result = json.loads(contender.walker(["python3", me, "walk", op, contender.directory,
                                              str(1 + repeats)]))
        after = disk_reads()
        reads = result["disk_reads"]
        if reads is None and before is not None and after is not None:
            reads = after - before  # (the whole walker: also its python's start)
        samples = out["samples"].setdefault(name, {}).setdefault(op, {"first": [],
                                                                      "repeated": []})
        samples["first"].append(result["ns"][0])
        samples["repeated"].extend(result["ns"][1:])
        out["entries"].setdefault(name, set()).add(result["entries"])
        out["disk_reads"].setdefault(name, []).append(reads)
        out["startup"].setdefault(name, {}).setdefault(op, []).extend(result["startup"])
        print(f"  {name:8} {op:5} first {result['ns'][0] / 1e6:9.2f} ms  repeated "
              + " ".join(f"{t / 1e6:.2f}" for t in result["ns"][1:])
              + f" ms  (start {min(result['startup']) / 1e6:.2f} ms, disk I/O {reads}, "
              f"{result['entries']} entries)", flush=True)


HOOKS = ("inode_permission", "inode_getattr", "file_open", "inode_getxattr",
         "inode_listxattr", "inode_readlink", "body", "inode_copy_up")  # guard.bpf.c's enum


def hook_counts(guard: Any) -> list[int]:
    """The program's per-hook call counters (guard.bpf.c's ``counts``: [hook] calls,
    [len(HOOKS) + hook] denials), summed over the CPUs, of every pinned set."""
    from launcher.login.bpfguard import opened

    cpus = Path("/sys/devices/system/cpu/possible").read_text().strip()
    ncpu = int(cpus.rsplit("-", 1)[-1]) + 1
    total = [0] * (2 * len(HOOKS))
    for pinned in guard.sets():
        with opened(guard.lib, os.path.join(pinned, "map_counts")) as fd:
            for slot in range(len(total)):
                value = guard.lib.lookup(fd, slot.to_bytes(4, sys.byteorder), 8 * ncpu)
                if value is not None:
                    total[slot] += sum(int.from_bytes(value[i:i + 8], sys.byteorder)
                                       for i in range(0, 8 * ncpu, 8))
    return total


def hooks_per_walk(guard: Any, walker: Callable[[list[str]], str], out: dict[str, Any]) -> None:
    """The program's hook calls in one pass of each walk (a pass over the tree minus the
    same walker's run in the empty directory), untimed."""
    me = str(Path(__file__).resolve())
    for op in OPS:
        calls = []
        for directory in (str(TREE), str(EMPTY)):
            before = hook_counts(guard)
            walker(["python3", me, "walk", op, directory, "1", "nocount"])
            calls.append([b - a for a, b in zip(before, hook_counts(guard), strict=True)])
        per_pass = {name: calls[0][i] - calls[1][i] for i, name in enumerate(HOOKS)
                    if calls[0][i] - calls[1][i]}
        denied = sum(calls[0][len(HOOKS):]) - sum(calls[1][len(HOOKS):])
        out["hooks"][op] = {"calls": per_pass, "denied": denied}
        print(f"  bpf hooks in one {op} pass: {per_pass}, denied {denied}", flush=True)


def plain_overlay() -> Contender:
    """bench/install's overlay-img: userxattr, upper on an ext4 image (loop), lower /."""
    teardown_plain()
    PLAIN.mkdir(parents=True)
    image = PLAIN / "layer.img"
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    sh("mkfs.ext4", "-q", "-F", str(image))
    (PLAIN / "img").mkdir()
    sh("mount", "-o", "loop", str(image), str(PLAIN / "img"))
    for sub in ("upper", "work"):
        (PLAIN / "img" / sub).mkdir()
    (PLAIN / "view").mkdir()
    sh("mount", "-t", "overlay", "overlay", "-o",
       f"userxattr,lowerdir=/,upperdir={PLAIN}/img/upper,workdir={PLAIN}/img/work",
       str(PLAIN / "view"))

    def walker(argv: list[str]) -> str:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout

    return Contender("overlay", f"{PLAIN}/view{TREE}", walker)


def teardown_plain() -> None:
    for mountpoint in (PLAIN / "view", PLAIN / "img"):
        subprocess.run(["umount", str(mountpoint)], capture_output=True, check=False)
    subprocess.run(["rm", "-rf", str(PLAIN)], check=False)


def main_run(argv: list[str]) -> int:
    import argparse

    sys.path[:0] = ["/opt/sdeefs", "/opt/sdeefs/pydeps"]
    import attrs

    from launcher import env
    from launcher.login import bpfguard
    from launcher.view import User
    from sdeefs.config import DEFAULT_DENY, Engine, Guard, SiteConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    args = parser.parse_args(argv)
    chosen = [c for c in args.contenders.split(",") if c]
    config = SiteConfig(root=str(BASE / "root"), run_dir=str(RUN_DIR), engine=Engine.KERNEL,
                        guard=Guard.BPF, shared=(), sockets=(), layer_size=256 << 20,
                        deny=DEFAULT_DENY)
    guard = bpfguard.BpfGuard(str(RUN_DIR))
    users: dict[str, User] = {}

    def user_for(guard_kind: str) -> User:
        if guard_kind not in users:
            name = f"meta{guard_kind}"
            sh("useradd", "-m", "-s", "/bin/sh", name)
            users[guard_kind] = User.lookup(name)
        return users[guard_kind]

    def inside(user: User) -> Callable[[list[str]], str]:
        def walker(walker_argv: list[str]) -> str:
            command = " ".join(f"'{a}'" for a in walker_argv)
            result = subprocess.run(
                [os.environ["SDEEFS_SHELL"], "-c", command],
                env={"SDEEFS_RUN_DIR": str(RUN_DIR), "HOME": user.home, "USER": user.name,
                     "PATH": "/usr/bin:/bin"},
                user=user.uid, group=user.gid, extra_groups=[], cwd="/",
                capture_output=True, text=True, timeout=3600, check=False)
            if result.returncode != 0:
                raise RuntimeError(f"inside {user.name}: {result.stderr.strip()[-400:]}")
            return result.stdout
        return walker

    def late_secret_seen(user: User) -> str:
        return inside(user)(["sh", "-c", f"cat {LATE} >/dev/null 2>&1 && echo read || "
                             "echo ENOENT"]).strip()

    out: dict[str, Any] = {"samples": {}, "startup": {}, "entries": {}, "disk_reads": {},
                           "hooks": {},
                           "kernel": os.uname().release, "rounds": args.rounds,
                           "repeats": args.repeats, "ops": OPS,
                           "clocksource": Path("/sys/devices/system/clocksource/clocksource0/"
                                               "current_clocksource").read_text().strip()}
    spin = {}
    for n in (0, 10**8, 0, 10**8):  # (twice: the binary in memory, then timed)
        start = time.monotonic_ns()
        sh("/opt/lsmbuild/spin", str(n))
        spin[n] = time.monotonic_ns() - start
    out["spin_ns_per_instruction"] = (spin[10**8] - spin[0]) / (2 * 10**8)
    out["bpf_jit_enable"] = Path("/proc/sys/net/core/bpf_jit_enable").read_text().strip()
    print(f"clock check: a loop of 2e8 instructions took {spin[10**8] - spin[0]} ns more than "
          f"none ({out['spin_ns_per_instruction']:.4f} ns an instruction); bpf_jit_enable "
          f"{out['bpf_jit_enable']}", flush=True)
    # every entry's inode and every directory's blocks read once from the disk, and the
    # list: the walks find them in memory (drop_caches 2 keeps the block device's cache)
    for top, dirs, files in os.walk(TREE):
        for name in dirs + files:
            os.lstat(os.path.join(top, name))
    LIST.read_bytes()
    units = [u for u in ("overlay", "bpf", "c", "bpf-nodeny", "overlay-attached")
             if u in chosen or (u == "bpf" and "bpf-off" in chosen)]
    print(f"kernel {out['kernel']}, clocksource {out['clocksource']}, tree {TREE}: "
          f"{sum(len(d) + len(f) for _, d, f in os.walk(TREE))} entries, "
          f"{sum(len(d) for _, d, _ in os.walk(TREE))} directories", flush=True)
    for round_no in range(args.rounds):
        order = units[round_no % len(units):] + units[:round_no % len(units)]
        print(f"round {round_no + 1}/{args.rounds}: {', '.join(order)}", flush=True)
        for unit in order:
            if unit == "overlay":
                try:
                    measure(plain_overlay(), args.repeats, out)
                finally:
                    teardown_plain()
                continue
            if unit == "overlay-attached":
                cfg = attrs.evolve(config, guard=Guard.BPF)
                user = user_for("bpf")
                record = env.ensure(cfg, user, Engine.KERNEL)
                try:
                    if record.guard != "bpf" or not guard.entries():
                        raise RuntimeError("overlay-attached: no program attached")
                    plain = plain_overlay()
                    measure(Contender(unit, plain.directory, plain.walker), args.repeats, out)
                finally:
                    teardown_plain()
                    env.stop(cfg, user)
                    guard.detach_all()  # (the next units start without it)
                continue
            kind = Guard.C if unit == "c" else Guard.BPF
            cfg = attrs.evolve(config, guard=kind)
            if unit == "bpf-nodeny":
                cfg = attrs.evolve(cfg, deny=())
            user = user_for(unit)
            LATE.unlink(missing_ok=True)
            started = time.monotonic()
            record = env.ensure(cfg, user, Engine.KERNEL)
            print(f"  {unit}: environment started in {time.monotonic() - started:.1f} s, "
                  f"guard {record.guard}", flush=True)
            try:
                if record.guard != kind.value:
                    raise RuntimeError(f"asked for guard {kind.value}, got {record.guard}")
                LATE.write_text("root only, after the start\n")
                os.chmod(LATE, 0o600)
                seen = late_secret_seen(user)
                if seen != "ENOENT":
                    raise RuntimeError(f"{unit}: a late root-only file is {seen} inside")
                walker = inside(user)
                if unit != "bpf" or "bpf" in chosen:
                    measure(Contender(unit, str(TREE), walker), args.repeats, out)
                if unit == "bpf" and not out["hooks"]:
                    hooks_per_walk(guard, walker, out)
                if unit == "bpf" and "bpf-off" in chosen:
                    guard.detach_all()
                    deadline = time.monotonic() + 120  # the links' release lags the unpin
                    while (seen := late_secret_seen(user)) != "read":
                        if time.monotonic() > deadline:
                            raise RuntimeError("the program still hides after detach_all")
                        time.sleep(1)
                    measure(Contender("bpf-off", str(TREE), walker), args.repeats, out)
            finally:
                env.stop(cfg, user)
    out["entries"] = {k: sorted(v) for k, v in out["entries"].items()}
    print("META-JSON " + json.dumps(out), flush=True)
    return 0


def main() -> int:
    if sys.argv[1:2] == ["walk"]:
        op, directory, passes = sys.argv[2], sys.argv[3], int(sys.argv[4])
        print(json.dumps(walk(op, directory, passes, sys.argv[5:6] != ["nocount"])))
        return 0
    if sys.argv[1:2] == ["run"]:
        return main_run(sys.argv[2:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
