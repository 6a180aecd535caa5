"""The login replicad serving a kernel-engine journal: real replicads on loopback, a real
layer image, kernel overlayfs and the capture daemon (``sdeefs.fs.capture``).

* a head query drains the capture: a barrier asked right after a write (the capture set to
  wait 30 s before journaling it on its own) holds the write;
* a follower's link does not wait for a drain: it streams the committed batches while
  the capture is busy;
* a capture batch is shipped only once committed: a batch cut off by a kill -9 (and a
  capture stalled in the middle of one) never reaches a replica, the restarted capture's
  Void and full scan do, and the replica converges byte-identical.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs import records as rec
from sdeefs.journal import Entry, Journal
from sdeefs.replication.origin import extent_blocks_ok, open_batch, settled, without_aborted
from tests.conftest import wait_for_socket
from tests.fs.capture_util import tree, tree_diff
from tests.fs.test_capture import Site, make_site, requires_kernel
from tests.launcher.launcher_site import VENV_BIN
from tests.launcher.test_job import _free_port

USER = "alice"


def _start_replicad(base: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    """A replicad with explicit options (no site config here: a bare layer under ROOT)."""
    control = base / f"{name}.sock"
    log = open(base / f"{name}.log", "ab")  # noqa: SIM115 (kept by the process)
    proc = subprocess.Popen([str(VENV_BIN / "sdeefs-replicad"), "--node", name, "--key-file",
                             str(base / "key"), "--control", str(control), *args],
                            stdout=log, stderr=log, start_new_session=True)
    wait_for_socket(proc, control, base / f"{name}.log")
    return proc


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[Site, Path]]:
    """A kernel-engine layer of USER under ROOT (ROOT/alice/{layer.img,layer,state}), the
    login replicad serving ROOT and node n1 following it."""
    root = tmp_path / "root"
    (root / USER).mkdir(parents=True)
    site = make_site(root / USER, size=256 << 20)
    base = tmp_path / "nodes"
    base.mkdir()
    (base / "key").write_text(os.urandom(32).hex())
    os.chmod(base / "key", 0o600)
    port = _free_port()
    daemons = []
    try:
        daemons.append(_start_replicad(base, "login", "--origin", str(root), "--listen",
                                       f"127.0.0.1:{port}"))
        daemons.append(_start_replicad(base, "n1", "--replica-dir", str(base / "replicas"),
                                       "--upstream", f"127.0.0.1:{port}"))
        yield site, base
    finally:
        for proc in daemons:
            proc.kill()
            proc.wait(10)
        site.cleanup()


def replica(base: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdeefs", "replica", *args, "--control",
                           str(base / "n1.sock")], capture_output=True, text=True,
                          timeout=timeout)


def barrier(base: Path) -> None:
    result = replica(base, "follow", USER, "--wait")
    assert result.returncode == 0, result.stderr


def applied(base: Path) -> int:
    status = json.loads(replica(base, "status", "--json").stdout)
    return int(status["replicas"][USER]["applied"])


def diff(site: Site, base: Path) -> list[str]:
    return tree_diff(tree(site.upper, mtimes=False),
                     tree(base / "replicas" / USER / "upper", mtimes=False))


@requires_kernel
def test_a_barrier_right_after_a_write_holds_it(nodes: tuple[Site, Path]) -> None:
    site, base = nodes
    site.start("--quiet", "30", "--max-delay", "30")  # it journals only when asked
    barrier(base)
    (site.mnt / "d").mkdir()
    for i in range(50):
        (site.mnt / "d" / f"f{i}").write_bytes(b"x" * i)
    barrier(base)
    assert (base / "replicas" / USER / "upper" / "d" / "f49").read_bytes() == b"x" * 49
    assert diff(site, base) == []


@requires_kernel
def test_a_follower_streams_committed_batches_while_the_capture_is_busy(
        nodes: tuple[Site, Path]) -> None:
    """A follower's link is answered with the journal's head as it is, not after a drain:
    it starts on the batches committed so far while the capture journals the rest (here
    the capture is stopped, so no drain could answer); a barrier still drains."""
    site, base = nodes
    proc = site.start()
    (site.mnt / "d").mkdir()
    for i in range(20):
        (site.mnt / "d" / f"f{i}").write_bytes(b"y" * i)
    head = site.drain()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        (site.mnt / "later").write_bytes(b"not journaled yet")
        result = replica(base, "follow", USER)
        assert result.returncode == 0, result.stderr
        deadline = time.monotonic() + 30  # (a drain would wait DRAIN_TIMEOUT, 60 s)
        while applied(base) < head:
            assert time.monotonic() < deadline, "the follower got nothing while the " \
                "capture was busy"
            time.sleep(0.1)
        assert (base / "replicas" / USER / "upper" / "d" / "f19").read_bytes() == b"y" * 19
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    barrier(base)
    assert (base / "replicas" / USER / "upper" / "later").read_bytes() == b"not journaled yet"
    assert diff(site, base) == []


@requires_kernel
def test_an_uncommitted_batch_never_reaches_a_replica(nodes: tuple[Site, Path]) -> None:
    site, base = nodes
    first = site.start()
    (site.mnt / "before").write_bytes(b"before")
    barrier(base)
    site.stop(first)
    stalled = site.start("--fault-stall-after", "5")  # the start's scan: nothing to do
    for i in range(40):
        (site.mnt / f"n{i}").write_bytes(b"new %d" % i)
    journal = Journal(directory=str(site.state / "journal"))
    deadline = time.monotonic() + 20
    begin = None
    while begin is None:
        assert time.monotonic() < deadline, "the capture did not start its batch"
        begins = [e.seq for e in journal.read(1) if isinstance(e.record, rec.Begin)]
        committed = {e.record.begin for e in journal.read(1) if isinstance(e.record, rec.Commit)}
        begin = next((b for b in begins if b not in committed), None)
        time.sleep(0.05)
    time.sleep(1.0)  # the stalled batch's first records are in the journal, its end is not
    assert max(e.seq for e in journal.read(1)) > begin
    assert applied(base) < begin
    # nothing the stalled batch holds is on the replica (an earlier batch may have
    # committed the first files: a Create is one record a file, and the stall comes
    # after 5 records of a batch)
    held = {e.record.path for e in journal.read(begin)
            if isinstance(e.record, rec.Create | rec.Mknod)}
    assert held
    for path in held:
        assert not (base / "replicas" / USER / os.fsdecode(path)).exists(), path
    site.stop(stalled, signal.SIGKILL)
    site.start()  # voids the cut-off batch, then a full scan
    barrier(base)
    assert diff(site, base) == []
    assert applied(base) >= begin


@requires_kernel
def test_new_files_travel_as_create_records_and_the_replica_converges(
        nodes: tuple[Site, Path]) -> None:
    """An install's new files (through the overlay: the capture reads them whole) are
    journaled as Create records (``sdeefs.records``, type 21); the login replicad ships
    them, the replica ends byte-identical to the upper and the journal's replay (``sdeefs
    check``) equals the upper.  A file over MAX_INLINE takes the records of old."""
    site, base = nodes
    site.start("--quiet", "30", "--max-delay", "30")  # one batch, when the barrier asks
    barrier(base)
    d = site.mnt / "inst"
    d.mkdir()
    contents = {f"f{i}": os.urandom(i * 37) for i in range(300)}
    contents["block"] = os.urandom(rec.MAX_INLINE)
    contents["over"] = os.urandom(rec.MAX_INLINE + 1)
    for name, data in contents.items():
        (d / name).write_bytes(data)
    os.setxattr(d / "f7", "user.b", b"2")
    os.setxattr(d / "f7", "user.a", b"1")
    os.chmod(d / "f7", 0o640)
    os.link(d / "f3", d / "hard")
    barrier(base)
    creates = {e.record.path: e.record for e in site.journal().read(1)
               if isinstance(e.record, rec.Create)}
    assert {f"upper/inst/{n}".encode() for n in contents if n not in ("over", "f3")} \
        <= set(creates)
    # the hard-linked file: one Create (under either name), then a Link
    assert len({b"upper/inst/f3", b"upper/inst/hard"} & set(creates)) == 1
    assert b"upper/inst/over" not in creates
    f7 = creates[b"upper/inst/f7"]
    assert f7.xattr_pairs() == ((b"user.a", b"1"), (b"user.b", b"2"))
    assert f7.mode & 0o7777 == 0o640
    assert f7.data == contents["f7"]
    assert diff(site, base) == []
    mirror = base / "replicas" / USER / "upper" / "inst"
    for name, data in contents.items():
        assert (mirror / name).read_bytes() == data
        assert (mirror / name).stat().st_mtime_ns == (site.upper / "inst" / name
                                                      ).stat().st_mtime_ns
    assert os.stat(mirror / "hard").st_ino == os.stat(mirror / "f3").st_ino
    assert site.replay_diff() == []
    # and then changed: later records (an Extent) on top of a Create converge too
    (site.mnt / "inst" / "f5").write_bytes(b"changed")
    os.unlink(site.mnt / "inst" / "f6")
    barrier(base)
    assert (mirror / "f5").read_bytes() == b"changed"
    assert diff(site, base) == []
    assert site.replay_diff() == []


@requires_kernel
def test_an_extent_bigger_than_a_frame_reaches_the_replica_whole(
        nodes: tuple[Site, Path]) -> None:
    """An Extent's data travels in MORE-chained frames of wire.CHUNK bytes, SKIP on the
    first only: the origin once set the first frame's flags over its MORE, so the replica
    took the first MiB for the whole record, refused the next chunk as out of sequence,
    resumed past the record, and reached the barrier with the file cut short."""
    site, base = nodes
    site.start("--quiet", "30", "--max-delay", "30")  # one batch, when the barrier asks
    barrier(base)
    (site.mnt / "m1").mkdir()  # metadata before it: the Extent's first frame says SKIP
    big = os.urandom((3 << 20) + 12345)
    (site.mnt / "big").write_bytes(big)
    barrier(base)
    assert any(isinstance(e.record, rec.Extent) and e.record.length > (1 << 20)
               for e in site.journal().read(1))
    assert (base / "replicas" / USER / "upper" / "big").read_bytes() == big
    assert diff(site, base) == []


# -- the rules, record by record ------------------------------------------------------------


def entries(*records: rec.Record) -> list[Entry]:
    return [Entry(seq, record) for seq, record in enumerate(records, 1)]


def test_settled_holds_an_open_batch_and_voided_records_become_markers() -> None:
    write = rec.Mkdir(b"upper/a", 0o755, 0, 0)
    pending = entries(write, rec.Sync(0), rec.Begin(0), write, write)
    assert open_batch(pending) == 2
    assert settled(pending, time.monotonic()) == 2  # up to the Begin, never into it
    committed = pending + [Entry(6, rec.Commit(3))]
    assert open_batch(committed) is None
    assert settled(committed, time.monotonic()) == 6
    voided = without_aborted(pending + [Entry(6, rec.Void(3, 5))])
    assert open_batch(voided) is None
    assert [type(e.record) for e in voided] == [rec.Mkdir, rec.Sync, rec.Sync, rec.Sync,
                                                 rec.Sync, rec.Void]


def _sums(data: bytes, kind: type[rec.Extent] = rec.Extent3) -> bytes:
    """The block sums of ``kind``'s function (made here, not by sdeefs.blocksums):
    BLAKE2b for the types of journals written before BLAKE3 (18, 22), BLAKE3 for 23, 24."""
    import hashlib

    import blake3

    def one(block: bytes) -> bytes:
        if kind.SUMS == "blake3":
            return blake3.blake3(block).digest(rec.SUM_SIZE)
        assert kind.SUMS == "blake2b"
        return hashlib.blake2b(block, digest_size=rec.SUM_SIZE).digest()

    return b"".join(one(data[i:i + rec.EXTENT_BLOCK])
                    for i in range(0, len(data), rec.EXTENT_BLOCK))


OTHER_KIND = {rec.Extent: rec.Extent3, rec.Extent3: rec.Extent}


@pytest.mark.parametrize("kind", [rec.Extent, rec.Extent3])
def test_an_extent_whose_block_changed_waits_for_a_later_extent(
        kind: type[rec.Extent]) -> None:
    """The rule, for an Extent of a journal written before BLAKE3 (type 18, BLAKE2b sums)
    and one of now (type 23, BLAKE3): each record's sums are checked with its type's
    function, never the other's (which would hold every block back for good)."""
    block = rec.EXTENT_BLOCK
    old, new = b"a" * block + b"b" * 10, b"a" * block + b"c" * 10

    def sums(data: bytes) -> bytes:
        return _sums(data, kind)

    extent = kind(b"upper/f", b"h", 0, len(old), len(old), sums(old))
    # the same sums said to be the other function's: no block matches
    assert not extent_blocks_ok(OTHER_KIND[kind](b"upper/f", b"h", 0, len(old), len(old),
                                                 sums(old)), old, [])
    assert extent_blocks_ok(extent, old, [])
    assert not extent_blocks_ok(extent, new, [])  # read after it changed: not yet
    assert not extent_blocks_ok(extent, old[:block], [])  # truncated since
    later = kind(b"upper/f", b"h", block, 10, len(new), sums(new)[rec.SUM_SIZE:])
    assert extent_blocks_ok(extent, new, [later])  # a later Extent rewrites that block
    # of either type: an old journal's record is rewritten by one of the new capture
    assert extent_blocks_ok(extent, new, [rec.Extent3(b"upper/f", b"h", block, 10, len(new),
                                                      _sums(new)[rec.SUM_SIZE:])])
    other = kind(b"upper/g", b"g", block, 10, len(new), sums(new)[rec.SUM_SIZE:])
    assert not extent_blocks_ok(extent, new, [other])
    shrunk = rec.Extent(b"upper/f", b"h", 0, 0, block, b"")
    assert extent_blocks_ok(extent, old[:block], [shrunk])  # the file ends before the block


