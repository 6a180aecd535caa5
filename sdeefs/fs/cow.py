"""Overlay semantics: a copy-on-write view of a read-only lower tree and a writable upper.

This module never imports pyfuse3; it works on node ids, ``bytes`` names and
``os.stat_result``s, raises ``OSError`` with a real errno, and is tested on
plain directories without a mount (``tests/fs/test_cow.py``).  Its parts:
the node table (``sdeefs.fs.inodes``), the read-only lower with its hide policy,
owner mapping and origin handles (``sdeefs.fs.lower``), and the upper, reached
and changed through :class:`~sdeefs.layers.LayerRoot` only.

The upper directory is in **kernel overlayfs format** (Documentation/filesystems/overlayfs.rst):

* a deleted lower entry is a character device 0/0 (a *whiteout*);
* a directory that replaces a lower one carries ``<prefix>opaque = "y"``;
* a copied-up entry carries ``<prefix>origin``, a kernel file handle of its
  lower original (``sdeefs.fs.lower`` has the format), which is how sdeefs
  keeps ``st_ino`` across copy-up and remount;
* a directory of the lower that was renamed carries ``<prefix>redirect``, the
  kernel's format (redirect_dir=on): the name it had in the same parent (a rename
  within one directory), or ``/`` and its path from the lower's root; it keeps
  merging with that lower directory wherever it is, and its old name holds a
  whiteout (:meth:`CowFS.rename`, :meth:`CowFS._redirected`);
* ``<prefix>`` is ``trusted.overlay.`` (host root mounts) or ``user.overlay.``
  (user-namespace mounts with ``userxattr``); those names are hidden from the view.
  Redirects exist only under ``trusted.``: the kernel refuses redirect_dir with
  ``userxattr`` (it neither follows nor makes them there), so a view whose upper
  user-namespace overlays also mount (the launcher's, jobs' replicas) must not have
  them either: a rename of a lower directory is EXDEV there (``mv`` copies), as in
  the kernel.

Two modes share one node table and one journal:

* ``merged`` - the overlay view (``--engine fuse``).
* ``raw`` - the passthrough upper for kernel overlayfs (``--engine hybrid``):
  the view root holds ``upper`` and ``work`` exactly as they are on disk,
  whiteouts and overlay xattrs included, so kernel overlayfs can use it as
  its upper filesystem while every change is journaled here.

Every change to the upper is made through :class:`LayerRoot`, which journals
it first (see ``sdeefs.journal`` for the log model) and resolves every upper
path with ``openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS)``: the upper is
user-owned in the launcher's set-up, so a symlink planted there must never
lead the root daemon elsewhere.

Copy-up, in two phases.  Every change of a lower entry copies it up first, and
copying a regular file's data may take long, so each change that may need it has
a ``copy_up_for_*`` method that decides what to copy, refuses first what could
not be journaled, and stages the copy: it returns a :class:`CopyUp` (or None once
nothing, or nothing more, needs a data copy: directories, symlinks and special
files are copied at once).  The caller runs :meth:`CowFS.copy_data` (in a worker
thread), then :meth:`CowFS.finish_copy_up` (or :meth:`CowFS.abort_copy_up`), and
asks again until None; the change itself then finds its entries in the upper.
Called directly, a change makes the same copies synchronously
(:meth:`CowFS.run_copy_ups`): one decision, two ways to run it.

Concurrency contract (docs/threading.md): every method here is synchronous.
Node-table changes and namespace mutations run on the trio loop, one at a
time (``sdeefs.fs.ops`` holds a lock around them); only :meth:`CowFS.copy_data`,
:meth:`CowFS.find_other_name`, :meth:`CowFS.sync_journal` and file data I/O
run in worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import Literal

import attrs

from .. import records as rec
from ..errors import BadRecord
from ..identity import Identity
from ..layers import AnyJournal, LayerRoot, join, split
from ..replicable import NOBODY, UserIds, of_identity, refusal, user_ids
from ..sysio import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    copy_file_data,
    fallocate,
    fd_path,
    is_whiteout,
    name_to_handle,
    range_lock,
)
from ..trees import walk
from .inodes import ROOT_INO, Attr, Node, ViewNodes, check_name
from .lower import HidePolicy, Lower

log = logging.getLogger(__name__)

PATH_MAX = 4096
UPPER_ONLY_BIT = 1 << 63  # tags st_ino of upper-only files when upper and lower differ in st_dev
STAGE = b"work/sdeefs"  # where the merged engine stages copy-ups and replacements
DEFAULT_EXCLUDES = (b"proc", b"sys", b"dev", b"run")

Mode = Literal["merged", "raw"]
# what resolving a name yields: (ino, kind, lower path, in_upper, opaque, stat)
Resolved = tuple[int, int, bytes | None, bool, bool, os.stat_result]


@attrs.frozen
class OverlayXattrs:
    """Names of the overlayfs xattrs in the upper (trusted.* or user.* namespace)."""

    prefix: bytes = b"trusted.overlay."

    @property
    def opaque(self) -> bytes:
        return self.prefix + b"opaque"

    @property
    def origin(self) -> bytes:
        return self.prefix + b"origin"

    @property
    def redirect(self) -> bytes:
        return self.prefix + b"redirect"

    @property
    def redirects(self) -> bool:
        """Are lower directories renamed with redirects (see the module docstring)?"""
        return self.prefix == b"trusted.overlay."

    def is_private(self, name: bytes) -> bool:
        return name.startswith(b"trusted.overlay.") or name.startswith(b"user.overlay.")


@attrs.frozen
class ViewConfig:
    """How one view is assembled (all paths absolute, in bytes)."""

    upper: bytes
    work: bytes
    lower: bytes | None = b"/"
    mode: Mode = "merged"
    excludes: tuple[bytes, ...] = DEFAULT_EXCLUDES  # view paths shown as empty directories
    hidden: tuple[bytes, ...] = ()  # view paths whose lower entry is not shown at all
    xattrs: OverlayXattrs = OverlayXattrs()
    cache_timeout: float = 0.0  # how long lower-only names may be answered from memory
    # Nodes the daemon keeps known to the kernel (merged mode): past it the entries looked
    # up longest ago are handed back (overflow); it bounds the name caches too
    node_limit: int = 50_000
    # Lower entries this says to hide (lower path, its lstat) do not show; the launcher
    # passes sdeefs.fs.guard.Policy.hides: deny patterns and root-only entries, at lookup time.
    hide: HidePolicy | None = None
    # The launcher's user (sdeefs.identity): lower entries show, and are copied up, with
    # owners as its idmapped lower shows them (system ids as its subordinate ids), and the
    # daemon accepts only its ids (the id door: ops.py)
    ids: Identity | None = None


@attrs.frozen
class AttrChange:
    """A change of attributes as the kernel asks for it (None: that one stays).

    ``keep_mtime``: a change of size leaves a regular file's mtime as it is (ftruncate
    would set it).  With the writeback cache the kernel keeps regular files' times
    itself and times a truncate only when the size it knows changes; it did not time
    this one, so neither may the upper, or it would hold a time the view never shows.
    """

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    keep_mtime: bool = False

    @property
    def complete(self) -> bool:
        """Nothing of the entry's current attributes is needed to apply it."""
        return (self.uid is None) == (self.gid is None) and not (
            self.keep_mtime and self.size is not None and self.mtime_ns is None)

    def against(self, st: os.stat_result) -> AttrChange:
        """This change made complete by the entry's current ``st``: the owner's other half,
        the kept mtime."""
        uid, gid, mtime = self.uid, self.gid, self.mtime_ns
        if (uid is None) != (gid is None):
            uid = st.st_uid if uid is None else uid
            gid = st.st_gid if gid is None else gid
        if self.keep_mtime and self.size is not None and mtime is None and \
                stat.S_ISREG(st.st_mode):
            mtime = st.st_mtime_ns
        return AttrChange(self.mode, uid, gid, self.size, self.atime_ns, mtime)

    def record(self, path: bytes) -> rec.Setattr:
        """The journal record of this (complete) change of the layer path ``path``."""
        mask = ((rec.SET_MODE if self.mode is not None else 0)
                | (rec.SET_OWNER if self.uid is not None else 0)
                | (rec.SET_SIZE if self.size is not None else 0)
                | (rec.SET_ATIME if self.atime_ns is not None else 0)
                | (rec.SET_MTIME if self.mtime_ns is not None else 0))
        return rec.Setattr(path, mask, self.mode or 0, self.uid or 0, self.gid or 0,
                           self.size or 0, self.atime_ns or 0, self.mtime_ns or 0)


