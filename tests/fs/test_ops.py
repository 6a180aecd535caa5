"""The pyfuse3 adapter ``sdeefs.fs.ops.Operations`` in process: no mount, no kernel.

The async handlers are called as pyfuse3 would call them, with a duck-typed request
context (s3ql's t3_fs_api does the same), over a real CowFS on plain directories with
a real journal and real worker threads.  What only the kernel can provide is duck-typed
too: ``SetattrFields`` (pyfuse3 lets no Python code set its fields) and, for readdir,
the reply buffer.  Every test ends with the invariants of ``test_cow.assert_consistent``:
the upper is in overlayfs format, replaying the journal rebuilds it, the lower is as it
was.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import cast

import attrs
import pyfuse3
import pytest
from pyfuse3 import EntryAttributes, FileHandleT, FileInfo, InodeT

from sdeefs import records as rec
from sdeefs.fs import ops as ops_module
from sdeefs.fs.inodes import ROOT_INO
from sdeefs.fs.ops import Operations
from sdeefs.offload import Offload
from sdeefs.sysio import RENAME_EXCHANGE

from .test_cow import MTIME_NS, Env, assert_consistent, mkfile

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, trusted.* xattrs)")


@attrs.frozen
class _Ctx:
    """What a pyfuse3.RequestContext carries."""

    uid: int = 0
    gid: int = 0
    pid: int = 0
    umask: int = 0o022


@attrs.frozen
class _Fields:
    """A pyfuse3.SetattrFields (whose attributes Python code cannot set)."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


def context(uid: int = 0, gid: int = 0) -> pyfuse3.RequestContext:
    """A request context as the handlers read it (pyfuse3 makes its own only from a
    request of /dev/fuse)."""
    return cast(pyfuse3.RequestContext, _Ctx(uid, gid))


def fields(**updates: bool) -> pyfuse3.SetattrFields:
    """SetattrFields with ``updates`` (``update_mode=True`` ...) set."""
    return cast(pyfuse3.SetattrFields, _Fields(**updates))


ROOT = InodeT(ROOT_INO)
CTX = context()
# readdir's reply buffer: only pyfuse3.readdir_reply reads it, stood in for where it is used
NO_TOKEN = cast(pyfuse3.ReaddirToken, None)


def attributes(**values: int) -> EntryAttributes:
    entry = EntryAttributes()
    for name, value in values.items():
        setattr(entry, name, value)
    return entry


def operations(env: Env, writeback_cache: bool = True) -> Operations:
    return Operations(env.fs, Offload(), 0.0, writeback_cache)


def records(env: Env) -> list[rec.Record]:
    assert env.journal is not None
    return [entry.record for entry in env.journal.read()]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.close()


async def lookup(ops: Operations, path: bytes) -> EntryAttributes:
    ino = ROOT
    entry = await ops.getattr(ROOT, CTX)
    for part in path.split(b"/"):
        entry = await ops.lookup(ino, part, CTX)
        ino = entry.st_ino
    return entry


async def read_all(ops: Operations, ino: InodeT) -> bytes:
    info = await ops.open(ino, os.O_RDONLY, CTX)
    try:
        return bytes(await ops.read(info.fh, 0, 1 << 20))  # a view of a reused buffer
    finally:
        await ops.release(info.fh)


async def fuse_errno(call: Awaitable[object]) -> int:
    """The errno of the FUSEError the awaitable ``call`` raises."""
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call
    return info.value.errno


# --------------------------------------------------------------------------


async def test_lookup_getattr_forget(env: Env) -> None:
    mkfile(env.lower / "d" / "f", b"lower", mode=0o640, owner=(7, 8))
    ops = operations(env)
    entry = await lookup(ops, b"d/f")
    st = os.stat(env.lower / "d" / "f")
    assert (entry.st_ino, entry.st_size, entry.st_uid, entry.st_gid) == (st.st_ino, 5, 7, 8)
    assert stat.S_IMODE(entry.st_mode) == 0o640
    assert (await ops.getattr(entry.st_ino, CTX)).st_size == 5
    assert await fuse_errno(ops.lookup(ROOT, b"missing", CTX)) == errno.ENOENT
    assert await fuse_errno(ops.lookup(ROOT, b"x" * 256, CTX)) == errno.ENAMETOOLONG
    await ops.forget([(entry.st_ino, 1)])
    assert await fuse_errno(ops.getattr(entry.st_ino, CTX)) == errno.ESTALE
    assert_consistent(env)