@pytest.mark.parametrize("kind", [rec.Extent, rec.Extent3])
def test_a_senders_extent_frames_carry_the_data_it_checked(
        tmp_path: Path, kind: type[rec.Extent]) -> None:
    """An Extent's data goes from the upper straight into MORE-chained frames (SKIP on the
    first only) and is checked there against the capture's sums: what travels is what was
    checked.  A block changed since the capture read it holds the Extent back (the sender
    waits) until a later committed Extent rewrites it; then both travel, with the data as
    it is now.  Of a journal written before BLAKE3 (type 18, BLAKE2b sums) as of one
    written now (type 23): a replica gets a type-18 Extent either way, with the sums only
    if they are BLAKE2b's (the only function type 18 says)."""
    from sdeefs.journal import JournalTail
    from sdeefs.layers import open_layer_root
    from sdeefs.offload import Offload
    from sdeefs.replication.origin import JournalSender, OriginUser
    from sdeefs.replication.relay import Downstream, DownstreamLink, Downstreams
    from sdeefs.replication.wire import (
        DOWN,
        FRAME_HEADER,
        MAC_SIZE,
        MORE,
        RUN,
        SKIP,
        UP,
        Frame,
        LinkKey,
        decode_record_payload,
        split_run,
    )
    from sdeefs.statedir import UserDirs

    layer = tmp_path / "layer"
    for sub in ("upper", "work"):
        (layer / sub).mkdir(parents=True)
    data = os.urandom((3 << 20) + 1234)
    (layer / "upper" / "big").write_bytes(data)
    dirs = UserDirs.of(str(tmp_path / "root"), "alice")
    journal = Journal.open(str(dirs.state.journal))
    seq = journal.append(rec.Mkdir(b"upper/d", 0o755, 1000, 1000))
    journal.append(rec.Done(seq))
    first = journal.append(kind(b"upper/big", b"", 0, len(data), len(data),
                                _sums(data, kind)))
    source = open_layer_root(str(layer / "upper"), str(layer / "work"))
    link = DownstreamLink(None, None, LinkKey(b"k" * 32, DOWN),  # type: ignore[arg-type]
                          Downstream("n1", "alice"), Offload())
    # the follower's end: every frame must arrive in its place on the link (wire v9), also
    # after a batch the sender held back
    follower = LinkKey(b"k" * 32, UP)
    sender = JournalSender(link, OriginUser("alice", dirs, Downstreams(4)),
                           JournalTail(str(dirs.state.journal), 1), source, Offload())

    def frames() -> list[tuple[int, int, rec.Record, bytes]]:
        out, _ = sender.next_batch()
        got = []
        for buf in out:
            Frame.decode(bytes(buf[:FRAME_HEADER.size]), bytes(buf[FRAME_HEADER.size:-MAC_SIZE]),
                         bytes(buf[-MAC_SIZE:]), follower)
            _, _, _, flags, _, seq, _ = FRAME_HEADER.unpack_from(buf)
            payload = bytes(buf[FRAME_HEADER.size:-MAC_SIZE])
            for one in ([p for _, _, p in split_run(payload, seq)] if flags & RUN
                        else [payload]):
                record, chunk = decode_record_payload(one)
                got.append((seq, flags, record, bytes(chunk)))
        return got

    sent = frames()
    assert [type(r) for _, _, r, _ in sent[:1]] == [rec.Mkdir]
    chunks = [(seq, flags, chunk) for seq, flags, r, chunk in sent if isinstance(r, rec.Extent)]
    assert {seq for seq, _, _ in chunks} == {first}
    assert [flags for _, flags, _ in chunks] == [SKIP | MORE, MORE, MORE, 0]
    assert b"".join(chunk for _, _, chunk in chunks) == data
    shipped = [r for _, _, r, _ in sent if isinstance(r, rec.Extent)]
    assert {type(r) for r in shipped} == {rec.Extent}
    assert {r.sums for r in shipped} == {_sums(data, kind) if kind is rec.Extent else b""}
    # changed since the capture read it: not shipped, whatever the file holds now
    second = journal.append(kind(b"upper/big", b"", 0, len(data), len(data),
                                 _sums(data, kind)))
    changed = bytearray(data)
    changed[(20 << 16) + 5] ^= 1
    (layer / "upper" / "big").write_bytes(changed)
    assert frames() == []
    assert sender.waiting
    # the capture's next batch rewrites the block: both go, with the data as it is now
    block = bytes(changed[20 << 16:21 << 16])
    journal.append(kind(b"upper/big", b"", 20 << 16, len(block), len(data),
                        _sums(block, kind)))
    sent = frames()
    assert {seq for seq, _, _, _ in sent} == {second, second + 1}
    assert b"".join(c for seq, _, _, c in sent if seq == second) == changed
    journal.close()
    source.close()


