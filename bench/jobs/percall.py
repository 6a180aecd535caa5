"""What one 4 KiB pwrite/pread costs through the job's kernel overlay vs a plain directory.

Usage (as root; outside SLURM, a few minutes)::

    .venv/bin/python bench/jobs/percall.py [--rounds 10] [--calls 200000] \
        [--out bench/out/jobs-percall.md]

On each medium a job's scratch can live on (a tmpfs, as the test cluster's nodes; ext4 on
a loop device, direct I/O to its image, as a node's local disk), the harness makes::

    D/plain/            a plain directory (the bare job's scratch)
    D/bind/             a bind mount of D/plain (what a job's /tmp is: launcher/enter/start.c)
    D/lower/f           64 MiB of random bytes (a file of the user's replica)
    D/ovl/              kernel overlayfs, lowerdir=D/lower, upperdir=D/upper (a job's root)

and runs ``percall`` (bench/jobs/percall.c: 4 KiB pwrite then pread at random offsets of a
64 MiB file, page cache, ns per call) on ``plain/new``, ``bind/new2``, ``ovl/new`` (a file
created in the overlay: it lives in the upper), and read-only on ``lower/f`` and ``ovl/f``
(the lower's file read through the overlay, not copied up): round after round, order
rotating, so every overlay sample has a plain one of the same round beside it.  Writes OUT
(Markdown: median ns per call, and the paired difference, median [min, max]) and OUT.json.

``--write-rounds N`` (ext4 only): then N rounds of writes into a user's file, as a job
writes into a file of its replica (a lower file: the open for writing copies it up into the
job's scratch upper), each round with new files of 64 MiB (``D/lower/wR-X``), and the page
cache in the state each variant leaves it (``sync; echo 3 > /proc/sys/vm/drop_caches`` once
per round, after the copies below and before the re-reads): ``percall FILE 64 CALLS seq``
(the open timed apart, then 1 MiB sequential and 4 KiB random writes; then the mean size of
the page-cache folios holding the file, :func:`folio_kib`) on

* ``plain, re-read``: a ``cp`` of the lower file in D/plain, its pages dropped, then read
  once (``cat``): what bench/jobs/fio.py's bare file is;
* ``plain, as written``: a ``cp`` made after the drop (its pages as cp's writes left them);
* ``overlay, copy-up``: the lower file through the overlay, copied up by percall's open (in
  the open's time): what fio.py's sdeefs file is after its first pass;
* ``overlay, copy-up, re-read``: copied up before the drop, then read once through the
  overlay;
* ``overlay volatile, copy-up``: the same through a second overlay mounted with
  ``volatile`` (``D/ovlv``: the copy-up does not fsync the new upper file).

Order rotating each round; paired with ``plain, re-read`` of the same round.

``--write-fio MODES`` (with ``--write-rounds``): fio instead of percall's writes, each mode
2 s after ``cat FILE`` (bench/jobs/fio.py's page-cache passes), the open for writing (the
copy-up) done and timed first.  ``--folios`` (ext4): the folio sizes bench/jobs/fio.py's
first pass used to leave in bare's file and in sdeefs' copy (:func:`folios_after_first_pass`).

``--cold-rounds N`` (ext4 only): then N rounds of cold reads of ``lower/f`` directly and
through ``ovl/f`` (``sync; echo 3 > /proc/sys/vm/drop_caches`` before each; fio, one pass,
1 MiB sequential and 4 KiB random, 3 s at most), KiB/s, paired the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# (name, file under D, read-only?, the plain counterpart it is paired with)
TARGETS = (("plain", "plain/new", False, None), ("bind", "bind/new2", False, "plain"),
           ("overlay", "ovl/new", False, "plain"), ("lower", "lower/f", True, None),
           ("overlay-lower", "ovl/f", True, "lower"))
# --write-rounds: (name, the file percall writes, under D; {r}: the round)
WRITES = (("plain, re-read", "plain/a{r}"), ("plain, as written", "plain/d{r}"),
          ("overlay, copy-up", "ovl/w{r}-b"), ("overlay, copy-up, re-read", "ovl/w{r}-c"),
          ("overlay volatile, copy-up", "ovlv/w{r}-v"))
MIB = 64  # each file's size


KPF_COMPOUND_TAIL = 1 << 16  # /proc/kpageflags (the kernel's admin-guide/mm/pagemap.rst)


def folio_kib(path: Path) -> float:
    """The mean size, KiB, of the page-cache folios holding ``path``'s pages as they are
    (mapped read-only and touched: a fault maps the cached folio, it does not change it; the
    PFNs from /proc/self/pagemap, each PFN's flags from /proc/kpageflags; root only)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    npages = path.stat().st_size // 4096
    with open(path, "rb") as f:
        addr = libc.mmap(None, npages * 4096, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap {path}")
    try:
        for i in range(npages):
            ctypes.c_char.from_address(addr + i * 4096).value  # noqa: B018 (fault it in)
        with open("/proc/self/pagemap", "rb") as pm:
            pm.seek(addr // 4096 * 8)
            entries = struct.unpack(f"<{npages}Q", pm.read(npages * 8))
    finally:
        libc.munmap(addr, npages * 4096)
    folios = pages = 0
    with open("/proc/kpageflags", "rb") as kf:
        for e in entries:
            if not e >> 63:  # not present
                continue
            kf.seek((e & ((1 << 55) - 1)) * 8)
            pages += 1
            folios += not struct.unpack("<Q", kf.read(8))[0] & KPF_COMPOUND_TAIL
    return 4 * pages / folios if folios else 0.0


def drop_caches() -> None:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)


@contextlib.contextmanager
def medium(kind: str, base: Path, size_gib: int = 1) -> Iterator[Path]:
    """A mounted filesystem of ``kind`` (tmpfs | ext4) at base/kind, removed afterwards."""
    mnt = base / kind
    mnt.mkdir()
    loop = ""
    try:
        if kind == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(mnt)],
                           check=True)
        else:
            image = base / f"{kind}.img"
            subprocess.run(["truncate", "-s", f"{size_gib}G", str(image)], check=True)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
            loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(image)],
                                  check=True, capture_output=True, text=True).stdout.strip()
            subprocess.run(["mount", loop, str(mnt)], check=True)
        yield mnt
    finally:
        for sub in ("ovlv", "ovl", "bind", ""):
            subprocess.run(["umount", str(mnt / sub) if sub else str(mnt)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)


def prepare(d: Path, write_rounds: int = 0) -> None:
    for sub in ("plain", "bind", "lower", "upper", "work", "ovl", "upperv", "workv", "ovlv",
                "upperf", "workf", "ovlf"):
        (d / sub).mkdir()
    subprocess.run(["mount", "--bind", str(d / "plain"), str(d / "bind")], check=True)
    with open(d / "lower" / "f", "wb") as f:
        f.write(os.urandom(MIB << 20))
    for r in range(write_rounds):  # the lower files a round copies up, written before mounting
        for x in "abcdv":
            with open(d / "lower" / f"w{r}-{x}", "wb") as f:
                f.write(os.urandom(MIB << 20))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={d}/lower,upperdir={d}/upper,workdir={d}/work", str(d / "ovl")],
                   check=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={d}/lower,upperdir={d}/upperv,workdir={d}/workv,volatile",
                    str(d / "ovlv")], check=True)


