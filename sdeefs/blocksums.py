"""Block sums: a 16-byte hash of each ``records.EXTENT_BLOCK`` (64 KiB) block of data.

The capture (``sdeefs.fs.reconcile``) sums every block it reads, keeps the sums in its
model (``sdeefs.fs.model``) and journals them in Extent records (``sdeefs.records``);
the login node's shipper (``sdeefs.replication.origin``) sums what it reads for an
Extent and compares.  A sum is only ever compared with a sum made by the same function,
and which function made a sum is never guessed from its bytes: the record type or the
checkpoint version that holds it says so.

``BLAKE2B``: BLAKE2b with digest_size 16 and no key (``hashlib.blake2b``).  Held by
Extent (record type 18), StableExtent (22) and the model checkpoint of version 1: what
sdeefs wrote before BLAKE3.  Still read and checked; no longer written.

``BLAKE3``: BLAKE3 with no key, the first 16 bytes of its output (PyPI ``blake3``,
single-threaded).  Held by Extent3 (23), StableExtent3 (24) and the model checkpoint of
version 2.  Everything written now.

Why BLAKE3: the sums cost the capture a hash of every byte a user writes (a cold stream
of a 1 GiB install: a GiB of hashing on a 2-core login node), and BLAKE3 is about five
times cheaper than BLAKE2b there (bench/RESULTS.md, issue 16, branch sumsfast: 0.19 s
of CPU per GiB against 1.0 s with libsodium's BLAKE2b and 1.4-1.7 s with hashlib's).
Both are collision resistant, which the sums must be: they guard what reaches a replica,
so a user must not be able to make two blocks the capture takes for equal (a
non-cryptographic hash such as xxh3, 3x faster again, is refused for that reason).  16
bytes of either keep records.SUM_SIZE and every format's layout.

Each block is one call (:func:`data_sums`): the ``blake3`` module releases the GIL for
an input of 2048 bytes or more (as hashlib does), so the worker thread that hashes
leaves the trio loop free; one call over a whole buffer could not give a sum per block.
The Python loop costs about 1 microsecond a block next to ~16 of hashing.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Literal

from blake3 import blake3

BLOCK = 1 << 16  # records.EXTENT_BLOCK (asserted there)
SUM_SIZE = 16  # records.SUM_SIZE (asserted there)

Algorithm = Literal["blake2b", "blake3"]
BLAKE2B: Algorithm = "blake2b"
BLAKE3: Algorithm = "blake3"

Buffer = bytes | bytearray | memoryview


def _blake3_sum(data: Buffer) -> bytes:
    return blake3(data).digest(SUM_SIZE)


def _blake2b_sum(data: Buffer) -> bytes:
    return hashlib.blake2b(data, digest_size=SUM_SIZE).digest()


_SUM = {BLAKE3: _blake3_sum, BLAKE2B: _blake2b_sum}


def block_sum(data: Buffer, algorithm: Algorithm = BLAKE3) -> bytes:
    """The sum of one block (at most BLOCK bytes; the last one of a file may be shorter)."""
    return _SUM[algorithm](data)


def data_sums(data: Buffer, algorithm: Algorithm = BLAKE3) -> bytes:
    """The sums of every BLOCK of ``data`` (the last may be shorter), one after the other;
    b"" for no data."""
    one = _SUM[algorithm]
    if len(data) <= BLOCK:
        return one(data) if len(data) else b""
    view = memoryview(data)
    return b"".join([one(view[at:at + BLOCK]) for at in range(0, len(data), BLOCK)])


@functools.lru_cache(maxsize=256)
def zero_sum(length: int, algorithm: Algorithm = BLAKE3) -> bytes:
    """The sum of ``length`` zero bytes (a pure function: cached)."""
    return block_sum(bytes(length), algorithm)
