"""A cold stream of the default engine, the login node's side (issue 16, branch coldsource).

* ``StableExtent`` (``sdeefs.records``): the capture's witness (the file's ctime while it
  read it) lets the login replicad ship an Extent's data without hashing it, when nobody
  has the file open for writing as it starts reading (a read lease) and the ctime is
  unchanged after; otherwise the sums decide as for any Extent.  The record's encoding is
  pinned; a replica is sent the plain Extent (the witness stays on the login node).
* the capture journals a StableExtent for a file that was quiet when read, and the
  replica converges byte-identical (a real capture, real replicads).
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from sdeefs import records as rec
from sdeefs.errors import BadRecord
from sdeefs.fs.fanotify import handle_ino
from sdeefs.journal import Journal, JournalTail
from sdeefs.layers import LayerRoot, open_layer_root
from sdeefs.offload import Offload
from sdeefs.replication.origin import JournalSender, OriginUser
from sdeefs.replication.relay import Downstream, DownstreamLink, Downstreams
from sdeefs.replication.wire import (
    DOWN,
    FRAME_HEADER,
    MAC_SIZE,
    RUN,
    UP,
    Frame,
    LinkKey,
    decode_record_payload,
    split_run,
)
from sdeefs.statedir import UserDirs
from sdeefs.sysio import name_to_handle
from tests.fs.test_capture import Site, requires_kernel
from tests.replication.test_capture_origin import (  # noqa: F401
    USER,
    _sums,
    barrier,
    diff,
    nodes,
)

# -- the record -----------------------------------------------------------------------------


def test_a_stable_extent_is_an_extent_and_its_witness_pinned() -> None:
    """Type 22: an Extent's fields, then the witness as a little-endian i64."""
    stable = rec.StableExtent(b"upper/f", b"h" * 8, 1 << 16, 10, 100, b"s" * 16, 1234567890)
    rtype, payload = rec.encode_record(stable)
    plain = stable.shipped()
    assert rtype == 22
    assert type(plain) is rec.Extent
    assert payload == rec.encode_record(plain)[1] + struct.pack("<q", 1234567890)
    assert rec.decode_record(22, payload) == stable
    assert isinstance(stable, rec.Write)  # applied and replayed as the Write it is
    for bad in (0, -1):
        with pytest.raises(BadRecord):
            rec.decode_record(22, payload[:-8] + struct.pack("<q", bad))
    with pytest.raises(BadRecord):
        rec.decode_record(22, payload[:-1])
    for version in (1, 2):  # a type of encoding 3, as Create
        with pytest.raises(BadRecord):
            rec.decode_record(22, payload, version)


# -- the sender's rule ------------------------------------------------------------------------


