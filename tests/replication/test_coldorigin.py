"""The login node's sender copies journal records into frames as they are (issue 16, branch
coldorigin): ``JournalTail.poll_raw``, ``records.peek``, ``RunEncoder.add_record``.

What must not change is pinned here: the frames sent for a journal are byte for byte the
ones the decoding sender made (its code is kept below as the reference, ``_reference``),
for a realistic history and odd and hostile records alike, the refusals noted for
``sdeefs status`` are the same, and ``peek`` vouches only for payloads that
``decode_record`` accepts (and then says what it says)."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
from pathlib import Path
from types import SimpleNamespace

import attrs
import pytest

from sdeefs import records as rec
from sdeefs.errors import BadRecord
from sdeefs.journal import (
    SEGMENT_HEADER,
    Entry,
    Journal,
    JournalTail,
    encode_frame,
    encode_segment_header,
    segment_name,
)
from sdeefs.layers import open_layer_root
from sdeefs.replicable import NOBODY, UserIds, refusal, user_ids
from sdeefs.replication import mac, wire
from sdeefs.replication.origin import (
    MARKERS,
    MAX_REFUSED,
    JournalSender,
    OriginUser,
    merge_setattr,
    settled,
    without_aborted,
)
from sdeefs.replication.relay import Downstreams
from sdeefs.replication.wire import (
    RECORD,
    RUN,
    RUN_BYTES,
    RUN_ENTRY,
    RUN_WRITE,
    Frame,
    encode_record_payload,
    encode_write_frames,
    write_record_payload,
)
from sdeefs.statedir import UserDirs

KEY = b"k" * 32
UID = 1000


@pytest.fixture
def fixed_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MAC field made a function of the frame (the GMAC nonce is random), and no
    record held back for a possible Abort (the reference takes all as settled)."""
    from sdeefs.replication import origin

    monkeypatch.setattr(origin, "HOLD_BACK", 0.0)

    def seal(key: bytes, *parts: bytes, nonce: bytes | None = None) -> bytes:
        digest = hashlib.sha256(key + (nonce or b""))
        for part in parts:
            digest.update(part)
        return digest.digest()[:mac.FIELD - 4] + bytes(4)

    monkeypatch.setattr(mac, "seal", seal)
    monkeypatch.setattr(wire, "_gmacc", None)  # frames sealed through mac.seal, patched


# -- the decoding sender, as it was (the reference) -------------------------------------------


@attrs.define(eq=False)
class _OldRun:
    """``wire.RunEncoder`` before ``add_record``."""

    key: bytes
    parts: list[bytes] = attrs.field(factory=list)
    single: tuple[int, int, bytes] | None = None
    count: int = 0
    size: int = 0
    last: int = 0

    def add(self, seq: int, flags: int, payload: bytes, out: list[bytes | bytearray]) -> None:
        if self.size + RUN_ENTRY.size + len(payload) > 2 << 20:
            self.flush(out)
        if not self.count:
            self.single = (seq, flags, payload)
        self.parts += (RUN_ENTRY.pack(seq, flags, len(payload)), payload)
        self.count += 1
        self.size += RUN_ENTRY.size + len(payload)
        self.last = seq
        if self.size >= RUN_BYTES:
            self.flush(out)

    def flush(self, out: list[bytes | bytearray]) -> None:
        if self.count == 1 and self.single is not None:
            seq, flags, payload = self.single
            out.append(Frame(RECORD, seq, payload, flags).encode(self.key))
        elif self.count:
            out.append(Frame(RECORD, self.last, b"".join(self.parts), RUN).encode(self.key))
        self.parts, self.single, self.count, self.size = [], None, 0, 0