def writes(d: Path, prog: Path, rounds: int, calls: int, fio_modes: tuple[str, ...] = ()
           ) -> dict[str, dict[str, list[float]]]:
    """--write-rounds (module docstring): {variant: {"open"|"seqwrite"|"pwrite": [ns],
    "folio": [KiB]}}; with ``fio_modes`` (--write-fio) fio instead of percall's writes:
    {"open": [ns], "folio": [KiB], "fio_MODE": [KiB/s]}."""
    out: dict[str, dict[str, list[float]]] = {n: {} for n, _ in WRITES}
    for r in range(rounds):
        subprocess.run(["cp", str(d / "lower" / f"w{r}-a"), str(d / "plain" / f"a{r}")],
                       check=True)
        os.close(os.open(d / "ovl" / f"w{r}-c", os.O_WRONLY))  # its copy-up
        drop_caches()
        for name in (f"plain/a{r}", f"ovl/w{r}-c"):
            subprocess.run(["cat", str(d / name)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cp", str(d / "lower" / f"w{r}-d"), str(d / "plain" / f"d{r}")],
                       check=True)
        order = list(WRITES[r % len(WRITES):] + WRITES[:r % len(WRITES)])
        for name, rel in order:
            path = d / rel.format(r=r)
            if fio_modes:
                began = time.perf_counter_ns()
                os.close(os.open(path, os.O_WRONLY))  # the copy-up, if not done yet
                out[name].setdefault("open", []).append(time.perf_counter_ns() - began)
                out[name].setdefault("folio", []).append(folio_kib(path))
                for mode in fio_modes:  # as bench/jobs/fio.py's page-cache passes
                    subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL)
                    terse = subprocess.run(
                        ["fio", f"--name={mode}", f"--filename={path}", f"--size={MIB}m",
                         f"--rw={mode}", f"--bs={'1m' if mode in ('write', 'rw') else '4k'}",
                         "--ioengine=psync", "--runtime=2", "--time_based", "--invalidate=0",
                         "--minimal"], check=True, capture_output=True, text=True).stdout
                    fields = terse.split(";")
                    out[name].setdefault(f"fio_{mode}", []).append(
                        float(fields[6]) + float(fields[47]))
                continue
            line = subprocess.run([str(prog), str(path), str(MIB), str(calls),
                                   "seq"], check=True, capture_output=True, text=True).stdout
            words = line.split()
            for key, value in zip(words[::2], words[1::2], strict=True):
                out[name].setdefault(key, []).append(float(value))
            out[name].setdefault("folio", []).append(folio_kib(path))
        for _, rel in WRITES:  # room for the next round's files
            os.unlink(d / rel.format(r=r))
    return out


