"""The capture's block sums: CPU per GiB of each function, and whether the loop still runs.

Usage: ``.venv/bin/python bench/deploy/sumspeed.py [--mib 256] [--repeat 5]``

For each way of summing every 64 KiB block of a buffer (``--mib`` MiB of random data,
summed in READ_CHUNK (1 MiB) pieces as ``reconcile.read_sums`` does): the CPU seconds
per GiB (``time.thread_time``, median of ``--repeat``), and while a worker thread sums
the same data over and over for a second, how late a thread that sleeps 1 ms at a time
wakes (the trio loop's case: it must answer the control socket while the capture's
worker hashes), as the
median, 99th percentile and maximum of its lateness, next to its lateness with no
worker at all.  Contenders: ``blocksums.data_sums`` with BLAKE3 (what the capture uses)
and with hashlib's BLAKE2b (what it used without libsodium), and libsodium's BLAKE2b
(``crypto_generichash``, what ``_capturec.block_sums`` called with the GIL released,
here through ctypes, which releases it too), if libsodium is installed.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.common import load_sodium  # noqa: E402
from sdeefs import blocksums

BLOCK = blocksums.BLOCK
CHUNK = 1 << 20


def sodium_sums() -> Callable[[bytes], bytes] | None:
    lib = load_sodium()
    if lib is None:
        return None
    hash_fn = lib.crypto_generichash
    hash_fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p,
                        ctypes.c_ulonglong, ctypes.c_void_p, ctypes.c_size_t]

    def sums(data: bytes) -> bytes:
        out = ctypes.create_string_buffer(16 * -(-len(data) // BLOCK))
        for i, at in enumerate(range(0, len(data), BLOCK)):
            block = data[at:at + BLOCK]
            hash_fn(ctypes.addressof(out) + 16 * i, 16, block, len(block), None, 0)
        return out.raw

    return sums


def cpu_per_gib(fn: Callable[[bytes], bytes], chunks: list[bytes], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.thread_time()
        for chunk in chunks:
            fn(chunk)
        runs.append(time.thread_time() - start)
    return statistics.median(runs) / (len(chunks) * CHUNK / 2**30)


def lateness(fn: Callable[[bytes], bytes] | None, chunks: list[bytes]) -> list[float]:
    """Seconds past 1 ms that each sleep(0.001) of this thread took, while a worker sums
    ``chunks`` over and over for a second (None: no worker, for 0.5 s)."""
    done = threading.Event()

    def work() -> None:
        assert fn is not None
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            for chunk in chunks:
                fn(chunk)
        done.set()

    late = []
    worker = threading.Thread(target=work) if fn is not None else None
    if worker is not None:
        worker.start()
    end = time.monotonic() + 0.5
    while not done.is_set() if worker is not None else time.monotonic() < end:
        start = time.perf_counter()
        time.sleep(0.001)
        late.append(time.perf_counter() - start - 0.001)
    if worker is not None:
        worker.join()
    return late


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    data = os.urandom(args.mib << 20)
    chunks = [data[at:at + CHUNK] for at in range(0, len(data), CHUNK)]
    contenders: dict[str, Callable[[bytes], bytes] | None] = {
        "BLAKE3 (blocksums, now)": lambda b: blocksums.data_sums(b, blocksums.BLAKE3),
        "BLAKE2b (hashlib)": lambda b: blocksums.data_sums(b, blocksums.BLAKE2B),
        "BLAKE2b (libsodium)": sodium_sums(),
    }
    idle = lateness(None, chunks)
    print(json.dumps({"contender": "no worker", "late_ms": _late(idle),
                      "load": os.getloadavg()[0]}))
    for name, fn in contenders.items():
        if fn is None:
            print(json.dumps({"contender": name, "skipped": "libsodium is not installed"}))
            continue
        print(json.dumps({"contender": name,
                          "cpu_s_per_gib": round(cpu_per_gib(fn, chunks, args.repeat), 3),
                          "late_ms": _late(lateness(fn, chunks)),
                          "load": os.getloadavg()[0]}), flush=True)
    return 0


def _late(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"median": round(statistics.median(values) * 1e3, 3),
            "p99": round(values[int(len(values) * 0.99)] * 1e3, 3),
            "max": round(values[-1] * 1e3, 3), "samples": len(values)}


if __name__ == "__main__":
    raise SystemExit(main())
