"""Wire version 8 (issue 16, branch coldfast): runs of records in one frame (``wire.RUN``).

A run is checked whole before any of it is applied; its records are then applied as if
each had come alone (the C path for the common ones, Python for the rest), with the
same skips.  Every byte of it stays hostile: one flipped bit and nothing is applied."""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest

from sdeefs import records as rec
from sdeefs.replication.replica import Replica, _apply_batch
from sdeefs.replication.wire import (
    FRAME_HEADER,
    MAC_SIZE,
    MORE,
    RECORD,
    RUN,
    RUN_BYTES,
    RUN_ENTRY,
    SKIP,
    UP,
    Frame,
    Key,
    LinkKey,
    ProtocolError,
    RunEncoder,
    decode_record_payload,
    encode_record_payload,
    record_frames,
    split_run,
)

from .test_protocol import (
    ALICE,
    ALICE_OWNER,
    KEY,
    USER,
    _accept_all,
    _hostile_session,
    _mixed_history,
    _tree_state,
)


def _runs(history: Sequence[tuple[int, rec.Record, bytes | None]], key: Key = KEY,
          flags: dict[int, int] | None = None) -> list[bytearray]:
    """``history`` as an origin sends it: small records in runs, big writes alone."""
    out: list[bytes | bytearray] = []
    run = RunEncoder(key)
    for seq, record, data in history:
        frames = record_frames(seq, record, data)
        if len(frames) > 1 or len(frames[0].payload) > 64 << 10:
            run.flush(out)
            out.extend(f.encode(key) for f in frames)
        else:
            run.add(seq, (flags or {}).get(seq, 0), bytes(frames[0].payload), out)
    run.flush(out)
    return [bytearray(b) for b in out]


def _decoded(wire: list[bytearray]) -> list[Frame]:
    return [Frame.decode(bytes(b[:FRAME_HEADER.size]), bytes(b[FRAME_HEADER.size:-MAC_SIZE]),
                         bytes(b[-MAC_SIZE:]), KEY) for b in wire]


@pytest.mark.parametrize("native", [True, False])
def test_a_run_applies_as_its_records_one_by_one(tmp_path: Path, native: bool) -> None:
    history = _mixed_history()
    frames = _decoded(_runs(history))
    assert any(f.flags & RUN for f in frames)
    assert len(frames) < len(history) // 2
    reference = Replica.open(str(tmp_path / "one" / USER), ALICE)
    _accept_all(reference, history)
    replica = Replica.open(str(tmp_path / "run" / USER), ALICE)
    replica.batch_applier().native = native
    before, applied, _ = _apply_batch(replica, frames)
    assert (before, applied) == (0, frames)
    assert replica.applied == reference.applied == len(history)
    assert replica.skipped.count == reference.skipped.count == 0
    assert _tree_state(tmp_path / "run" / USER / "upper") == \
        _tree_state(tmp_path / "one" / USER / "upper")
    reference.close()
    replica.close()


@pytest.mark.expect_log("sdeefs.replication.replica")
async def test_a_run_with_one_flipped_bit_is_refused_and_nothing_applied(
        tmp_path: Path) -> None:
    """The MAC covers the whole run: a bit flipped in any record of it, and the replica
    applies none of them (nor anything after it)."""
    history = [(seq, rec.Mkdir(b"upper/d%d" % seq, 0o755, 0, 0), None) for seq in range(1, 9)]
    for flip in (FRAME_HEADER.size + RUN_ENTRY.size + 3, FRAME_HEADER.size + 200):
        def build(key: LinkKey, flip: int = flip) -> bytes:
            wire = _runs(history, key)
            assert len(wire) == 1
            assert Frame.decode(bytes(wire[0][:24]), bytes(wire[0][24:-32]),
                                bytes(wire[0][-32:]), LinkKey(key.key, UP)).flags == RUN
            wire[0][flip] ^= 0x04
            return bytes(wire[0])

        replica, error = await _hostile_session(tmp_path / str(flip), build)
        assert "authentication failed" in error
        assert replica.applied == 0
        assert os.listdir(tmp_path / str(flip) / "replicas" / USER / "upper") == []
        replica.close()


def _entry(seq: int, flags: int, payload: bytes) -> bytes:
    return RUN_ENTRY.pack(seq, flags, len(payload)) + payload