FOLIO_MODES = ("write", "randwrite", "rw", "randrw")


def folios_after_first_pass(d: Path) -> dict[str, tuple[float, float, float]]:
    """--folios (ext4): for each mode that writes, a lower file of 64 MiB and a ``cp`` of it
    beside, the page cache dropped; then as bench/jobs/fio.py's first pass used to do: the
    bare copy written by one fio pass, the lower file through the overlay opened for
    writing (its copy-up) and written by one fio pass; each read once (``cat``).  {mode:
    (bare's folio KiB, sdeefs' after the copy-up, sdeefs' after the pass)}."""
    for m in FOLIO_MODES:
        with open(d / "lower" / f"fo-{m}", "wb") as f:
            f.write(os.urandom(MIB << 20))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={d}/lower,"
                    f"upperdir={d}/upperf,workdir={d}/workf", str(d / "ovlf")], check=True)
    try:
        for m in FOLIO_MODES:
            subprocess.run(["cp", str(d / "lower" / f"fo-{m}"), str(d / "plain" / f"fo-{m}")],
                           check=True)
        drop_caches()
        out = {}
        for m in FOLIO_MODES:
            sizes = []
            for path in (d / "plain" / f"fo-{m}", d / "ovlf" / f"fo-{m}"):
                if path.parent.name == "ovlf":
                    os.close(os.open(path, os.O_WRONLY))
                    sizes.append(folio_kib(path))
                subprocess.run(["fio", "--name=first", f"--filename={path}", f"--size={MIB}m",
                                f"--rw={m}", f"--bs={'1m' if m in ('write', 'rw') else '4k'}",
                                "--ioengine=psync", "--invalidate=0", "--minimal"], check=True,
                               capture_output=True)
                subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL)
                sizes.append(folio_kib(path))
            out[m] = (sizes[0], sizes[1], sizes[2])
        return out
    finally:
        subprocess.run(["umount", str(d / "ovlf")], check=True)


