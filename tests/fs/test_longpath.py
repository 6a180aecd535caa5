"""Trees deeper than PATH_MAX through real mounts of both engines (issue 9, items 1 and 3).

A path that the daemon accepts must be journaled so that the next mount,
``sdeefs check``, replay and every replica accept it too; a path a record cannot
carry is refused with ENAMETOOLONG before anything is journaled.  Each syscall
argument stays below PATH_MAX (as on any filesystem); the tree does not: these
tests reach deep entries through directory fds, as ``mv``, ``rm -r`` or ``find`` do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs import records as rec
from sdeefs.check import run_checks
from sdeefs.journal import Journal, NullJournal
from sdeefs.layers import LayerRoot
from sdeefs.replication.replica import Replica
from sdeefs.replication.snapshot import tree_digest
from sdeefs.replication.wire import record_frames
from sdeefs.trees import signature
from sdeefs.writeahead import read_write_data

from ..conftest import Layers, requires_fuse, sdeefs

pytestmark = requires_fuse
ENGINES = ["fuse", "hybrid"]


def mkdirs(top: int, parts: list[bytes]) -> int:
    """mkdir -p of ``parts`` below the directory fd ``top``, one level at a time; the
    deepest directory's fd (O_PATH) is returned."""
    fd = os.dup(top)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            step = os.open(part, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = step
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_below(top: int, parts: list[bytes], flags: int = os.O_PATH | os.O_DIRECTORY,
               mode: int = 0o644) -> int:
    """Open ``parts`` below ``top`` with each syscall given one component."""
    fd = os.dup(top)
    try:
        for part in parts[:-1]:
            step = os.open(part, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = step
        return os.open(parts[-1], flags, mode, dir_fd=fd)
    finally:
        os.close(fd)


def read_below(top: int, parts: list[bytes]) -> bytes:
    fd = open_below(top, parts, os.O_RDONLY)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def write_below(top: int, parts: list[bytes], data: bytes) -> None:
    fd = open_below(top, parts, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def fd_of(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY)


def journal_records(state: Path) -> list[rec.Record]:
    return [e.record for e in Journal(directory=str(state / "journal")).read()]


def replicate(upper: Path, state: Path, replica_root: Path) -> Replica:
    """Apply the whole journal to a fresh Replica through its ordinary path (frames)."""
    fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in (upper, state / "work")]
    source = LayerRoot(fds[0], fds[1], NullJournal())
    replica = Replica.open(str(replica_root))
    try:
        for entry in Journal(directory=str(state / "journal")).read():
            data = read_write_data(source, entry.record) \
                if isinstance(entry.record, rec.Write) else None
            for frame in record_frames(entry.seq, entry.record, data):
                replica.accept(frame)
    finally:
        source.close()
    return replica


def chain(levels: int, width: int = 200, tag: bytes = b"d") -> list[bytes]:
    """Directory names of ``width`` bytes, numbered so that no two levels are alike."""
    return [b"%04d" % i + tag * (width - 4) for i in range(levels)]


@pytest.fixture
def closing() -> Iterator[list[int]]:
    """fds to close at the end (before the mounts come down), or earlier by ``release``."""
    fds: list[int] = []
    yield fds
    release(fds)


def release(fds: list[int]) -> None:
    """Close the fds held in the view: a mount with open fds cannot be unmounted."""
    for fd in fds:
        os.close(fd)
    fds.clear()


# -- issue 9, bug 1: the reproduction ------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_mv_into_a_4020_byte_deep_chain_survives_remount(layers: Layers, engine: str,
                                                         closing: list[int]) -> None:
    """A directory chain ~4020 bytes deep inside the view, ``mv`` a file into it, unmount,
    mount again: the mount must come up, ``sdeefs check`` be clean, the content intact.
    (It bricked the journal: the record was refused at recovery, the daemon died.)"""
    mnt = layers.mount(engine)
    root = fd_of(mnt)
    closing.append(root)
    parts = chain(20)  # 20 × 201 - 1 = 4019 bytes below the mount root
    closing.append(mkdirs(root, parts))
    half = open_below(root, parts[:10])
    closing.append(half)
    name = "f" * 100
    content = b"the user's work\n" * 1000
    (mnt / name).write_bytes(content)
    # mv, as a user runs it: each argument is far below PATH_MAX
    rest = b"/".join(parts[10:]).decode()
    done = subprocess.run(["mv", str(mnt / name), rest + "/"], cwd=f"/proc/self/fd/{half}",
                          pass_fds=[half], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    release(closing)
    layers.umount()

    layers.mount(engine)
    root2 = fd_of(mnt)
    closing.append(root2)
    assert read_below(root2, [*parts, name.encode()]) == content
    assert not (mnt / name).exists()
    release(closing)
    layers.umount()
    result = sdeefs("check", "--upper", str(layers.upper), "--state", str(layers.state),
                    check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "ok\n")


# -- issue 9, item 3: no depth limit ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_a_20kb_deep_tree_is_journaled_checked_replayed_and_replicated(
        layers: Layers, engine: str, tmp_path: Path, closing: list[int]) -> None:
    (layers.lower / "top").mkdir()
    (layers.lower / "top" / "lowerfile").write_bytes(b"from the lower\n")
    mnt = layers.mount(engine)
    root = fd_of(mnt)
    closing.append(root)

    # A legal 4095-byte path one directory below the mount root (it got ENAMETOOLONG).
    d = mkdirs(root, [b"d"])
    closing.append(d)
    legal = chain(19, 210, b"l")  # 19 × 211 = 4009 bytes of directories ...
    closing.append(mkdirs(d, legal))
    leaf = b"x" * (4095 - len(b"/".join(legal)) - 1)  # ... and a name: 4095 in all
    assert len(b"/".join([*legal, leaf])) == 4095
    fd = os.open(b"/".join([*legal, leaf]), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600,
                 dir_fd=d)
    os.write(fd, b"4095\n")
    os.close(fd)

    # 100 levels of 200 bytes: 20 KB below the mount root, below a lower directory.
    parts = [b"top", *chain(100)]
    bottom = mkdirs(root, parts)
    closing.append(bottom)
    big = os.urandom(1536 * 1024)  # more than one replication chunk, in a 20 KB deep file
    write_below(bottom, [b"data"], big)
    write_below(bottom, [b"gone"], b"to be deleted\n")
    os.mkdir(b"emptydir", dir_fd=bottom)
    os.symlink(b"../" * 3 + b"target", b"link", dir_fd=bottom)
    os.setxattr(f"/proc/self/fd/{bottom}/data", "user.deep", b"yes")
    os.chmod(b"data", 0o640, dir_fd=bottom)
    # rename within the deep tree, a hard link to the top, deletions
    os.rename(b"data", b"data2", src_dir_fd=bottom, dst_dir_fd=bottom)
    os.link(b"data2", b"shallow-link", src_dir_fd=bottom, dst_dir_fd=root)
    os.unlink(b"gone", dir_fd=bottom)
    os.rmdir(b"emptydir", dir_fd=bottom)
    # a directory in the middle moves to a longer name: everything below gets deeper
    middle = open_below(root, parts[:50])
    closing.append(middle)
    longer = parts[50] + b"-renamed" * 6
    os.rename(parts[50], longer, src_dir_fd=middle, dst_dir_fd=middle)
    parts[50] = longer
    # and a file of the lower moves 20 KB deep (copy-up at the bottom)
    deep_now = open_below(root, parts)
    closing.append(deep_now)
    os.rename(b"top/lowerfile", b"lowerfile", src_dir_fd=root, dst_dir_fd=deep_now)
    release(closing)
    layers.umount()

    # the journal, check and replay (check replays the whole journal and compares)
    assert run_checks(str(layers.upper), str(layers.state)) == []
    result = sdeefs("check", "--upper", str(layers.upper), "--state", str(layers.state),
                    check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "ok\n")
    paths = [getattr(r, n) for r in journal_records(layers.state)
             for n, k in r.FIELDS if k == "path"]
    assert max(len(p) for p in paths) > 20000

    # a replica applying the records gets the byte-identical tree
    replica = replicate(layers.upper, layers.state, tmp_path / "replica")
    replica.close()
    replica_upper = tmp_path / "replica" / "upper"
    assert tree_digest(str(replica_upper)) == tree_digest(str(layers.upper))
    assert signature(str(replica_upper)) == signature(str(layers.upper))
    for top in (layers.upper, replica_upper):
        top_fd = fd_of(top)
        closing.append(top_fd)
        assert read_below(top_fd, [*parts, b"data2"]) == big
        assert read_below(top_fd, [*parts, b"lowerfile"]) == b"from the lower\n"
        assert read_below(top_fd, [b"d", *legal, leaf]) == b"4095\n"

    # and the next mount shows it all
    layers.mount(engine)
    root2 = fd_of(mnt)
    closing.append(root2)
    assert read_below(root2, [*parts, b"data2"]) == big
    assert read_below(root2, [b"shallow-link"]) == big
    bottom2 = open_below(root2, parts)
    closing.append(bottom2)
    st = os.stat(b"data2", dir_fd=bottom2, follow_symlinks=False)
    assert (stat.S_IMODE(st.st_mode), st.st_nlink) == (0o640, 2)
    assert os.readlink(b"link", dir_fd=bottom2) == b"../../../target"
    release(closing)
    layers.umount()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_rename_target_beyond_the_cap_is_refused_and_not_journaled(
        layers: Layers, engine: str, closing: list[int]) -> None:
    mnt = layers.mount(engine, "--sync-interval", "3600")
    root = fd_of(mnt)
    closing.append(root)
    # 255 levels of 255 bytes: a layer path of 6 + 255 × 256 - 1 = 65285 bytes (fits)
    parts = [b"%03d" % i + b"c" * 252 for i in range(255)]
    bottom = mkdirs(root, parts)
    closing.append(bottom)
    (mnt / "ok").write_bytes(b"fits\n")
    (mnt / ("y" * 255)).write_bytes(b"does not fit\n")
    os.rename(b"ok", b"ok" * 100, src_dir_fd=root, dst_dir_fd=bottom)  # 65486 bytes: fine
    before = journal_records(layers.state)
    with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is checked
        os.rename(b"y" * 255, b"y" * 255, src_dir_fd=root, dst_dir_fd=bottom)  # 65541
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as info:  # noqa: PT011 - the errno is checked
        os.mkdir(b"z" * 255, dir_fd=bottom)
    assert info.value.errno == errno.ENAMETOOLONG
    assert journal_records(layers.state) == before
    assert (mnt / ("y" * 255)).read_bytes() == b"does not fit\n"
    assert read_below(root, [*parts, b"ok" * 100]) == b"fits\n"
    release(closing)
    layers.umount()
    assert run_checks(str(layers.upper), str(layers.state)) == []