MKDIR = encode_record_payload(rec.Mkdir(b"upper/a", 0o755, 0, 0))
MKDIR_B = encode_record_payload(rec.Mkdir(b"upper/b", 0o755, 0, 0))
BAD_RUNS = {
    "cut short in an entry's head": (2, _entry(1, 0, MKDIR) + _entry(2, 0, MKDIR_B)[:9]),
    "cut short in a record": (2, _entry(1, 0, MKDIR) + _entry(2, 0, MKDIR_B)[:-1]),
    "a MORE entry": (2, _entry(1, 0, MKDIR) + _entry(2, MORE, MKDIR_B)),
    "an unknown entry flag": (2, _entry(1, 0, MKDIR) + _entry(2, 8, MKDIR_B)),
    "seqs going back": (2, _entry(2, 0, MKDIR) + _entry(1, 0, MKDIR_B) + _entry(2, 0, b"")),
    "a seq twice": (1, _entry(1, 0, MKDIR) + _entry(1, 0, MKDIR_B)),
    "a last seq not the frame's": (3, _entry(1, 0, MKDIR) + _entry(2, 0, MKDIR_B)),
    "nothing": (0, b""),
}


@pytest.mark.parametrize("what", sorted(BAD_RUNS))
def test_a_malformed_run_is_refused_whole_and_nothing_of_it_applied(
        tmp_path: Path, what: str) -> None:
    seq, payload = BAD_RUNS[what]
    replica = Replica.open(str(tmp_path / USER), ALICE)
    with pytest.raises(ProtocolError, match="run of records"):
        _apply_batch(replica, [Frame(RECORD, seq, payload, RUN)])
    assert replica.applied == 0
    assert os.listdir(tmp_path / USER / "upper") == []
    replica.close()


@pytest.mark.parametrize("flags", [RUN | MORE, RUN | SKIP])
def test_a_run_flag_with_more_or_skip_is_a_bad_frame(flags: int) -> None:
    wire = Frame(RECORD, 1, _entry(1, 0, MKDIR), flags).encode(KEY)
    with pytest.raises(ProtocolError, match="bad frame type"):
        Frame.decode(bytes(wire[:24]), bytes(wire[24:-32]), bytes(wire[-32:]), KEY)


def test_a_run_overlapping_what_a_copy_holds_applies_the_rest(tmp_path: Path) -> None:
    """A relay forwards frames as its upstream cut them; a follower that got records 1-3
    elsewhere may be sent a run of 1-6: it passes over what it holds and goes on; a seq
    gap inside a run is refused like one between frames."""
    history = [(seq, rec.Mkdir(b"upper/d%d" % seq, 0o755, *ALICE_OWNER), None)
               for seq in range(1, 7)]
    replica = Replica.open(str(tmp_path / USER), ALICE)
    _accept_all(replica, history[:3])
    (run,) = _decoded(_runs(history))
    assert (run.flags, run.seq) == (RUN, 6)
    _apply_batch(replica, [run])
    assert replica.applied == 6
    assert sorted(os.listdir(tmp_path / USER / "upper")) == [f"d{i}" for i in range(1, 7)]
    mine = encode_record_payload(rec.Mkdir(b"upper/a", 0o755, *ALICE_OWNER))
    gap = Frame(RECORD, 9, _entry(7, 0, mine) + _entry(9, 0, MKDIR_B), RUN)
    with pytest.raises(ProtocolError, match="out of sequence: seq 9 after 7"):
        replica.accept(gap)
    assert replica.applied == 6  # nothing of the run was applied
    assert not (tmp_path / USER / "upper" / "a").exists()
    replica.close()


@pytest.mark.expect_log("sdeefs.replication.replica")
@pytest.mark.parametrize("native", [True, False])
def test_a_hostile_record_in_a_run_is_refused_exactly_as_alone(tmp_path: Path,
                                                               native: bool) -> None:
    """A foreign owner, a host-root capability, a path through a planted symlink and a
    garbled record inside a run: each skipped with the reason it gets alone (the C path
    leaves every one of them to Python), nothing outside the copy touched, the records
    around them applied."""
    outside = tmp_path / "outside"
    outside.mkdir()
    v2_cap = struct.pack("<IIIII", 0x02000001, 0x2000, 0, 0, 0)
    history: Sequence[tuple[int, rec.Record, bytes | None]] = [
        (1, rec.Mknod(b"upper/ok", stat.S_IFREG | 0o644, *ALICE_OWNER), None),
        (2, rec.Mknod(b"upper/root-owned", stat.S_IFREG | 0o4755, 0, 0), None),
        (3, rec.Mknod(b"upper/link/escaped", stat.S_IFREG | 0o644, *ALICE_OWNER), None),
        (4, rec.Write(b"upper/link/escaped", b"", 0, 4), b"evil"),
        (5, rec.Setxattr(b"upper/ok", b"security.capability", v2_cap), None),
        (6, rec.Setattr(b"upper/ok", rec.SET_OWNER, uid=0, gid=0), None),
        (7, rec.Write(b"upper/ok", b"", 0, 2), b"ok"),
        (8, rec.Mknod(b"upper/../escaped", stat.S_IFREG | 0o644, *ALICE_OWNER), None),
        (9, rec.Setattr(b"upper/ok", rec.SET_MODE | rec.SET_MTIME, 0o640, mtime_ns=10**18),
         None),
    ]
    skipped = []
    for how in ("one", "run"):
        replica = Replica.open(str(tmp_path / how / USER), ALICE)
        replica.batch_applier().native = native
        os.symlink(outside, tmp_path / how / USER / "upper" / "link")
        # (record 8's path is refused by decoding: the encoder checks nothing)
        frames = [f for seq, record, data in history for f in record_frames(seq, record, data)]
        if how == "one":
            for frame in frames:
                replica.accept(frame)
        else:
            run: list[bytes | bytearray] = []
            encoder = RunEncoder(KEY)
            for frame in frames:
                encoder.add(frame.seq, 0, bytes(frame.payload), run)
            encoder.flush(run)
            (frame,) = _decoded([bytearray(b) for b in run])
            assert frame.flags == RUN
            _apply_batch(replica, [frame])
        assert replica.applied == 9
        skipped.append([(r.seq, r.reason) for r in replica.skipped.records])
        assert os.listdir(outside) == []
        assert not (tmp_path / how / USER / "escaped").exists()
        ok = tmp_path / how / USER / "upper" / "ok"
        assert ok.read_bytes() == b"ok"
        assert (ok.stat().st_uid, ok.stat().st_gid) == ALICE_OWNER
        assert stat.S_IMODE(ok.stat().st_mode) == 0o640
        assert ok.stat().st_mtime_ns == 10**18
        assert os.listxattr(ok) == []
        replica.close()
    assert skipped[0] == skipped[1]
    assert {2, 3, 5, 6, 8} <= {seq for seq, _ in skipped[1]}


