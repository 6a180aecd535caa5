"""The node tables: the inodes the kernel knows, by node id and (in the overlay) by name.

FUSE names an inode by a node id the daemon hands out in a lookup; the kernel
keeps count of its lookups and gives them back (``forget``).  Two rules follow,
kept here for both FUSE daemons of this package:

* a node lives while the kernel's count is above zero (the root always);
* an id stands for one inode until the kernel has forgotten it, so an inode
  number the filesystem reuses meanwhile for something new gets another id.

The kernel forgets only under memory pressure, so on a big machine a ``find`` over
/usr would keep 140,000 nodes (and the daemon's memory) for good.  The overlay's
table therefore keeps its nodes in the order they were last looked up, and past a
configured number the daemon asks the kernel to drop the entries looked up longest
ago (:meth:`ViewNodes.least_recent`, ``sdeefs.fs.ops``): the kernel forgets those it
does not use, and looks them up again when it needs them.

:class:`NodeTable` holds any node type with an ``ino`` and a ``lookups`` count
(the guard's ``GuardNode``, the overlay's :class:`Node`); :class:`ViewNodes` adds
what the overlay needs: the view paths naming each node (``by_path``, a hard-linked
file has several) and fresh ids for reused inode numbers.  :class:`Attr` is what
both answer a lookup with.

Synchronous, and changed on the trio loop only (docs/threading.md).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

import attrs

ROOT_INO = 1
NAME_MAX = 255
# Overlay node ids handed out when the filesystem reuses the inode number of an entry
# the kernel still remembers (real inode numbers stay below this on every filesystem)
RENUMBERED_BASE = 1 << 62


@attrs.frozen
class Attr:
    """What a lookup or getattr returns: the inode number we report and the backing stat.

    ``owner`` (uid, gid), when set, is shown instead of the backing entry's owner.
    """

    ino: int
    st: os.stat_result
    owner: tuple[int, int] | None = None


def check_name(name: bytes) -> None:
    """EINVAL or ENAMETOOLONG unless ``name`` is one directory entry's name."""
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, "invalid name")


class Counted(Protocol):
    """A node: its id and the kernel's lookup count."""

    ino: int
    lookups: int


N = TypeVar("N", bound=Counted)


@attrs.define(eq=False)
class NodeTable(Generic[N]):
    """Node id -> node for every inode the kernel knows (iterating yields the ids).

    Attributes:
        nodes: the table.
        _fresh: numbers for ids the filesystem cannot lend (see :meth:`fresh_id`).
    """

    nodes: dict[int, N] = attrs.field(factory=dict)
    _fresh: Iterator[int] = attrs.field(factory=lambda: itertools.count(1))

    def node(self, ino: int) -> N:
        """The node of ``ino``; ESTALE if the kernel asks about one it was told to forget."""
        try:
            return self.nodes[ino]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown inode {ino}") from None

    def get(self, ino: int) -> N | None:
        return self.nodes.get(ino)

    def add(self, node: N) -> N:
        self.nodes[node.ino] = node
        return node

    def fresh_id(self, base: int) -> int:
        """A node id no inode number is: ``base`` plus a counter (``base`` above them all)."""
        return base + next(self._fresh)

    def forget(self, ino: int, count: int) -> N | None:
        """The kernel dropped ``count`` lookups of ``ino``: the node if that was its last.

        The returned node is out of the table; the root stays whatever the count.
        """
        node = self.nodes.get(ino)
        if node is None or ino == ROOT_INO:
            return None
        node.lookups -= count
        if node.lookups > 0:
            return None
        del self.nodes[ino]
        return node

    def __iter__(self) -> Iterator[int]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)


@attrs.define(eq=False)
class Node:
    """One inode of the overlay view.

    Attributes:
        ino: the FUSE node id, also the reported st_ino.
        kind: S_IFMT bits.
        paths: view paths (b"" = root) naming this inode; the first is used for I/O.
        lower: path of the visible lower entry, or None.
        in_upper: an entry exists in the upper at ``paths[0]``.
        opaque: (directories) nothing below it comes from the lower.
        lookups: the kernel's lookup count.
        dead: its last name was removed and its upper inode is gone.
        fds: descriptors of the backing file held by the kernel's open files
            (``sdeefs.fs.ops`` registers them): an unlinked file lives on in them.
    """

    ino: int
    kind: int
    paths: list[bytes]
    lower: bytes | None
    in_upper: bool
    opaque: bool = False
    lookups: int = 0
    dead: bool = False
    fds: list[int] = attrs.field(factory=list)

    @property
    def path(self) -> bytes:
        return self.paths[0]

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def unlinked(self) -> bool:
        """Removed from the view while the kernel still holds it (an open file, say)."""
        return not self.in_upper and self.lower is None and self.ino != ROOT_INO

    def lose_last_name(self, path: bytes, gone: bool) -> None:
        """Its last name ``path`` went (kept for I/O); ``gone``: its inode went with it."""
        self.paths = [path]
        self.in_upper = False
        self.lower = None
        self.dead = self.dead or gone


