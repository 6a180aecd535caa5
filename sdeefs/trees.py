"""Walking and removing directory trees of any depth through directory fds, never by path.

A tree may be deeper than PATH_MAX (kernel overlayfs allows it, and so does
sdeefs up to ``records.MAX_PATH``), so ``check``, ``diff``, snapshots, digests
and clean-ups cannot hand a whole path to the kernel, nor recurse in Python
(a chain of 1-byte names is thousands of levels deep).  :func:`walk` opens
every directory relative to its parent with ``O_NOFOLLOW`` (a symlink planted
in the tree is never followed) and hands each entry over as (directory fd, name);
:func:`remove_tree` is ``rm -r`` the same way.

Order of :func:`walk`: the root, then every entry of a directory (sorted by
name), then the subdirectories' contents one after another in the same order.
So all entries of one directory come together, with the same ``dir_fd``, and a
directory always comes before what it holds.

At most ``WINDOW`` directory fds are open at a time, whatever the depth: below
that, ancestors' fds are closed and, on the way back up, reopened through
``..`` of the child and checked against the (st_dev, st_ino) they had.  A tree
changed under the walk that way raises :class:`TreeChanged` rather than going
somewhere else.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Generator, Iterator

import attrs

WINDOW = 64  # directory fds held open at most (RLIMIT_NOFILE is often 1024)
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeChanged(OSError):
    """A directory moved while the walk was below it."""

    def __init__(self, path: bytes) -> None:
        super().__init__(errno.ESTALE, "a directory moved while the tree was walked",
                         os.fsdecode(path[-200:]))


@attrs.frozen
class Visit:
    """One entry of the walk.  ``dir_fd`` is valid only until the walk goes on.

    path: relative to the root (b"" for the root itself).
    dir_fd: the directory holding the entry (for the root: the root's own fd).
    name: the entry's name in ``dir_fd`` (b"" for the root).
    st: its lstat.
    """

    path: bytes
    dir_fd: int
    name: bytes
    st: os.stat_result

    def at(self) -> bytes:
        """A path string reaching the entry itself (for calls that take only paths)."""
        base = b"/proc/self/fd/%d" % self.dir_fd
        return base + b"/" + self.name if self.name else base


@attrs.define(eq=False)
class _Level:
    """A directory on the way down: its fd (-1 while closed) and what is left to visit."""

    path: bytes
    name: bytes
    fd: int
    ident: tuple[int, int]
    pending: deque[bytes] = attrs.field(factory=deque)


@attrs.define(eq=False)
class _Descent:
    """The directories from the root to where a walk is, at most WINDOW of them open.

    The bottom level (the root) always stays open: it is the way back."""

    levels: list[_Level] = attrs.field(factory=list)

    @property
    def top(self) -> _Level:
        return self.levels[-1]

    def push(self, path: bytes, name: bytes, fd: int) -> _Level:
        st = os.fstat(fd)
        level = _Level(path, name, fd, (st.st_dev, st.st_ino))
        self.levels.append(level)
        if len(self.levels) > WINDOW + 1:
            far = self.levels[-WINDOW - 1]
            if far.fd >= 0:
                os.close(far.fd)
                far.fd = -1
        return level

    def enter(self, name: bytes) -> _Level | None:
        """Open ``name`` below the top level and make it the top (None if gone meanwhile)."""
        top = self.top
        try:
            fd = os.open(name, _OPEN_DIR, dir_fd=top.fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return None  # removed or replaced since it was listed
            raise
        return self.push(top.path + b"/" + name if top.path else name, name, fd)

    def leave(self) -> _Level:
        """Pop the top level; the new top is open afterwards.  The caller closes the fd."""
        child = self.levels.pop()
        if self.levels and self.levels[-1].fd < 0:
            parent = self.levels[-1]
            try:
                fd = os.open(b"..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=child.fd)
            except BaseException:
                os.close(child.fd)
                raise
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != parent.ident:
                os.close(fd)
                os.close(child.fd)
                raise TreeChanged(parent.path)
            parent.fd = fd
        return child

    def close(self) -> None:
        for level in self.levels:
            if level.fd >= 0:
                os.close(level.fd)
        self.levels.clear()


def _names(fd: int) -> list[bytes]:
    return sorted(os.fsencode(n) for n in os.listdir(fd))


def walk(root_fd: int) -> Generator[Visit, None, None]:
    """Every entry below ``root_fd`` (an open directory; not closed here), root first."""
    root_st = os.fstat(root_fd)
    yield Visit(b"", root_fd, b"", root_st)
    descent = _Descent()
    try:
        level: _Level | None = descent.push(b"", b"", os.dup(root_fd))
        while descent.levels:
            if level is not None:  # just entered: hand over its entries, note its subdirs
                for name in _names(level.fd):
                    try:
                        st = os.stat(name, dir_fd=level.fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    yield Visit(level.path + b"/" + name if level.path else name, level.fd,
                                name, st)
                    if stat.S_ISDIR(st.st_mode):
                        level.pending.append(name)
            top = descent.top
            if top.pending:
                level = descent.enter(top.pending.popleft())
            else:
                os.close(descent.leave().fd)
                level = None
    finally:
        descent.close()


def remove_tree(parent_fd: int, name: bytes) -> None:
    """``rm -r`` of ``name`` in the directory ``parent_fd``, whatever its depth.

    Never follows a symlink: a symlink is removed, not what it points to.
    FileNotFoundError if ``name`` does not exist.
    """
    try:
        fd = os.open(name, _OPEN_DIR, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        os.unlink(name, dir_fd=parent_fd)
        return
    descent = _Descent()
    try:
        level: _Level | None = descent.push(name, name, fd)
        while descent.levels:
            if level is not None:
                level.pending.extend(_names(level.fd))
            top = descent.top
            if not top.pending:
                child = descent.leave()
                os.close(child.fd)
                os.rmdir(child.name, dir_fd=descent.top.fd if descent.levels else parent_fd)
                level = None
                continue
            entry = top.pending.popleft()
            try:
                os.unlink(entry, dir_fd=top.fd)
                level = None
            except IsADirectoryError:
                level = descent.enter(entry)
            except FileNotFoundError:
                level = None
    finally:
        descent.close()


def rmtree(path: str | bytes) -> None:
    """``remove_tree`` of an absolute or relative path (its last component); nothing if absent."""
    head, tail = os.path.split(os.fsencode(path).rstrip(b"/"))
    try:
        parent = os.open(head or b".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        remove_tree(parent, tail)
    except FileNotFoundError:
        pass
    finally:
        os.close(parent)


def entries_below(root: str | bytes) -> Iterator[Visit]:
    """The entries below ``root`` (not the root itself), by directory fds: any depth."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for visit in walk(fd):
            if visit.path:
                yield visit
    finally:
        os.close(fd)


def signature(root: str | bytes) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, uid, gid, size, symlink target, sorted xattrs) below ``root``.

    What ``sdeefs check`` compares (a journal's replay with the upper) and what tests
    compare between a layer and its replicas; file contents are not read.
    """
    sig: dict[str, tuple[object, ...]] = {}
    for visit in entries_below(root):
        st, where = visit.st, visit.at()
        target = os.fsdecode(os.readlink(visit.name, dir_fd=visit.dir_fd)) \
            if stat.S_ISLNK(st.st_mode) else None
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        try:
            names = sorted(os.listxattr(where, follow_symlinks=False))
            xattrs = tuple((n, os.getxattr(where, n, follow_symlinks=False)) for n in names)
        except OSError:
            xattrs = ()
        sig[os.fsdecode(visit.path)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                        st.st_uid, st.st_gid, size, target, xattrs)
    return sig