def test_split_run_gives_views_of_whole_records() -> None:
    payload = _entry(4, SKIP, MKDIR) + _entry(5, 0, MKDIR_B)
    entries = split_run(payload, 5)
    assert [(s, f, bytes(p)) for s, f, p in entries] == [(4, SKIP, MKDIR), (5, 0, MKDIR_B)]
    assert all(isinstance(p, memoryview) for _, _, p in entries)


def test_the_run_encoder_closes_frames_at_run_bytes_and_keeps_single_records_plain() -> None:
    out: list[bytes | bytearray] = []
    encoder = RunEncoder(KEY)
    encoder.add(1, 0, MKDIR, out)
    encoder.flush(out)
    (single,) = _decoded([bytearray(b) for b in out])
    assert (single.flags, single.seq, bytes(single.payload)) == (0, 1, MKDIR)
    out = []
    big = encode_record_payload(rec.Write(b"upper/f", b"", 0, 60 << 10), b"x" * (60 << 10))
    for seq in range(1, 11):
        encoder.add(seq, 0, big, out)
    encoder.flush(out)
    frames = _decoded([bytearray(b) for b in out])
    assert all(len(f.payload) <= RUN_BYTES + len(big) + RUN_ENTRY.size for f in frames)
    assert [s for f in frames for s, _, _ in split_run(f.payload, f.seq)] == \
        list(range(1, 11))
    assert all(decode_record_payload(p)[1] == b"x" * (60 << 10)
               for f in frames for _, _, p in split_run(f.payload, f.seq))


def test_frames_carry_an_aes_gmac_with_a_fresh_nonce_and_nothing_else_passes() -> None:
    """Version 8's MAC field: a random nonce, the GMAC tag, four zero bytes.  The same
    frame sealed twice has two nonces; a flipped tag, nonce or padding bit, the HMAC of
    version 7 and another key are all refused."""
    import hashlib
    import hmac

    from sdeefs.replication import mac

    frame = Frame(RECORD, 3, MKDIR)
    one, two = frame.encode(KEY), frame.encode(KEY)
    assert one[:-MAC_SIZE] == two[:-MAC_SIZE]
    assert one[-MAC_SIZE:-MAC_SIZE + mac.NONCE_SIZE] != two[-MAC_SIZE:-MAC_SIZE + mac.NONCE_SIZE]
    assert bytes(one[-4:]) == bytes(4)

    def decode(wire: bytes | bytearray, key: bytes = KEY) -> Frame:
        return Frame.decode(bytes(wire[:24]), bytes(wire[24:-32]), bytes(wire[-32:]), key)

    assert decode(one) == decode(two) == frame
    for byte in range(len(one) - MAC_SIZE, len(one)):
        bad = bytearray(one)
        bad[byte] ^= 0x01
        with pytest.raises(ProtocolError, match="authentication failed"):
            decode(bad)
    with pytest.raises(ProtocolError, match="authentication failed"):
        decode(one, b"x" * 32)
    old_mac = hmac.new(KEY, bytes(one[:-MAC_SIZE]), hashlib.sha256).digest()
    with pytest.raises(ProtocolError, match="authentication failed"):
        decode(bytes(one[:-MAC_SIZE]) + old_mac)