def test_a_sender_reading_a_long_history_holds_a_bounded_window(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cold follower of a long history (a pip install: tens of thousands of records)
    is served from a window of about MAX_PENDING entries: every batch looks at what is
    held, so holding the whole history made a cold stream cost its square.  Every
    record still travels, in order, markers left out."""
    from sdeefs.journal import JournalTail
    from sdeefs.offload import Offload
    from sdeefs.replication import origin
    from sdeefs.replication.origin import MAX_PENDING, JournalSender, OriginUser
    from sdeefs.replication.relay import Downstream, DownstreamLink, Downstreams
    from sdeefs.replication.wire import (
        FRAME_HEADER,
        MAC_SIZE,
        RUN,
        decode_record_payload,
        split_run,
    )
    from sdeefs.statedir import UserDirs

    dirs = UserDirs.of(str(tmp_path), "alice")
    journal = Journal.open(str(dirs.state.journal))
    files = 12_000
    for i in range(files):
        seq = journal.append(rec.Mknod(b"upper/f%d" % i, stat.S_IFREG | 0o644, 1000, 1000))
        journal.append(rec.Done(seq))
    journal.close()
    user = OriginUser("alice", dirs, Downstreams(4))
    link = DownstreamLink(None, None, b"k" * 32, Downstream("n1", "alice"),  # type: ignore[arg-type]
                          Offload())
    sender = JournalSender(link, user, JournalTail(str(dirs.state.journal), 1),
                           None, Offload())  # type: ignore[arg-type]
    made: list[bytes] = []
    looked_at: list[int] = []
    runs: list[int] = []  # records per frame

    def settled(pending: list[Entry], first_seen: float, batches: bool = True) -> int:
        looked_at.append(len(pending))
        return original(pending, first_seen, batches)

    original = origin.settled
    monkeypatch.setattr(origin, "settled", settled)
    deadline = time.monotonic() + 60
    while len(made) < files and time.monotonic() < deadline:
        out, _ = sender.next_batch()
        for buf in out:
            payload = bytes(buf[FRAME_HEADER.size:-MAC_SIZE])
            flags, seq = FRAME_HEADER.unpack_from(buf)[3], FRAME_HEADER.unpack_from(buf)[5]
            records = [p for _, _, p in split_run(payload, seq)] if flags & RUN else [payload]
            runs.append(len(records))
            for one in records:
                record, _ = decode_record_payload(one)
                if not isinstance(record, rec.Done):  # a batch may end on a marker
                    assert isinstance(record, rec.Mknod)
                    made.append(record.path)
        if not out:
            time.sleep(0.06)  # the last record waits HOLD_BACK for a possible Abort
    assert made == [b"upper/f%d" % i for i in range(files)]
    assert len(runs) < files / 100  # many records per frame (wire.RUN), one MAC each
    # what each batch looked at (it scans it whole): the whole history before, 24,000
    assert max(looked_at) <= 2 * MAX_PENDING


def test_a_journal_written_before_blake3_replays_and_checks(tmp_path: Path) -> None:
    """A capture batch as sdeefs wrote it before BLAKE3 (Extent 18 and StableExtent 22,
    BLAKE2b sums) is what it was: ``sdeefs check`` and replay rebuild the upper from it,
    and the shipper's rule passes each record's data as it is (checked with BLAKE2b)."""
    from sdeefs.apply import replay
    from sdeefs.check import check_replay_matches
    from sdeefs.sysio import name_to_handle
    from tests.fs.capture_util import open_layers

    layer = tmp_path / "layer"
    for sub in ("upper", "work"):
        (layer / sub).mkdir(parents=True)
    data = os.urandom(5 * rec.EXTENT_BLOCK + 99)
    big = layer / "upper" / "big"
    big.write_bytes(data)
    os.chmod(big, 0o644)
    st = os.stat(big)
    fd = os.open(big, os.O_RDONLY)
    try:
        handle = name_to_handle(fd)
    finally:
        os.close(fd)
    cut = 2 * rec.EXTENT_BLOCK
    journal = Journal.open(str(tmp_path / "journal"))
    begin = journal.append(rec.Begin(1))
    journal.append(rec.Mknod(b"upper/big", stat.S_IFREG | 0o644, st.st_uid, st.st_gid))
    records: list[rec.Extent] = [
        rec.Extent(b"upper/big", handle, 0, cut, len(data), _sums(data[:cut], rec.Extent)),
        rec.StableExtent(b"upper/big", handle, cut, len(data) - cut, len(data),
                         _sums(data[cut:], rec.StableExtent), st.st_ctime_ns)]
    for record in records:
        journal.append(record)
        assert extent_blocks_ok(record, data[record.offset:record.offset + record.length], [])
    journal.append(rec.Setattr(b"upper/big", rec.SET_SIZE | rec.SET_MTIME, 0o644, st.st_uid,
                               st.st_gid, len(data), 0, st.st_mtime_ns))
    journal.append(rec.Commit(begin))
    assert [type(e.record) for e in journal.read(1)][2:4] == [rec.Extent, rec.StableExtent]
    assert check_replay_matches(journal, str(layer / "upper"), str(layer / "work")) == []
    scratch = tmp_path / "replay"
    for sub in ("upper", "work"):
        (scratch / sub).mkdir(parents=True)
    source, target = open_layers(layer), open_layers(scratch)
    try:
        replay(journal, source, target)
    finally:
        source.close()
        target.close()
        journal.close()
    assert tree_diff(tree(layer / "upper"), tree(scratch / "upper")) == []
