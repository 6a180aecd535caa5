"""Writing a data set into the deploy harness's compute file system, pattern by pattern.

Usage (as root)::

    .venv/bin/python bench/deploy/ext4write.py [--size 2G] [--repeat 3]
        [--patterns tar,replica,...] [--fs ext4|tmpfs] [--settle 0,15] [--work DIR]
        [--out FILE.jsonl]

The question (bench/RESULTS.md, branch applyext4): a cold stream's replica writes the same
files into the harness's loop-mounted ext4 as ``tar x`` does, yet pays far more there than
on tmpfs, and more than tar.  Here only the writing is measured: each run makes a fresh file
system as ``bench/deploy/run.py``'s ``make_compute_fs`` does (a journaled ext4 in a sparse
image of ``2 × 5/4 × size + 2 GiB``, loop-mounted; or a tmpfs), warms the source, ``sync``s,
writes and deletes a scratch file of the data set's size and waits ``--settle`` seconds
(``free_memory``: where the writer's page cache comes from), then one writer puts the data
set of ``bench/deploy`` (``/var/tmp/sdeefs-deploy-data/SIZE``) into it.  Patterns:

* ``tar``: ``tar -c | tar -x --numeric-owner`` through a pipe (GNU tar writes 10 KiB
  blocks); the extracting tar's own CPU (``wait4``) is the writer's.
* ``replica``: a replica's syscalls (``sdeefs/replication/_applyc.c``), one thread in this
  process: per directory ``mkdir``, ``chown``, ``chmod``; per file ``openat(O_CREAT|O_EXCL|
  O_NOFOLLOW)``, ``fchown``, ``fchmod``, ``pwrite`` of the data in CHUNK pieces (a Create's
  one piece up to 64 KiB, an Extent frame's 1 MiB), ``futimens``, ``close``.  The data
  comes from an 8 MiB buffer of random bytes (a receiver's slabs: the bytes were read from
  the socket just before), not from the source files: only the file system's part is timed.
* ``replica-CHUNK`` (e.g. ``replica-10k``, ``replica-64k``, ``replica-4m``): the same with
  every file's data in CHUNK pieces.
* ``replica-fallocate``: ``replica``, with ``fallocate`` of a big file's size before its
  data (unwritten extents), as the brief's candidate.
* ``replica-ftruncate``: ``replica``, with ``ftruncate`` to the size first.
* ``replica-dontneed`` / ``replica-sfr``: ``replica``, and after each big file
  ``posix_fadvise(DONTNEED)`` / ``sync_file_range(WRITE)`` of it (writeback started by the
  writer itself).

Printed per run (one JSON line, also appended to ``--out``): the writer's wall time; its CPU
(user, system); the whole machine's busy CPU over the window (``/proc/stat``: kernel
threads included: the loop device's worker, ext4's writeback, jbd2); the bytes written back
during the window (``nr_written``: writeback the writer did not wait for, but its CPU is in
the busy figure); then a ``sync``'s wall time and the machine's busy CPU meanwhile (the
writeback the window left behind: what a writer leaves to the node after it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

DATA = Path("/var/tmp/sdeefs-deploy-data")
GIB = 1 << 30
MIB = 1 << 20
RING = 8 * MIB
TICK = os.sysconf("SC_CLK_TCK")
SIZES = {"1G": GIB, "2G": 2 * GIB, "100M": 100 * MIB, "500M": 500 * MIB}
INLINE = 64 * 1024  # a Create carries a file up to this whole (records.MAX_INLINE)


def busy_ticks() -> tuple[int, int]:
    """(busy, iowait) clock ticks of all CPUs since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, idle, iowait, irq, softirq = fields
    return user + nice + system + irq + softirq, iowait


def written_pages() -> int:
    with open("/proc/vmstat") as f:
        for line in f:
            key, value = line.split()
            if key == "nr_written":
                return int(value)
    return 0


def make_fs(kind: str, work: Path, size: int) -> Path:
    """As run.py's make_compute_fs: journaled ext4 on a loop-mounted sparse image, or tmpfs."""
    mount = work / "mnt"
    mount.mkdir(parents=True, exist_ok=True)
    if kind == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(mount)], check=True)
        return mount
    image = work / "compute-fs.img"
    image.unlink(missing_ok=True)
    with open(image, "wb") as handle:
        handle.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    return mount


