"""Hostile-input review of wire version 8 and the replica's C applier (issue 16, branch
applyreview): what a peer's bytes can do to a replica through a RUN frame, the C path
(``sdeefs/replication/_applyc.c``) and the frame MAC.

Each test names what it guards; those marked as findings failed on ddadbe1 (or where
they say)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sdeefs import records as rec
from sdeefs.replication import applier
from sdeefs.replication.replica import Replica, _apply_batch
from sdeefs.replication.wire import (
    RECORD,
    RECORD_HEAD,
    RUN,
    RUN_ENTRY,
    SKIP,
    Frame,
    ProtocolError,
    encode_record_payload,
    record_frames,
)

from .test_protocol import ALICE, ALICE_OWNER, USER, _hostile_session


def apply_frames(replica: Replica, frames: list[Frame], how: str) -> None:
    """Apply ``frames`` the way ``how`` names: "per-record" (``Replica.accept``), or as one
    batch through the C applier ("native") or the Python one."""
    if how == "per-record":
        for frame in frames:
            replica.accept(frame)
    else:
        replica.batch_applier().native = how == "native"
        _apply_batch(replica, frames)

NATIVE = [pytest.param(True, marks=pytest.mark.skipif(
    applier._applyc is None, reason="sdeefs.replication._applyc is not built")), False]
MKNOD_F = rec.Mknod(b"upper/f", stat.S_IFREG | 0o644, *ALICE_OWNER)


def _entry(seq: int, flags: int, payload: bytes) -> bytes:
    return RUN_ENTRY.pack(seq, flags, len(payload)) + payload


@pytest.mark.expect_log("sdeefs.replication.replica")
@pytest.mark.parametrize("how", ["native", "python", "per-record"])
def test_a_setattr_size_past_off_t_is_skipped_not_a_crash(tmp_path: Path, how: str) -> None:
    """Finding (failed on ddadbe1): a Setattr(SET_SIZE) of size >= 2^63 decoded fine (u64),
    the C path rightly left it to Python, and Python's ``os.ftruncate`` raised
    OverflowError: not an OSError, so neither a skip nor a retry, but an exception out of
    the link (the daemon's "a bug in one link" catch), the same record again at the next
    connection: replication wedged on one hostile record.  Now refused at decoding
    (``records.Setattr.validate``, as ``Write`` refuses a range past 2^62) and skipped."""
    if how == "native" and applier._applyc is None:
        pytest.skip("sdeefs.replication._applyc is not built")
    replica = Replica.open(str(tmp_path / USER), ALICE)
    frames = record_frames(1, MKNOD_F, None) + \
        record_frames(2, rec.Setattr(b"upper/f", rec.SET_SIZE, size=1 << 63), None) + \
        record_frames(3, rec.Setattr(b"upper/f", rec.SET_SIZE, size=5), None)
    apply_frames(replica, frames, how)
    assert replica.applied == 3
    assert [r.seq for r in replica.skipped.records] == [2]
    assert (tmp_path / USER / "upper" / "f").stat().st_size == 5
    replica.close()


@pytest.mark.expect_log("sdeefs.replication.replica")
@pytest.mark.parametrize("run", [False, True])
async def test_a_frame_dropped_before_a_skip_frame_is_noticed(tmp_path: Path, run: bool) -> None:
    """Finding (failed on main before wire version 9, branch wireseq): the origin sends
    Mkdir (1), leaves out its Done (2) and sends the next record (3) with SKIP.  Someone
    on the path drops frame 1 (TCP segments rewritten: the MAC of every frame that
    arrives is intact).  The replica took 3 as following 0 and wrote its position past
    record 1: lost for good.  Now every frame's MAC binds its place on the link
    (``wire.LinkKey``): frame 3 arrives where the first frame was due, and nothing of
    it is applied."""
    first = encode_record_payload(rec.Mkdir(b"upper/one", 0o755, *ALICE_OWNER))
    third = encode_record_payload(rec.Mkdir(b"upper/three", 0o755, *ALICE_OWNER))
    frames = [Frame(RECORD, 1, _entry(1, 0, first), RUN), Frame(RECORD, 3, _entry(3, SKIP, third),
                                                                    RUN)] if run else \
        [Frame(RECORD, 1, first), Frame(RECORD, 3, third, SKIP)]

    def build(key: bytes) -> bytes:
        sent = [frame.encode(key) for frame in frames]  # sealed in order by the sender
        return bytes(sent[1])  # ... and the first dropped on the path

    replica, error = await _hostile_session(tmp_path, build, ALICE)
    try:
        assert "out of sequence" in error
        assert replica.applied == 0
        assert os.listdir(tmp_path / "replicas" / USER / "upper") == []
    finally:
        replica.close()


@pytest.mark.expect_log("sdeefs.replication.replica")
@pytest.mark.parametrize("native", NATIVE)
def test_a_symlink_planted_at_the_name_is_never_followed(tmp_path: Path,
                                                         native: bool) -> None:
    """Guard (passed on ddadbe1): a replica's upper holds a symlink where a record names a
    file (planted by anything but the stream).  Mknod (O_CREAT|O_EXCL|O_NOFOLLOW: EEXIST,
    taken as applied before), Write (O_NOFOLLOW: nothing to write) and Setattr (not held:
    Python) leave its target untouched, in C as in Python."""
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret")
    outside.chmod(0o600)
    replica = Replica.open(str(tmp_path / USER), ALICE)
    os.symlink(outside, tmp_path / USER / "upper" / "f")
    replica.batch_applier().native = native
    frames = [*record_frames(1, MKNOD_F, None),
              *record_frames(2, rec.Write(b"upper/f", b"", 0, 4), b"evil"),
              *record_frames(3, rec.Setattr(b"upper/f", rec.SET_SIZE | rec.SET_MODE,
                                            mode=0o4777, size=0), None)]
    _apply_batch(replica, frames)
    assert replica.applied == 3
    assert outside.read_bytes() == b"secret"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
    replica.close()


@pytest.mark.skipif(applier._applyc is None, reason="sdeefs.replication._applyc is not built")
def test_every_cut_of_a_common_record_is_left_to_python(tmp_path: Path) -> None:
    """Guard (passed on ddadbe1): every cut of a Mknod, Write and Setattr record, and
    the record length field pointing past the payload, is not taken by the C path (False,
    nothing made): lengths from the frame are checked before anything is read."""
    replica = Replica.open(str(tmp_path / USER), ALICE)
    batch = replica.batch_applier()
    payloads = [encode_record_payload(MKNOD_F),
                encode_record_payload(rec.Write(b"upper/f", b"h" * 136, 0, 3), b"abc"),
                encode_record_payload(rec.Setattr(b"upper/f", rec.SET_ALL, 0o644,
                                                  *ALICE_OWNER, 3, 1, 2))]
    for payload in payloads:
        record_end = RECORD_HEAD.size + RECORD_HEAD.unpack_from(payload)[1]
        for cut in range(record_end):  # (a Write cut in its data is a shorter write)
            assert not batch.take(payload[:cut], 1), (payload, cut)
        lying = bytearray(payload)
        lying[2:6] = (len(payload)).to_bytes(4, "little")
        assert not batch.take(bytes(lying), 1)
        lying[2:6] = (0xFFFFFFFF).to_bytes(4, "little")
        assert not batch.take(bytes(lying), 1)
    assert os.listdir(tmp_path / USER / "upper") == []
    replica.close()


def test_a_run_replayed_whole_is_out_of_sequence_and_not_relayed(tmp_path: Path) -> None:
    """Finding (failed on ddadbe1): a RUN frame all of whose records this copy holds was
    passed over silently and returned for relaying, where a plain frame replayed is "out
    of sequence".  Within a session its MAC stays valid, so anyone on the path could
    replay it: the relay buffer got an old frame after newer ones (a follower's position,
    the last frame sent, went back; what it is sent again is out of sequence there).  A
    run overlapping what a copy holds (a relay's cut) is still applied from there on."""
    replica = Replica.open(str(tmp_path / USER), ALICE)
    mkdirs = [encode_record_payload(rec.Mkdir(b"upper/d%d" % seq, 0o755, *ALICE_OWNER))
              for seq in range(1, 5)]
    run = Frame(RECORD, 3, b"".join(_entry(s, 0, mkdirs[s - 1]) for s in (1, 2, 3)), RUN)
    assert _apply_batch(replica, [run])[1] == [run]
    with pytest.raises(ProtocolError, match="out of sequence"):
        _apply_batch(replica, [run])
    overlap = Frame(RECORD, 4, b"".join(_entry(s, 0, mkdirs[s - 1]) for s in (2, 3, 4)), RUN)
    assert _apply_batch(replica, [overlap])[1] == [overlap]
    assert replica.applied == 4
    assert sorted(os.listdir(tmp_path / USER / "upper")) == ["d1", "d2", "d3", "d4"]
    replica.close()