async def test_create_write_read_fsync(env: Env) -> None:
    ops = operations(env)
    info, entry = await ops.create(ROOT, b"new", 0o640, os.O_WRONLY | os.O_CREAT,
                                   context(uid=1000, gid=100))
    assert (entry.st_uid, entry.st_gid) == (1000, 100)
    assert await ops.write(info.fh, 0, b"hello") == 5
    assert await ops.write(info.fh, 5, b" world") == 6
    await ops.fsync(info.fh, True)
    await ops.release(info.fh)
    assert await read_all(ops, entry.st_ino) == b"hello world"
    writes = [r for r in records(env) if isinstance(r, rec.Write)]
    assert [(w.path, w.offset, w.length) for w in writes] == [(b"upper/new", 0, 5),
                                                              (b"upper/new", 5, 6)]
    assert_consistent(env)


async def test_open_for_writing_copies_up_with_or_without_the_data(env: Env) -> None:
    mkfile(env.lower / "keep", b"0123456789", owner=(5, 6), mtime_ns=MTIME_NS)
    mkfile(env.lower / "trunc", b"0123456789")
    ops = operations(env)
    keep = (await lookup(ops, b"keep")).st_ino
    info = await ops.open(keep, os.O_RDWR, CTX)
    await ops.write(info.fh, 2, b"AB")
    await ops.release(info.fh)
    assert (env.upper / "keep").read_bytes() == b"01AB456789"
    assert (env.ust("keep").st_uid, env.ust("keep").st_gid) == (5, 6)
    trunc = (await lookup(ops, b"trunc")).st_ino
    info = await ops.open(trunc, os.O_WRONLY | os.O_TRUNC, CTX)
    await ops.release(info.fh)
    assert (env.upper / "trunc").read_bytes() == b""
    copies = [r for r in records(env) if isinstance(r, rec.Write) and b"#" in r.path]
    assert [r.length for r in copies] == [10]  # the data of "trunc" was never copied
    assert (await ops.getattr(keep, CTX)).st_ino == keep  # st_ino kept across copy-up
    assert_consistent(env)


async def test_setattr_copies_up_and_completes_the_owner(env: Env) -> None:
    mkfile(env.lower / "f", b"0123456789", mode=0o644, owner=(1234, 5678), mtime_ns=MTIME_NS)
    ops = operations(env)
    f = (await lookup(ops, b"f")).st_ino
    entry = await ops.setattr(f, attributes(st_mode=stat.S_IFREG | 0o600),
                              fields(update_mode=True), None, CTX)
    assert stat.S_IMODE(entry.st_mode) == 0o600
    assert (env.upper / "f").read_bytes() == b"0123456789"
    entry = await ops.setattr(f, attributes(st_uid=42), fields(update_uid=True), None,
                              CTX)
    assert (entry.st_uid, entry.st_gid) == (42, 5678)
    assert env.ust("f").st_mtime_ns == MTIME_NS
    times = attributes(st_atime_ns=MTIME_NS - 5, st_mtime_ns=MTIME_NS + 5)
    entry = await ops.setattr(f, times, fields(update_atime=True, update_mtime=True), None,
                              CTX)
    assert (env.ust("f").st_atime_ns, env.ust("f").st_mtime_ns) == (MTIME_NS - 5, MTIME_NS + 5)
    assert_consistent(env)


@pytest.mark.parametrize("writeback_cache", [True, False])
async def test_a_truncate_the_kernel_did_not_time(env: Env, writeback_cache: bool) -> None:
    """With the writeback cache the kernel keeps regular files' mtime and sends it when it
    changes it; a size without one leaves the mtime alone.  Without that cache the daemon's
    file is the truth, and a truncate times it as on any filesystem."""
    mkfile(env.lower / "f", b"0123456789", mtime_ns=MTIME_NS)
    ops = operations(env, writeback_cache)
    f = (await lookup(ops, b"f")).st_ino
    entry = await ops.setattr(f, attributes(st_size=10), fields(update_size=True), None,
                              CTX)
    assert (entry.st_mtime_ns == MTIME_NS) is writeback_cache
    assert (env.ust("f").st_mtime_ns == MTIME_NS) is writeback_cache
    assert entry.st_size == 10
    assert_consistent(env)