def remove_fs(work: Path) -> None:
    mount = work / "mnt"
    if os.path.ismount(mount):
        subprocess.run(["umount", str(mount)], check=True)
    (work / "compute-fs.img").unlink(missing_ok=True)


def warm(tree: Path) -> None:
    """Read the source tree once (as run.py does before a measurement)."""
    subprocess.run(["tar", "-cf", "/dev/null", "-C", str(tree), "."], check=True)
    with os.scandir(tree) as _:
        pass
    for dirpath, _dirs, files in os.walk(tree):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    while f.read(4 * MIB):
                        pass


def listing(tree: Path) -> list[tuple[str, os.stat_result]]:
    """Every entry below ``tree`` (relative path, lstat), parents first, names sorted."""
    out: list[tuple[str, os.stat_result]] = []
    for dirpath, dirs, files in os.walk(tree):
        dirs.sort()
        rel = os.path.relpath(dirpath, tree)
        for name in sorted(dirs) + sorted(files):
            path = os.path.join(dirpath, name)
            out.append((os.path.normpath(os.path.join(rel, name)), os.lstat(path)))
    return out


def replica_writer(entries: list[tuple[str, os.stat_result]], dest: Path, chunk: int | None,
                   variant: str, result: dict[str, float]) -> None:
    """The replica's syscalls (module docstring), in this thread; its rusage in ``result``."""
    ring = bytearray(os.urandom(RING))
    view = memoryview(ring)
    dirs: dict[str, int] = {"": os.open(dest, os.O_PATH | os.O_DIRECTORY)}
    at = 0
    r0 = resource.getrusage(resource.RUSAGE_THREAD)
    t0 = time.perf_counter()
    for rel, st in entries:
        head, name = os.path.split(rel)
        parent = dirs[head if head != "." else ""]
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(name, 0o700, dir_fd=parent)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=parent, follow_symlinks=False)
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=parent)
            dirs[rel] = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW,
                                dir_fd=parent)
            continue
        if stat.S_ISLNK(st.st_mode):
            os.symlink("target", name, dir_fd=parent)
            continue
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     stat.S_IMODE(st.st_mode), dir_fd=parent)
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        size = st.st_size
        piece = chunk if chunk is not None else (INLINE if size <= INLINE else MIB)
        if variant == "fallocate" and size > INLINE:
            os.posix_fallocate(fd, 0, size)
        elif variant == "ftruncate" and size > INLINE:
            os.ftruncate(fd, size)
        off = 0
        while off < size or (off == 0 and size == 0):
            n = min(piece, size - off)
            if at + n > RING:
                at = 0
            os.pwrite(fd, view[at:at + n], off)
            at += n
            off += n
            if n == 0:
                break
        if size > INLINE and variant == "dontneed":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        elif size > INLINE and variant == "sfr":
            sync_file_range(fd, 0, 0)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.close(fd)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_THREAD)
    for fd in dirs.values():
        os.close(fd)
    result.update(wall=wall, user=r1.ru_utime - r0.ru_utime, sys=r1.ru_stime - r0.ru_stime)


def sync_file_range(fd: int, offset: int, length: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), 2) != 0:
        raise OSError(ctypes.get_errno(), "sync_file_range")


def tar_writer(tree: Path, dest: Path, result: dict[str, float]) -> None:
    t0 = time.perf_counter()
    sender = subprocess.Popen(["tar", "-cf", "-", "--numeric-owner", "-C", str(tree), "."],
                              stdout=subprocess.PIPE)
    receiver = subprocess.Popen(["tar", "-xf", "-", "--numeric-owner", "-C", str(dest)],
                                stdin=sender.stdout)
    assert sender.stdout is not None
    sender.stdout.close()
    _, status, usage = os.wait4(receiver.pid, 0)
    wall = time.perf_counter() - t0
    sender.wait()
    if status != 0 or sender.returncode != 0:
        raise SystemExit(f"tar failed: {status} {sender.returncode}")
    result.update(wall=wall, user=usage.ru_utime, sys=usage.ru_stime)