# A directory changed less than this before its stamp was taken may change again with the
# same timestamps (a coarse clock: one jiffy; some filesystems: 1-2 s): its stamp is not
# trusted (ListingStamp).
RACY_NS = 2_000_000_000


@attrs.frozen
class ListingStamp:
    """What one merged directory's listing was made from: the kernel may keep a copy of it
    (FOPEN_KEEP_CACHE at opendir) only while a new listing has the same stamp.

    ``names``: the hash of the listed names in order; the hash of bytes is SipHash with a
    per-process secret key, so nobody can craft two listings that collide.  ``upper`` and
    ``lower``: (st_ino, st_mtime_ns, st_ctime_ns) of the directory in each layer (None where
    it has none), taken before the listing: they change when a name is replaced by another
    entry under the same name, which the names alone do not show.
    """

    names: int
    upper: tuple[int, int, int] | None
    lower: tuple[int, int, int] | None


def _dir_stamp(st: os.stat_result | None) -> tuple[int, int, int] | None:
    return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


@attrs.frozen
class CopyUp:
    """A copy-up in progress: the staged file and where it goes."""

    node: Node
    stage: bytes
    lower_fd: int
    upper_fd: int
    size: int


@attrs.frozen
class _Move:
    """A rename that passed every check: its nodes and view paths."""

    old_parent: Node
    node: Node
    new_parent: Node
    target: Node | None
    src: bytes
    dst: bytes


def _last_link(st: os.stat_result) -> bool:
    return stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1