def _reference(entries: list[Entry], source: object, ids: UserIds,
               refused: dict[int, str]) -> list[bytes | bytearray]:
    """The frames the decoding sender (``JournalSender.next_batch`` and ``_encode`` before
    this branch) made of ``entries``, all settled, one batch; refusals into ``refused``."""
    from sdeefs.writeahead import open_write_data

    pending = without_aborted(entries)
    ready = settled(pending, 0.0)
    out: list[bytes | bytearray] = []
    run = _OldRun(KEY)
    skipped = False

    def encode(seq: int, record: rec.Record, flags: int) -> None:
        reason = refusal(record, ids)
        if reason is not None and seq not in refused and len(refused) < MAX_REFUSED:
            refused[seq] = reason
        if not isinstance(record, rec.Write):
            run.add(seq, flags, encode_record_payload(record), out)
            return
        fd = open_write_data(source, record)  # type: ignore[arg-type]
        try:
            if record.length <= RUN_WRITE:
                run.add(seq, flags, write_record_payload(record, fd), out)
                return
            run.flush(out)
            out.extend(bytes(b) for b in encode_write_frames(seq, record, fd, KEY, flags))
        finally:
            if fd is not None:
                os.close(fd)

    held: tuple[int, rec.Setattr, int] | None = None
    for taken, entry in enumerate(pending[:ready], 1):
        record = entry.record
        last_of_batch = taken == ready
        if isinstance(record, rec.Extent):
            raise AssertionError("no Extent in these journals")
        if isinstance(record, MARKERS) and not last_of_batch:
            skipped = True
            continue
        if held is not None and isinstance(record, rec.Setattr):
            merged = merge_setattr(held[1], record)
            if merged is not None:
                held, skipped = (entry.seq, merged, 2), False
                continue
        if held is not None:
            encode(*held)
            held = None
        flags = 2 if skipped else 0
        skipped = False
        if isinstance(record, rec.Setattr) and not last_of_batch:
            held = (entry.seq, record, flags)
            continue
        encode(entry.seq, record, flags)
    if held is not None:
        encode(*held)
    run.flush(out)
    return out


# -- journals ----------------------------------------------------------------------------------


def _history(upper: Path) -> list[rec.Record]:
    """What a user's install journals (files, directories, writes big and small, setattr
    chains of chmod/chown/utimes, renames, xattrs, links, aborts, markers), and odd and
    hostile records that only a journal written by something else holds."""
    rng = random.Random(16)
    out: list[rec.Record] = []
    (upper / "d").mkdir(exist_ok=True)
    out.append(rec.Mkdir(b"upper/d", stat.S_IFDIR | 0o755, UID, UID))
    for i in range(300):
        name = b"upper/d/f%d" % i
        size = rng.choice([0, 10, 4000, 70_000, 300_000, 2_500_000]) if i % 7 else 65536
        (upper / "d" / f"f{i}").write_bytes(rng.randbytes(size))
        out.append(rec.Mknod(name, stat.S_IFREG | 0o644, UID, UID))
        out.append(rec.Done(len(out)))
        if size:
            out.append(rec.Write(name, b"", 0, size))
        if i % 5 == 3:  # the file shrank since: a shorter write goes
            out.append(rec.Write(name, b"", size, 1000))
        chain = [rec.Setattr(name, rec.SET_MODE, 0o600),
                 rec.Setattr(name, rec.SET_OWNER, 0, UID, UID),
                 rec.Setattr(name, rec.SET_ATIME | rec.SET_MTIME, 0, 0, 0, 0, 5, -7),
                 rec.Setattr(name, rec.SET_SIZE, 0, 0, 0, size),  # after times: alone
                 rec.Setattr(name + b"x", rec.SET_MODE, 0o755)]  # another path: alone
        out += chain[:1 + i % len(chain)]
        if i % 11 == 0:
            out.append(rec.Sync(1))
        if i % 13 == 0:
            out.append(rec.Setxattr(name, b"user.k", b"v"))
            out.append(rec.Setxattr(name, b"security.selinux", b"x"))  # refused
        if i % 17 == 0:
            out.append(rec.Rename(name, name + b".moved", 0, i))
            out.append(rec.Abort(len(out)))  # the rename did not happen
        if i % 19 == 0:
            out.append(rec.Mknod(name + b".theirs", stat.S_IFREG | 0o644, 0, 0))  # refused
            out.append(rec.Mkdir(name + b".dir", stat.S_IFDIR | 0o700, 4242, UID))  # refused
            out.append(rec.Setattr(name, rec.SET_OWNER, 0, 0, 0))  # refused
            out.append(rec.Mknod(b"upper/d/.wh.x%d" % i, stat.S_IFCHR | 0o600, 0, 0))
            out.append(rec.Mknod(b"upper/d/.wh.y%d" % i, stat.S_IFCHR, 0, 0))  # a whiteout
            out.append(rec.Mknod(b"work/#%d" % i, stat.S_IFREG | 0o600, 0, 0))  # copy-up
        if i % 23 == 0:
            out.append(rec.Symlink(name + b".l", b"../x" * 20, UID, UID))
            out.append(rec.Link(name, name + b".h"))
            out.append(rec.Setattr(name, rec.SET_MODE | rec.SET_SIZE, 0o4755, 0, 0, 3))
            out.append(rec.Unlink(name + b".h"))
            out.append(rec.Fallocate(name, 0, 0, 10))
            out.append(rec.Create(name + b".c", stat.S_IFREG | 0o640, UID, UID, 9, b"",
                                  rec.encode_xattr_list(((b"user.a", b"1"),)), b"data"))
            out.append(rec.Setattr(b"upper/" + b"p" * 255 + b"/q", rec.SET_MODE, 0o700))
    out.append(rec.Setattr(b"upper/d/f1", rec.SET_MODE, 0o700))  # the batch ends held
    return out


