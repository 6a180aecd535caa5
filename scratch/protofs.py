#!/usr/bin/env python3
"""Prototype (not sdeefs): a tiny pyfuse3 passthrough for the patched pyfuse3.

Shows (1) fallocate(2) reaching a Python handler (the patch registers the
low-level op; unpatched pyfuse3 leaves it NULL and the kernel answers
EOPNOTSUPP), and (2) FOPEN_CACHE_DIR + FOPEN_KEEP_CACHE on opendir (the patch
lets opendir return a FileInfo), so repeated listings are served from the
kernel's readdir cache.

    protofs.py SOURCE MOUNTPOINT [--cache-dir] [--stats FILE]

Counts every request kind and writes them to --stats on exit (SIGTERM/umount).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import json
import os
import signal
from collections.abc import Sequence

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileHandleT, FileInfo, FUSEError, InodeT, RequestContext

TIMEOUT = 10.0
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Proto(pyfuse3.Operations):
    def __init__(self, source: str, cache_dir: bool, no_opendir: bool = False) -> None:
        super().__init__()
        self.source = source
        self.cache_dir = cache_dir
        self.no_opendir = no_opendir
        self.opendir_stateless = no_opendir  # patched pyfuse3: no OPENDIR/RELEASEDIR at all
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.lookups: collections.Counter[int] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.files: dict[int, int] = {}
        self.dirs: dict[int, tuple[str, list[tuple[str, os.stat_result]]]] = {}
        self.next_fh = 1
        self.fallocates: list[tuple[int, int, int]] = []

    def _entry(self, st: os.stat_result, ino: int | None = None) -> EntryAttributes:
        e = EntryAttributes()
        for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                  "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_blocks"):
            setattr(e, k, getattr(st, k))
        e.st_ino = InodeT(ino if ino is not None else st.st_ino)
        e.st_blksize = 4096
        e.entry_timeout = e.attr_timeout = TIMEOUT
        return e

    def _ino(self, path: str, st: os.stat_result) -> int:
        ino = pyfuse3.ROOT_INODE if path == self.source else st.st_ino
        self.paths[ino] = path
        return ino

    async def lookup(self, parent: InodeT, name: bytes, ctx: RequestContext) -> EntryAttributes:
        self.calls["lookup"] += 1
        path = os.path.join(self.paths[parent], os.fsdecode(name))
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None
        ino = self._ino(path, st)
        self.lookups[ino] += 1
        return self._entry(st, ino)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, n in inode_list:
            self.lookups[ino] -= n

    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        self.calls["getattr"] += 1
        return self._entry(os.lstat(self.paths[inode]), inode)

    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT | FileInfo:
        self.calls["opendir"] += 1
        path = self.paths[inode]
        with os.scandir(path) as it:
            listing = sorted((e.name, e.stat(follow_symlinks=False)) for e in it)
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = (path, listing)
        if self.cache_dir:  # FOPEN_CACHE_DIR, and keep what an earlier open cached
            return FileInfo(fh=FileHandleT(fh), keep_cache=True, cache_readdir=True)
        return FileHandleT(fh)

    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        self.calls["readdir"] += 1
        if self.no_opendir:  # fh is the directory's inode (opendir_stateless)
            path = self.paths[fh]
            with os.scandir(path) as it:
                listing = sorted((e.name, e.stat(follow_symlinks=False)) for e in it)
        else:
            path, listing = self.dirs[fh]
        for index in range(start_id, len(listing)):
            name, st = listing[index]
            ino = self._ino(os.path.join(path, name), st)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(st), index + 1):
                return
            self.lookups[ino] += 1

    async def releasedir(self, fh: FileHandleT) -> None:
        self.calls["releasedir"] += 1
        del self.dirs[fh]

    async def open(self, inode: InodeT, flags: int, ctx: RequestContext) -> FileInfo:
        self.calls["open"] += 1
        fd = os.open(self.paths[inode], flags & ~os.O_CREAT)
        self.files[fd] = fd
        return FileInfo(fh=FileHandleT(fd))

    async def create(self, parent: InodeT, name: bytes, mode: int, flags: int,
                     ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        self.calls["create"] += 1
        path = os.path.join(self.paths[parent], os.fsdecode(name))
        fd = os.open(path, flags | os.O_CREAT, mode)
        self.files[fd] = fd
        st = os.fstat(fd)
        ino = self._ino(path, st)
        self.lookups[ino] += 1
        return FileInfo(fh=FileHandleT(fd)), self._entry(st, ino)

    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        return os.pwrite(fh, buf, off)

    async def release(self, fh: FileHandleT) -> None:
        os.close(self.files.pop(fh))

    async def fallocate(self, fh: FileHandleT, mode: int, offset: int, length: int) -> None:
        self.calls["fallocate"] += 1
        self.fallocates.append((mode, offset, length))
        try:
            fallocate(fh, mode, offset, length)
        except OSError as exc:
            raise FUSEError(exc.errno or errno.EIO) from None


async def serve(ops: Proto, stats: str | None) -> None:
    async def until_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(until_signal)
        await pyfuse3.main()  # returns when the mount goes away
        nursery.cancel_scope.cancel()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("mountpoint")
    ap.add_argument("--cache-dir", action="store_true")
    ap.add_argument("--no-opendir", action="store_true",
                    help="Operations.opendir_stateless (patched pyfuse3): the kernel sends "
                         "no OPENDIR/RELEASEDIR and caches every listing")
    ap.add_argument("--stats")
    args = ap.parse_args()
    ops = Proto(os.path.abspath(args.source), args.cache_dir, args.no_opendir)
    opts = set(pyfuse3.default_options)
    opts.add("fsname=protofs")
    opts.discard("default_permissions")
    pyfuse3.init(ops, args.mountpoint, opts)
    try:
        trio.run(serve, ops, args.stats)
    finally:
        pyfuse3.close(unmount=True)
        if args.stats:
            with open(args.stats, "w") as f:
                json.dump({"calls": ops.calls, "fallocates": ops.fallocates}, f)


if __name__ == "__main__":
    main()
