"""Block sums (sdeefs.blocksums) and the record types that say which function made them."""

from __future__ import annotations

import hashlib
import os
import struct

import blake3
import pytest

from sdeefs import blocksums
from sdeefs import records as rec
from sdeefs.errors import BadRecord

BLOCK = rec.EXTENT_BLOCK


def test_the_functions_are_pinned() -> None:
    """Known answers: BLAKE3's first 16 bytes (its published vector for "abc") and
    BLAKE2b with a 16-byte digest (hashlib), each of one block and of none."""
    assert blocksums.block_sum(b"abc", blocksums.BLAKE3) == \
        bytes.fromhex("6437b3ac38465133ffb63b75273a8db5")
    assert blocksums.block_sum(b"abc", blocksums.BLAKE2B) == \
        bytes.fromhex("cf4ab791c62b8d2b2109c90275287816")
    assert blocksums.block_sum(b"abc") == blocksums.block_sum(b"abc", blocksums.BLAKE3)
    for algorithm in (blocksums.BLAKE3, blocksums.BLAKE2B):
        assert blocksums.data_sums(b"", algorithm) == b""
        assert blocksums.zero_sum(BLOCK, algorithm) == \
            blocksums.block_sum(bytes(BLOCK), algorithm)


@pytest.mark.parametrize("algorithm", [blocksums.BLAKE3, blocksums.BLAKE2B])
def test_data_sums_are_each_blocks_sum(algorithm: blocksums.Algorithm) -> None:
    """A sum per BLOCK (the last one shorter), from bytes, a bytearray or a memoryview,
    as the reference implementations give them."""
    def reference(block: bytes) -> bytes:
        if algorithm == blocksums.BLAKE3:
            return blake3.blake3(block).digest(rec.SUM_SIZE)
        return hashlib.blake2b(block, digest_size=rec.SUM_SIZE).digest()

    for length in (1, 300, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, 1 << 20):
        data = os.urandom(length)
        want = b"".join(reference(data[at:at + BLOCK]) for at in range(0, length, BLOCK))
        assert len(want) == rec.SUM_SIZE * -(-length // BLOCK)
        assert blocksums.data_sums(data, algorithm) == want
        assert blocksums.data_sums(bytearray(data), algorithm) == want
        assert blocksums.data_sums(memoryview(data), algorithm) == want


def test_the_extent_types_say_their_function() -> None:
    """Types 18 and 22 (journals written before BLAKE3) hold BLAKE2b sums; 23 and 24,
    the same fields, BLAKE3's.  Each decodes as its own type (encoding 3 only for 22-24)."""
    assert (rec.Extent.SUMS, rec.StableExtent.SUMS) == (blocksums.BLAKE2B,) * 2
    assert (rec.Extent3.SUMS, rec.StableExtent3.SUMS) == (blocksums.BLAKE3,) * 2
    sums = b"s" * 32
    for old, new in ((rec.Extent(b"upper/f", b"h", BLOCK, 10, 100, sums),
                      rec.Extent3(b"upper/f", b"h", BLOCK, 10, 100, sums)),
                     (rec.StableExtent(b"upper/f", b"h", BLOCK, 10, 100, sums, 7),
                      rec.StableExtent3(b"upper/f", b"h", BLOCK, 10, 100, sums, 7))):
        (old_type, old_payload), (new_type, new_payload) = \
            rec.encode_record(old), rec.encode_record(new)
        assert {old_type: new_type} in ({18: 23}, {22: 24})
        assert new_payload == old_payload
        assert rec.decode_record(new_type, new_payload) == new
        assert type(rec.decode_record(old_type, old_payload)) is type(old)
        assert new_type in rec.EXTENT_TYPES
        assert isinstance(new, rec.Write)
        for version in (1, 2):
            with pytest.raises(BadRecord):
                rec.decode_record(new_type, new_payload, version)
    stable = rec.decode_record(24, rec.encode_record(
        rec.StableExtent3(b"upper/f", b"h", 0, 1, 1, sums[:16], 9))[1])
    assert struct.pack("<q", 9) == rec.encode_record(stable)[1][-8:]


def test_a_replica_is_sent_a_type_18_extent_with_blake2b_sums_only() -> None:
    """``shipped``: the witness stays; BLAKE3 sums are left off (type 18's are BLAKE2b's)."""
    sums = b"s" * 16
    plain = rec.Extent(b"upper/f", b"h", 0, 5, 5, sums)
    assert plain.shipped() is plain
    assert rec.StableExtent(b"upper/f", b"h", 0, 5, 5, sums, 3).shipped() == plain
    for new in (rec.Extent3(b"upper/f", b"h", 0, 5, 5, sums),
                rec.StableExtent3(b"upper/f", b"h", 0, 5, 5, sums, 3)):
        out = new.shipped()
        assert type(out) is rec.Extent
        assert out == rec.Extent(b"upper/f", b"h", 0, 5, 5, b"")