@attrs.define(eq=False)
class ViewNodes(NodeTable[Node]):
    """The overlay's node table: nodes by id and by view path.

    Attributes:
        by_path: view path -> the node it names (every path in some ``Node.paths``).
        renumbered: inode numbers the filesystem reused -> the node id used instead.
    """

    by_path: dict[bytes, Node] = attrs.field(factory=dict)
    renumbered: dict[int, int] = attrs.field(factory=dict)

    def forget(self, ino: int, count: int) -> Node | None:
        node = super().forget(ino, count)
        if node is not None:
            for path in node.paths:
                if self.by_path.get(path) is node:
                    del self.by_path[path]
        return node

    def least_recent(self, count: int) -> list[Node]:
        """Up to ``count`` nodes looked up longest ago, for the kernel to be asked to drop.

        The table is in lookup order (:meth:`remember` moves a node to its end), so they
        are read from its front.  Each one read is moved to the end, so a node the kernel
        keeps (one in use) is not asked again before the rest of the table was, and a
        call reads ``count`` entries, not the table.  Passed over: the root and files the
        kernel holds open.
        """
        found: list[Node] = []
        for node in list(itertools.islice(self.nodes.values(), count)):
            del self.nodes[node.ino]
            self.nodes[node.ino] = node
            if node.ino != ROOT_INO and not node.fds:
                found.append(node)
        return found

    def ino_of_path(self, path: bytes) -> int | None:
        node = self.by_path.get(path)
        return node.ino if node is not None else None

    def remember(self, ino: int, kind: int, path: bytes, lower: bytes | None, in_upper: bool,
                 opaque: bool, count: bool) -> Node:
        """The node of inode number ``ino``, found at ``path``; ``count``: a kernel lookup."""
        real = ino
        ino = self.renumbered.get(real, real)
        node = self.nodes.get(ino)
        if node is not None and node.dead:
            # The filesystem reused the inode number of a deleted entry the kernel still
            # remembers.  A FUSE node id must not be reused before the kernel forgets it
            # (a dead directory inode answers ENOENT to everything), so renumber.
            ino = self.fresh_id(RENUMBERED_BASE)
            self.renumbered[real] = ino
            node = None
        if node is None:
            node = self.add(Node(ino, kind, [], lower, in_upper, opaque))
        else:
            node.kind, node.lower, node.in_upper, node.opaque = kind, lower, in_upper, opaque
            if count:  # most recently looked up: to the end of the table (least_recent)
                del self.nodes[ino]
                self.nodes[ino] = node
        self.name(node, path)
        if count:
            node.lookups += 1
        return node

    def name(self, node: Node, path: bytes) -> None:
        """``path`` now names ``node`` (first among its names)."""
        previous = self.by_path.get(path)
        if previous is not None and previous is not node and path in previous.paths:
            previous.paths.remove(path)
            if not previous.paths:
                previous.paths.append(path)  # unreachable now; keeps its last name for I/O
        self.by_path[path] = node
        # Only names that still lead to this node stay: one it kept after losing its
        # last name (see drop_name) is no name once it is found under another.
        node.paths = [p for p in node.paths if p != path and self.by_path.get(p) is node]
        node.paths.insert(0, path)

    def also_named(self, node: Node, path: bytes) -> None:
        """``path`` names ``node`` too (after its other names)."""
        if path not in node.paths:
            node.paths.append(path)
            self.by_path[path] = node

    def drop_name(self, path: bytes, keep: Node | None = None) -> Node | None:
        """``path`` names nothing any more (unless it names ``keep``).

        Returns the node it named if that was the node's last name, for the caller
        to decide what the node is now (found under another name, or unlinked:
        :meth:`Node.lose_last_name`).
        """
        node = self.by_path.get(path)
        if node is None or node is keep:
            return None
        del self.by_path[path]
        if path in node.paths:
            node.paths.remove(path)
        return None if node.paths else node

    def rename_paths(self, src: bytes, dst: bytes, is_dir: bool) -> None:
        """Every name at or below ``src`` moves to ``dst`` (a scan only for directories)."""
        if is_dir:
            prefix = src + b"/"
            moved = [p for p in self.by_path if p == src or p.startswith(prefix)]
        else:
            moved = [src] if src in self.by_path else []
        renamed = [(p, dst + p[len(src):], self.by_path.pop(p)) for p in moved]
        for old, new, node in renamed:
            node.paths = [new if p == old else p for p in node.paths]
        for _, new, node in renamed:
            self.by_path[new] = node
