"""A full disk under the view (issue 9 item 7): the writer gets ENOSPC, nothing else changes.

Upper and state live on a small loop-mounted ext4 (no reserved blocks), the lower
elsewhere.  The disk fills up in the middle of a write, of a copy-up and of a journal
append; each time the operation that needed the space fails with ENOSPC, the view
stays writable, ``rm`` frees space, writing resumes, and ``sdeefs check`` is clean.
Before the fix the journal's failed append turned the whole view read-only (EROFS,
EIO for the writer through the page cache) until an unmount.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sdeefs import records as rec
from sdeefs.check import run_checks
from sdeefs.errors import FailsafeError
from sdeefs.fs.image import create_image, mount_image, unmount_image
from sdeefs.journal import Journal

from ..conftest import Layers, make_layers, mounted, requires_fuse

ENGINES = ["fuse", "hybrid"]
FULL = (errno.ENOSPC, errno.EDQUOT)
MiB = 1 << 20


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "loop mounts need root"
    if shutil.which("mkfs.ext4") is None:
        return "needs e2fsprogs (mkfs.ext4)"
    return None


pytestmark = [requires_fuse, pytest.mark.skipif(_skip_reason() is not None,
                                                reason=_skip_reason() or "")]


@contextlib.contextmanager
def small_disk(root: Path, size: int = 48 * MiB) -> Iterator[Path]:
    """A fresh ext4 of ``size`` bytes mounted at ``root/disk``; unmounted (its loop device
    detached) whatever happens."""
    image, disk = root / "disk.img", root / "disk"
    create_image(str(image), size)
    mount_image(str(image), str(disk))
    try:
        yield disk
    finally:
        if mounted(disk):
            try:
                unmount_image(str(disk))
            except Exception:
                subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture
def full_layers(tmp_path: Path) -> Iterator[Layers]:
    """Layers whose upper and state are on a small disk of their own."""
    with small_disk(tmp_path) as disk:
        result = make_layers(tmp_path)
        result.upper = disk / "upper"
        result.state = disk / "state"
        result.upper.mkdir()
        try:
            yield result
        finally:
            result.cleanup()


def fill(path: Path, limit: int = 256 * MiB) -> int:
    """Write ``path`` until the disk is full; the errno that stopped it (0: none).

    At most ``limit`` bytes: with the writeback cache write(2) only fills the page
    cache, and the error comes when the data is written back (fsync, close).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    data = b"\xa5" * MiB
    failed = 0
    for step in [lambda: os.write(fd, data)] * (limit // MiB) + [lambda: os.fsync(fd)]:
        try:
            step()
        except OSError as exc:
            failed = exc.errno or -1
            break
    try:
        os.close(fd)
    except OSError as exc:
        failed = failed or exc.errno or -1
    return failed


def error_of(action: Callable[[], object]) -> int:
    """The errno ``action`` failed with (0: it did not fail)."""
    try:
        action()
    except OSError as exc:
        return exc.errno or -1
    return 0


def write_one_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"X")
        f.flush()
        os.fsync(f.fileno())


