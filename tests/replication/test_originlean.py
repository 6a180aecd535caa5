"""The cold stream's origin CPU per byte, second pass (issue 16, branch originlean).

* a frame is sealed in one C call (``_gmacc.seal``): the same MAC field as
  ``mac.seal``, byte for byte, and a frame of the wrong size is refused;
* the sender's pool hands out the buffer freed last (the warmest), makes a buffer for a
  frame of half a chunk or more a whole chunk's size (the next full frame fits it), and
  a small frame's just its size;
* a big Extent starts the next batch (a batch is not 8 MiB and a 16 MiB Extent);
* a Create of the user's own without xattrs passes the refusal check without being
  expanded into its records, and every other Create is judged as before;
* a journal tail reads into one buffer it keeps, and what it returns is the same.
"""

from __future__ import annotations

import os

import pytest

from sdeefs import records as rec
from sdeefs.journal import Journal, JournalTail, RawEntry
from sdeefs.replicable import NOBODY, refusal, user_ids
from sdeefs.replication import mac, wire
from sdeefs.replication.wire import BufferPool
from tests.replication import test_coldsource
from tests.replication.test_coldsource import _Sender, _stable, _wrong_sums

login = test_coldsource.login  # the same login journal and sender fixture
UID = 4321  # (not root: root's ids are never a user's)


# -- sealing in C ------------------------------------------------------------------------------


@pytest.mark.skipif(wire._gmacc is None, reason="the _gmacc extension is not built")
@pytest.mark.parametrize("length", [0, 1, 24, 4096, (1 << 20) + 77])
def test_the_c_seal_is_mac_seal_byte_for_byte(length: int) -> None:
    assert wire._gmacc is not None
    key, nonce = os.urandom(32), os.urandom(mac.NONCE_SIZE)
    body = os.urandom(length)
    frame = bytearray(body + bytes(mac.FIELD))
    with memoryview(frame) as view:  # (a pool's frame is a view)
        wire._gmacc.seal(mac.derived(key), nonce, view, length)
    assert frame[:length] == body
    assert bytes(frame[length:]) == mac.seal(key, body, nonce=nonce)
    assert mac.matches(key, frame[length:], body)


@pytest.mark.skipif(wire._gmacc is None, reason="the _gmacc extension is not built")
def test_the_c_seal_refuses_a_frame_of_the_wrong_size() -> None:
    assert wire._gmacc is not None
    key, nonce = mac.derived(os.urandom(32)), os.urandom(mac.NONCE_SIZE)
    for frame, end in ((bytearray(40), 10), (bytearray(41), 10), (bytearray(42), -1)):
        with pytest.raises(ValueError, match="ends in its 32-byte MAC field"):
            wire._gmacc.seal(key, nonce, frame, end)
    with pytest.raises(ValueError, match="is 32 bytes, a nonce 12"):
        wire._gmacc.seal(key[:31], nonce, bytearray(42), 10)
    with pytest.raises(ValueError, match="is 32 bytes, a nonce 12"):
        wire._gmacc.seal(key, nonce[:11], bytearray(42), 10)
    with pytest.raises(TypeError):  # not writable
        wire._gmacc.seal(key, nonce, bytes(42), 10)  # type: ignore[arg-type]


def test_a_frame_sealed_under_a_link_key_is_what_the_follower_checks() -> None:
    """Frames sealed one after the other (the C path where built) authenticate at the
    follower in that order, as before."""
    down = wire.LinkKey(b"k" * 32, wire.DOWN)
    up = wire.LinkKey(b"k" * 32, wire.UP)
    for seq in range(1, 4):
        buf = wire.Frame(wire.RECORD, seq, os.urandom(100 * seq)).encode(down)
        header, payload = bytes(buf[:wire.FRAME_HEADER.size]), bytes(buf[24:-32])
        frame = wire.Frame.decode(header, payload, bytes(buf[-32:]), up)
        assert frame.seq == seq


# -- the pool ---------------------------------------------------------------------------------


def test_the_pool_hands_out_the_buffer_freed_last() -> None:
    """Of the free buffers, the one freed last (the warmest in the cache); the pool then
    holds about the buffers in flight at once."""
    pool = BufferPool(keep=8)
    a, b, c = pool.take(100), pool.take(100), pool.take(100)
    first, second = id(a.obj), id(b.obj)  # (ids: a reference would hold the buffer)
    del a  # sent first
    del b  # then this one
    again = pool.take(100)
    assert id(again.obj) == second
    del again, c
    window = []
    for _ in range(50):  # two in flight at a time: two buffers (and one just freed)
        window.append(pool.take(100))
        if len(window) > 2:
            window.pop(0)
    assert len(pool._buffers) <= 3
    assert first in {id(b) for b in pool._buffers}