def _site(tmp_path: Path) -> tuple[UserDirs, Path]:
    dirs = UserDirs.of(str(tmp_path), "alice")
    upper, work = dirs.live()
    os.makedirs(upper, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    return dirs, Path(upper)


def _sender_frames(dirs: UserDirs, ids: UserIds) -> tuple[list[bytes], dict[int, str]]:
    """Every frame the sender makes of the journal (batch after batch, all settled)."""
    user = OriginUser("alice", dirs, Downstreams(4))
    user.ids = ids
    source = open_layer_root(*dirs.live())
    tail = JournalTail(str(dirs.state.journal), 1)
    sender = JournalSender(SimpleNamespace(key=KEY), user, tail, source, None)  # type: ignore[arg-type]
    out: list[bytes] = []
    try:
        while True:
            sender.first_seen = 0.0  # everything settled
            buffers, _ = sender.next_batch()
            if not buffers and not sender.pending:
                break
            out += [bytes(b) for b in buffers]
    finally:
        tail.close()
        source.close()
    return out, user.refused


def _reference_frames(dirs: UserDirs, ids: UserIds) -> tuple[list[bytes], dict[int, str]]:
    tail = JournalTail(str(dirs.state.journal), 1)
    source = open_layer_root(*dirs.live())
    entries: list[Entry] = []
    try:
        while batch := tail.poll():
            entries += batch
        refused: dict[int, str] = {}
        return [bytes(b) for b in _reference(entries, source, ids, refused)], refused
    finally:
        tail.close()
        source.close()


@pytest.mark.expect_log("sdeefs.replication.origin")  # the refusals noted
@pytest.mark.parametrize("ids", [user_ids(UID, UID), NOBODY], ids=["owner", "nobody"])
def test_frames_are_byte_identical_to_the_decoding_senders(
        tmp_path: Path, fixed_mac: None, ids: UserIds,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A realistic history with odd and hostile records: the same frames, byte for byte,
    as decoding every record and encoding it again made, and the same refusals noted."""
    from sdeefs.replication import origin

    monkeypatch.setattr(origin, "BATCH_BYTES", 1 << 40)  # one batch, as the reference
    monkeypatch.setattr(origin, "MAX_PENDING", 1 << 40)
    monkeypatch.setattr(origin, "POLL_BYTES", 1 << 30)
    dirs, upper = _site(tmp_path)
    journal = Journal.open(str(dirs.state.journal))
    history = _history(upper)
    for record in history:
        journal.append(record)
    journal.close()
    new, new_refused = _sender_frames(dirs, ids)
    old, old_refused = _reference_frames(dirs, ids)
    assert len(new) == len(old) > 100
    assert new == old
    assert new_refused == old_refused
    assert len(old_refused) >= (5 if ids is not NOBODY else 2)


@pytest.mark.expect_log("sdeefs.replication.origin")
def test_batches_cut_where_they_were(tmp_path: Path, fixed_mac: None) -> None:
    """The sender's own batches (BATCH_BYTES of data, MAX_PENDING entries) end where
    they did: the stream of frames is the decoding sender's, batch cuts included."""
    dirs, upper = _site(tmp_path)
    journal = Journal.open(str(dirs.state.journal))
    for record in _history(upper):
        journal.append(record)
    journal.close()
    new, _ = _sender_frames(dirs, user_ids(UID, UID))
    joined = b"".join(new)
    # the same records and data, in the same order, as a single batch makes them
    old, _ = _reference_frames(dirs, user_ids(UID, UID))
    assert _records_of(joined) == _records_of(b"".join(old))


def _records_of(stream: bytes) -> list[tuple[int, bytes]]:
    """(seq, RECORD payload) of every record in a stream of frames (runs split)."""
    from sdeefs.replication.wire import FRAME_HEADER, MAC_SIZE, split_run

    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(stream):
        _, _, _, flags, length, seq, _ = FRAME_HEADER.unpack_from(stream, pos)
        payload = stream[pos + FRAME_HEADER.size:pos + FRAME_HEADER.size + length]
        if flags & RUN:
            out += [(s, bytes(p)) for s, _, p in split_run(payload, seq)]
        else:
            out.append((seq, payload))
        pos += FRAME_HEADER.size + length + MAC_SIZE
    return out


def test_an_old_segment_travels_in_the_encoding_of_now(tmp_path: Path, fixed_mac: None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A version-1 segment (u16 path lengths) is decoded and encoded again when read: the
    wire carries version 3, as the decoding sender sent it."""
    from sdeefs.replication import origin

    monkeypatch.setattr(origin, "BATCH_BYTES", 1 << 40)
    dirs, upper = _site(tmp_path)
    os.makedirs(dirs.state.journal, exist_ok=True)
    (upper / "a").write_bytes(b"x" * 5000)
    records = [rec.Mkdir(b"upper/b", stat.S_IFDIR | 0o755, UID, UID),
               rec.Mknod(b"upper/a", stat.S_IFREG | 0o644, UID, UID), rec.Done(2),
               rec.Write(b"upper/a", b"", 0, 5000), rec.Setattr(b"upper/a", rec.SET_MODE, 0o600),
               rec.Setattr(b"upper/a", rec.SET_OWNER, 0, UID, UID)]
    segment = encode_segment_header(1, 1) + b"".join(
        encode_frame(seq, r, 1) for seq, r in enumerate(records, 1))
    Path(dirs.state.journal, segment_name(1)).write_bytes(segment)
    Path(dirs.state.journal, "id").write_bytes(b"i" * 16)
    assert len(segment) > SEGMENT_HEADER.size
    new, _ = _sender_frames(dirs, user_ids(UID, UID))
    old, _ = _reference_frames(dirs, user_ids(UID, UID))
    assert new == old
    assert [s for s, _ in _records_of(b"".join(new))] == [1, 2, 4, 6]


def test_a_record_that_does_not_decode_stops_the_sender_as_before(tmp_path: Path) -> None:
    """A journal written by something else, with a record that does not decode (its
    checksum right): the raw reader refuses it as the decoding one did (BadRecord), and
    sends nothing of the read that held it."""
    dirs, _ = _site(tmp_path)
    journal = Journal.open(str(dirs.state.journal))
    journal.append(rec.Mkdir(b"upper/a", stat.S_IFDIR | 0o755, UID, UID))
    journal.close()
    path = Path(dirs.state.journal, segment_name(1))
    bad = rec.Mkdir(b"upper/../etc", stat.S_IFDIR | 0o755, UID, UID)  # no door let it in
    with open(path, "ab") as f:
        f.write(encode_frame(2, bad))
    for poll in ("poll", "poll_raw"):
        tail = JournalTail(str(dirs.state.journal), 1)
        with pytest.raises(BadRecord):
            getattr(tail, poll)()
        tail.close()
    with pytest.raises(BadRecord):
        _sender_frames(dirs, user_ids(UID, UID))


# -- peek: only what decodes ---------------------------------------------------------------------


def _samples() -> list[tuple[int, bytes]]:
    records: list[rec.Record] = [
        rec.Mkdir(b"upper/a", 0o40755, 1, 2), rec.Mknod(b"upper/a/b", 0o100644, 3, 4),
        rec.Mknod(b"upper/.wh.c", stat.S_IFCHR, 0, 0), rec.Mknod(b"work/#1", 0o10600, 0, 0),
        rec.Unlink(b"upper/x"), rec.Rmdir(b"work/y"),
        rec.Setattr(b"upper/a", rec.SET_ALL, 0o7777, 5, 6, (1 << 63) - 1, -1, 1 << 62),
        rec.Setattr(b"upper/a", rec.SET_MODE, 0o644),
        rec.Write(b"upper/a", b"h" * rec.MAX_HANDLE, 5, 10), rec.Write(b"upper/b", b"", 0, 0),
        rec.Done(7), rec.Sync(1), rec.Abort(3), rec.Symlink(b"upper/l", b"t", 1, 1),
        rec.Begin(1), rec.Commit(2), rec.Void(1, 2),
        rec.Setattr(b"upper/" + b"n" * 255 + b"/" + b"m" * 255, rec.SET_SIZE, 0, 0, 0, 9)]
    return [rec.encode_record(r) for r in records]


def _mutations(payload: bytes, rng: random.Random) -> list[bytes]:
    out = [payload[:-1], payload + b"\0", payload[:4], b"", payload[:1]]
    for _ in range(60):
        b = bytearray(payload)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(b)) if b else 0
            if b:
                b[i] = rng.choice([0, 0x2e, 0x2f, 0xff, 0x80, 0x01, rng.randrange(256)])
        out.append(bytes(b))
    # hostile lengths and fields
    out.append(struct.pack("<I", 1 << 31) + payload[4:])
    out.append(struct.pack("<I", len(payload)) + payload[4:])
    return out


@pytest.mark.parametrize("version", [1, 2, 3])
def test_peek_vouches_only_for_what_decodes(version: int) -> None:
    """Over valid payloads of every type and thousands of hostile variants: whatever
    ``peek`` vouches for, ``decode_record`` accepts, with the same fields, and encodes
    back to the same bytes (so a sender may copy it); and it vouches for the valid
    payloads of the types it knows."""
    rng = random.Random(version)
    vouched = 0
    for rtype, payload in _samples():
        if version < 3:  # the same record in that version's encoding
            payload = rec.encode_record(rec.decode_record(rtype, payload), version)[1]
        cases = [payload, *_mutations(payload, rng)]
        for rtype_tried in {rtype, rec.Mknod.TYPE, rec.Setattr.TYPE, rec.Write.TYPE}:
            for case in cases:
                fields = rec.peek(rtype_tried, case, version)
                if fields is None:
                    continue
                vouched += 1
                record = rec.decode_record(rtype_tried, case, version)  # never raises
                assert rec.encode_record(record, version)[1] == case
                if hasattr(record, "path"):
                    assert case[4:fields[0]] == record.path
                if isinstance(record, rec.Setattr):
                    assert fields[1:] == (record.mask, record.mode, record.uid, record.gid,
                                          record.size, record.atime_ns, record.mtime_ns)
                elif isinstance(record, rec.Write):
                    assert case[fields[0] + 4:fields[1]] == record.handle
                    assert fields[2:] == (record.offset, record.length)
                elif isinstance(record, rec.Mkdir | rec.Mknod):
                    assert fields[1:] == (record.mode, record.uid, record.gid)
                elif isinstance(record, rec.Done | rec.Sync):
                    assert fields == (record.seq if isinstance(record, rec.Done)
                                      else record.reason,)
        if version >= 2 and rtype in (1, 2, 5, 6, 8, 11, 13, 14):
            assert rec.peek(rtype, payload, version) is not None
    assert vouched > 100


def test_merged_setattr_fields_encode_as_merge_setattr() -> None:
    """The sender merges setattr chains on fields; the bytes are ``merge_setattr``'s."""
    from sdeefs.replication.origin import PATH_LENGTH, SETATTR_FIXED, merge_setattr_fields

    rng = random.Random(3)
    bits = [rec.SET_MODE, rec.SET_OWNER, rec.SET_SIZE, rec.SET_ATIME, rec.SET_MTIME]
    for _ in range(2000):
        pair = [rec.Setattr(rng.choice([b"upper/a", b"upper/b"]),
                            sum(b for b in bits if rng.random() < 0.4), rng.randrange(0o7777),
                            rng.randrange(5), rng.randrange(5), rng.randrange(1 << 40),
                            rng.randrange(-5, 5), rng.randrange(-5, 5)) for _ in range(2)]
        fields = [(r.path, r.mask, r.mode, r.uid, r.gid, r.size, r.atime_ns, r.mtime_ns)
                  for r in pair]
        merged = merge_setattr(*pair)
        got = merge_setattr_fields(*fields)
        assert (merged is None) == (got is None)
        if merged is not None and got is not None:
            assert PATH_LENGTH.pack(len(got[0])) + got[0] + SETATTR_FIXED.pack(*got[1:]) \
                == rec.encode_record(merged)[1]


def test_a_run_with_add_record_is_what_add_made(fixed_mac: None) -> None:
    """``RunEncoder.add_record`` (type and body, no payload made) gives the frames that
    ``add`` of the whole payload gives, a run of one included."""
    from sdeefs.replication.wire import RunEncoder

    rng = random.Random(5)
    for count in (1, 2, 50, 3000):
        a, b = RunEncoder(KEY), RunEncoder(KEY)
        out_a: list[bytes | bytearray] = []
        out_b: list[bytes | bytearray] = []
        for seq in range(1, count + 1):
            record = rec.Write(b"upper/f%d" % seq, b"", 0, rng.randrange(3000))
            data = rng.randbytes(record.length)
            flags = rng.choice([0, 2])
            a.add(seq, flags, encode_record_payload(record, data), out_a)
            b.add_record(seq, flags, record.TYPE, rec.encode_record(record)[1], out_b, data)
        a.flush(out_a)
        b.flush(out_b)
        assert [bytes(x) for x in out_a] == [bytes(x) for x in out_b]


def test_a_pooled_buffer_is_used_again_only_once_nothing_refers_to_it() -> None:
    """``wire.BufferPool`` (the sender's Write frames, read into buffers not zeroed): a
    buffer some view, slice or list still holds is never handed out again."""
    from sdeefs.replication.wire import BufferPool

    pool = BufferPool(keep=4)
    first = pool.take(100)
    first[:] = b"a" * 100
    held = first[10:20]  # a slice of a view: holds the buffer too
    del first
    second = pool.take(100)
    second[:] = b"b" * 100
    assert bytes(held) == b"a" * 10  # not reused while the slice lives
    frames = [second]
    del second, held
    third = pool.take(50)  # the first buffer, free again
    third[:] = b"c" * 50
    assert bytes(frames[0]) == b"b" * 100
    assert len(pool._buffers) == 2
    bigger = pool.take(4000)  # no free buffer big enough: a new one
    assert len(bigger) == 4000
    assert len(pool._buffers) == 3
    del third, frames, bigger
    many = [pool.take(10) for _ in range(10)]  # beyond ``keep``: buffers of their own
    assert len(pool._buffers) == 4
    for i, view in enumerate(many):
        view[:] = bytes([i]) * 10
    assert [bytes(v) for v in many] == [bytes([i]) * 10 for i in range(10)]
    pool.clear()
    assert not pool._buffers


def test_frames_sent_from_a_worker_thread_arrive_whole_and_a_cancel_ends_the_wait() -> None:
    """``relay.send_blocking`` (the origin's sends off the trio loop): every byte of many
    buffers arrives in order through a socket whose buffer takes a fraction of them at a
    time; a peer that reads nothing leaves the thread waiting, and cancelling the task
    that waits for it ends that wait within a poll interval."""
    import socket

    import trio

    from sdeefs.replication.relay import SEND_WAIT, send_blocking
    from sdeefs.replication.wire import Encoded

    rng = random.Random(7)
    buffers: list[Encoded] = [rng.randbytes(rng.choice([10, 5000, 300_000]))
                                        for _ in range(200)]
    buffers.append(bytearray(rng.randbytes(1 << 20)))
    want = b"".join(buffers)

    async def main() -> None:
        left, right = socket.socketpair()
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        left.setblocking(False)
        got = bytearray()

        def receive() -> None:
            while len(got) < len(want):
                chunk = right.recv(1 << 16)
                assert chunk
                got.extend(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, receive)
            await trio.to_thread.run_sync(send_blocking, left.fileno(), buffers)
        assert bytes(got) == want
        # nobody reads: the thread waits for room until its task is cancelled
        start = trio.current_time()
        with trio.move_on_after(0.3):
            silent: list[Encoded] = [bytes(8 << 20)]
            await trio.to_thread.run_sync(send_blocking, left.fileno(), silent)
        assert trio.current_time() - start < 0.3 + 3 * SEND_WAIT / 1000
        left.close()
        right.close()

    trio.run(main)
