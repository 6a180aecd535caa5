"""The guard layer: what a user may not see of the host, decided when it is looked up.

Why.  The launcher shows the host root through an idmapped mount that maps the
host's system ids (root, _apt, man ...) to the user's subordinate ids
(sdeefs.identity, docs/identity.md), so that root inside owns "root's" files and can
change them (copy-up into the user's layer).  The price: root inside has DAC override
over every system-owned entry, so an entry the user could not read on the host - a
0600 file of root, a 0700 directory of _apt, a 0640 file of group shadow - would be
readable inside.  A scan when the environment starts misses
everything created afterwards (an ssh host key generated later, a key an admin
installs, ``/etc/gshadow-`` written by ``groupadd``), and so does a deny list
expanded once.

Model.  The guard is a read-only FUSE filesystem mounted as one more overlayfs
lower layer, directly above the idmapped host root.  It holds the host's
directories and nothing else; when overlayfs looks a name up in it, the guard
looks at the host entry *at that moment* and answers with

* a **whiteout** (character device 0/0) if the entry is hidden: its path matches
  a deny pattern (:class:`DenyPatterns`, glob syntax) or the user cannot read it on
  the host (:meth:`sdeefs.identity.Identity.host_readable`: owner, group and other
  bits against the user's uid and groups; a directory the user cannot both list and
  search is hidden whole).  Overlayfs stops there: the name does
  not exist in the view, and the user may create their own entry of that name;
* a **directory** if it is a visible host directory, with the host's attributes
  (owner mapped as the idmapped lower maps it, :meth:`Policy.owner`), so that
  overlayfs goes on looking below;
* **nothing** otherwise, and overlayfs finds the host's own entry in the layer
  below, which serves all file data at kernel speed.

A directory listing holds only the whiteouts (overlayfs merges the layers'
listings and drops whited-out names).  Overlayfs asks the guard once per name and
keeps its dentry, so the cost is one FUSE round trip the first time a path is
looked up, and nothing on reads and writes (bench/RESULTS.md: ``bench/install`` meta).

Failing closed.  A directory handed out to the kernel is remembered by path and
host inode number; once that path no longer leads to that directory (renamed or
replaced on the host), every name looked up in it is hidden.  If the guard
process dies, lookups in the view fail (ENOTCONN) instead of showing the host
unfiltered - unless ``sdeefs-guard``'s keeper takes the connection over with a new
server that resolves every node the kernel holds and drops every answer it kept
(guard.c, "surviving a crash"; the Python daemon has no keeper).  Entries are
resolved below a detached clone of the lower mount without following symlinks.

What is decided when.  A name the guard answers "nothing" for is never cached by the
guard: every lookup of it decides afresh (overlayfs keeps its own dentry of what it then
finds in the layer below, see below).  What the kernel may keep is what the guard handed
out, and for how long depends on the daemon:

* ``sdeefs-guard`` (C, the default: ``sdeefs/fs/guardd/guard.c``) watches every host
  directory it handed out (inotify) and lets the kernel keep directories, whiteouts and
  listings until the host changes them: a change of an entry (created, removed, moved,
  chmod/chown) drops the kernel's answer for that name and the directory's cached
  listing, as soon as the guard has read the notification (the kernel queues it with the
  change; the guard reads it within microseconds, on a busy machine after its next
  wakeup).  A directory it cannot watch (inotify limits, ``SDEEFS_GUARD_NO_INOTIFY=1``),
  and everything after lost notifications, gets the short timeout instead, and its
  listing is re-read whenever its mtime changed.  It answers no extended attribute
  requests but listings (empty): a named one is EOPNOTSUPP (Python daemon: ENODATA), which
  overlayfs takes as "not opaque, no redirect" without asking again;
* the Python daemon (``GuardOperations``, ``guard = "python"`` or ``SDEEFS_GUARD=python``)
  lets the kernel keep every answer for ``cache_timeout`` seconds and re-reads a listing
  when its directory's mtime changed (at most ``LISTING_TTL`` later).

Not covered: an entry that was visible when the view first looked it up and whose
mode the host tightens afterwards stays visible while overlayfs keeps its dentry
(on the host, too, everybody could read it until then).  For a directory the C daemon
narrows this: its guard dentry is part of overlayfs' dentry, which overlayfs revalidates,
so a directory tightened on the host is hidden once the notification is read.

This module is synchronous and never imports pyfuse3; ``sdeefs.fs.ops.GuardOperations``
serves it (``tests/fs/test_guard.py`` checks it on plain directories).  Its node table
is ``sdeefs.fs.inodes.NodeTable``, as the overlay's.  It is also the reference model of the
C daemon, which gets its parameters from :meth:`Policy.argv` and is checked against
:class:`GuardView` by ``tests/fs/test_guard_c.py``.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
import sys
import time
from collections.abc import Iterable

import attrs

from ..identity import Identity
from ..layers import join
from ..sysio import openat2_beneath
from .inodes import ROOT_INO, Attr, NodeTable, check_name

# Node ids: a visible directory keeps its host inode number (stable across restarts);
# numbers the host cannot lend (1, or too large for overlayfs' xino bits) and all
# whiteouts come from these ranges instead.
GUARD_ID_BASE = 1 << 48
WHITEOUT_BASE = 1 << 49
STALE_WHITEOUT = WHITEOUT_BASE - 1  # the answer for every name in a directory that moved
# A directory's listing (its hidden entries) is reused while the directory's mtime is the
# same, for at most this long: overlayfs lists the guard's directory on every getdents of a
# merged directory, and a scan stats every entry.  (Only listings wait: a lookup always
# decides afresh, so an entry chmod'ed to root-only is hidden at once, if still listed.)
LISTING_TTL = 60.0


def readable_only_by_root(st: os.stat_result, system: int = 1) -> bool:
    """Would the idmapped view let inside-root read what only system ids (below ``system``:
    root, _apt, man ...) may?  The user-independent rule of the jobs' cached scan
    (launcher/compute/private.py); logins use the guard's per-user rule (:class:`Policy`).

    Everybody else's entries need nothing: their owners are not mapped into the
    user namespace, so root inside gets no override on them.
    """
    mode = st.st_mode
    needed = 0o005 if stat.S_ISDIR(mode) else 0o004  # what "others" must be allowed
    if mode & needed == needed:
        return False
    root_bits = (0o500 if stat.S_ISDIR(mode) else 0o400) if st.st_uid < system else 0
    group_bits = (0o050 if stat.S_ISDIR(mode) else 0o040) if st.st_gid < system else 0
    return bool(mode & (root_bits | group_bits))


@attrs.frozen
class DenyPatterns:
    """Absolute glob patterns, matched the way ``glob.glob`` would expand them.

    A pattern matches a path with as many components, each by ``fnmatch`` rules;
    a wildcard does not match a leading dot unless the pattern's component has one.
    """

    patterns: tuple[tuple[bytes, ...], ...] = ()

    @classmethod
    def of(cls, globs: Iterable[str]) -> DenyPatterns:
        split = (tuple(p for p in os.fsencode(g).split(b"/") if p) for g in globs)
        return cls(tuple(dict.fromkeys(p for p in split if p)))

    def matches(self, rel: bytes) -> bool:
        """Does a lower-relative path (no leading slash) match one of the patterns?"""
        parts = rel.split(b"/")
        return any(len(pattern) == len(parts) and all(map(_component_matches, parts, pattern))
                   for pattern in self.patterns)


def _component_matches(name: bytes, pattern: bytes) -> bool:
    if not _MAGIC.intersection(pattern):
        return name == pattern
    if name.startswith(b".") and not pattern.startswith(b"."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


_MAGIC = frozenset(b"*?[")


@attrs.frozen
class Policy:
    """What the guard hides, and how host owners show (as the user's idmapped lower shows
    them: ``ids.shown``)."""

    deny: DenyPatterns
    ids: Identity

    def hides(self, rel: bytes, st: os.stat_result) -> bool:
        return not self.ids.host_readable(st) or self.deny.matches(rel)

    def owner(self, st: os.stat_result) -> tuple[int, int]:
        return self.ids.shown(st.st_uid, st.st_gid)

    def argv(self) -> list[bytes]:
        """This policy as ``sdeefs-guard``'s options (the C daemon applies the same rules to
        these parameters: the one place they are handed over)."""
        ids = self.ids
        args = [b"--uid", b"%d" % ids.uid, b"--gid", b"%d" % ids.gid,
                b"--groups", b",".join(b"%d" % g for g in ids.groups),
                b"--subuid", b"%d" % ids.subuid, b"--subgid", b"%d" % ids.subgid,
                b"--count", b"%d" % ids.count, b"--system", b"%d" % ids.system]
        for pattern in self.deny.patterns:
            args += [b"--deny", b"/" + b"/".join(pattern)]
        return args


def guard_binary() -> str:
    """The compiled ``sdeefs-guard`` (``$SDEEFS_GUARD_BIN``, or next to this Python: scripts/
    setup.sh and scripts/install.sh build it there from sdeefs/fs/guardd/)."""
    return os.environ.get("SDEEFS_GUARD_BIN") or os.path.join(os.path.dirname(sys.executable),
                                                              "sdeefs-guard")


Hidden = list[tuple[bytes, bytes, os.stat_result]]  # (name, lower path, host stat)


@attrs.define(eq=False)
class GuardNode:
    """An entry the kernel knows: a visible host directory or a whiteout."""

    ino: int
    rel: bytes  # path below the lower root (b"" = the root)
    host_ino: int
    whiteout: bool
    st: os.stat_result  # the host entry when last seen
    lookups: int = 0


def _whiteout_stat(node_ino: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFCHR, node_ino, 0, 1, uid, gid, 0, 0, 0, 0),
                          {"st_rdev": 0, "st_atime_ns": 0, "st_mtime_ns": 0, "st_ctime_ns": 0,
                           "st_blksize": 4096, "st_blocks": 0})


@attrs.define(eq=False)
class GuardView:
    """The guard's answers over ``lower_fd`` (a directory; the launcher passes a detached
    clone of the host root's mount).  See the module docstring for the model."""

    lower_fd: int
    policy: Policy
    nodes: NodeTable[GuardNode] = attrs.field(factory=NodeTable)
    _ids: dict[tuple[bool, int], int] = attrs.field(factory=dict)  # (whiteout, host ino) -> id
    # node ino -> (host mtime_ns, monotonic expiry, hidden entries)
    _listings: dict[int, tuple[int, float, Hidden]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        st = os.fstat(self.lower_fd)
        self.nodes.add(GuardNode(ROOT_INO, b"", st.st_ino, False, st, lookups=1))

    # -- the kernel's questions ---------------------------------------------------------------

    def lookup(self, parent_ino: int, name: bytes) -> Attr:
        check_name(name)
        parent = self._dir(parent_ino)
        fd = self._open(parent, os.O_PATH)
        if fd is None:
            return self._remember_whiteout(None, join(parent.rel, name))
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(errno.ENOENT, "not in the guard", name) from None
        finally:
            os.close(fd)
        return self._answer(join(parent.rel, name), st)

    def getattr(self, ino: int) -> Attr:
        node = self.node(ino)
        if not node.whiteout:
            fd = self._open(node, os.O_PATH)
            if fd is not None:
                try:
                    node.st = os.fstat(fd)
                finally:
                    os.close(fd)
        return self._attr(node)

    def forget(self, ino: int, count: int) -> None:
        node = self.nodes.forget(ino, count)
        if node is not None:
            self._listings.pop(ino, None)
            key = (node.whiteout, node.host_ino)
            if self._ids.get(key) == ino:
                del self._ids[key]

    def cached_hidden(self, ino: int) -> Hidden | None:
        """The directory's listing from the cache, if its directory did not change since."""
        hit = self._listings.get(ino)
        if hit is None or hit[1] < time.monotonic():
            return None
        fd = self._open(self._dir(ino), os.O_PATH)
        if fd is None:
            return []
        try:
            return hit[2] if os.fstat(fd).st_mtime_ns == hit[0] else None
        finally:
            os.close(fd)

    def scan_hidden(self, ino: int) -> Hidden:
        """(name, path, host stat) of the hidden entries of a directory: its listing.

        Touches no node table (only the listing cache, one dict store), so the operations
        layer runs it in a worker thread (it stats every entry); each entry becomes a node
        only as it is handed to the kernel (:meth:`remember_hidden`).
        """
        node = self._dir(ino)
        fd = self._open(node, os.O_RDONLY)
        if fd is None:
            return []
        found = []
        try:
            mtime = os.fstat(fd).st_mtime_ns  # before the scan: a change during it rescans
            for entry in os.scandir(fd):
                name = os.fsencode(entry.name)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                rel = join(node.rel, name)
                if self.policy.hides(rel, st):
                    found.append((name, rel, st))
        finally:
            os.close(fd)
        found.sort()
        if len(self._listings) > 100_000:
            self._listings.clear()
        self._listings[ino] = (mtime, time.monotonic() + LISTING_TTL, found)
        return found

    def remember_hidden(self, rel: bytes, st: os.stat_result) -> Attr:
        return self._remember_whiteout(st.st_ino, rel)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.lower_fd)

    def node(self, ino: int) -> GuardNode:
        return self.nodes.node(ino)

    # -- inside -------------------------------------------------------------------------------

    def _dir(self, ino: int) -> GuardNode:
        node = self.node(ino)
        if node.whiteout:
            raise NotADirectoryError(errno.ENOTDIR, "a whiteout", node.rel)
        return node

    def _open(self, node: GuardNode, flags: int) -> int | None:
        """The node's host directory, or None once its path leads elsewhere (fail closed)."""
        try:
            fd = openat2_beneath(self.lower_fd, node.rel, flags | os.O_DIRECTORY)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV,
                             errno.EACCES):
                return None
            raise
        if os.fstat(fd).st_ino != node.host_ino:
            os.close(fd)
            return None
        return fd

    def _answer(self, rel: bytes, st: os.stat_result) -> Attr:
        if self.policy.hides(rel, st):
            return self._remember_whiteout(st.st_ino, rel)
        if not stat.S_ISDIR(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "not in the guard", rel)
        key = (False, st.st_ino)
        ino = self._ids.get(key)
        if ino is None:
            ino = st.st_ino if 1 < st.st_ino < GUARD_ID_BASE else \
                self.nodes.fresh_id(GUARD_ID_BASE)
            self._ids[key] = ino
        node = self.nodes.get(ino)
        if node is None or node.host_ino != st.st_ino:
            node = self.nodes.add(GuardNode(ino, rel, st.st_ino, False, st))
        node.rel, node.st = rel, st  # the same directory may have moved: follow it
        node.lookups += 1
        return self._attr(node)

    def _remember_whiteout(self, host_ino: int | None, rel: bytes) -> Attr:
        """A whiteout node (one per hidden host inode; None: the shared stale one)."""
        if host_ino is None:
            ino = STALE_WHITEOUT
        else:
            key = (True, host_ino)
            ino = self._ids.get(key) or self.nodes.fresh_id(WHITEOUT_BASE)
            self._ids[key] = ino
        node = self.nodes.get(ino)
        if node is None:
            st = _whiteout_stat(ino, *self.policy.ids.root)
            node = self.nodes.add(GuardNode(ino, rel, -1 if host_ino is None else host_ino,
                                            True, st))
        node.lookups += 1
        return self._attr(node)

    def _attr(self, node: GuardNode) -> Attr:
        if node.whiteout:
            return Attr(node.ino, node.st)
        return Attr(node.ino, node.st, self.policy.owner(node.st))
