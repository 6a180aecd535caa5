"""The kernel engine's capture end to end: a real ext4 layer image (``sdeefs.fs.image``),
kernel overlayfs over it, the capture daemon watching it with fanotify; changes made
through the overlay; after a drain, replaying the journal into an empty layer root
gives the upper (as ``sdeefs check`` does), also after kill -9 and queue overflows."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from sdeefs import blocksums, mountinfo
from sdeefs import records as rec
from sdeefs.apply import recover, replay
from sdeefs.check import check_replay_matches
from sdeefs.errors import QuietError
from sdeefs.fs import capture, image, reconcile
from sdeefs.fs import fanotify as fan
from sdeefs.fs.model import Model
from sdeefs.journal import Journal
from sdeefs.sysio import RENAME_EXCHANGE, renameat2

from .capture_util import open_layers, tree, tree_diff


def kernel_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop mounts, kernel overlayfs, fanotify filesystem marks)"
    if shutil.which("mkfs.ext4") is None or shutil.which("e2fsck") is None:
        return "needs e2fsprogs (mkfs.ext4, e2fsck)"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read():
            return "the kernel has no overlayfs"
    return None


requires_kernel = pytest.mark.skipif(kernel_skip_reason() is not None,
                                     reason=kernel_skip_reason() or "")


@attrs.define
class Site:
    """A layer image mounted at ``layer``, an overlay of it at ``mnt``, and captures."""

    root: Path
    lower: Path
    layer: Path
    mnt: Path
    state: Path
    procs: list[subprocess.Popen[bytes]] = attrs.field(factory=list)
    overlay: bool = False

    @property
    def upper(self) -> Path:
        return self.layer / "upper"

    @property
    def log(self) -> Path:
        return self.root / "capture.log"

    def mount_overlay(self) -> None:
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.lower},upperdir={self.upper},"
                        f"workdir={self.layer / 'work'}", str(self.mnt)], check=True)
        self.overlay = True

    def start(self, *extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sdeefs.fs.capture", "--layer", str(self.layer),
             "--state", str(self.state), "--log", str(self.log), *extra],
            stderr=subprocess.PIPE)
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while True:
            try:
                capture.request(str(self.state), "status", timeout=5)
                return proc
            except QuietError:  # not listening yet
                if proc.poll() is not None:
                    assert proc.stderr is not None
                    raise AssertionError(f"capture exited: {proc.stderr.read()!r}") from None
                if time.monotonic() > deadline:
                    raise AssertionError("capture did not start") from None
                time.sleep(0.05)

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        code = proc.wait(60)
        self.procs.remove(proc)
        return code

    def drain(self) -> int:
        return capture.drain(str(self.state))

    def status(self) -> dict[str, Any]:
        """The capture's answer (JSON)."""
        return capture.request(str(self.state), "status")

    def journal(self) -> Journal:
        return Journal(directory=str(self.state / "journal"))  # for reading

    def head(self) -> int:
        return max((e.seq for e in self.journal().read(1)), default=0)

    def replay_diff(self) -> list[str]:
        """Replay the whole journal into an empty layer root; differences with the upper."""
        journal = self.journal()
        problems = check_replay_matches(journal, str(self.upper), str(self.layer / "work"))
        scratch = self.root / "replay"
        shutil.rmtree(scratch, ignore_errors=True)
        (scratch / "upper").mkdir(parents=True)
        (scratch / "work").mkdir()
        source, target = open_layers(self.layer), open_layers(scratch)
        try:
            replay(journal, source, target)
        finally:
            source.close()
            target.close()
        return problems + tree_diff(tree(self.upper), tree(scratch / "upper"))

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        self.procs.clear()
        if self.overlay:
            subprocess.run(["umount", str(self.mnt)], capture_output=True)
            if image.mount_source(str(self.mnt)) is not None:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        image.unmount_image(str(self.layer))


