"""The replica's common records in C (``sdeefs/replication/_applyc.c``) against the Python
path they stand in for, on hostile inputs.

The C path only *takes* a record or leaves it to Python; it never refuses.  So the
property: whatever it takes, Python's one set of rules (``records.decode_record``,
``wire.sanitize``, ``replicable.refusal``) accepts and carries, and a history applied with
the C path and without it leaves the same tree, the same skipped records (same seqs,
same reasons) and nothing outside the copy."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sdeefs import records as rec
from sdeefs.replicable import NOBODY, UserIds, refusal, user_ids
from sdeefs.replication import applier
from sdeefs.replication.replica import Replica, _apply_batch
from sdeefs.replication.wire import (
    RECORD,
    RECORD_HEAD,
    Frame,
    ProtocolError,
    decode_record_payload,
    encode_record_payload,
)

pytestmark = pytest.mark.skipif(applier._applyc is None,
                                reason="sdeefs.replication._applyc is not built")

USER = "alice"
ALICE = user_ids(4242, 4242)
PATHS = [b"upper/a", b"upper/d/b", b"upper/d", b"upper/l/x", b"upper/../x", b"upper/./a",
         b"upper//a", b"work/w", b"upper", b"upper/a\x00", b"upper/" + b"n" * 256,
         b"upper/" + b"n" * 255, b"uppe/x", b"upper/a/", b"upper/d/..", b"upper/.a"]
MODES = [stat.S_IFREG | 0o644, stat.S_IFREG | 0o4755, stat.S_IFREG | 0o7777,
         stat.S_IFIFO | 0o644, stat.S_IFCHR, 0o644, stat.S_IFREG | 0o644 | 0x10000,
         stat.S_IFDIR | 0o755, stat.S_IFREG]
OWNERS = [(4242, 4242), (0, 0), (4242, 0), (1000, 4242), (4242, 1000)]
TIMES = [0, 10**18, -1, -(10**9) + 1, 2**62]
NOW_SLACK = 3600 * 10**9  # a time within an hour of now was set by the kernel, not a record


def _mknod() -> st.SearchStrategy[bytes]:
    return st.builds(lambda p, m, o: encode_record_payload(rec.Mknod(p, m, *o)),
                     st.sampled_from(PATHS), st.sampled_from(MODES), st.sampled_from(OWNERS))


def _write() -> st.SearchStrategy[bytes]:
    def build(path: bytes, offset: int, data: bytes, extra: int, handle: bytes) -> bytes:
        length = max(len(data) + extra, 0)
        return encode_record_payload(rec.Write(path, handle, offset, length), data)
    return st.builds(build, st.sampled_from(PATHS), st.sampled_from([0, 5, 2**62 - 3, 2**62]),
                     st.sampled_from([b"", b"abc", b"x" * 100]), st.sampled_from([0, 4, -1]),
                     st.sampled_from([b"", b"h" * 136, b"h" * 137]))


def _setattr() -> st.SearchStrategy[bytes]:
    def build(path: bytes, mask: int, mode: int, owner: tuple[int, int], size: int,
              atime: int, mtime: int) -> bytes:
        return encode_record_payload(rec.Setattr(path, mask, mode, *owner, size, atime, mtime))
    return st.builds(build, st.sampled_from(PATHS), st.integers(0, 63),
                     st.sampled_from([0o644, 0o4755, 0o7777, 0o17777]),
                     st.sampled_from(OWNERS), st.sampled_from([0, 3, 100]),
                     st.sampled_from(TIMES), st.sampled_from(TIMES))


def _create() -> st.SearchStrategy[bytes]:
    """A Create (the kernel engine's small file whole): the C path takes a new file's
    without xattrs and leaves the rest (an existing file, xattrs) to Python."""
    def build(path: bytes, mode: int, owner: tuple[int, int], mtime: int, handle: bytes,
              xattrs: bytes, data: bytes) -> bytes:
        return encode_record_payload(rec.Create(path, mode, *owner, mtime, handle, xattrs,
                                                data))
    return st.builds(build, st.sampled_from(PATHS), st.sampled_from(MODES),
                     st.sampled_from(OWNERS), st.sampled_from(TIMES),
                     st.sampled_from([b"", b"h" * 136, b"h" * 137]),
                     st.sampled_from([b"", rec.encode_xattr_list(((b"user.a", b"1"),)),
                                      rec.encode_xattr_list(((b"trusted.x", b"1"),)),
                                      b"\x00"]),
                     st.sampled_from([b"", b"abc", b"y" * 5000, b"z" * rec.MAX_INLINE,
                                      b"z" * (rec.MAX_INLINE + 1)]))


def _extent() -> st.SearchStrategy[bytes]:
    """An Extent (the kernel engine's data, a Write with the capture's sums): the C path
    takes it as the Write it is when ``records.Extent.validate`` would pass it."""
    def build(path: bytes, offset: int, data: bytes, extra: int, handle: bytes,
              sums: bytes, size: int) -> bytes:
        length = max(len(data) + extra, 0)
        return encode_record_payload(rec.Extent(path, handle, offset, length, size, sums),
                                     data)
    return st.builds(build, st.sampled_from(PATHS),
                     st.sampled_from([0, 5, rec.EXTENT_BLOCK, 2**62 - rec.EXTENT_BLOCK, 2**62]),
                     st.sampled_from([b"", b"abc", b"x" * 100]), st.sampled_from([0, 4, -1]),
                     st.sampled_from([b"", b"h" * 136, b"h" * 137]),
                     st.sampled_from([b"", b"s" * rec.SUM_SIZE, b"s" * (rec.SUM_SIZE - 1),
                                      b"s" * (rec.SUM_SIZE * rec.MAX_SUMS),
                                      b"s" * (rec.SUM_SIZE * (rec.MAX_SUMS + 1))]),
                     st.sampled_from([0, 3, 2**64 - 1]))


def _mutated(payload: bytes, where: int, byte: int, cut: int) -> bytes:
    """``payload`` with one byte replaced, or cut short, or with a byte added."""
    if cut == 1:
        return payload[:where % (len(payload) + 1)]
    if cut == 2:
        return payload + bytes([byte])
    buf = bytearray(payload)
    buf[where % len(buf)] = byte
    return bytes(buf)


PAYLOADS = st.one_of(
    _mknod(), _write(), _setattr(), _create(), _extent(),
    st.builds(_mutated, st.one_of(_mknod(), _write(), _setattr(), _create(), _extent()),
              st.integers(0, 400),
              st.integers(0, 255), st.integers(0, 2)),
    st.just(encode_record_payload(rec.Mkdir(b"upper/d", 0o755, 4242, 4242))),
    st.binary(max_size=40))


def _state(upper: Path, now: int) -> list[tuple[object, ...]]:
    """Every entry: type and permissions, owner, size, the times a record set (others are
    the kernel's: "now"), then every file's contents (read after every stat)."""
    def when(t: int) -> int | str:
        return "now" if abs(t - now) < NOW_SLACK else t

    entries: list[tuple[object, ...]] = []
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            s = path.lstat()
            entries.append((str(path.relative_to(upper)), s.st_mode, s.st_uid, s.st_gid,
                            s.st_size, when(s.st_mtime_ns),
                            when(s.st_atime_ns) if stat.S_ISREG(s.st_mode) else None))
    contents: list[tuple[object, ...]] = [
        (path, (upper / path).read_bytes()) for path, mode, *_ in entries
        if isinstance(path, str) and isinstance(mode, int) and stat.S_ISREG(mode)]
    return sorted(entries, key=repr) + contents


# Entries a crash left (made, never chowned: root's, mode less a 077 umask) before the
# history comes again: of the kind its records make, and of another kind.
CRASHED = [(b"upper/a", stat.S_IFREG), (b"upper/d", stat.S_IFDIR), (b"upper/d/b", stat.S_IFREG),
           (b"upper/a", stat.S_IFDIR), (b"upper/a", stat.S_IFIFO), (b"work/w", stat.S_IFREG),
           (b"upper/d", stat.S_IFREG), (b"upper/.a", stat.S_IFREG)]


def _crashed(copy: Path, entries: list[tuple[bytes, int]]) -> None:
    """Make ``entries`` in the copy at ``copy`` as a kill between create and chown leaves
    them (those whose parent is missing or whose name is taken are passed over)."""
    for name, kind in entries:
        top, *parts = name.split(b"/")
        if top not in (b"upper", b"work") or not parts or any(
                p in (b"", b".", b"..") or b"\0" in p or len(p) > 255 for p in parts):
            continue  # a path no record may name (refused as such)
        path = copy / os.fsdecode(name)
        if os.path.lexists(path) or not path.parent.is_dir() \
                or path.parent.resolve() != path.parent.absolute():
            continue  # (never through the planted symlink)
        if kind == stat.S_IFDIR:
            path.mkdir(mode=0o700)
        elif kind == stat.S_IFIFO:
            os.mkfifo(path, 0o600)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _run(root: Path, payloads: list[bytes], ids: UserIds, native: bool,
         taken: list[bytes], crashed: list[tuple[bytes, int]] | None = None
         ) -> tuple[object, ...]:
    outside = root / "outside"
    outside.mkdir(parents=True)
    replica = Replica.open(str(root / USER), ids)
    os.symlink(outside, root / USER / "upper" / "l")
    _crashed(root / USER, crashed or [])
    replica.batch_applier().native = native
    original = applier.BatchApplier.take

    def take(self: applier.BatchApplier, payload: bytes | memoryview, seq: int) -> bool:
        got = original(self, payload, seq)
        if got:
            taken.append(bytes(payload))
        return got

    frames = [Frame(RECORD, seq, payload) for seq, payload in enumerate(payloads, 1)]
    error = None
    applier.BatchApplier.take = take  # type: ignore[method-assign]
    try:
        _apply_batch(replica, frames)
    except ProtocolError as exc:
        error = str(exc)
    finally:
        applier.BatchApplier.take = original  # type: ignore[method-assign]
    result = (error, replica.applied, [(r.seq, r.reason) for r in replica.skipped.records],
              replica.skipped.count, _state(root / USER / "upper", time.time_ns()),
              os.listdir(outside))
    replica.close()
    return result


def _made_by(payloads: list[bytes]) -> list[tuple[bytes, int]]:
    """The entries the creating records among ``payloads`` make (those that decode)."""
    made = []
    for payload in payloads:
        try:
            record, _ = decode_record_payload(payload)
        except ProtocolError:
            continue
        if isinstance(record, rec.Mknod | rec.Create):
            made.append((record.path, stat.S_IFMT(record.mode)))
        elif isinstance(record, rec.Mkdir):
            made.append((record.path, stat.S_IFDIR))
    return made


@pytest.mark.expect_log("sdeefs.replication.replica")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example([encode_record_payload(rec.Mknod(b"upper/a", stat.S_IFREG | 0o644, 4242, 4242))],
         "alice", [], True)
@example([encode_record_payload(rec.Create(b"upper/a", stat.S_IFREG | 0o755, 4242, 4242, 0,
                                           b"", b"", b"abc"))], "alice", [], True)
@example([encode_record_payload(rec.Mkdir(b"upper/d", 0o755, 4242, 4242))], "alice", [], True)
@given(st.lists(PAYLOADS, min_size=1, max_size=10), st.sampled_from(["alice", "nobody"]),
       st.lists(st.sampled_from(CRASHED), max_size=3), st.booleans())
def test_what_the_c_path_takes_python_accepts_and_both_leave_the_same_tree(
        payloads: list[bytes], who: str, crashed: list[tuple[bytes, int]],
        replayed: bool) -> None:
    """(``crashed``, ``replayed``: the history comes again after a crash that left
    entries, unowned: some at its records' paths, or, ``replayed``, every entry its
    creating records make, as a kill between create and chown leaves it.  Both paths
    settle them the same way.)"""
    ids = ALICE if who == "alice" else NOBODY
    if replayed:
        crashed = crashed + [(path, kind) for path, kind in _made_by(payloads)
                             if kind in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO)]
    with tempfile.TemporaryDirectory() as tmp:
        taken: list[bytes] = []
        native = _run(Path(tmp) / "n", payloads, ids, True, taken, crashed)
        python = _run(Path(tmp) / "p", payloads, ids, False, [], crashed)
    assert native == python
    assert native[-1] == []  # nothing outside the copy
    for payload in taken:
        record, _ = decode_record_payload(payload)  # Python accepts it ...
        assert refusal(record, ids) is None  # ... and carries it
        assert isinstance(record, rec.Mknod | rec.Write | rec.Setattr | rec.Create)


def test_the_c_path_takes_the_common_records_and_leaves_the_rest() -> None:
    """It does take a cold stream's bulk (else the property above holds trivially), and
    leaves what only Python may judge: a whiteout, a root owner, a set-ID mode beyond
    07777, a path through a symlink is resolved by Python's resolver and refused there."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        replica = Replica.open(str(root / USER), ALICE)
        batch = replica.batch_applier()
        common = [
            encode_record_payload(rec.Mknod(b"upper/f", stat.S_IFREG | 0o4755, 4242, 4242)),
            encode_record_payload(rec.Write(b"upper/f", b"", 0, 3), b"abc"),
            encode_record_payload(rec.Setattr(b"upper/f", rec.SET_ALL, 0o6755, 4242, 4242, 2,
                                              10**18, 2 * 10**18)),
        ]
        assert [batch.take(p, seq) for seq, p in enumerate(common, 1)] == [True] * 3
        batch.close()
        f = root / USER / "upper" / "f"
        assert f.read_bytes() == b"ab"
        assert stat.S_IMODE(f.stat().st_mode) == 0o755  # set-ID bits stripped
        assert f.stat().st_mtime_ns == 2 * 10**18
        left = [
            encode_record_payload(rec.Mknod(b"upper/w", stat.S_IFCHR, 0, 0)),
            encode_record_payload(rec.Mknod(b"upper/r", stat.S_IFREG | 0o644, 0, 0)),
            encode_record_payload(rec.Mknod(b"upper/x", stat.S_IFREG | 0o644 | 0x10000,
                                            4242, 4242)),
            encode_record_payload(rec.Setattr(b"upper/f", rec.SET_MODE, 0o644)),  # not held
            encode_record_payload(rec.Mkdir(b"upper/d", 0o755, 4242, 4242)),
            encode_record_payload(rec.Mknod(b"upper", stat.S_IFREG | 0o644, 4242, 4242)),
            struct.pack("<HI", rec.Mknod.TYPE, 3) + b"abc",
        ]
        assert [batch.take(p, 9) for p in left] == [False] * len(left)
        assert sorted(os.listdir(root / USER / "upper")) == ["f"]
        # a parent through a symlink: Python's resolver refuses it (ELOOP), as a skip
        outside = root / "outside"
        outside.mkdir()
        os.symlink(outside, root / USER / "upper" / "l")
        with pytest.raises(ProtocolError, match="record 9 cannot be applied"):
            batch.take(encode_record_payload(rec.Mknod(b"upper/l/x", stat.S_IFREG | 0o644,
                                                       4242, 4242)), 9)
        assert os.listdir(outside) == []
        replica.close()


def test_the_c_path_takes_a_new_files_create_and_leaves_the_rest() -> None:
    """The kernel engine's Create (a small file whole, most of a cold stream's records)
    goes through C when the file is new and has no xattrs: created, owned, its data,
    size and mtime as ``Create.expand`` applies them; an existing file (a replay), xattrs
    and a parent that cannot be resolved are Python's, which says why."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        replica = Replica.open(str(root / USER), ALICE)
        batch = replica.batch_applier()
        new = rec.Create(b"upper/c", stat.S_IFREG | 0o4751, 4242, 4242, 3 * 10**18, b"h",
                         b"", b"hello")
        assert batch.take(encode_record_payload(new), 1)
        assert batch.take(encode_record_payload(  # the held file's next record: C too
            rec.Setattr(b"upper/c", rec.SET_MODE, 0o640)), 2)
        batch.close()
        c = root / USER / "upper" / "c"
        assert c.read_bytes() == b"hello"
        s = c.stat()
        assert (stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, s.st_mtime_ns) == \
            (0o640, 4242, 4242, 3 * 10**18)
        left = [
            new,  # it exists now
            attrs.evolve(new, path=b"upper/x", xattrs=rec.encode_xattr_list(
                ((b"user.a", b"1"),))),
            attrs.evolve(new, path=b"upper/x", uid=0),
            attrs.evolve(new, path=b"upper/nodir/x"),
            attrs.evolve(new, path=b"upper/x", mode=stat.S_IFREG | 0o644 | 0x10000),
        ]
        assert [batch.take(encode_record_payload(r), 3) for r in left] == [False] * len(left)
        assert sorted(os.listdir(root / USER / "upper")) == ["c"]
        replica.close()


def test_the_c_path_takes_an_extent_as_the_write_it_is() -> None:
    """The kernel engine's Extent (most of a cold stream's bytes) is written by C into the
    held file at its offset; one ``records.Extent.validate`` refuses (sums not whole, an
    offset off its block, bytes after the sums) and a StableExtent (never sent to a
    replica: the login node keeps its witness) are Python's."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        replica = Replica.open(str(root / USER), ALICE)
        batch = replica.batch_applier()
        made = rec.Create(b"upper/e", stat.S_IFREG | 0o644, 4242, 4242, 0, b"h", b"", b"")
        assert batch.take(encode_record_payload(made), 1)
        sums = b"s" * (2 * rec.SUM_SIZE)
        data = os.urandom(rec.EXTENT_BLOCK + 10)
        first = rec.Extent(b"upper/e", b"h", 0, len(data), 2 * len(data), sums)
        assert batch.take(encode_record_payload(first, data), 2)
        again = attrs.evolve(first, offset=2 * rec.EXTENT_BLOCK)
        assert batch.take(encode_record_payload(again, data[:7]), 3)
        batch.close()
        assert (root / USER / "upper" / "e").read_bytes() == \
            data + bytes(rec.EXTENT_BLOCK - 10) + data[:7]
        left = [
            encode_record_payload(attrs.evolve(first, sums=b"s" * 15), data),
            encode_record_payload(attrs.evolve(first, offset=5), data),
            encode_record_payload(first, data) + b"",  # (taken: the control)
            encode_record_payload(rec.StableExtent(b"upper/e", b"h", 0, 3, 3, sums, 1),
                                  b"abc"),
        ]
        body = rec.encode_record(first)[1] + b"x"  # a byte after the sums
        left.append(struct.pack("<HI", rec.Extent.TYPE, len(body)) + body + data)
        assert [batch.take(p, 4) for p in left] == [False, False, True, False, False]
        replica.close()


def _write_syscalls() -> int:
    """Write syscalls this process made so far (``/proc/self/io``: pwrite counts)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("syscw:"):
                return int(line.split()[1])
    raise AssertionError("no syscw in /proc/self/io")


@pytest.mark.parametrize("native", [True, False])
def test_a_records_data_goes_in_pieces_and_lands_whole(native: bool) -> None:
    """A MiB of an Extent's data is written WRITE_PIECE bytes per pwrite, by C and by
    Python alike (ext4 sizes page-cache folios by the write: ``_applyc.c``, WRITE_PIECE),
    and the file holds it all."""
    assert applier.WRITE_PIECE == applier._applyc.WRITE_PIECE
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        replica = Replica.open(str(root / USER), ALICE)
        batch = replica.batch_applier()
        made = rec.Create(b"upper/e", stat.S_IFREG | 0o644, 4242, 4242, 0, b"h", b"", b"")
        assert batch.take(encode_record_payload(made), 1)
        batch.native = native
        data = os.urandom(1 << 20)
        extent = rec.Extent(b"upper/e", b"h", 0, len(data) + 5, len(data) + 5, b"")
        payload = encode_record_payload(extent, data)
        before = _write_syscalls()
        if native:
            assert batch.take(payload, 2)
        else:
            record, body = decode_record_payload(payload)
            batch.apply(record, body, "record 2")
        assert _write_syscalls() - before == len(data) // applier.WRITE_PIECE
        batch.close()
        assert (root / USER / "upper" / "e").read_bytes() == data
        replica.close()


def test_record_head_is_what_the_c_path_reads() -> None:
    assert RECORD_HEAD.format == "<HI"


def test_a_short_write_of_a_records_data_is_continued_or_raised_never_dropped(
        tmp_path: Path) -> None:
    """Python's path writes a record's data as ``_applyc``'s does: a short write (here: the
    process's file size limit cuts a piece) is continued, so the limit's EFBIG is raised
    rather than the rest of the record silently left out."""
    script = textwrap.dedent(f"""
        import errno, os, resource, signal
        from sdeefs.replication import applier
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        fd = os.open({str(tmp_path / "f")!r}, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            applier._write_pieces(fd, b"x" * 30_000, 80_000)
        except OSError as exc:
            print("raised", errno.errorcode[exc.errno])
        else:
            print("returned")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.split() == ["raised", "EFBIG"]