@attrs.define(eq=False)
class CowFS:
    """The copy-on-write view.  See the module docstring for modes and formats.

    Attributes:
        config: how the view is assembled.
        layers: journaled, safe access to upper and work.
        lower: the read-only lower (absent in raw mode).
        inodes: every inode the kernel knows, by node id and by view path.
        upper_dev: st_dev of the upper, for inode numbering.
        lower_fds: the descriptors in ``Node.fds`` that are of lower files (read-only):
            an unlinked file is changed only through one of the upper.
        ids: the host ids of the upper's owner (the launcher's user): what
            ``sdeefs.replicable`` lets a file capability name.
    """

    config: ViewConfig
    layers: LayerRoot
    lower: Lower
    inodes: ViewNodes
    upper_dev: int
    ids: UserIds = NOBODY
    lower_fds: set[int] = attrs.field(factory=set)
    _resolved: dict[tuple[int, bytes], tuple[float, Resolved]] = attrs.field(factory=dict)
    _listings: dict[int, tuple[float, list[bytes], ListingStamp | None]] = \
        attrs.field(factory=dict)
    _listed: dict[int, ListingStamp | None] = attrs.field(factory=dict)
    _name_hints: dict[tuple[int, int], bytes] = attrs.field(factory=dict)
    _cache_generation: int = 0
    _since_shed: int = 0
    _stage_counter: Iterator[int] = attrs.field(factory=itertools.count)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def open(cls, config: ViewConfig, journal: AnyJournal) -> CowFS:
        upper_fd = os.open(config.upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        work_fd = -1
        try:
            work_fd = os.open(config.work, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            upper_st = os.stat(upper_fd)
            upper_dev = upper_st.st_dev
            if os.stat(work_fd).st_dev != upper_dev:
                raise OSError(errno.EXDEV, "the work directory is not on the upper's filesystem")
            if config.mode == "merged":
                assert config.lower is not None
                lower = Lower.open(config.lower, config.hide, config.ids)
            else:
                lower = Lower.absent(upper_dev)
        except BaseException:
            for fd in (upper_fd, work_fd):
                if fd >= 0:
                    os.close(fd)
            raise
        # every id of the launcher's user, or (a plain mount) the upper's owner's own
        ids = of_identity(config.ids) if config.ids is not None else \
            user_ids(upper_st.st_uid, upper_st.st_gid)
        fs = cls(config, LayerRoot(upper_fd, work_fd, journal), lower, ViewNodes(), upper_dev,
                 ids)
        root = fs.inodes.add(Node(ROOT_INO, stat.S_IFDIR, [], b"" if lower.fd >= 0 else None,
                                  True, lookups=1))
        fs.inodes.name(root, b"")
        if config.mode == "merged":
            fs._prepare_stage()
        return fs

    def close(self) -> None:
        self.layers.close()
        self.lower.close()

    def _prepare_stage(self) -> None:
        """Create the staging directory and discard what an interrupted copy-up left there."""
        if self.layers.lstat(STAGE) is None:
            self.layers.mkdir(STAGE, 0o700, 0, 0)
            return
        for name in self.layers.listdir(STAGE):
            self._remove_tree(join(STAGE, name))

    def _remove_tree(self, path: bytes) -> None:
        st = self.layers.lstat(path)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            for name in self.layers.listdir(path):
                self._remove_tree(join(path, name))
            self.layers.rmdir(path)
        else:
            self.layers.unlink(path)

    # -- paths --------------------------------------------------------------------------------

    @property
    def raw(self) -> bool:
        return self.config.mode == "raw"

    def layer_path(self, view_path: bytes) -> bytes:
        """The layer-root path of a view path (merged: under upper/; raw: itself)."""
        if self.raw:
            return view_path
        return join(b"upper", view_path)

    def _stage_name(self) -> bytes:
        return join(STAGE, b"#%x-%d" % (os.getpid(), next(self._stage_counter)))

    # -- node table ---------------------------------------------------------------------------

    def node(self, ino: int) -> Node:
        return self.inodes.node(ino)

    def forget(self, ino: int, count: int) -> None:
        self.inodes.forget(ino, count)

    def overflow(self) -> list[tuple[int, bytes]]:
        """Entries (parent node id, name) for the kernel to drop, after a lookup.

        The kernel forgets nodes only under memory pressure: without this the daemon
        would keep a node for every entry ever looked up (a ``find`` over /usr: 140,000,
        230 MB).  Past ``node_limit`` nodes, one batch of the least recently looked-up
        (``ViewNodes.least_recent``) every batch's worth of lookups, so shedding keeps
        pace with lookups without asking again for entries whose FORGET is on its way.
        None in raw mode: kernel overlayfs above holds the upper's dentries, and a
        dropped one would make it revalidate (ESTALE, docs/hardlinks.md).
        """
        if self.raw:
            return []
        batch = max(64, self.config.node_limit // 16)
        self._since_shed += 1
        if len(self.inodes) <= self.config.node_limit or self._since_shed < batch:
            return []
        self._since_shed = 0
        entries = []
        for node in self.inodes.least_recent(batch):
            head, name = split(node.path)
            if name:
                entries.append((self.inodes.ino_of_path(head) or ROOT_INO, name))
        return entries

    def opened(self, node: Node, fd: int) -> None:
        """The kernel holds ``fd`` (from :meth:`open_fd`) open on ``node`` until :meth:`released`.

        An unlinked file lives on in such descriptors: getattr and setattr go through them.
        """
        node.fds.append(fd)

    def released(self, node: Node, fd: int) -> None:
        if fd in node.fds:
            node.fds.remove(fd)
        self.lower_fds.discard(fd)

    def _open_fd_of(self, node: Node) -> tuple[int, bool]:
        """(a descriptor an unlinked ``node`` lives on in, whether it is a lower file's):
        one of the upper file if the kernel holds any (the file as it is now)."""
        for fd in node.fds:
            if fd not in self.lower_fds:
                return fd, False
        return node.fds[0], True

    def _forget_path(self, path: bytes, keep: Node | None = None,
                     removed: os.stat_result | None = None) -> None:
        """A name disappeared from the view: drop it from the node that carried it.

        ``removed`` is the upper entry's stat before it went.  Its last link: the
        inode is gone, so its number may be reused by the filesystem for something
        new (``dead``).  Not its last link: the file lives on under another name,
        and if this was the last name known here while the kernel still uses the
        node (an open file, a cached dentry), that other name is looked for, so
        that what is written through the node is journaled under a path a replica
        can find (otherwise it would count as unlinked and go unjournaled).
        """
        node = self.inodes.drop_name(path, keep)
        if node is None:
            return
        if removed is not None and not _last_link(removed) and node.lookups > 0:
            other = self._other_name(removed, split(path)[0])
            if other is not None:
                self.inodes.name(node, other)
                return
        node.lose_last_name(path, gone=removed is not None and _last_link(removed))

    def _other_name(self, removed: os.stat_result, near: bytes) -> bytes | None:
        """A view path that still names the upper inode of ``removed``, or None.

        What :meth:`find_other_name` found before the removal (the daemon runs that
        scan in a worker thread), else that scan here.
        """
        hint = self._name_hints.pop((removed.st_dev, removed.st_ino), None)
        if hint is not None:
            st = self.layers.lstat(self.layer_path(hint))
            if st is not None and (st.st_dev, st.st_ino) == (removed.st_dev, removed.st_ino):
                return hint
        return self.find_other_name(removed, near, b"")

    def other_name_needed(self, parent_ino: int, name: bytes, flags: int = 0
                          ) -> tuple[os.stat_result, bytes, bytes] | None:
        """(upper stat, its directory, its path) if removing ``name`` (by unlink, or by a
        rename with ``flags`` over it) leaves a node the kernel holds with no known name
        while its file keeps other links; else None.

        Then the file's other name is to be found (:meth:`find_other_name`) before the
        removal, so that the node carries on under it (see :meth:`_forget_path`).
        """
        if flags & RENAME_EXCHANGE:
            return None  # an exchange removes no name
        parent = self.inodes.get(parent_ino)
        if parent is None:
            return None
        path = join(parent.path, name)
        node = self.inodes.by_path.get(path)
        if node is None or node.is_dir or node.lookups <= 0 or node.paths != [path]:
            return None
        try:
            st = self.layers.lstat(self.layer_path(path))
        except OSError:
            return None
        if st is None or _last_link(st):
            return None
        return st, parent.path, path

    def find_other_name(self, removed: os.stat_result, near: bytes, exclude: bytes
                        ) -> bytes | None:
        """A view path other than ``exclude`` naming the upper inode of ``removed``.

        A scan, as hard links have no way back to their names: the directory ``near``
        first, then the whole upper, by d_ino, confirmed with lstat; it stays on the
        upper's filesystem and never follows symlinks.  It only reads the upper, so it
        may run in a worker thread (the caller holds the namespace lock); it is needed
        only when the last known name of a multiply linked file goes.
        """
        top = b"upper"
        starts = [self.layer_path(near)] if near and self.layer_path(near) != top else []
        for start in [*starts, top]:
            found = self._find_link(start, removed, self.layer_path(exclude) if exclude
                                    else b"", recurse=start == top)
            if found is not None:
                return found if self.raw else found[len(top) + 1:]
        return None

    def hint_other_name(self, removed: os.stat_result, path: bytes) -> None:
        """Remember what :meth:`find_other_name` found for the removal that follows."""
        self._name_hints[(removed.st_dev, removed.st_ino)] = path

    def _find_link(self, start: bytes, removed: os.stat_result, exclude: bytes,
                   recurse: bool) -> bytes | None:
        try:
            pfd = self.layers.open_dir(start)
        except OSError:
            return None
        try:
            dfd = os.open(fd_path(pfd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            os.close(pfd)
        pending = [(start, dfd)]
        try:
            while pending:
                path, dfd = pending.pop()
                try:
                    subdirs = []
                    with os.scandir(dfd) as entries:
                        for entry in entries:
                            name = os.fsencode(entry.name)
                            if entry.is_dir(follow_symlinks=False):
                                subdirs.append(name)
                            elif entry.inode() == removed.st_ino:
                                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                                if (st.st_ino, st.st_dev) == (removed.st_ino, removed.st_dev) \
                                        and join(path, name) != exclude:
                                    return join(path, name)
                    for name in subdirs if recurse else ():
                        try:
                            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                          | os.O_CLOEXEC, dir_fd=dfd)
                        except OSError:
                            continue
                        if os.fstat(sub).st_dev != removed.st_dev:
                            os.close(sub)  # a mount inside the upper: not the upper
                            continue
                        pending.append((join(path, name), sub))
                finally:
                    os.close(dfd)
        finally:
            for _, fd in pending:
                os.close(fd)
        return None

    # -- resolution ---------------------------------------------------------------------------

    def _resolve(self, parent: Node, name: bytes) -> Resolved:
        """Find ``name`` in ``parent``: (ino, kind, lower path, in_upper, opaque, stat)."""
        path = join(parent.path, name)
        if self.raw:
            return self._resolve_raw(parent, path)
        upper, origin = (self.layers.lstat_with_xattr(self.layer_path(path),
                                                      self.config.xattrs.origin)
                         if parent.in_upper else (None, None))
        if upper is not None and is_whiteout(upper):
            raise FileNotFoundError(errno.ENOENT, "whiteout", path)
        lower_path: bytes | None = None
        lower = None
        redirect = self._redirected(path, upper)
        if redirect is not None:
            if redirect.startswith(b"/"):
                candidate: bytes | None = redirect[1:]
            elif parent.lower is not None and not parent.opaque:
                candidate = join(parent.lower, redirect)
            else:
                candidate = None
        elif parent.lower is not None and not parent.opaque:
            candidate = join(parent.lower, name)
        else:
            candidate = None
        if candidate is not None and path not in self.config.hidden:
            lower = self.lower.visible(candidate)
            if lower is not None:
                lower_path = candidate
        if upper is None and lower is None:
            raise FileNotFoundError(errno.ENOENT, "no such entry", path)
        excluded = path in self.config.excludes
        if upper is not None:
            kind = stat.S_IFMT(upper.st_mode)
            if kind != stat.S_IFDIR:  # nothing of the lower shows through an upper non-directory
                ino = self.lower.origin_ino(origin) or self._upper_ino(upper)
                return ino, kind, None, True, False, upper
            opaque = excluded or self._is_opaque(path)
            if lower is None or not stat.S_ISDIR(lower.st_mode) or opaque:
                return self._upper_ino(upper), kind, None, True, opaque, upper
            return lower.st_ino, kind, lower_path, True, False, upper  # merged: lower's number
        assert lower is not None
        kind = stat.S_IFMT(lower.st_mode)
        return lower.st_ino, kind, lower_path, False, excluded, lower

    def _redirected(self, path: bytes, upper: os.stat_result | None) -> bytes | None:
        """The redirect of the upper directory at view path ``path`` (None: none).

        As the kernel reads it (fs/overlayfs/namei.c): ``/`` then the lower path, or one
        name (no ``/``) in the parent's lower directory; anything else is EIO.
        """
        if upper is None or not stat.S_ISDIR(upper.st_mode) or \
                not self.config.xattrs.redirects:
            return None
        try:
            value = self.layers.getxattr(self.layer_path(path), self.config.xattrs.redirect)
        except OSError:
            return None
        parts = value[1:].split(b"/") if value.startswith(b"/") else [value]
        if not value or len(value) > PATH_MAX or any(
                p in (b"", b".", b"..") or b"\0" in p or len(p) > 255 for p in parts):
            raise OSError(errno.EIO, f"invalid redirect {value[:64]!r}", path)
        return value

    def _resolve_raw(self, parent: Node, path: bytes) -> Resolved:
        if parent.ino == ROOT_INO and path not in (b"upper", b"work"):
            raise FileNotFoundError(errno.ENOENT, "not a layer", path)
        st = self.layers.lstat(path)
        if st is None:
            raise FileNotFoundError(errno.ENOENT, "no such entry", path)
        return st.st_ino, stat.S_IFMT(st.st_mode), None, True, True, st

    def _upper_ino(self, st: os.stat_result) -> int:
        if st.st_dev == self.lower.dev or self.raw:
            return st.st_ino
        return st.st_ino | UPPER_ONLY_BIT

    def _is_opaque(self, path: bytes) -> bool:
        try:
            return self.layers.getxattr(self.layer_path(path),
                                        self.config.xattrs.opaque) == b"y"
        except OSError:
            return False

    def _directory(self, parent_ino: int, name: bytes) -> Node:
        """The directory ``parent_ino``, for ``name`` to be looked up or made in it."""
        check_name(name)
        parent = self.node(parent_ino)
        if not parent.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return parent

    def lookup(self, parent_ino: int, name: bytes) -> Attr:
        parent = self._directory(parent_ino, name)
        ino, kind, lower, in_upper, opaque, st = self._resolve_cached(parent, name)
        node = self.inodes.remember(ino, kind, join(parent.path, name), lower, in_upper,
                                    opaque, True)
        return Attr(node.ino, st)

    def _resolve_cached(self, parent: Node, name: bytes) -> Resolved:
        """_resolve, remembered for ``cache_timeout`` for entries that only the lower holds.

        The kernel re-asks for names and attributes it dropped (and for every entry
        of every readdir, which FUSE never caches); answering from memory for
        lower-only entries is as fresh as the kernel's own cache, which the admin's
        changes also wait out.  Any change to the upper forgets everything, and upper
        entries are never cached (their size changes with every write).
        """
        now = time.monotonic()
        if self._cache_generation != self.layers.generation \
                or len(self._resolved) > self.config.node_limit:
            self._resolved.clear()
            self._listings.clear()
            self._cache_generation = self.layers.generation
        key = (parent.ino, name)
        hit = self._resolved.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        result = self._resolve(parent, name)
        if not result[3] and self.config.cache_timeout > 0:
            self._resolved[key] = (now + self.config.cache_timeout, result)
        return result

    def parent_ino(self, node: Node) -> int:
        """The inode of the directory holding ``node`` (the root for the root)."""
        if node.ino == ROOT_INO:
            return ROOT_INO
        head, _ = split(node.path)
        return self.inodes.ino_of_path(head) or ROOT_INO

    def _root_stat(self) -> os.stat_result:
        if self.raw:
            return os.stat(self.layers.upper_fd)
        return self.layers.lstat(b"upper") or os.stat(self.layers.upper_fd)

    def _stat_node(self, node: Node) -> os.stat_result:
        if node.ino == ROOT_INO:
            return self._root_stat()
        if node.in_upper:
            st = self.layers.lstat(self.layer_path(node.path))
            if st is not None:
                return st
        if node.lower is not None:
            st = self.lower.lstat(node.lower)
            if st is not None:
                return st
        raise FileNotFoundError(errno.ENOENT, "entry vanished", node.path)

    def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        if node.unlinked and node.fds:  # the file lives on in its open descriptors
            return Attr(node.ino, os.fstat(self._open_fd_of(node)[0]))
        return Attr(node.ino, self._stat_node(node))

    def _lower_of(self, node: Node) -> bytes:
        """The lower path of a node that is not in the upper; ENOENT once it was removed.

        (An unlinked entry can still be reached through an open O_PATH descriptor.)
        """
        if node.lower is None:
            raise FileNotFoundError(errno.ENOENT, "the entry was removed", node.path)
        return node.lower

    def readlink(self, ino: int) -> bytes:
        node = self.node(ino)
        if node.in_upper:
            return self.layers.readlink(self.layer_path(node.path))
        return self.lower.readlink(self._lower_of(node))

    def listdir(self, ino: int) -> list[bytes]:
        """The merged names of a directory: upper first, then lower; whiteouts hidden, no dups."""
        return self._listing(ino)[0]

    def open_listing(self, ino: int) -> tuple[list[bytes], bool]:
        """The merged names of directory ``ino`` for an opendir, and whether the kernel may
        keep the copy of its listing it cached at an earlier open (FOPEN_KEEP_CACHE).

        It may while this listing has the stamp of the listing handed out at the previous
        open (:class:`ListingStamp`); a change through the mount the kernel notices itself
        (it drops its copy when it changes a directory), a host change of the lower shows
        here once the listing is made again: at once for a directory in the upper, within
        ``cache_timeout`` for a lower-only one, as with :meth:`listdir`.
        """
        names, stamp = self._listing(ino)
        previous = self._listed.get(ino)
        if len(self._listed) >= self.config.node_limit:
            self._listed.clear()  # bounded like the name caches; a forgotten stamp: refetch
        self._listed[ino] = stamp
        return names, stamp is not None and stamp == previous

    def listing_changed(self, ino: int) -> None:
        """What the kernel cached of ``ino``'s listing may not be its last open's listing
        (an entry of it vanished before readdir handed it out): not kept at the next open."""
        self._listed.pop(ino, None)

    def _listing(self, ino: int) -> tuple[list[bytes], ListingStamp | None]:
        node = self.node(ino)
        if node.in_upper or self.raw or self.config.cache_timeout <= 0:
            return self._stamped_listdir(node)
        now = time.monotonic()
        hit = self._listings.get(ino)
        if hit is not None and hit[0] > now and self._cache_generation == self.layers.generation:
            return hit[1], hit[2]
        names, stamp = self._stamped_listdir(node)
        if self._cache_generation == self.layers.generation:
            self._listings[ino] = (now + self.config.cache_timeout, names, stamp)
        return names, stamp

    def _stamped_listdir(self, node: Node) -> tuple[list[bytes], ListingStamp | None]:
        """:meth:`_listdir` and its stamp (None: not to be trusted, RACY_NS)."""
        upper = None
        if node.ino == ROOT_INO:
            upper = self._root_stat()
        elif node.in_upper:
            upper = self.layers.lstat(self.layer_path(node.path))
        lower = self.lower.lstat_raw(node.lower) \
            if node.lower is not None and not node.opaque and not self.raw else None
        taken = time.time_ns()
        names = self._listdir(node)
        if any(st.st_ctime_ns > taken - RACY_NS for st in (upper, lower) if st is not None):
            return names, None
        return names, ListingStamp(hash(tuple(names)), _dir_stamp(upper), _dir_stamp(lower))

    def _listdir(self, node: Node) -> list[bytes]:
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if self.raw and node.ino == ROOT_INO:
            return [b"upper", b"work"]
        names: list[bytes] = []
        seen: set[bytes] = set()
        whiteouts: set[bytes] = set()
        if node.in_upper:
            upath = self.layer_path(node.path)
            for name in sorted(self.layers.listdir(upath)):
                if not self.raw:
                    st = self.layers.lstat(join(upath, name))
                    if st is None:
                        continue
                    if is_whiteout(st):
                        whiteouts.add(name)
                        continue
                seen.add(name)
                names.append(name)
        if node.lower is not None and not node.opaque and not self.raw:
            for bname in sorted(self.lower.listdir(node.lower)):
                if bname in seen or bname in whiteouts:
                    continue
                if join(node.path, bname) in self.config.hidden:
                    continue
                if self.lower.hide is not None and \
                        self.lower.visible(join(node.lower, bname)) is None:
                    continue
                seen.add(bname)
                names.append(bname)
        return names

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(fd_path(self.layers.upper_fd))

    # -- copy-up ------------------------------------------------------------------------------

    def needs_copy_up(self, node: Node) -> bool:
        """Is ``node`` still only in the lower (a cheap question, e.g. before taking a lock)?"""
        return not self.raw and not node.in_upper

    def ensure_upper_dir(self, node: Node) -> None:
        """Copy a directory (and its parents) up, so entries can be created in it."""
        if node.in_upper or self.raw:
            return
        self.ensure_upper_dir(self._parent_node(node))
        lower, lst = self._lower_entry(node)
        # another user's entry cannot be copied up (kernel overlayfs: EOVERFLOW)
        self.admit(lst.st_uid, lst.st_gid, errno.EOVERFLOW)
        stage = self._stage_name()
        self.layers.mkdir(stage, lst.st_mode, lst.st_uid, lst.st_gid)
        self._copy_metadata(lower, stage, lst)
        if self.layers.lstat(self.layer_path(node.path)) is not None:
            self.layers.rmdir(stage)  # a concurrent creator beat us; keep theirs
        else:
            self._move_into_place(stage, node.path)
        node.in_upper = True

    def _move_into_place(self, stage: bytes, path: bytes, link: bool = False) -> None:
        """Rename (or link) a copy into the upper without touching its directory's times.

        A copy-up is not a change of the directory holding it, so, like kernel
        overlayfs, restore that directory's atime and mtime afterwards.
        """
        dest = self.layer_path(path)
        parent, _ = split(dest)
        before = self.layers.lstat(parent)
        if link:
            self.layers.link(stage, dest)
        else:
            self.layers.rename(stage, dest, RENAME_NOREPLACE)
        if before is not None:
            self.layers.setattr(rec.Setattr(parent, rec.SET_ATIME | rec.SET_MTIME,
                                            atime_ns=before.st_atime_ns,
                                            mtime_ns=before.st_mtime_ns))

    def _walk(self, path: bytes) -> Node:
        """The node of a view path, resolved from the root (not counted as a kernel lookup)."""
        node = self.node(ROOT_INO)
        for part in path.split(b"/") if path else []:
            ino, kind, lower, in_upper, opaque, _ = self._resolve(node, part)
            node = self.inodes.remember(ino, kind, join(node.path, part), lower, in_upper,
                                        opaque, False)
        return node

    def _parent_node(self, node: Node) -> Node:
        head, _ = split(node.path)
        ino = self.inodes.ino_of_path(head)
        # a parent not in the table is resolved by walking from the root
        return self.node(ino) if ino is not None else self._walk(head)

    def _copy_metadata(self, lower_path: bytes, stage: bytes, lst: os.stat_result) -> None:
        """xattrs, origin, owner, mode and times of a lower entry onto a staged copy."""
        xattrs = self.config.xattrs
        for name, value in self.lower.xattrs(lower_path):
            # Not what no replica carries (a host file capability for host root, an LSM
            # label): the user's copy is theirs, without the host's privileges.
            if not xattrs.is_private(name) and \
                    refusal(rec.Setxattr(stage, name, value), self.ids) is None:
                self.layers.setxattr(stage, name, value)
        origin = self.lower.origin_of(lower_path)
        # user.* xattrs are not allowed on symlinks; trusted.* are (as kernel overlayfs does)
        if origin and not (stat.S_ISLNK(lst.st_mode) and xattrs.prefix.startswith(b"user.")):
            self.layers.setxattr(stage, xattrs.origin, origin)
        mask = rec.SET_OWNER | rec.SET_ATIME | rec.SET_MTIME
        if not stat.S_ISLNK(lst.st_mode):
            mask |= rec.SET_MODE
        self.layers.setattr(rec.Setattr(stage, mask, stat.S_IMODE(lst.st_mode), lst.st_uid,
                                        lst.st_gid, 0, lst.st_atime_ns, lst.st_mtime_ns))

    def start_copy_up(self, node: Node, keep_data: bool = True) -> CopyUp | None:
        """Stage a copy of ``node`` if it is only in the lower: a CopyUp for a regular file;
        anything else is copied at once (None, as for a node that needs no copy)."""
        if not self.needs_copy_up(node):
            return None
        if node.is_dir:
            self.ensure_upper_dir(node)
            return None
        self.ensure_upper_dir(self._parent_node(node))
        lower, lst = self._lower_entry(node)
        self.admit(lst.st_uid, lst.st_gid, errno.EOVERFLOW)
        stage = self._stage_name()
        if not stat.S_ISREG(lst.st_mode):
            if stat.S_ISLNK(lst.st_mode):
                self.layers.symlink(stage, self.lower.readlink(lower), lst.st_uid, lst.st_gid)
            elif stat.S_ISBLK(lst.st_mode) or stat.S_ISCHR(lst.st_mode):
                self.layers.mkdev(stage, lst.st_mode, lst.st_rdev, lst.st_uid, lst.st_gid)
            else:
                self.layers.mknod(stage, lst.st_mode, lst.st_uid, lst.st_gid)
            self._copy_metadata(lower, stage, lst)
            self._finish(node, stage, lst)
            return None
        self.layers.mknod(stage, stat.S_IFREG | 0o600, 0, 0)
        size = lst.st_size if keep_data else 0
        lower_fd = self.lower.open_file(lower, os.O_RDONLY)
        try:
            upper_fd = self.layers.open(stage, os.O_WRONLY)
        except BaseException:
            os.close(lower_fd)
            raise
        return CopyUp(node, stage, lower_fd, upper_fd, size)

    def copy_data(self, plan: CopyUp) -> None:
        """The bulk copy, in the kernel (reflink or copy_file_range).  Runs in a worker thread."""
        try:
            if plan.size:  # journal first, as for every write (sdeefs.writeahead)
                handle = name_to_handle(plan.upper_fd)
                self.layers.journal.append(rec.Write(plan.stage, handle, 0, plan.size))
            copy_file_data(plan.lower_fd, plan.upper_fd, plan.size)
            os.fsync(plan.upper_fd)  # the copy must be durable before it shadows the lower
        finally:
            os.close(plan.lower_fd)
            os.close(plan.upper_fd)

    def abort_copy_up(self, plan: CopyUp) -> None:
        self.layers.unlink(plan.stage)

    def finish_copy_up(self, plan: CopyUp) -> None:
        try:
            lower, lst = self._lower_entry(plan.node)
            self._copy_metadata(lower, plan.stage, lst)
        except BaseException:
            self.abort_copy_up(plan)
            raise
        self._finish(plan.node, plan.stage, lst)

    def _lower_entry(self, node: Node) -> tuple[bytes, os.stat_result]:
        """(lower path, stat as shown) of a node to copy up; ENOENT if it vanished."""
        lower = self._lower_of(node)
        lst = self.lower.lstat(lower)
        if lst is None:
            raise FileNotFoundError(errno.ENOENT, "lower entry vanished", node.path)
        return lower, lst

    def _finish(self, node: Node, stage: bytes, lst: os.stat_result) -> None:
        """Move a staged copy into place, then give every other lower name of it the same inode."""
        self._move_into_place(stage, node.path)
        node.in_upper = True
        if stat.S_ISREG(lst.st_mode) and lst.st_nlink > 1:
            self._link_other_names(node, lst)

    def run_copy_ups(self, next_plan: Callable[[], CopyUp | None]) -> None:
        """Make the copies ``next_plan`` (a ``copy_up_for_*``) asks for, here and now."""
        while (plan := next_plan()) is not None:
            try:
                self.copy_data(plan)
            except BaseException:
                self.abort_copy_up(plan)
                raise
            self.finish_copy_up(plan)

    def copy_up(self, node: Node, keep_data: bool = True) -> None:
        """Copy ``node`` up if it is only in the lower, here and now (tests, tools)."""
        self.run_copy_ups(lambda: self.start_copy_up(node, keep_data))

    def _start_first(self, nodes: list[Node], keep_data: bool = True) -> CopyUp | None:
        """Copy up the first of ``nodes`` still only in the lower that needs a data copy
        (those before it that need none are copied at once)."""
        for node in nodes:
            plan = self.start_copy_up(node, keep_data)
            if plan is not None:
                return plan
        return None

    def _link_other_names(self, node: Node, lst: os.stat_result) -> None:
        """Hard links: after copying up one lower name, link the copy under all the others.

        Without this (kernel overlayfs with index=off, fuse-overlayfs #192) a
        write through one name is invisible through the others.
        """
        for other in self.lower.names_of(lst, exclude=node.lower):
            head, _ = split(other)
            try:
                parent = self._walk(head)
            except OSError:
                continue  # the directory is gone from the view
            if other in self.config.hidden or parent.opaque or parent.lower != head:
                continue  # that name does not show this lower file in the view
            if self.layers.lstat(self.layer_path(other)) is not None:
                continue  # deleted or replaced in the upper: no longer the same file
            self.ensure_upper_dir(parent)
            self._move_into_place(self.layer_path(node.path), other, link=True)
            self.inodes.also_named(node, other)

    # -- what each change copies up (the first phase; see the module docstring) ---------------

    def copy_up_for_setattr(self, ino: int, change: AttrChange) -> CopyUp | None:
        """A setattr copies up; a truncate to 0 leaves the data behind."""
        node = self.node(ino)
        self._refuse_layer_root(node)
        if node.unlinked and node.fds:
            return None  # changed through its descriptor
        return self.start_copy_up(node, keep_data=change.size != 0)

    def copy_up_for_link(self, ino: int, new_parent_ino: int, new_name: bytes
                         ) -> CopyUp | None:
        node = self.node(ino)
        if node.is_dir:
            raise OSError(errno.EPERM, "hard links to directories are not allowed")
        self.check_new_entry(new_parent_ino, new_name)  # before journaling a copy
        return self.start_copy_up(node)

    def copy_up_for_rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
                           new_name: bytes, flags: int) -> CopyUp | None:
        """The moved entry, and for an exchange the other one (a replaced one stays behind)."""
        move = self._check_move(old_parent_ino, old_name, new_parent_ino, new_name, flags,
                                fits=False)
        if move is None or not self._moved_lower(move, flags):
            return None
        # what could not be journaled is refused before a copy is
        self.check_rename(old_parent_ino, old_name, new_parent_ino, new_name, flags)
        return self._start_first(self._moved_lower(move, flags))

    def _moved_lower(self, move: _Move, flags: int) -> list[Node]:
        """What of a rename is still only in the lower: copied up before it."""
        moved = [move.node, move.target] if flags & RENAME_EXCHANGE else [move.node]
        return [n for n in moved if n is not None and self.needs_copy_up(n)]

    def copy_up_for_xattr(self, ino: int, name: bytes, removing: bool = False,
                          value: bytes = b"") -> CopyUp | None:
        """Validate a setxattr (of ``value``) or removexattr, then copy up for it.

        What no replica would carry (``sdeefs.replicable``) is refused with EPERM here,
        before anything is journaled: the journal never holds a record replicas skip."""
        self._check_xattr_name(name)
        node = self.node(ino)
        self._refuse_layer_root(node)
        if removing:
            # ENODATA before any copy-up, and before the rule: kernel overlayfs removes
            # POSIX ACLs that are not there from its work directory, and must hear ENODATA
            self.getxattr(ino, name)
        record = rec.Removexattr(b"upper", name) if removing else \
            rec.Setxattr(b"upper", name, value)
        reason = refusal(record, self.ids)
        if reason is not None:
            raise OSError(errno.EPERM, f"not replicated: {reason}")
        return self.start_copy_up(node)

    def copy_up_for_write(self, ino: int, truncate: bool) -> CopyUp | None:
        """An open for writing copies up (its data too, unless it truncates)."""
        return self.start_copy_up(self.node(ino), keep_data=not truncate)

    # -- creating entries ---------------------------------------------------------------------

    def _prepare_create(self, parent_ino: int, name: bytes) -> tuple[Node, bytes, bool]:
        """Check that ``name`` is free in the view: (parent, view path, replaces a whiteout)."""
        parent = self._directory(parent_ino, name)
        path = join(parent.path, name)
        self._check_fits(path)
        if self.raw and parent.ino == ROOT_INO:
            raise OSError(errno.EPERM, "the layer root holds only upper and work")
        try:
            self._resolve(parent, name)
        except FileNotFoundError:
            pass
        else:
            raise FileExistsError(errno.EEXIST, "exists", path)
        self.ensure_upper_dir(parent)
        upper = None if self.raw else self.layers.lstat(self.layer_path(path))
        return parent, path, upper is not None and is_whiteout(upper)

    def _creator(self, parent_ino: int, uid: int, gid: int, is_dir: bool
                 ) -> tuple[int, int, int]:
        """(uid, gid, mode bits) of a new entry made by ``uid``/``gid``: BSD group semantics
        under a setgid directory (its group, and a new directory its setgid bit too), what
        the kernel gives every local filesystem (inode_init_owner)."""
        self.admit(uid, gid, errno.EPERM)
        parent = self.getattr(parent_ino).st
        if parent.st_mode & stat.S_ISGID:
            return uid, parent.st_gid, stat.S_ISGID if is_dir else 0
        return uid, gid, 0

    def admit(self, uid: int | None, gid: int | None, err: int = errno.EINVAL) -> None:
        """The id door of a user's view (``config.ids``): only the user's ids may own what
        it creates or chowns (sdeefs.identity: u, its groups, its subordinate ranges), as
        only those can reach the user's journal and replicas.  A creator outside them is
        refused with EPERM, a chown to another id with EINVAL (the kernel's answer for an
        id its namespace does not map)."""
        ids = self.config.ids
        if ids is None:
            return
        if (uid is not None and not ids.owns_uid(uid)) or \
                (gid is not None and not ids.owns_gid(gid)):
            raise OSError(err, f"uid {uid} / gid {gid} is not one of the user's ids")

    # -- what a record can carry ---------------------------------------------------------------

    def _check_fits(self, path: bytes) -> None:
        """ENAMETOOLONG unless records can name the view path ``path`` in the upper.

        The one limit on depth (``records.MAX_PATH``, what the journal and every replica
        accept), checked before anything is journaled; each syscall argument is limited
        by PATH_MAX as always, the tree is not.
        """
        if len(self.layer_path(path)) > rec.MAX_PATH:
            raise OSError(errno.ENAMETOOLONG, f"paths deeper than {rec.MAX_PATH} bytes cannot "
                                              "be journaled")

    def check_new_entry(self, parent_ino: int, name: bytes) -> None:
        """Refuse (ENAMETOOLONG) a new name that could not be journaled: before a copy-up."""
        check_name(name)
        self._check_fits(join(self.node(parent_ino).path, name))

    def check_rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
                     new_name: bytes, flags: int) -> None:
        """Refuse (ENAMETOOLONG) a rename after which some record could not be journaled.

        That is the new name, and when a directory moves to a longer path, every path
        below it: a directory whose subtree would end up deeper than ``records.MAX_PATH``
        stays where it is (a walk of that subtree, only for directories moving deeper).
        """
        check_name(new_name)
        src = join(self.node(old_parent_ino).path, old_name)
        dst = join(self.node(new_parent_ino).path, new_name)
        self._check_fits(dst)
        growth = len(dst) - len(src)
        if growth > 0:
            self._check_subtree_fits(src, growth)
        elif growth < 0 and flags & RENAME_EXCHANGE:
            self._check_subtree_fits(dst, -growth)

    def _check_subtree_fits(self, path: bytes, growth: int) -> None:
        layer = self.layer_path(path)
        budget = rec.MAX_PATH - len(layer) - growth - 1  # bytes left for a path below it
        st = self.layers.lstat(layer)
        if st is None or not stat.S_ISDIR(st.st_mode):
            return
        fd = self.layers.open(layer, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for visit in walk(fd):
                if len(visit.path) > budget:
                    raise OSError(errno.ENAMETOOLONG, "the directory holds paths that would "
                                  f"be deeper than {rec.MAX_PATH} bytes")
        finally:
            os.close(fd)

    def _place(self, stage: bytes, path: bytes, over_whiteout: bool, is_dir: bool) -> None:
        """Move a staged new entry to ``path``, replacing the whiteout there if any."""
        dest = self.layer_path(path)
        if not over_whiteout:
            self.layers.rename(stage, dest, RENAME_NOREPLACE)
        elif is_dir:  # rename(2) cannot put a directory over a device: exchange, then drop it
            self.layers.rename(stage, dest, RENAME_EXCHANGE)
            self.layers.unlink(stage)
        else:
            self.layers.rename(stage, dest)

    def _new_entry(self, parent_ino: int, name: bytes, make: Callable[[bytes], None],
                   is_dir: bool = False) -> Attr:
        parent, path, over_whiteout = self._prepare_create(parent_ino, name)
        if self.raw:
            make(path)
        elif over_whiteout or is_dir and parent.lower is not None and not parent.opaque:
            stage = self._stage_name()
            make(stage)
            if is_dir and over_whiteout:
                self.layers.setxattr(stage, self.config.xattrs.opaque, b"y")
            self._place(stage, path, over_whiteout, is_dir)
        else:
            make(self.layer_path(path))
        self._forget_path(path)
        return self.lookup(parent.ino, name)

    def mkdir(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        """A new directory, made by ``uid``/``gid`` (the caller; see :meth:`_creator`)."""
        uid, gid, inherited = self._creator(parent_ino, uid, gid, is_dir=True)
        return self._new_entry(parent_ino, name, lambda p: self.layers.mkdir(
            p, mode | inherited, uid, gid), is_dir=True)

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int, uid: int,
              gid: int) -> Attr:
        """A new file, fifo, socket or device node.

        A device only reaches here from a caller the kernel let make one (CAP_MKNOD in the
        initial user namespace: vfs_mknod refuses everyone else with EPERM, a user
        environment included); the view is mounted nodev, so it stays inert.  A character
        device 0/0 is a whiteout: the passthrough upper makes one, the merged view refuses
        it (EPERM), as kernel overlayfs does.
        """
        kind = stat.S_IFMT(mode)
        whiteout = kind == stat.S_IFCHR and rdev == 0
        if whiteout and not self.raw:
            raise OSError(errno.EPERM, "a whiteout cannot be made in the view")
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise OSError(errno.EINVAL, "unsupported file type")
        uid, gid, _ = self._creator(parent_ino, uid, gid, is_dir=False)
        if kind in (stat.S_IFCHR, stat.S_IFBLK) and not whiteout:
            return self._new_entry(parent_ino, name,
                                   lambda p: self.layers.mkdev(p, mode, rdev, uid, gid))
        return self._new_entry(parent_ino, name, lambda p: self.layers.mknod(p, mode, uid, gid))

    def symlink(self, parent_ino: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        if len(target) >= PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, "symlink target too long")
        uid, gid, _ = self._creator(parent_ino, uid, gid, is_dir=False)
        return self._new_entry(parent_ino, name,
                               lambda p: self.layers.symlink(p, target, uid, gid))

    def create(self, parent_ino: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return self.mknod(parent_ino, name, stat.S_IFREG | (mode & 0o7777), 0, uid, gid)

    def link(self, ino: int, new_parent_ino: int, new_name: bytes) -> Attr:
        self.run_copy_ups(lambda: self.copy_up_for_link(ino, new_parent_ino, new_name))
        src = self.layer_path(self.node(ino).path)
        return self._new_entry(new_parent_ino, new_name, lambda p: self.layers.link(src, p))

    # -- removing entries ---------------------------------------------------------------------

    def _child(self, parent_ino: int, name: bytes) -> tuple[Node, Node]:
        check_name(name)
        parent = self.node(parent_ino)
        ino, kind, lower, in_upper, opaque, _ = self._resolve(parent, name)
        node = self.inodes.remember(ino, kind, join(parent.path, name), lower, in_upper, opaque,
                                    False)
        return parent, node

    def _whiteout_needed(self, parent: Node, name: bytes) -> bool:
        if self.raw or parent.lower is None or parent.opaque:
            return False
        return self.lower.lstat(join(parent.lower, name)) is not None

    def stale_if_removed(self, parent_ino: int, name: bytes) -> int | None:
        """The inode whose attributes the kernel must ask for again if the name goes (by
        unlink, or a rename over it), else None (its own bookkeeping is right then).

        The FUSE kernel drops the cached link count of the inode by one; that is right for
        a file in the upper, but a file still only in the lower keeps the lower file's
        count, as kernel overlayfs shows it through an open descriptor (nothing in the
        lower was unlinked).
        """
        if self.raw:
            return None
        try:
            _, node = self._child(parent_ino, name)
        except OSError:
            return None
        if node.is_dir or node.in_upper or node.lookups == 0:
            return None
        return node.ino

    def unlink(self, parent_ino: int, name: bytes) -> None:
        parent, node = self._child(parent_ino, name)
        if node.is_dir:
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        self._remove(parent, node, name)

    def rmdir(self, parent_ino: int, name: bytes) -> None:
        parent, node = self._child(parent_ino, name)
        if not node.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        if self.raw and parent.ino == ROOT_INO:
            raise OSError(errno.EPERM, "the layer root holds only upper and work")
        if self.listdir(node.ino):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        self._remove(parent, node, name)

    def _remove(self, parent: Node, node: Node, name: bytes) -> None:
        path = join(parent.path, name)
        dest = self.layer_path(path)
        whiteout = self._whiteout_needed(parent, name)
        if whiteout:
            self.ensure_upper_dir(parent)
        upper = self.layers.lstat(dest) if parent.in_upper or self.raw else None
        if upper is None:
            if whiteout:
                self.layers.mknod(dest, stat.S_IFCHR, 0, 0)
        elif whiteout:
            # Atomically swap the entry for a whiteout, then dispose of the old entry.
            stage = self._stage_name()
            self.layers.mknod(stage, stat.S_IFCHR, 0, 0)
            self.layers.rename(stage, dest, RENAME_EXCHANGE)
            self._remove_tree(stage)
        elif stat.S_ISDIR(upper.st_mode):
            self._clear_whiteouts(dest)
            self.layers.rmdir(dest)
        else:
            self.layers.unlink(dest)
        self._forget_path(path, removed=upper)

    def _clear_whiteouts(self, upper_dir: bytes) -> None:
        for child in self.layers.listdir(upper_dir):
            self.layers.unlink(join(upper_dir, child))

    # -- rename -------------------------------------------------------------------------------

    def _check_move(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
                    new_name: bytes, flags: int, fits: bool = True) -> _Move | None:
        """Everything a rename refuses, before anything changes; None: nothing to do.

        ``fits``: also refuse what could not be journaled (:meth:`check_rename`).
        """
        check_name(new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
                flags & RENAME_EXCHANGE and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT)):
            raise OSError(errno.EINVAL, "invalid rename flags")
        if flags & RENAME_WHITEOUT and not self.raw:
            raise OSError(errno.EINVAL, "RENAME_WHITEOUT is offered by the passthrough upper only")
        old_parent, node = self._child(old_parent_ino, old_name)
        new_parent = self.node(new_parent_ino)
        if not new_parent.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        src = join(old_parent.path, old_name)
        dst = join(new_parent.path, new_name)
        if dst == src:
            return None
        if dst.startswith(src + b"/") and node.is_dir:
            raise OSError(errno.EINVAL, "cannot move a directory into itself")
        try:
            _, target = self._child(new_parent_ino, new_name)
        except FileNotFoundError:
            target = None
        if target is node and not flags & RENAME_EXCHANGE:
            return None  # two names of one file: rename(2) does nothing
        if target is not None and flags & RENAME_NOREPLACE:
            raise FileExistsError(errno.EEXIST, "target exists", dst)
        if target is None and flags & RENAME_EXCHANGE:
            raise FileNotFoundError(errno.ENOENT, "exchange target missing", dst)
        if self.raw:
            if old_parent.ino == ROOT_INO or new_parent.ino == ROOT_INO:
                raise OSError(errno.EPERM, "the layer root holds only upper and work")
        else:
            redirects = self.config.xattrs.redirects
            if node.is_dir and node.lower is not None and not redirects:
                raise OSError(errno.EXDEV, "renaming a lower directory needs a copy "
                                           "(no redirects under userxattr)")
            if target is not None and not (flags & RENAME_EXCHANGE):
                if node.is_dir and not target.is_dir:
                    raise NotADirectoryError(errno.ENOTDIR, "target is not a directory")
                if target.is_dir and not node.is_dir:
                    raise IsADirectoryError(errno.EISDIR, "target is a directory")
                if target.is_dir and self.listdir(target.ino):
                    raise OSError(errno.ENOTEMPTY, "target directory not empty")
            if flags & RENAME_EXCHANGE and target is not None and target.is_dir and \
                    target.lower is not None and not redirects:
                raise OSError(errno.EXDEV, "exchanging a lower directory needs a copy")
        if fits:
            self.check_rename(old_parent_ino, old_name, new_parent_ino, new_name, flags)
        return _Move(old_parent, node, new_parent, target, src, dst)

    def rename(self, old_parent_ino: int, old_name: bytes, new_parent_ino: int,
               new_name: bytes, flags: int) -> None:
        move = self._check_move(old_parent_ino, old_name, new_parent_ino, new_name, flags)
        if move is None:
            return
        self.run_copy_ups(lambda: self._start_first(self._moved_lower(move, flags)))
        node, target, src, dst = move.node, move.target, move.src, move.dst
        if self.raw:
            victim = self.layers.lstat(dst)
            self.layers.rename(src, dst, flags)
            self._after_rename(src, dst, node, target, flags, victim)
            return
        self.ensure_upper_dir(move.new_parent)
        samedir = move.old_parent is move.new_parent
        self._set_redirect(node, src, old_name, samedir)
        if flags & RENAME_EXCHANGE and target is not None:
            self._set_redirect(target, dst, new_name, samedir)
        src_whiteout = self._whiteout_needed(move.old_parent, old_name) and \
            not flags & RENAME_EXCHANGE
        dst_upper = self.layer_path(dst)
        upper_target = self.layers.lstat(dst_upper)
        if target is not None and target.is_dir and upper_target is not None and \
                stat.S_ISDIR(upper_target.st_mode) and not flags & RENAME_EXCHANGE:
            self._clear_whiteouts(dst_upper)
        if node.is_dir and node.lower is None and not flags & RENAME_EXCHANGE and \
                self._whiteout_needed(move.new_parent, new_name):
            self.layers.setxattr(self.layer_path(src), self.config.xattrs.opaque, b"y")
        if upper_target is not None and is_whiteout(upper_target) and node.is_dir:
            self.layers.rename(self.layer_path(src), dst_upper, RENAME_EXCHANGE)
            if not src_whiteout:  # else the whiteout that came back to src is what src needs
                self.layers.unlink(self.layer_path(src))
        else:
            mode = flags & RENAME_EXCHANGE
            if src_whiteout:
                mode |= RENAME_WHITEOUT
            self.layers.rename(self.layer_path(src), dst_upper, mode)
        self._after_rename(src, dst, node, target, flags, upper_target)

    def _set_redirect(self, node: Node, path: bytes, name: bytes, samedir: bool) -> None:
        """Before a directory that merges with the lower moves from view path ``path``
        (named ``name``): its redirect, as the kernel sets it (ovl_set_redirect): kept if
        it has one that still holds (any, within one directory; an absolute one, always),
        else its name (within one directory) or ``/`` and its lower path."""
        if not node.is_dir or node.lower is None:
            return
        layer = self.layer_path(path)
        try:
            current: bytes | None = self.layers.getxattr(layer, self.config.xattrs.redirect)
        except OSError:
            current = None
        if current and (samedir or current.startswith(b"/")):
            return
        value = name if samedir else b"/" + node.lower
        if len(value) > PATH_MAX - 1:
            raise OSError(errno.EXDEV, "redirect too long: the move needs a copy")
        self.layers.setxattr(layer, self.config.xattrs.redirect, value)

    def _after_rename(self, src: bytes, dst: bytes, node: Node, target: Node | None,
                      flags: int, victim: os.stat_result | None) -> None:
        """Node bookkeeping after a rename; ``victim`` is the replaced upper entry's stat."""
        if flags & RENAME_EXCHANGE and target is not None:
            tmp = b"\0swap"
            self.inodes.rename_paths(dst, tmp, target.is_dir)
            self.inodes.rename_paths(src, dst, node.is_dir)
            self.inodes.rename_paths(tmp, src, target.is_dir)
            return
        if target is not None:
            self._forget_path(dst, keep=node, removed=victim)
        self.inodes.rename_paths(src, dst, node.is_dir)
        node.in_upper = True
        if not self.raw and not node.is_dir:
            node.lower = None  # a moved file is upper-only now; a directory keeps merging

    # -- attributes and xattrs ----------------------------------------------------------------

    def setattr(self, ino: int, change: AttrChange) -> Attr:
        """Apply ``change`` after copying up (data kept unless the size becomes 0).

        An unlinked node that the kernel still holds open is changed through its
        descriptor, unjournaled: no replica knows it by any name.
        """
        self.admit(change.uid, change.gid)
        self.run_copy_ups(lambda: self.copy_up_for_setattr(ino, change))
        node = self.node(ino)
        if node.unlinked and node.fds:
            return self._setattr_open(node, change)
        if not change.complete:
            change = change.against(self._stat_node(node))
        path = self.layer_path(node.path) if node.ino != ROOT_INO else b"upper"
        self.layers.setattr(change.record(path))
        return self.getattr(ino)

    def _setattr_open(self, node: Node, change: AttrChange) -> Attr:
        fd, lower = self._open_fd_of(node)
        if lower:
            # Never the lower file.  Kernel overlayfs answers EEXIST (its copy-up of a file
            # whose name is gone meets the whiteout or the new entry at that name).  Times
            # alone are what the FUSE kernel flushes by itself at close after the unlink
            # (writeback cache): refusing them would fail the close (EIO); ignored.
            if change.mode is None and change.uid is None and change.gid is None \
                    and change.size is None:
                return Attr(node.ino, os.fstat(fd))
            raise FileExistsError(errno.EEXIST, "the file was removed before it was copied up")
        change = change.against(os.fstat(fd))
        if change.size is not None:
            os.ftruncate(fd, change.size)
        if change.uid is not None and change.gid is not None:
            os.fchown(fd, change.uid, change.gid)
        if change.mode is not None:
            os.fchmod(fd, change.mode)
        if change.atime_ns is not None or change.mtime_ns is not None:
            st = os.fstat(fd)
            os.utime(fd, ns=(st.st_atime_ns if change.atime_ns is None else change.atime_ns,
                             st.st_mtime_ns if change.mtime_ns is None else change.mtime_ns))
        return Attr(node.ino, os.fstat(fd))

    def _refuse_layer_root(self, node: Node) -> None:
        if node.ino == ROOT_INO and self.raw:
            raise OSError(errno.EPERM, "the layer root is not changeable")

    def _xattr_path(self, node: Node) -> tuple[bytes | None, bytes | None]:
        """(layer path, lower path) that holds this node's xattrs."""
        if node.ino == ROOT_INO:
            return (b"upper" if not self.raw else None), None
        if node.in_upper:
            return self.layer_path(node.path), None
        return None, node.lower

    def _check_xattr_name(self, name: bytes) -> None:
        if not self.raw and self.config.xattrs.is_private(name):
            # overlay's own attributes are not part of the view (kernel overlayfs: EPERM on set)
            raise OSError(errno.EPERM, "overlay xattrs are private")
        if len(name) > 255:
            raise OSError(errno.ERANGE, "xattr name too long")

    def getxattr(self, ino: int, name: bytes) -> bytes:
        node = self.node(ino)
        if not self.raw and self.config.xattrs.is_private(name):
            raise OSError(errno.ENODATA, "no such attribute")
        upper, lower = self._xattr_path(node)
        if upper is not None:
            return self.layers.getxattr(upper, name)
        if lower is not None:
            return self.lower.getxattr(lower, name)
        raise OSError(errno.ENODATA, "no such attribute")

    def listxattr(self, ino: int) -> list[bytes]:
        node = self.node(ino)
        upper, lower = self._xattr_path(node)
        if upper is not None:
            names = self.layers.listxattr(upper)
        elif lower is not None:
            names = self.lower.listxattr(lower)
        else:
            names = []
        if self.raw:
            return names
        return [n for n in names if not self.config.xattrs.is_private(n)]

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.run_copy_ups(lambda: self.copy_up_for_xattr(ino, name, value=value))
        node = self.node(ino)
        path = self.layer_path(node.path) if node.ino != ROOT_INO else b"upper"
        self.layers.setxattr(path, name, value)

    def removexattr(self, ino: int, name: bytes) -> None:
        self.run_copy_ups(lambda: self.copy_up_for_xattr(ino, name, removing=True))
        node = self.node(ino)
        path = self.layer_path(node.path) if node.ino != ROOT_INO else b"upper"
        self.layers.removexattr(path, name)

    # -- files --------------------------------------------------------------------------------

    def open_fd(self, ino: int, flags: int) -> int:
        """Open the backing file (the caller has copied up if it writes)."""
        node = self.node(ino)
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        if not node.in_upper and flags & os.O_ACCMODE != os.O_RDONLY:
            raise OSError(errno.EROFS, "the lower is read-only: copy up before writing")
        if node.in_upper:
            return self.layers.open(self.layer_path(node.path), flags)
        fd = self.lower.open_file(self._lower_of(node), flags)
        self.lower_fds.add(fd)
        return fd

    def journal_write(self, node: Node, handle: bytes, offset: int, length: int) -> None:
        """Record that ``length`` bytes at ``offset`` are about to change in the upper file.

        ``handle`` is the file handle of the open upper file (``name_to_handle``), taken
        per open file: an inode number can be reused by a new file, a handle cannot.
        """
        if node.unlinked:
            return  # the file has no name in the upper any more: nothing a replica must see
        self.layers.journal.append(rec.Write(self.layer_path(node.path), handle, offset, length))

    def fallocate(self, node: Node, fd: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) of the upper file open as ``fd`` (writable, so copied up already).

        Journaled as a Fallocate record (``sdeefs.records``: record, syscall, Done), with
        the range write-locked from the record to the Done, so that no Write record of the
        range comes between them.  Blocking (an allocation may take long): a worker
        thread's call, under the namespace lock (one metadata record in flight).  A mode
        the record cannot carry (COLLAPSE_RANGE, INSERT_RANGE, UNSHARE) is EOPNOTSUPP,
        as on filesystems without it.  An unlinked file is changed unjournaled, as writes.
        """
        record = rec.Fallocate(self.layer_path(node.path) if not node.unlinked else b"upper",
                               mode, offset, length)
        try:
            record.validate()
        except BadRecord:
            if mode not in rec.FALLOCATE_MODES:
                raise OSError(errno.EOPNOTSUPP, "fallocate mode not supported") from None
            raise OSError(errno.EINVAL, "bad fallocate range") from None
        if node.unlinked:
            fallocate(fd, mode, offset, length)
            return
        range_lock(fd, offset, length, fcntl.F_WRLCK, wait=True)
        try:
            self.layers.fallocate(record, fd)
        finally:
            range_lock(fd, offset, length, fcntl.F_UNLCK, wait=False)

    def sync_journal(self) -> None:
        """Make every record appended so far durable (a disk flush: a worker thread's job)."""
        self.layers.journal.sync()