def make_site(root: Path, size: int = 1 << 30, bytes_per_inode: int | None = None) -> Site:
    site = Site(root, root / "lower", root / "layer", root / "mnt", root / "state")
    for d in (site.lower / "ld" / "sub", site.lower / "keep", site.mnt, site.state):
        d.mkdir(parents=True)
    (site.lower / "lf").write_bytes(b"lower file\n")
    (site.lower / "ld" / "sub" / "y").write_bytes(b"y" * 5000)
    (site.lower / "ld" / "z").write_bytes(b"z")
    (site.lower / "keep" / "k").write_bytes(b"k")
    os.link(site.lower / "keep" / "k", site.lower / "keep" / "k2")
    image.create_image(str(root / "layer.img"), size, bytes_per_inode)
    image.mount_image(str(root / "layer.img"), str(site.layer))
    image.prepare_layer(str(site.layer), 0, 0)
    site.mount_overlay()
    return site


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = make_site(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()


def changes_through_the_overlay(mnt: Path, tag: str = "") -> None:
    """Copy-ups, whiteouts, opaque directories, hard links, renames of every kind."""
    with open(mnt / "lf", "ab") as f:  # copy-up of a lower file
        f.write(b"appended" + tag.encode())
    os.chmod(mnt / "keep" / "k", 0o600)  # copy-up of a hard-linked lower file (metadata)
    os.setxattr(mnt / "keep", "user.tag", b"v" + tag.encode())  # copy-up of a lower dir
    shutil.rmtree(mnt / "ld", ignore_errors=True)  # whiteouts for a lower tree
    (mnt / "ld").mkdir(exist_ok=True)  # over its whiteout: an opaque directory
    (mnt / "ld" / "again").write_bytes(b"again")
    new = mnt / f"new{tag}"
    (new / "deep" / "er").mkdir(parents=True)
    (new / "deep" / "er" / "f").write_bytes(os.urandom(100_000))
    os.link(new / "deep" / "er" / "f", new / "hard")
    os.symlink("deep/er/f", new / "sym")
    os.mkfifo(new / "fifo")
    (mnt / f"x{tag}").write_bytes(b"x")
    (mnt / f"y{tag}").write_bytes(b"y")
    fd = os.open(mnt, os.O_RDONLY)
    try:
        renameat2(fd, f"x{tag}".encode(), fd, f"y{tag}".encode(), RENAME_EXCHANGE)
    finally:
        os.close(fd)
    os.rename(new / "deep", mnt / f"moved{tag}")  # a directory moves up
    os.rename(mnt / f"x{tag}", new / "over")
    (mnt / f"tmp{tag}").write_bytes(b"new contents")
    os.rename(mnt / f"tmp{tag}", mnt / f"y{tag}")  # write-then-rename over a file
    with open(mnt / f"moved{tag}" / "er" / "f", "r+b") as f:
        f.truncate(5000)


@requires_kernel
def test_changes_through_the_overlay_replay_to_the_upper(site: Site) -> None:
    proc = site.start()
    changes_through_the_overlay(site.mnt)
    head = site.drain()
    assert head == site.head()
    assert site.replay_diff() == []
    assert not os.path.lexists(site.upper / "ld" / "sub")  # below an opaque directory now
    assert os.getxattr(site.upper / "ld", "trusted.overlay.opaque") == b"y"
    changes_through_the_overlay(site.mnt, "2")
    site.drain()
    assert site.replay_diff() == []
    assert site.stop(proc) == 0
    # a clean stop leaves a checkpoint at the head: a restart finds nothing to journal
    head = site.head()
    proc = site.start()
    assert site.drain() == head
    assert site.replay_diff() == []
    site.stop(proc)


@requires_kernel
def test_drain_covers_writes_to_a_file_still_open(site: Site) -> None:
    proc = site.start()
    with open(site.mnt / "open", "wb") as f:
        f.write(b"first")
        f.flush()
        site.drain()
        assert site.replay_diff() == []
        f.write(b" and more")
        f.flush()
        site.drain()
        assert site.replay_diff() == []
    site.stop(proc)


@requires_kernel
def test_kill_9_in_a_batch_then_restart(site: Site) -> None:
    # committed batches after the start's checkpoint, then a crash: the next start
    # rebuilds the model from the checkpoint and the journal after it
    proc = site.start()
    changes_through_the_overlay(site.mnt, "a")
    site.drain()
    site.stop(proc, signal.SIGKILL)
    changes_through_the_overlay(site.mnt, "b")  # while no capture runs
    proc = site.start("--fault-stall-after", "40")
    for i in range(200):
        (site.mnt / f"f{i}").write_bytes(b"%d" % i)
    deadline = time.monotonic() + 60
    while b"stalled" not in (site.log.read_bytes() if site.log.exists() else b""):
        assert time.monotonic() < deadline, "the capture never stalled"
        time.sleep(0.05)
    site.stop(proc, signal.SIGKILL)
    assert capture.dangling_batch(site.journal()) is not None
    # the user goes on while no capture runs
    changes_through_the_overlay(site.mnt)
    for i in range(0, 200, 3):
        os.unlink(site.mnt / f"f{i}")
    proc = site.start()
    site.drain()
    journal = site.journal()
    voids = [e.record for e in journal.read(1) if isinstance(e.record, rec.Void)]
    assert len(voids) == 1
    assert capture.dangling_batch(journal) is None
    assert site.replay_diff() == []
    site.stop(proc)


@requires_kernel
def test_queue_overflow_makes_a_full_scan(site: Site) -> None:
    proc = site.start("--bounded-queue")
    (site.mnt / "many").mkdir()
    (site.mnt / "old").mkdir()
    for i in range(100):
        (site.mnt / "old" / f"o{i}").write_bytes(b"old")
    site.drain()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        for i in range(20_000):  # > 16384 queued events: the queue is full
            (site.mnt / "many" / f"f{i}").write_bytes(b"x")
        # changes whose events are lost: only a full scan finds them
        for i in range(0, 100, 2):
            os.unlink(site.mnt / "old" / f"o{i}")
        with open(site.mnt / "old" / "o1", "ab") as f:
            f.write(b" and new")
        os.chmod(site.mnt / "old" / "o3", 0o600)
        os.rename(site.mnt / "old" / "o5", site.mnt / "old" / "o5-renamed")
        (site.mnt / "old" / "late").write_bytes(b"late")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    site.drain()
    assert site.replay_diff() == []
    status = site.status()
    assert status["overflows"] >= 1
    assert status["full_scans"] >= 2
    site.stop(proc)


@requires_kernel
def test_a_one_byte_edit_of_a_64_mib_file(site: Site) -> None:
    proc = site.start()
    with open(site.mnt / "big", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    first = site.drain()
    with open(site.mnt / "big", "r+b") as f:
        f.seek(33_333_333)
        f.write(b"!")
    site.drain()
    writes = [e.record for e in site.journal().read(first + 1)
              if isinstance(e.record, rec.Write)]
    assert [(w.offset, w.length) for w in writes] == [(33_333_333 // 65536 * 65536, 65536)]
    assert site.replay_diff() == []
    site.stop(proc)


@requires_kernel
def test_a_backlog_is_committed_in_batches_of_bounded_bytes(site: Site) -> None:
    """An install the capture is behind on (here: stopped while it runs) is journaled in
    committed batches of about ``--batch-bytes`` of data each, so a follower streams
    the first while the capture reads the next; the drain asked as it resumes still
    holds all of it (a barrier sees everything done before it)."""
    proc = site.start("--batch-bytes", str(4 << 20))
    with open(site.mnt / "known", "wb") as f:
        f.write(os.urandom(3 << 20))
    first = site.drain()
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with open(site.mnt / "known", "r+b") as f:  # changed data of a journaled file
            f.write(os.urandom(3 << 20))
        for d in range(3):
            (site.mnt / f"d{d}").mkdir()
            for i in range(4):
                (site.mnt / f"d{d}" / f"big{i}").write_bytes(os.urandom((2 << 20) + i))
                (site.mnt / f"d{d}" / f"small{i}").write_bytes(os.urandom(5000 + i))
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    head = site.drain()
    assert site.replay_diff() == []
    batches: list[int] = []  # Extent bytes per committed batch
    for entry in site.journal().read(first + 1):
        if isinstance(entry.record, rec.Begin):
            batches.append(0)
        elif isinstance(entry.record, rec.Extent):
            batches[-1] += entry.record.length
        assert entry.seq <= head
    assert sum(batches) >= 27 << 20
    assert len([b for b in batches if b]) >= 5, batches  # 27 MiB, about 4 MiB a batch
    assert max(batches) <= (4 << 20) + (3 << 20), batches  # one file past the bound at most
    site.stop(proc)


@requires_kernel
def test_a_journal_of_another_engine_is_trusted(site: Site) -> None:
    """No capture wrote the journal (an engine that journals ahead of every change): the
    upper is taken as its state, nothing is journaled for what it holds already."""
    journal = Journal.open(str(site.state / "journal"))
    journal.append(rec.Mknod(b"upper/pre", stat.S_IFREG | 0o644, 0, 0))
    journal.close()
    (site.upper / "pre").write_bytes(b"")
    os.chmod(site.upper / "pre", 0o644)
    proc = site.start()
    head = site.head()
    (site.mnt / "after").write_bytes(b"after")
    site.drain()
    later = [e.record for e in site.journal().read(head + 1)]
    assert not any(getattr(r, "path", b"") == b"upper/pre" for r in later)
    site.stop(proc)


@requires_kernel
def test_control_socket_is_root_only(site: Site) -> None:
    proc = site.start()
    assert stat.S_IMODE(os.stat(site.state / "capture.sock").st_mode) == 0o600
    with pytest.raises(SystemExit) as exc:
        capture.main(["--layer", str(site.layer), "--state", str(site.state)])
    assert exc.value.code == 4  # one capture per state directory
    site.stop(proc)
    assert not (site.state / "capture.sock").exists()


# -- the layer image ------------------------------------------------------------------------


@pytest.mark.expect_log("sdeefs.fs.image")
@requires_kernel
def test_image_mount_options_and_unclean_images(tmp_path: Path) -> None:
    img, layer, copy_layer = tmp_path / "l.img", tmp_path / "layer", tmp_path / "copy"
    image.create_image(str(img), 256 << 20)
    assert os.stat(img).st_blocks * 512 < 64 << 20  # sparse
    assert stat.S_IMODE(os.stat(img).st_mode) == 0o600
    with contextlib.ExitStack() as stack:
        image.mount_image(str(img), str(layer))
        stack.callback(image.unmount_image, str(layer))
        mount = mountinfo.at(layer)
        assert mount is not None
        assert {"nodev", "nosuid"} <= mount.options
        upper, _ = image.prepare_layer(str(layer), 4242, 4343)
        assert os.stat(upper).st_uid == 4242
        assert os.stat(layer).st_uid == 0
        (Path(upper) / "f").write_bytes(b"data")
        with pytest.raises(image.ImageError, match="in use"):
            image.mount_image(str(img), str(tmp_path / "second"))
        os.sync()
        shutil.copy(img, tmp_path / "copy.img")  # as the disk holds it after a crash
    assert image.superblock_state(str(tmp_path / "copy.img"))[0]  # needs recovery
    image.mount_image(str(tmp_path / "copy.img"), str(copy_layer))
    try:
        assert (copy_layer / "upper" / "f").read_bytes() == b"data"
    finally:
        image.unmount_image(str(copy_layer))
    assert image.superblock_state(str(tmp_path / "copy.img")) == (False, False)
    assert image.loop_devices_of(str(img)) == []


# -- journal rules of batches (no kernel objects needed) ------------------------------------


@pytest.mark.expect_log("sdeefs.fs.capture", "sdeefs.fs.reconcile")
def test_void_dangling_and_replay_skips_it(tmp_path: Path) -> None:
    journal = Journal.open(str(tmp_path / "journal"))
    begin = journal.append(rec.Begin(0))
    journal.append(rec.Mkdir(b"upper/committed", 0o755, 0, 0))
    journal.append(rec.Commit(begin))
    begin2 = journal.append(rec.Begin(0))
    journal.append(rec.Mkdir(b"upper/cut-off", 0o755, 0, 0))
    assert capture.dangling_batch(journal) == begin2
    assert capture.void_dangling(journal) == begin2
    assert capture.dangling_batch(journal) is None
    assert capture.void_dangling(journal) is None
    for sub in ("src/upper", "src/work", "dst/upper", "dst/work"):
        (tmp_path / sub).mkdir(parents=True)
    source, target = open_layers(tmp_path / "src"), open_layers(tmp_path / "dst")
    try:
        replay(journal, source, target)
    finally:
        source.close()
        target.close()
    assert sorted(os.listdir(tmp_path / "dst" / "upper")) == ["committed"]
    # recovery of the FUSE engines leaves a committed batch alone
    assert recover(journal, os.fsencode(tmp_path / "src" / "upper"),
                   os.fsencode(tmp_path / "src" / "work")) is None
    journal.close()


def test_a_dangling_batch_in_an_earlier_segment(tmp_path: Path) -> None:
    journal = Journal.open(str(tmp_path / "journal"), segment_bytes=4096)
    begin = journal.append(rec.Begin(1))
    for i in range(200):
        journal.append(rec.Mkdir(b"upper/d%d" % i, 0o755, 0, 0))
    assert len(journal.segments()) > 2
    assert capture.dangling_batch(journal) == begin
    journal.append(rec.Commit(begin))
    assert capture.dangling_batch(journal) is None
    journal.close()


# -- fanotify event decoding (pinned layouts; no kernel needed) -----------------------------


def _fid_info(itype: int, ino: int, gen: int, name: bytes | None = None) -> bytes:
    handle = fan.HANDLE_HEADER.pack(8, fan.FILEID_INO32_GEN) + fan.INO32_GEN.pack(ino, gen)
    body = b"\x01" * 8 + handle  # fsid, then the struct file_handle
    if name is not None:
        body += name + b"\0"
    body += b"\0" * (-(len(body) + 4) % 4)  # the kernel pads info records to 4 bytes
    return fan.INFO_HEADER.pack(itype, 0, 4 + len(body)) + body


def _event(mask: int, *infos: bytes, pid: int = 42) -> bytes:
    body = b"".join(infos)
    return fan.METADATA.pack(fan.METADATA.size + len(body), fan.FANOTIFY_METADATA_VERSION, 0,
                             fan.METADATA.size, mask, fan.FAN_NOFD, pid) + body


def test_decode_events() -> None:
    data = (_event(fan.FAN_RENAME, _fid_info(fan.INFO_OLD_DFID_NAME, 10, 1, b"a"),
                   _fid_info(fan.INFO_NEW_DFID_NAME, 11, 2, b"b\xff"),
                   _fid_info(fan.INFO_FID, 12, 3))
            + _event(fan.FAN_ATTRIB | fan.FAN_ONDIR, _fid_info(fan.INFO_DFID_NAME, 13, 4, b"."))
            + _event(fan.FAN_Q_OVERFLOW))
    renamed, attrib, overflow = fan.decode_events(data)
    assert renamed.mask == fan.FAN_RENAME
    assert renamed.pid == 42
    assert renamed.handle is not None
    assert fan.handle_ino(renamed.handle) == 12
    assert [(t, fan.handle_ino(h), n) for t, h, n in renamed.dirs] == \
        [(fan.INFO_OLD_DFID_NAME, 10, b"a"), (fan.INFO_NEW_DFID_NAME, 11, b"b\xff")]
    assert attrib.handle is None
    assert attrib.dirs[0][2] == b"."
    assert overflow.mask == fan.FAN_Q_OVERFLOW
    assert overflow.dirs == ()
    assert fan.handle_ino(fan.HANDLE_HEADER.pack(12, 0x81) + bytes(12)) is None  # not ext4's


@pytest.mark.parametrize("damage", ["version", "event_len", "info_len", "handle_len"])
def test_decode_events_refuses_what_it_does_not_know(damage: str) -> None:
    data = bytearray(_event(fan.FAN_CREATE, _fid_info(fan.INFO_DFID_NAME, 10, 1, b"name")))
    if damage == "version":
        data[4] = 2
    elif damage == "event_len":
        struct.pack_into("<I", data, 0, len(data) + 8)
    elif damage == "info_len":
        struct.pack_into("<H", data, fan.METADATA.size + 2, 200)
    else:
        struct.pack_into("<I", data, fan.METADATA.size + 12, 100)
    with pytest.raises(fan.BadEvent):
        fan.decode_events(bytes(data))


# -- the C hot path (sdeefs.fs._capturec) against the Python one -----------------------------

requires_capturec = pytest.mark.skipif(
    reconcile.capturec is None, reason="sdeefs.fs._capturec is not built (pip install -e .)")


def _note_in_python(data: bytes) -> tuple[reconcile.Dirty, int]:
    """What Capture._note makes of ``data`` (its inode lookups: handles only)."""
    @attrs.define
    class Notes:
        dirty: reconcile.Dirty = attrs.field(factory=reconcile.Dirty)
        counters: capture.Counters = attrs.field(factory=capture.Counters)

        def _ino(self, handle: bytes) -> int | None:
            return fan.handle_ino(handle)

    notes = Notes()
    capture.Capture._note(notes, fan.decode_events(data))  # type: ignore[arg-type]
    return notes.dirty, notes.counters.overflows


@requires_capturec
@pytest.mark.expect_log("sdeefs.fs.capture")  # the overflow's warning
def test_note_events_in_c_matches_python() -> None:
    data = (_event(fan.FAN_RENAME, _fid_info(fan.INFO_OLD_DFID_NAME, 10, 1, b"a"),
                   _fid_info(fan.INFO_NEW_DFID_NAME, 11, 2, b"b\xff"),
                   _fid_info(fan.INFO_FID, 12, 3))
            + _event(fan.FAN_CREATE | fan.FAN_MODIFY | fan.FAN_CLOSE_WRITE,
                     _fid_info(fan.INFO_DFID_NAME, 10, 1, b"new"), _fid_info(fan.INFO_FID, 14, 1))
            + _event(fan.FAN_ATTRIB | fan.FAN_ONDIR, _fid_info(fan.INFO_DFID_NAME, 13, 4, b"."))
            + _event(fan.FAN_ATTRIB, _fid_info(fan.INFO_FID, 15, 9))
            + _event(fan.FAN_DELETE | fan.FAN_ONDIR, _fid_info(fan.INFO_DFID_NAME, 11, 2, b"d"),
                     _fid_info(fan.INFO_FID, 16, 1))
            + _event(fan.FAN_Q_OVERFLOW))
    want, overflows = _note_in_python(data)
    got = reconcile.Dirty()
    count, c_overflows, unresolved = reconcile.capturec.note_events(
        data, got.dirs, got.objects, got.data, got.names)
    assert (count, c_overflows, unresolved) == (6, overflows, [])
    assert (got.dirs, got.objects, got.data, got.names) == \
        (want.dirs, want.objects, want.data, want.names)
    assert got.names == {(10, b"a"), (11, b"b\xff"), (10, b"new"), (11, b"d")}
    assert got.data == {14}
    # a handle that is not ext4's comes back whole, for the Python path
    other = fan.HANDLE_HEADER.pack(12, 0x81) + bytes(12)
    body = b"\x01" * 8 + other
    info = fan.INFO_HEADER.pack(fan.INFO_FID, 0, 4 + len(body)) + body
    odd = _event(fan.FAN_MODIFY, info, _fid_info(fan.INFO_DFID_NAME, 10, 1, b"n"), pid=7)
    got = reconcile.Dirty()
    count, _, unresolved = reconcile.capturec.note_events(
        odd, got.dirs, got.objects, got.data, got.names)
    assert count == 1
    assert not got
    [(mask, pid, handle, dirs)] = unresolved
    [event] = fan.decode_events(odd)
    assert fan.Event(mask, pid, handle, dirs) == event


@requires_capturec
@pytest.mark.parametrize("damage", ["version", "event_len", "info_len", "handle_len"])
def test_note_events_in_c_refuses_what_it_does_not_know(damage: str) -> None:
    data = bytearray(_event(fan.FAN_CREATE, _fid_info(fan.INFO_DFID_NAME, 10, 1, b"name")))
    if damage == "version":
        data[4] = 2
    elif damage == "event_len":
        struct.pack_into("<I", data, 0, len(data) + 8)
    elif damage == "info_len":
        struct.pack_into("<H", data, fan.METADATA.size + 2, 200)
    else:
        struct.pack_into("<I", data, fan.METADATA.size + 12, 100)
    d = reconcile.Dirty()
    with pytest.raises(ValueError, match="fanotify"):
        reconcile.capturec.note_events(bytes(data), d.dirs, d.objects, d.data, d.names)
    assert not d


@requires_capturec
def test_examine_in_c_sees_what_python_sees(tmp_path: Path) -> None:
    """Every kind of entry (xattrs, a symlink, a FIFO, a whiteout, a big and an empty file,
    hard links): the C examination gives the Python one's Seen, contents included."""
    up = tmp_path / "upper"
    (up / "d").mkdir(parents=True)
    (up / "f").write_bytes(b"hello" * 1000)
    (up / "big").write_bytes(os.urandom(3 << 20))  # past what C reads itself
    (up / "empty").write_bytes(b"")
    os.link(up / "f", up / "d" / "f2")
    os.symlink("../some/where", up / "l")
    os.mkfifo(up / "fifo")
    os.mknod(up / "wh", stat.S_IFCHR, 0)
    os.setxattr(up / "f", "user.k", b"v")
    os.setxattr(up / "d", "trusted.overlay.opaque", b"y")
    os.chown(up / "empty", 1000, 1001)
    upper = reconcile.Upper.open(str(up))
    try:
        results = {}
        for native in (True, False):
            model = Model.empty()
            rc = reconcile.Reconciler(model, upper, native=native)
            b = reconcile._Batch(full=True)
            fd = os.open(up, os.O_RDONLY | os.O_DIRECTORY)
            try:
                names = sorted(os.fsencode(n) for n in os.listdir(up))
                ids = rc._examine_entries(fd, [(n, None, os.lstat(up / os.fsdecode(n)).st_ino)
                                               for n in names], b)
                ids += rc._examine_entries(fd, [(b"gone", None, 0)], b)
            finally:
                os.close(fd)
            results[native] = (ids, b.seen, b.read_bytes)
        assert results[True] == results[False]
        ids, seen, read = results[True]
        assert ids[-1] is None  # gone
        assert read == 5000 + (3 << 20)
        by_name: dict[bytes, int] = {}
        for name, found in zip(names, ids[:-1], strict=True):
            assert found is not None, name
            by_name[name] = found
        assert seen[by_name[b"f"]].xattrs == ((b"user.k", b"v"),)
        assert seen[by_name[b"l"]].target == b"../some/where"
        assert seen[by_name[b"big"]].contents is not None
        assert seen[by_name[b"fifo"]].contents is None
    finally:
        upper.close()


def test_read_sums_are_the_blake3_sums_of_the_data(tmp_path: Path) -> None:
    """The capture's sums (``read_sums``, ``data_sums``) are BLAKE3's (``SUMS``), what its
    Extent3 records say they are, one per BLOCK of the file."""
    assert reconcile.SUMS == blocksums.BLAKE3 == rec.Extent3.SUMS
    path = tmp_path / "f"
    data = os.urandom(2 * reconcile.READ_CHUNK + 5)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        want = blocksums.data_sums(data, blocksums.BLAKE3)
        assert reconcile.read_sums(fd) == (want, len(data))
        assert reconcile.data_sums(data) == reconcile.data_sums(memoryview(data)) == want
        assert want[:rec.SUM_SIZE] == reconcile.block_sum(data[:reconcile.BLOCK])
    finally:
        os.close(fd)


@requires_kernel
def test_events_queued_during_a_batch_start_the_next_at_once(site: Site) -> None:
    """A batch is gathered for at most ``max_delay`` after its first event arrived: what
    queued while the previous batch ran (a big install on a busy machine) is batched
    at once, not after another ``max_delay`` of waiting while the writer goes on.  And a
    batch is not fdatasync'ed by itself (the drain's fdatasync, or sync_interval's).
    In process: the Capture's steps driven by hand (the daemon's loop runs them so)."""
    config = capture.Config(str(site.layer), str(site.state), quiet=600, max_delay=1,
                            sync_interval=600)
    cap = capture.Capture.open(config)
    try:
        cap._batch()  # the start's full scan
        trio.run(cap._maintain)  # its checkpoint
        (site.mnt / "first").write_bytes(b"1")
        assert cap._read_events()
        (site.mnt / "second").write_bytes(b"2")  # queued while the batch runs ...
        time.sleep(1.5)  # ... longer than max_delay
        cap._batch()
        assert (site.upper / "second").exists()

        async def gather() -> None:
            with trio.fail_after(30):  # (the old rule: max_delay from now, then quiet: 600 s)
                await cap._gather()

        trio.run(gather)
        assert cap.dirty
        cap._batch()
        assert b"second" in {getattr(e.record, "path", b"").rsplit(b"/", 1)[-1]
                             for e in site.journal().read(1)}
        # not synced by the loop's maintenance (only its writeback started) ...
        trio.run(cap._maintain)
        assert cap.journal.synced < cap.journal.head
        # ... until sync_interval has passed since the last sync, or a drain asks
        cap._last_sync -= config.sync_interval
        trio.run(cap._maintain)
        assert cap.journal.synced == cap.journal.head
    finally:
        cap.close()
    assert site.replay_diff() == []