def test_a_short_frame_leaves_a_buffer_the_next_full_one_fits() -> None:
    """A pool of ``size``: the short last frame of a big file gets a whole buffer, which
    the next full frame reuses (it was replaced by a new one, faulted in again); a small
    file's frame gets a buffer of its own size."""
    size = 1 << 20
    pool = BufferPool(keep=8, size=size)
    tail = pool.take(size // 2 + 1)
    buffer = id(tail.obj)  # (an id: a reference would hold the buffer)
    assert len(tail) == size // 2 + 1
    assert len(pool._buffers[0]) == size
    del tail
    full = pool.take(size)
    assert id(full.obj) == buffer
    assert len(pool._buffers) == 1
    small = pool.take(4096)
    assert len(pool._buffers[-1]) == 4096  # not a chunk per small file
    del small, full
    assert id(pool.take(size).obj) == buffer


def test_beyond_keep_a_buffer_of_its_own_is_just_its_size() -> None:
    pool = BufferPool(keep=1, size=1 << 20)
    held = pool.take(1 << 20)
    extra = pool.take((1 << 19) + 1)
    assert len(bytes(extra.obj)) == (1 << 19) + 1  # not kept: no chunk made for it
    assert len(pool._buffers) == 1
    assert held.obj is pool._buffers[0]


# -- the sender -------------------------------------------------------------------------------


def test_a_big_extent_starts_the_next_batch(login: _Sender) -> None:
    """Bytes in a batch already, and an Extent that would take it over BATCH_BYTES: the
    Extent goes first in the next batch (at most one big Extent's frames a batch)."""
    from sdeefs.replication import origin

    small = os.urandom(100_000)
    big = os.urandom(origin.BATCH_BYTES)
    _, h1, c1 = login.file("small", small)
    _, h2, c2 = login.file("big", big)
    login.journal.append(_stable("small", h1, small, c1, _wrong_sums(small)))
    login.journal.append(_stable("big", h2, big, c2, _wrong_sums(big)))
    first = login.frames()
    assert [(getattr(r, "path", None), len(d)) for _, _, r, d in first] == [
        (b"upper/small", len(small))]
    second = login.frames()
    assert b"".join(d for _, _, _, d in second) == big
    assert {getattr(r, "path", None) for _, _, r, _ in second} == {b"upper/big"}


def _create(uid: int, gid: int, xattrs: tuple[tuple[bytes, bytes], ...] = ()) -> rec.Create:
    return rec.Create(b"upper/f", 0o100644, uid, gid, 0, b"h" * 8,
                      rec.encode_xattr_list(xattrs), b"data")


def _raw(seq: int, record: rec.Record) -> RawEntry:
    rtype, payload = rec.encode_record(record)
    return RawEntry(seq, rtype, payload, None, record)


def test_an_own_create_without_xattrs_is_not_expanded(
        login: _Sender, monkeypatch: pytest.MonkeyPatch) -> None:
    """Most of a cold stream's records: judged from their owner and xattrs alone."""
    login.sender.user.ids = user_ids(UID, UID)

    def expand(self: rec.Create) -> list[tuple[rec.Record, bytes | None]]:
        raise AssertionError("expanded")

    monkeypatch.setattr(rec.Create, "expand", expand)
    assert login.sender._refusal(_raw(1, _create(UID, UID))) is None


@pytest.mark.parametrize("known", [True, False], ids=["user", "nobody"])
def test_every_create_is_judged_as_refusal_judges_it(login: _Sender, known: bool) -> None:
    ids = user_ids(UID, UID) if known else NOBODY
    login.sender.user.ids = ids
    other = UID + 1
    for record in (_create(UID, UID), _create(other, UID), _create(UID, other),
                   _create(UID, UID, ((b"user.x", b"1"),)),
                   _create(UID, UID, ((b"security.selinux", b"x"),)),
                   _create(other, other, ((b"trusted.overlay.opaque", b"y"),))):
        assert login.sender._refusal(_raw(1, record)) == refusal(record, ids), record


# -- the journal tail -------------------------------------------------------------------------


def test_a_tail_reads_into_the_buffer_it_keeps(tmp_path: os.PathLike[str]) -> None:
    directory = os.path.join(tmp_path, "journal")
    journal = Journal.open(directory, segment_bytes=1 << 16)
    records = [rec.Write(b"upper/f", b"h", i * 10, 10) for i in range(2000)]
    for record in records:
        journal.append(record)
    tail = JournalTail(directory, 1)
    raw = JournalTail(directory, 1)
    skip = JournalTail(directory, 1)
    try:
        got = tail.poll(4096)
        kept = tail._buffer
        assert len(kept) == 4096
        while batch := tail.poll(4096):
            got += batch
        assert tail._buffer is kept  # one buffer, every look (segments included)
        assert [e.record for e in got] == records
        assert [e.seq for e in got] == list(range(1, 2001))
        entries: list[RawEntry] = []
        while batch2 := raw.poll_raw(8192):
            entries += batch2
        assert [e.record for e in entries] == records
        assert all(isinstance(e.payload, bytes) for e in entries)  # copies: the buffer
        # is read into again
        count = 0
        while step := skip.skip(8192):
            count += step
        assert count == 2000
        assert skip.next_seq == 2001
    finally:
        for t in (tail, raw, skip):
            t.close()
        journal.close()


def test_a_tail_asked_for_more_than_the_journal_holds_keeps_what_it_holds(
        tmp_path: os.PathLike[str]) -> None:
    directory = os.path.join(tmp_path, "journal")
    journal = Journal.open(directory)
    for i in range(10):
        journal.append(rec.Write(b"upper/f", b"h", i, 1))
    tail = JournalTail(directory, 1)
    try:
        assert len(tail.poll(1 << 30)) == 10
        size = os.path.getsize(os.path.join(directory, "seg-0000000000000001.log"))
        assert 0 < len(tail._buffer) <= size
        journal.append(rec.Write(b"upper/f", b"h", 10, 1))
        assert [e.seq for e in tail.poll(1 << 30)] == [11]
        assert tail.poll(1 << 30) == []
    finally:
        tail.close()
        journal.close()