class _Sender:
    """A login journal and upper in ``tmp``, and a sender of it (no socket)."""

    def __init__(self, tmp: Path) -> None:
        self.layer = tmp / "layer"
        for sub in ("upper", "work"):
            (self.layer / sub).mkdir(parents=True)
        self.dirs = UserDirs.of(str(tmp / "root"), "alice")
        self.journal = Journal.open(str(self.dirs.state.journal))
        self.source: LayerRoot = open_layer_root(str(self.layer / "upper"),
                                                 str(self.layer / "work"))
        link = DownstreamLink(None, None, LinkKey(b"k" * 32, DOWN),  # type: ignore[arg-type]
                              Downstream("n1", "alice"), Offload())
        self.follower = LinkKey(b"k" * 32, UP)
        self.sender = JournalSender(link, OriginUser("alice", self.dirs, Downstreams(4)),
                                    JournalTail(str(self.dirs.state.journal), 1), self.source,
                                    Offload())

    def file(self, name: str, data: bytes) -> tuple[Path, bytes, int]:
        """``upper/name`` holding ``data``: its path, handle, and ctime once it is old."""
        path = self.layer / "upper" / name
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            handle = name_to_handle(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if handle_ino(handle) != st.st_ino:
            pytest.skip("the filesystem of tmp_path has no ext4-style file handles")
        return path, handle, st.st_ctime_ns

    def frames(self) -> list[tuple[int, int, rec.Record, bytes]]:
        """(seq, rtype, record, data) of what the next batch sends, as the follower reads it."""
        out, _ = self.sender.next_batch()
        got = []
        for buf in out:
            Frame.decode(bytes(buf[:FRAME_HEADER.size]), bytes(buf[FRAME_HEADER.size:-MAC_SIZE]),
                         bytes(buf[-MAC_SIZE:]), self.follower)
            _, _, _, flags, _, seq, _ = FRAME_HEADER.unpack_from(buf)
            payload = bytes(buf[FRAME_HEADER.size:-MAC_SIZE])
            for one in ([p for _, _, p in split_run(payload, seq)] if flags & RUN
                        else [payload]):
                rtype = struct.unpack_from("<H", one)[0]
                record, chunk = decode_record_payload(one)
                got.append((seq, rtype, record, bytes(chunk)))
        return got

    def close(self) -> None:
        self.journal.close()
        self.source.close()
        self.sender.tail.close()


@pytest.fixture
def login(tmp_path: Path) -> Iterator[_Sender]:
    sender = _Sender(tmp_path)
    try:
        yield sender
    finally:
        sender.close()


def _stable(name: str, handle: bytes, data: bytes, ctime: int, sums: bytes,
            kind: type[rec.StableExtent] = rec.StableExtent3) -> rec.StableExtent:
    return kind(f"upper/{name}".encode(), handle, 0, len(data), len(data), sums, ctime)


WRONG = b"\0" * rec.SUM_SIZE  # sums no data has: only the witness can let such data go


def _wrong_sums(data: bytes) -> bytes:
    return WRONG * (-(-len(data) // rec.EXTENT_BLOCK))


def test_a_witnessed_extent_travels_unhashed_as_a_plain_extent(login: _Sender) -> None:
    """The witness holds (no writer, ctime as captured): the data goes as read, its sums
    not looked at (here they match no data: the old sender held such an Extent back for
    good), and the replica gets a type-18 Extent without the witness."""
    data = os.urandom((2 << 20) + 777)
    _, handle, ctime = login.file("big", data)
    seq = login.journal.append(_stable("big", handle, data, ctime, _wrong_sums(data)))
    sent = login.frames()
    assert {s for s, _, _, _ in sent} == {seq}
    assert {rtype for _, rtype, _, _ in sent} == {rec.Extent.TYPE}
    assert all(type(r) is rec.Extent for _, _, r, _ in sent)
    assert b"".join(chunk for _, _, _, chunk in sent) == data
    assert not login.sender.waiting


@pytest.mark.parametrize("kind", [rec.StableExtent, rec.StableExtent3])
def test_a_changed_ctime_leaves_it_to_the_sums(login: _Sender,
                                               kind: type[rec.StableExtent]) -> None:
    """The file's ctime moved since the capture read it: the sums decide.  Wrong sums:
    held back; right sums: shipped, checked with the function of the record's type
    (BLAKE2b in a journal written before BLAKE3: type 22; BLAKE3 now: type 24)."""
    data = os.urandom(3 << 16)
    path, handle, ctime = login.file("f", data)
    os.chmod(path, 0o600)  # a ctime change only: the data are the same
    assert os.stat(path).st_ctime_ns != ctime
    login.journal.append(_stable("f", handle, data, ctime, _wrong_sums(data), kind))
    assert login.frames() == []
    assert login.sender.waiting
    login.sender.pending.clear()
    other = rec.StableExtent3 if kind is rec.StableExtent else rec.StableExtent
    login.journal.append(_stable("f", handle, data, ctime, _sums(data, kind), other))
    assert login.frames() == []  # the right bytes, said to be the other function's
    login.sender.pending.clear()
    seq = login.journal.append(_stable("f", handle, data, ctime, _sums(data, kind), kind))
    sent = login.frames()
    assert {s for s, _, _, _ in sent} == {seq}
    assert b"".join(chunk for _, _, _, chunk in sent) == data


@pytest.mark.parametrize("how", ["open", "mapped"])
def test_a_writer_of_the_file_leaves_it_to_the_sums(login: _Sender, how: str) -> None:
    """Someone has the file open for writing (or a shared writable mapping of it, its
    descriptor closed): a write through a mapping need not move the ctime, so the witness
    proves nothing and the sums decide (wrong ones: held back).  Once the writer is gone,
    the witness holds again."""
    data = os.urandom(2 << 16)
    path, handle, ctime = login.file("f", data)
    fd = os.open(path, os.O_RDWR)
    mapping = None
    try:
        if how == "mapped":
            mapping = mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fd)
            fd = -1
        seq = login.journal.append(_stable("f", handle, data, ctime, _wrong_sums(data)))
        assert login.frames() == []
        assert login.sender.waiting
    finally:
        if mapping is not None:
            mapping.close()
        if fd >= 0:
            os.close(fd)
    assert os.stat(path).st_ctime_ns == ctime  # nothing was written: the witness holds
    sent = login.frames()
    assert {s for s, _, _, _ in sent} == {seq}
    assert b"".join(chunk for _, _, _, chunk in sent) == data


# -- the capture writes them ---------------------------------------------------------------------


@requires_kernel
def test_the_capture_witnesses_a_quiet_file_and_the_replica_converges(
        nodes: tuple[Site, Path]) -> None:  # noqa: F811
    """A file written, then quiet when the capture reads it: its Extents carry the witness
    (its ctime then); the replica gets the data whole.  A file changed again after that is
    shipped as it is now, and the replica still converges."""
    site, base = nodes
    site.start()
    barrier(base)
    data = os.urandom((1 << 20) + 4321)
    (site.mnt / "quiet").write_bytes(data)
    time.sleep(0.1)  # the capture reads it once it is quiet (its ctime a tick old by then)
    barrier(base)
    stable = [e.record for e in site.journal().read(1)
              if isinstance(e.record, rec.StableExtent)]
    assert stable, "the capture journaled no witness"
    assert {r.ctime_ns for r in stable} == {os.stat(site.upper / "quiet").st_ctime_ns}
    assert (base / "replicas" / USER / "upper" / "quiet").read_bytes() == data
    with open(site.mnt / "quiet", "r+b") as f:  # its ctime moves: the sums decide again
        f.seek(70000)
        f.write(b"changed")
    barrier(base)
    assert diff(site, base) == []


# -- open batches, kept as entries are read -----------------------------------------------------


def test_the_senders_open_batch_is_open_batch_of_its_window(login: _Sender) -> None:
    """``JournalSender`` keeps the capture's open batches as it reads (not a scan of its
    window per look): over random histories of batches, Commits, Voids and records, read
    a few at a time and sent a few at a time, it finds the Begin ``open_batch`` finds."""
    import random

    from sdeefs.journal import RawEntry
    from sdeefs.replication.origin import open_batch, without_aborted

    rng = random.Random(16)
    record = rec.Mkdir(b"upper/d", 0o755, 1000, 1000)
    for _ in range(200):
        sender = login.sender
        sender.pending, sender.open_begins, sender.batches = [], set(), False
        seq, begins = 0, []
        for _ in range(rng.randrange(1, 12)):
            new = []
            for _ in range(rng.randrange(0, 6)):
                seq += 1
                roll = rng.random()
                if roll < 0.2:
                    one: rec.Record = rec.Begin(0)
                    begins.append(seq)
                elif roll < 0.35 and begins:
                    one = rec.Commit(begins.pop())
                elif roll < 0.45 and begins:
                    one = rec.Void(begins[0], seq - 1)
                    begins = []
                else:
                    one = record
                rtype, payload = rec.encode_record(one)
                new.append(RawEntry(seq, rtype, payload, None))
            sender._take(new)
            expected = open_batch(without_aborted(sender.pending))
            assert sender._open_batch() == expected
            if sender.pending and rng.random() < 0.5:  # some sent: the window moves on
                cut = rng.randrange(0, (expected if expected is not None
                                        else len(sender.pending)) + 1)
                sender.pending = sender.pending[cut:]
                assert sender._open_batch() == open_batch(sender.pending)


@requires_kernel
def test_a_file_still_being_written_is_journaled_once_written_with_its_witness(
        nodes: tuple[Site, Path]) -> None:  # noqa: F811
    """The capture's batches run while a big file is written (every max_delay): it is
    not journaled as it grows, in Extents no witness can cover (read while changing),
    but once written, with the witness; a barrier asked while it is still being written
    holds what was written before it all the same."""
    site, base = nodes
    site.start()
    barrier(base)
    piece = os.urandom(16 << 10)

    def write_for(f: BinaryIO, seconds: float) -> int:
        written, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            f.write(piece)
            f.flush()
            written += len(piece)
            time.sleep(0.001)
        return written

    with open(site.mnt / "growing", "wb") as f:
        first = write_for(f, 0.3)
        barrier(base)  # asked while it is being written: nothing is left for later
        assert (base / "replicas" / USER / "upper" / "growing").stat().st_size == first
        write_for(f, 0.4)
    time.sleep(0.2)
    barrier(base)
    assert diff(site, base) == []
    # written between two barriers: journaled once written, with the witness (what
    # went at the first barrier was read while the file was changing: no witness)
    second = [e.record for e in site.journal().read(1)
              if isinstance(e.record, rec.Extent) and e.record.path == b"upper/growing"
              and e.record.length and e.record.offset + e.record.length > first]
    assert second
    assert all(isinstance(r, rec.StableExtent) for r in second), \
        [(type(r).__name__, r.offset, r.length) for r in second]