def writable(mnt: Path) -> None:
    """The view takes new data and new names again."""
    (mnt / "after").mkdir(exist_ok=True)
    data = os.urandom(MiB)
    (mnt / "after" / "file").write_bytes(data)
    fd = os.open(mnt / "after" / "file", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (mnt / "after" / "file").read_bytes() == data


def daemon_log(layers: Layers) -> str:
    path = layers.state / "daemon.log"
    return path.read_text() if path.exists() else ""


def settled(layers: Layers) -> None:
    log = daemon_log(layers)
    assert "refusing further mutations" not in log
    assert run_checks(str(layers.upper), str(layers.state)) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_full_disk_mid_write(full_layers: Layers, engine: str) -> None:
    layers = full_layers
    (layers.lower / "etc").mkdir()
    (layers.lower / "etc" / "motd").write_text("hello\n")
    mnt = layers.mount(engine)
    (mnt / "keep").write_text("kept\n")
    assert fill(mnt / "big") in FULL
    # nothing else changed: reads, the other files, names
    assert (mnt / "keep").read_text() == "kept\n"
    assert (mnt / "etc" / "motd").read_text() == "hello\n"
    assert sorted(os.listdir(mnt)) == ["big", "etc", "keep"]
    os.unlink(mnt / "big")  # rm frees space
    writable(mnt)
    (mnt / "keep").write_text("kept again\n")
    layers.umount()
    assert (layers.upper / "keep").read_text() == "kept again\n"
    assert not (layers.upper / "big").exists()
    settled(layers)


@pytest.mark.parametrize("engine", ENGINES)
def test_full_disk_mid_copy_up(full_layers: Layers, engine: str) -> None:
    layers = full_layers
    data = os.urandom(64 * MiB)  # more than the whole disk
    (layers.lower / "huge").write_bytes(data)
    mnt = layers.mount(engine)
    (mnt / "keep").write_text("kept\n")
    assert error_of(lambda: write_one_byte(mnt / "huge")) in FULL
    # the view still shows the lower file as it was, and nothing of the copy is left over
    with open(mnt / "huge", "rb") as f:
        assert f.read(MiB) == data[:MiB]
    assert os.stat(mnt / "huge").st_size == len(data)
    assert (mnt / "keep").read_text() == "kept\n"
    writable(mnt)
    layers.umount()
    assert not (layers.upper / "huge").exists()
    settled(layers)


@pytest.mark.parametrize("engine", ENGINES)
def test_full_disk_mid_journal_append(full_layers: Layers, engine: str) -> None:
    """The disk fills up from outside the view: the journal is the first to need space."""
    layers = full_layers
    mnt = layers.mount(engine)
    (mnt / "keep").write_text("kept\n")
    filler = layers.upper.parent / "filler"
    fill(filler)
    failed = 0
    for i in range(400):  # metadata records, until one of them finds no room
        failed = error_of(functools.partial(os.setxattr, mnt / "keep", f"user.n{i}",
                                            os.urandom(2000)))
        if failed:
            break
    assert failed in FULL
    assert error_of(lambda: (mnt / "d").mkdir()) in FULL or fill(mnt / "d" / "f") in FULL
    assert (mnt / "keep").read_text() == "kept\n"
    filler.unlink()  # space comes back from outside
    shutil.rmtree(mnt / "d", ignore_errors=True)  # (check replays next to the upper)
    writable(mnt)
    os.setxattr(mnt / "keep", "user.last", b"1")
    layers.umount()
    assert os.getxattr(layers.upper / "keep", "user.last") == b"1"
    settled(layers)


def test_journal_append_on_a_full_disk(tmp_path: Path) -> None:
    """The journal alone: a record with no room is refused (ENOSPC), nothing is torn, the
    journal stays writable, and what settles an operation (Done, Abort) still fits."""
    with small_disk(tmp_path, 16 * MiB) as disk:
        journal = Journal.open(str(disk / "journal"))
        try:
            seq = journal.append(rec.Mkdir(b"upper/a", 0o755, 0, 0))
            journal.append(rec.Done(seq))
            fill(disk / "filler")
            value = os.urandom(60000)
            refused: OSError | None = None
            for i in range(1000):
                try:
                    journal.append(rec.Setxattr(b"upper/a", b"user.x%d" % i, value))
                except OSError as exc:
                    refused = exc
                    break
            assert refused is not None
            assert refused.errno in FULL
            assert not isinstance(refused, FailsafeError)
            assert journal.failed is None
            last = journal.head
            journal.append(rec.Abort(last))  # settling what is in flight always fits
            journal.sync()
            (disk / "filler").unlink()
            journal.append(rec.Unlink(b"upper/b"))
            journal.sync()
        finally:
            journal.close()
        reopened = Journal.open(str(disk / "journal"))
        try:
            entries = list(reopened.read(1))
            assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
            assert isinstance(entries[-2].record, rec.Unlink | rec.Sync)
            assert reopened.head == entries[-1].seq
        finally:
            reopened.close()