async def test_setattr_of_an_unlinked_open_file_goes_through_its_descriptor(env: Env) -> None:
    mkfile(env.lower / "f", b"0123456789")
    ops = operations(env)
    f = (await lookup(ops, b"f")).st_ino
    info = await ops.open(f, os.O_RDWR, CTX)
    await ops.unlink(ROOT, b"f", CTX)
    before = len(records(env))
    entry = await ops.setattr(f, attributes(st_size=3, st_mode=stat.S_IFREG | 0o600),
                              fields(update_size=True, update_mode=True), None,
                              CTX)
    assert (entry.st_size, stat.S_IMODE(entry.st_mode), entry.st_nlink) == (3, 0o600, 0)
    assert (await ops.getattr(f, CTX)).st_size == 3
    await ops.write(info.fh, 0, b"xyz")
    assert await ops.read(info.fh, 0, 10) == b"xyz"
    assert len(records(env)) == before  # no name in the upper: nothing a replica must see
    await ops.release(info.fh)
    await ops.forget([(f, 1)])
    assert stat.S_ISCHR(os.lstat(env.upper / "f").st_mode)  # the whiteout
    assert_consistent(env)


async def test_rename_copies_up_the_moved_file_not_the_replaced_one(env: Env) -> None:
    mkfile(env.lower / "a", b"A" * 100)
    mkfile(env.lower / "b", b"B" * 200)
    mkfile(env.lower / "c", b"C" * 300)
    ops = operations(env)
    await ops.rename(ROOT, b"a", ROOT, b"b", 0, CTX)
    assert (env.upper / "b").read_bytes() == b"A" * 100
    assert stat.S_ISCHR(env.ust("a").st_mode)  # a whiteout where "a" was
    copies = [r.length for r in records(env) if isinstance(r, rec.Write)]
    assert copies == [100]  # the replaced "b" was not copied up first
    await ops.rename(ROOT, b"b", ROOT, b"c", RENAME_EXCHANGE, CTX)  # both copied up
    assert (env.upper / "c").read_bytes() == b"A" * 100
    assert (env.upper / "b").read_bytes() == b"C" * 300
    assert await fuse_errno(ops.rename(ROOT, b"a", ROOT, b"x", 0, CTX)) == errno.ENOENT
    assert_consistent(env)


async def test_link_copies_up_first_and_shares_the_inode(env: Env) -> None:
    mkfile(env.lower / "f", b"data")
    (env.lower / "d").mkdir()
    ops = operations(env)
    f = (await lookup(ops, b"f")).st_ino
    d = (await lookup(ops, b"d")).st_ino
    entry = await ops.link(f, d, b"g", CTX)
    assert entry.st_ino == f
    assert entry.st_nlink == 2
    assert env.ust("f").st_ino == env.ust("d/g").st_ino
    assert await fuse_errno(ops.link(d, ROOT, b"dirlink", CTX)) == errno.EPERM
    assert_consistent(env)


async def test_unlink_rmdir_mkdir(env: Env) -> None:
    mkfile(env.lower / "d" / "f", b"x")
    ops = operations(env)
    d = (await lookup(ops, b"d")).st_ino
    assert await fuse_errno(ops.rmdir(ROOT, b"d", CTX)) == errno.ENOTEMPTY
    await ops.unlink(d, b"f", CTX)
    await ops.rmdir(ROOT, b"d", CTX)
    entry = await ops.mkdir(ROOT, b"d", 0o750, CTX)
    assert stat.S_ISDIR(entry.st_mode)
    assert os.getxattr(env.upper / "d", "trusted.overlay.opaque") == b"y"
    assert await fuse_errno(ops.lookup(entry.st_ino, b"f", CTX)) == errno.ENOENT
    assert_consistent(env)