def cold(d: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    """KiB/s of cold reads: {"lower"|"overlay-lower": {"read"|"randread": [per round]}}."""
    out: dict[str, dict[str, list[float]]] = {"lower": {}, "overlay-lower": {}}
    for r in range(rounds):
        targets = [("lower", d / "lower" / "f"), ("overlay-lower", d / "ovl" / "f")]
        for name, path in targets[r % 2:] + targets[:r % 2]:
            for mode, bs in (("read", "1m"), ("randread", "4k")):
                drop_caches()
                terse = subprocess.run(
                    ["fio", "--name=cold", f"--filename={path}", f"--rw={mode}", f"--bs={bs}",
                     "--size=64m", "--ioengine=psync", "--invalidate=1", "--runtime=3",
                     "--minimal"], check=True, capture_output=True, text=True).stdout
                out[name].setdefault(mode, []).append(float(terse.split(";")[6]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=200000)
    parser.add_argument("--media", default="tmpfs,ext4")
    parser.add_argument("--cold-rounds", type=int, default=0)
    parser.add_argument("--write-rounds", type=int, default=0)
    parser.add_argument("--folios", action="store_true",
                        help="(ext4) the folio sizes fio.py's first pass used to leave")
    parser.add_argument("--write-fio", default="",
                        help="with --write-rounds: these fio modes (2 s each, page cache, as "
                        "bench/jobs/fio.py) instead of percall's writes, e.g. write,randwrite")
    parser.add_argument("--write-calls", type=int, default=1024,
                        help="1 MiB writes per --write-rounds sample (64x as many 4 KiB)")
    parser.add_argument("--out", type=Path,
                        default=REPO_ROOT / "bench" / "out" / "jobs-percall.md")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("percall.py: run as root (it mounts)", file=sys.stderr)
        return 2
    started, loads = time.time(), [os.getloadavg()[0]]
    # ns per call: raw[medium][target][op] = [one per round]
    raw: dict[str, dict[str, dict[str, list[float]]]] = {}
    colds: dict[str, dict[str, list[float]]] = {}
    wrote: dict[str, dict[str, list[float]]] = {}
    folios: dict[str, tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sdeefs-percall-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        prog = base / "percall"
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(prog),
                        str(REPO_ROOT / "bench" / "jobs" / "percall.c")], check=True)
        for kind in args.media.split(","):
            rounds = args.write_rounds if kind == "ext4" else 0
            with medium(kind, base, 1 + (5 * MIB * rounds * 2 >> 10) + 1) as d:
                prepare(d, rounds)
                raw[kind] = {t[0]: {"pwrite": [], "pread": []} for t in TARGETS}
                for r in range(args.rounds):
                    order = list(TARGETS[r % len(TARGETS):] + TARGETS[:r % len(TARGETS)])
                    for name, rel, ro, _ in order:
                        out = subprocess.run([str(prog), str(d / rel), "64", str(args.calls),
                                              *(["ro"] if ro else [])],
                                             check=True, capture_output=True, text=True)
                        w, rd = (float(v) for v in out.stdout.split()[1::2])
                        if not ro:
                            raw[kind][name]["pwrite"].append(w)
                        raw[kind][name]["pread"].append(rd)
                if kind == "ext4" and args.cold_rounds:
                    colds = cold(d, args.cold_rounds)
                if kind == "ext4" and args.folios:
                    folios = folios_after_first_pass(d)
                if rounds:
                    wrote = writes(d, prog, rounds, args.write_calls,
                                   tuple(m for m in args.write_fio.split(",") if m))
    loads.append(os.getloadavg()[0])
    lines = ["# bench/jobs/percall.py: 4 KiB pwrite/pread, plain directory vs the job's overlay",
             "",
             f"- Command: `.venv/bin/python bench/jobs/percall.py --rounds {args.rounds} "
             f"--calls {args.calls} --media {args.media} --cold-rounds {args.cold_rounds} "
             f"--write-rounds {args.write_rounds} --write-calls {args.write_calls}"
             + (f" --write-fio {args.write_fio}" if args.write_fio else "")
             + (" --folios" if args.folios else "") + "`",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}; kernel "
             f"{os.uname().release}; {os.cpu_count()} CPUs; 1-min load before/after: "
             f"{', '.join(f'{x:.1f}' for x in loads)}",
             "- ns per call, median and best of the rounds; over plain: paired (same round) "
             "difference, median [min, max], ns and %; best over best: the least each "
             "took (the run least disturbed by other processes), ns",
             "",
             "| medium | file | op | ns/call median | best | over plain, ns | over plain, % "
             "| best over best, ns |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for kind, targets in raw.items():
        for name, _, _, paired in TARGETS:
            for op, values in targets[name].items():
                if not values:
                    continue
                cell = ["–", "–", "–"]
                if paired:
                    base_v = targets[paired][op]
                    diffs = [a - b for a, b in zip(values, base_v, strict=True)]
                    pct = [100 * (a / b - 1) for a, b in zip(values, base_v, strict=True)]
                    cell = [f"{statistics.median(diffs):+.0f} [{min(diffs):+.0f}, "
                            f"{max(diffs):+.0f}]",
                            f"{statistics.median(pct):+.1f} [{min(pct):+.1f}, {max(pct):+.1f}]",
                            f"{min(values) - min(base_v):+.0f}"]
                lines.append(f"| {kind} | {name} | {op} | {statistics.median(values):.0f} | "
                             f"{min(values):.0f} | {cell[0]} | {cell[1]} | {cell[2]} |")
    if colds:
        lines += ["", "Cold reads on ext4 (page cache dropped before each), KiB/s, median of the "
                  "rounds; through the overlay: paired % of time over the direct read, median "
                  "[min, max]:", "", "| mode | lower file, direct | through the overlay, "
                  "KiB/s | over direct, % |", "| --- | ---: | ---: | ---: |"]
        for mode, direct in colds["lower"].items():
            via = colds["overlay-lower"][mode]
            pct = [100 * (a / b - 1) for a, b in zip(direct, via, strict=True)]
            lines.append(f"| {mode} | {statistics.median(direct):.0f} | "
                         f"{statistics.median(via):.0f} | {statistics.median(pct):+.1f} "
                         f"[{min(pct):+.0f}, {max(pct):+.0f}] |")
    if folios:
        lines += ["", "Page-cache folios of a user's file a job writes into (--folios, ext4): "
                  "bare's file after one fio pass, sdeefs' after the copy-up and after one fio "
                  "pass over the copy (each read once after), mean KiB:", "",
                  "| mode | bare, after fio's pass | sdeefs, after the copy-up | sdeefs, after "
                  "fio's pass |", "| --- | ---: | ---: | ---: |",
                  *(f"| {m} | {a:.0f} | {b:.0f} | {c:.0f} |" for m, (a, b, c) in folios.items())]
    if wrote and args.write_fio:
        first = wrote[WRITES[0][0]]
        modes = [m for m in args.write_fio.split(",") if m]
        lines += ["", f"fio writes into a user's file on ext4 ({args.write_rounds} rounds, new "
                  "64 MiB files each; the open for writing done first, timed apart; then per "
                  "mode `cat FILE`, fio 2 s, page cache, as bench/jobs/fio.py): KiB/s, median "
                  "of the rounds; % of time over the plain file re-read (fio.py's bare file), "
                  "paired, median [min, max]:", "",
                  "| file | open, ms | its folios, KiB | "
                  + " | ".join(f"{m} KiB/s | {m} over plain re-read" for m in modes) + " |",
                  "| --- | ---: | ---: |" + " ---: | ---: |" * len(modes)]
        for name, _ in WRITES:
            v = wrote[name]
            cells = []
            for m in modes:
                pct = [100 * (b / a - 1) for a, b in zip(v[f"fio_{m}"], first[f"fio_{m}"],
                                                          strict=True)]
                cells += [f"{statistics.median(v[f'fio_{m}']):.0f}",
                          "–" if name == WRITES[0][0] else
                          f"{statistics.median(pct):+.1f} % [{min(pct):+.0f}, {max(pct):+.0f}]"]
            lines.append(f"| {name} | {statistics.median(v['open']) / 1e6:.2f} | "
                         f"{statistics.median(v['folio']):.0f} | " + " | ".join(cells) + " |")
    elif wrote:
        first = wrote[WRITES[0][0]]
        lines += ["", f"Writes into a user's file on ext4 (--write-rounds: {args.write_rounds} "
                  f"rounds, new 64 MiB files each; {args.write_calls} writes of 1 MiB, then "
                  f"{64 * args.write_calls} of 4 KiB): the open (ms; through an overlay it copies "
                  "the lower file up), ns per call, median of the rounds; over the plain file "
                  "re-read (bench/jobs/fio.py's bare file): paired % of the same round, median "
                  "[min, max]:", "",
                  "| file | open, ms | its folios, KiB | 1 MiB write, ns | over plain re-read "
                  "| 4 KiB write, ns | over plain re-read |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, _ in WRITES:
            v = wrote[name]
            cells = []
            for op in ("seqwrite", "pwrite"):
                pct = [100 * (a / b - 1) for a, b in zip(v[op], first[op], strict=True)]
                cells += [f"{statistics.median(v[op]):.0f}",
                          "–" if name == WRITES[0][0] else
                          f"{statistics.median(pct):+.1f} % [{min(pct):+.0f}, {max(pct):+.0f}]"]
            lines.append(f"| {name} | {statistics.median(v['open']) / 1e6:.2f} | "
                         f"{statistics.median(v['folio']):.0f} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps({"raw": raw, "cold": colds,
                                                         "writes": wrote, "folios": folios,
                                                         "load": loads}))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