CHUNKS = {"10k": 10240, "16k": 16384, "32k": 32768, "64k": 65536, "256k": 256 * 1024, "1m": MIB,
          "4m": 4 * MIB}


def free_memory(mount: Path, size: int, settle: float) -> None:
    """Write ``size`` bytes into a scratch file on ``mount`` (1 MiB pieces), delete it,
    ``sync``, then wait ``settle`` seconds: the measured writer's page cache then comes
    from memory freed just before (``settle`` 0: "warm") or free for a while ("cold": the
    virtio balloon's free page reporting hands free 2 MiB blocks back to the host after
    ~2 s, and the first write to each faults it in again on the host)."""
    ring = memoryview(bytearray(os.urandom(RING)))
    path = mount / "scratch"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        off = 0
        while off < size:
            os.pwrite(fd, ring[off % RING:off % RING + MIB], off)
            off += MIB
    finally:
        os.close(fd)
    os.unlink(path)
    subprocess.run(["sync"], check=True)
    time.sleep(settle)


def one_run(pattern: str, tree: Path, entries: list[tuple[str, os.stat_result]], kind: str,
            work: Path, fs_size: int, settle: float, data_size: int) -> dict[str, object]:
    remove_fs(work)
    mount = make_fs(kind, work, fs_size)
    dest = mount / "dest"
    dest.mkdir()
    try:
        warm(tree)
        subprocess.run(["sync"], check=True)
        free_memory(mount, data_size, settle)
        result: dict[str, float] = {}
        busy0, iow0 = busy_ticks()
        w0 = written_pages()
        if pattern == "tar":
            tar_writer(tree, dest, result)
        else:
            _, _, rest = pattern.partition("-")
            chunk = CHUNKS.get(rest)
            variant = "" if rest in CHUNKS or not rest else rest
            thread = threading.Thread(target=replica_writer,
                                      args=(entries, dest, chunk, variant, result))
            thread.start()
            thread.join()
        busy1, iow1 = busy_ticks()
        w1 = written_pages()
        t0 = time.perf_counter()
        subprocess.run(["sync"], check=True)
        sync_wall = time.perf_counter() - t0
        busy2, iow2 = busy_ticks()
        return {"pattern": pattern, "fs": kind, "settle": settle, "wall": round(result["wall"], 3),
                "user": round(result["user"], 3), "sys": round(result["sys"], 3),
                "busy": round((busy1 - busy0) / TICK, 2),
                "iowait": round((iow1 - iow0) / TICK, 2),
                "written_mib": (w1 - w0) * 4096 // MIB,
                "sync_wall": round(sync_wall, 3), "sync_busy": round((busy2 - busy1) / TICK, 2),
                "load": round(os.getloadavg()[0], 2),
                "time": time.strftime("%H:%M:%S", time.gmtime())}
    finally:
        remove_fs(work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--patterns", default="tar,replica")
    parser.add_argument("--fs", choices=("ext4", "tmpfs"), default="ext4")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/sdeefs-ext4write"))
    parser.add_argument("--settle", default="0,15",
                        help="seconds between freeing a data set's worth of page cache "
                        "and the measured write, each value a run (free_memory)")
    parser.add_argument("--data", type=Path, default=DATA,
                        help="where the data sets are (a copy: run.py's other scenarios "
                        "edit the shared one in place, and tar refuses a file that changes)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tree = args.data / args.size / "tree"
    if not tree.is_dir():
        raise SystemExit(f"ext4write: no data set at {tree} (run bench/deploy/run.py once)")
    entries = listing(tree)
    fs_size = 2 * SIZES[args.size] * 5 // 4 + 2 * GIB  # make_compute_fs for two methods
    args.work.mkdir(parents=True, exist_ok=True)
    patterns = args.patterns.split(",")
    try:
        for run in range(args.repeat):
            order = patterns if run % 2 == 0 else patterns[::-1]
            for settle, pattern in ((float(s), p) for s in args.settle.split(",")
                                    for p in order):
                line = json.dumps({"run": run, **one_run(pattern, tree, entries, args.fs,
                                                         args.work, fs_size, settle,
                                                         SIZES[args.size])})
                print(line, flush=True)
                if args.out is not None:
                    with open(args.out, "a") as out:
                        out.write(line + "\n")
    finally:
        remove_fs(args.work)
        shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