async def test_new_entries_in_a_setgid_directory_take_its_group(env: Env) -> None:
    (env.lower / "shared").mkdir()
    os.chown(env.lower / "shared", 0, 5678)
    os.chmod(env.lower / "shared", 0o2775)
    ops = operations(env)
    shared = (await lookup(ops, b"shared")).st_ino
    user = context(uid=1000, gid=1000)
    sub = await ops.mkdir(shared, b"sub", 0o755, user)
    assert (sub.st_uid, sub.st_gid) == (1000, 5678)
    assert sub.st_mode & stat.S_ISGID
    info, f = await ops.create(shared, b"f", 0o644, os.O_WRONLY | os.O_CREAT, user)
    await ops.release(info.fh)
    assert (f.st_uid, f.st_gid) == (1000, 5678)
    assert not f.st_mode & stat.S_ISGID
    link = await ops.symlink(ROOT, b"plain", b"shared", user)
    assert (link.st_uid, link.st_gid) == (1000, 1000)
    assert_consistent(env)


async def test_xattrs_copy_up_only_what_changes(env: Env) -> None:
    mkfile(env.lower / "f", b"data")
    os.setxattr(env.lower / "f", "user.a", b"1")
    mkfile(env.lower / "g", b"data")
    ops = operations(env)
    f = (await lookup(ops, b"f")).st_ino
    g = (await lookup(ops, b"g")).st_ino
    assert await ops.getxattr(f, b"user.a", CTX) == b"1"
    assert await fuse_errno(ops.removexattr(g, b"user.none", CTX)) == errno.ENODATA
    assert "g" not in env.upper_names()  # ENODATA before any copy-up
    await ops.setxattr(f, b"user.b", b"2", CTX)
    assert sorted(await ops.listxattr(f, CTX)) == [b"user.a", b"user.b"]
    assert os.getxattr(env.upper / "f", "user.b") == b"2"
    await ops.removexattr(f, b"user.a", CTX)
    assert await ops.listxattr(f, CTX) == [b"user.b"]
    assert await fuse_errno(ops.setxattr(f, b"trusted.overlay.opaque", b"y", CTX)) \
        == errno.EPERM
    assert b"trusted.overlay.origin" not in await ops.listxattr(f, CTX)
    assert_consistent(env)


async def test_readdir_counts_what_it_delivers(env: Env,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """readdir entries count as lookups; one the kernel's buffer did not take does not.

    The buffer is the kernel's (``readdir_reply`` needs a request from /dev/fuse), so
    it is stood in for here: it takes two entries after "." and "..", then is full.
    """
    for name in ("a", "b", "c"):
        mkfile(env.lower / name, b"x")
    ops = operations(env)
    delivered: list[tuple[bytes, int]] = []

    def reply(token: object, name: bytes, attr: EntryAttributes, next_id: int) -> bool:
        if len(delivered) == 4:
            return False
        delivered.append((name, attr.st_ino))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    opened = await ops.opendir(ROOT, CTX)
    fh = FileHandleT(opened.fh if isinstance(opened, FileInfo) else opened)  # (patched: FileInfo)
    await ops.readdir(fh, 0, NO_TOKEN)
    assert [name for name, _ in delivered] == [b".", b"..", b"a", b"b"]
    counted = {name: ops.fs.node(ino).lookups for name, ino in delivered[2:]}
    assert counted == {b"a": 1, b"b": 1}
    c = os.stat(env.lower / "c").st_ino
    assert ops.fs.inodes.get(c) is None  # offered, not taken: forgotten again
    delivered.clear()
    await ops.readdir(fh, 4, NO_TOKEN)
    assert [name for name, _ in delivered] == [b"c"]
    await ops.releasedir(FileHandleT(fh))
    assert_consistent(env)


async def test_opendir_asks_the_kernel_to_cache_listings_only_with_the_patched_pyfuse3(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stock pyfuse3 takes only a handle from opendir (FileInfo: third_party/pyfuse3)."""
    mkfile(env.lower / "d" / "a", b"x")
    ops = operations(env)
    d = (await lookup(ops, b"d")).st_ino
    monkeypatch.setattr(ops_module, "CACHE_DIR", False)
    plain = await ops.opendir(d, CTX)
    assert isinstance(plain, int)
    await ops.releasedir(FileHandleT(plain))
    if hasattr(pyfuse3.Operations, "opendir_stateless"):  # the patched build is installed
        monkeypatch.setattr(ops_module, "CACHE_DIR", True)
        info = await ops.opendir(d, CTX)
        assert isinstance(info, FileInfo)
        assert info.cache_readdir  # type: ignore[attr-defined, unused-ignore]
        await ops.releasedir(FileHandleT(info.fh))
