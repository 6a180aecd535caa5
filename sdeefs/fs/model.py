"""The capture's model of the journaled tree: what the journal says the layer root is.

A replica that applied the journal up to ``Model.seq`` holds this tree.  The capture
compares it with the live upper (``sdeefs.fs.reconcile``) and journals the
difference; applying those records to the model's tree (which the reconciler does
to the model itself as it emits them) yields the upper as it saw it.

Identity
========
Nodes are keyed by an *id*: the upper filesystem's inode number for everything the
capture has seen, ``UPPER`` (-1) and ``WORK`` (-2) for the layer directories, and
other negative numbers for nodes that records created while no capture watched
(journal records after a checkpoint, or another engine's): their inode is not known
until a full scan finds them at their name (``adopt``).  ``handle`` (the
``struct file_handle`` bytes of name_to_handle_at, b"" if unknown) tells a reused
inode number from the inode the model knew: ext4 changes the generation in it.

Per node: ``mode`` (type and permissions), ``uid``, ``gid``, ``mtime`` (ns; 0
unknown), ``ctime`` (ns when last examined; 0 forces a re-read of the data at the
next full scan), ``size`` (for a character or block device its ``rdev``: a whiteout
has 0), ``handle``, its names (``parent``, ``name`` and, for more
hard links, ``links``), ``xattrs`` (sorted (name, value) pairs), ``data`` and for
directories ``children`` (name -> id).  ``data`` is, for regular files, the
BLAKE3 block sums of each ``EXTENT_BLOCK`` block (``sdeefs.blocksums``; None: unknown,
the next look at the file reads it and ships all of it; b"" for a file that is not
empty: as journaled, but no block's sum is known, so each compares as changed when the
file is next read), for symlinks the target, otherwise b"".
Access times are not modelled: reads change them without any event.

Checkpoint (``STATE/capture/model``)
====================================
Written atomically (temp file, fsync, rename, fsync of the directory), only for a
seq the journal has already made durable, so that after a power loss the journal
always reaches at least the checkpoint's seq.  Little endian::

    header  CKPT_HEADER, 64 bytes
            magic      8s   b"SDEEFSM\\0"
            version    u16  2 (1 is still read: below)
            flags      u16  0
            block      u32  EXTENT_BLOCK: the block size of the sums
            journal    16s  the journal's history id (``STATE/journal/id``)
            seq        u64  the journal seq this model reflects (a Commit, usually)
            root_ino   u64  inode number of ``upper/`` (0: unknown)
            next_id    i64  the next id for a node of unknown inode
            count      u64  nodes that follow
    node    NODE, 64 bytes, then variable parts, ``count`` times (any order)
            id q, parent q (0 for the two layer directories), mode I, uid I, gid I,
            mtime q, ctime q, size Q, name_len H, links H, xattrs H, handle_len B,
            flags B (1: ``data`` of a regular file is known), data_len I;
            then name, handle, data, ``links`` × (parent q, name_len H, name),
            ``xattrs`` × (name_len H, value_len I, name, value)
    crc32   u32 of every byte before it

Version 1 is the same layout with BLAKE2b sums (``blocksums.BLAKE2B``: sdeefs before
BLAKE3).  Loading one keeps everything but those sums: a regular file whose sums were
known gets ``data`` b"" (as journaled, no block's sum known), one whose sums were not
stays None.  A BLAKE2b sum compared with the capture's BLAKE3 sums could only ever
"differ", and a false "equal" is what must be impossible; b"" differs from the sums of
every file that is not empty (an empty file has none either way), so the next time a
file is read after the upgrade all of it within its old size is shipped, as the old
sums would have made it.  Not None: the model would then read every file again at the
first full scan and ship the whole upper to every replica once more; with b"" a file
is read only when it changes (its size, mtime and ctime are kept and trusted as ever).
The next checkpoint is version 2 (keeping b"" where nothing read the file since).

Loading checks the whole file (CRC, every parent a directory, no name bound twice,
every name a single safe component) and refuses it as a whole otherwise
(:class:`CheckpointError`); the capture then rebuilds the model from the journal.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from collections.abc import Iterator

import attrs

from .. import records as rec
from ..sysio import write_file_atomic

UPPER = -1
WORK = -2
FIRST_SYNTHETIC = -3
ROOTS = {b"upper": UPPER, b"work": WORK}

CKPT_MAGIC = b"SDEEFSM\0"
CKPT_VERSION = 2  # written: BLAKE3 sums
CKPT_VERSION_BLAKE2B = 1  # read: BLAKE2b sums, loaded as unknown (the docstring)
CKPT_HEADER = struct.Struct("<8sHHI16sQQqQ")
assert CKPT_HEADER.size == 64
NODE = struct.Struct("<qqIIIqqQHHHBBI")
assert NODE.size == 64
LINK = struct.Struct("<qH")
XATTR = struct.Struct("<HI")
CRC = struct.Struct("<I")
DATA_KNOWN = 1
NO_XATTRS: tuple[tuple[bytes, bytes], ...] = ()


class CheckpointError(Exception):
    """A checkpoint that cannot be trusted (damaged, another journal's, another format)."""


_PACKED = struct.Struct("<IIIqqQB")  # mode, uid, gid, mtime, ctime, size, handle length
_KNOWN = b"\x01"
_UNKNOWN = b"\x00"


class Node:
    """One inode of the journaled tree (see the module docstring for the fields).

    Memory is what bounds the model (one Node per inode of the upper): the scalar
    fields, the handle and ``data`` live packed in one bytes object (``_PACKED``, the
    handle, a known/unknown flag, the data), about 300 bytes a file all told instead
    of 520 as separate objects.  Reading a field unpacks it; changing one repacks.
    """

    __slots__ = ("parent", "name", "links", "xattrs", "children", "_p")

    parent: int  # 0: no name (yet)
    name: bytes
    links: list[tuple[int, bytes]] | None
    xattrs: tuple[tuple[bytes, bytes], ...]
    children: dict[bytes, int] | None
    _p: bytes

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime: int = 0, ctime: int = 0,
                 size: int = 0, handle: bytes = b"", parent: int = 0, name: bytes = b"",
                 links: list[tuple[int, bytes]] | None = None,
                 xattrs: tuple[tuple[bytes, bytes], ...] = NO_XATTRS,
                 data: bytes | None = b"", children: dict[bytes, int] | None = None) -> None:
        self.parent, self.name, self.links, self.xattrs, self.children = \
            parent, name, links, xattrs, children
        self._p = _pack(mode, uid, gid, mtime, ctime, size, handle, data)

    def __repr__(self) -> str:
        return (f"Node(mode={self.mode:o}, uid={self.uid}, gid={self.gid}, size={self.size}, "
                f"parent={self.parent}, name={self.name!r})")

    def unpacked(self) -> tuple[int, int, int, int, int, int, bytes, bytes | None]:
        p = self._p
        mode, uid, gid, mtime, ctime, size, hlen = _PACKED.unpack_from(p)
        at = _PACKED.size
        handle = p[at:at + hlen]
        at += hlen
        data = p[at + 1:] if p[at:at + 1] == _KNOWN else None
        return mode, uid, gid, mtime, ctime, size, handle, data

    def set(self, **changes: object) -> None:
        """Change fields of the packed part (mode, uid, gid, mtime, ctime, size, handle,
        data) at once."""
        mode, uid, gid, mtime, ctime, size, handle, data = self.unpacked()
        values: dict[str, object] = {"mode": mode, "uid": uid, "gid": gid, "mtime": mtime,
                                     "ctime": ctime, "size": size, "handle": handle,
                                     "data": data}
        values.update(changes)
        self._p = _pack(**values)  # type: ignore[arg-type]

    @property
    def mode(self) -> int:
        return int(_PACKED.unpack_from(self._p)[0])

    @mode.setter
    def mode(self, value: int) -> None:
        self.set(mode=value)

    @property
    def uid(self) -> int:
        return int(_PACKED.unpack_from(self._p)[1])

    @uid.setter
    def uid(self, value: int) -> None:
        self.set(uid=value)

    @property
    def gid(self) -> int:
        return int(_PACKED.unpack_from(self._p)[2])

    @gid.setter
    def gid(self, value: int) -> None:
        self.set(gid=value)

    @property
    def mtime(self) -> int:
        return int(_PACKED.unpack_from(self._p)[3])

    @mtime.setter
    def mtime(self, value: int) -> None:
        self.set(mtime=value)

    @property
    def ctime(self) -> int:
        return int(_PACKED.unpack_from(self._p)[4])

    @ctime.setter
    def ctime(self, value: int) -> None:
        self.set(ctime=value)

    @property
    def size(self) -> int:
        return int(_PACKED.unpack_from(self._p)[5])

    @size.setter
    def size(self, value: int) -> None:
        self.set(size=value)

    @property
    def handle(self) -> bytes:
        return self.unpacked()[6]

    @handle.setter
    def handle(self, value: bytes) -> None:
        self.set(handle=value)

    @property
    def data(self) -> bytes | None:
        return self.unpacked()[7]

    @data.setter
    def data(self, value: bytes | None) -> None:
        self.set(data=value)

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    def names(self) -> list[tuple[int, bytes]]:
        first = [(self.parent, self.name)] if self.parent else []
        return first + (self.links or [])


def _pack(mode: int, uid: int, gid: int, mtime: int, ctime: int, size: int, handle: bytes,
          data: bytes | None) -> bytes:
    head = _PACKED.pack(mode, uid, gid, mtime, ctime, size, len(handle))
    if data is None:
        return head + handle + _UNKNOWN
    return head + handle + _KNOWN + data


def _safe_name(name: bytes) -> bool:
    return 0 < len(name) <= rec.MAX_NAME and name not in (b".", b"..") and b"/" not in name \
        and b"\0" not in name


@attrs.define(eq=False)
class Model:
    """The journaled tree.  Not thread-safe: one reconciler owns it at a time.

    Attributes:
        nodes: id -> Node.
        root_ino: inode number of ``upper/`` (its id is UPPER); 0 if not known.
        seq: the journal seq the model reflects.
        journal_id: the journal history the seq belongs to.
        next_id: the next id for a node whose inode is not known (negative, decreasing).
    """

    nodes: dict[int, Node]
    root_ino: int = 0
    seq: int = 0
    journal_id: bytes = bytes(16)
    next_id: int = FIRST_SYNTHETIC

    @classmethod
    def empty(cls, journal_id: bytes = bytes(16)) -> Model:
        nodes = {UPPER: Node(stat.S_IFDIR | 0o755, children={}),
                 WORK: Node(stat.S_IFDIR | 0o700, children={})}
        return cls(nodes, journal_id=journal_id)

    # -- the tree ----------------------------------------------------------------------------

    def id_of_ino(self, ino: int) -> int:
        return UPPER if ino == self.root_ino and ino else ino

    def new_id(self) -> int:
        self.next_id -= 1
        return self.next_id + 1

    def lookup(self, parent: int, name: bytes) -> int | None:
        node = self.nodes.get(parent)
        if node is None or node.children is None:
            return None
        return node.children.get(name)

    def path(self, id: int) -> bytes:
        """The layer path of a node's first name (``upper/...``, ``work/...``)."""
        parts = []
        while id not in (UPPER, WORK):
            node = self.nodes[id]
            if not node.parent:
                raise KeyError(f"node {id} has no name")
            parts.append(node.name)
            id = node.parent
        parts.append(b"upper" if id == UPPER else b"work")
        return b"/".join(reversed(parts))

    def entry_path(self, parent: int, name: bytes) -> bytes:
        return self.path(parent) + b"/" + name

    def depth(self, id: int) -> int:
        d = 0
        while id not in (UPPER, WORK):
            id = self.nodes[id].parent
            d += 1
        return d

    def is_within(self, id: int, ancestor: int) -> bool:
        """Is ``id`` the directory ``ancestor`` or below it?"""
        while True:
            if id == ancestor:
                return True
            if id in (UPPER, WORK, 0):
                return False
            id = self.nodes[id].parent

    def add(self, id: int, node: Node) -> None:
        if id in self.nodes:
            raise KeyError(f"node {id} exists")
        self.nodes[id] = node

    def bind(self, id: int, parent: int, name: bytes) -> None:
        node = self.nodes[id]
        children = self.nodes[parent].children
        if children is None or name in children:
            raise KeyError(f"cannot bind {name!r} in {parent}")
        if node.is_dir and node.parent:
            raise KeyError(f"directory {id} has a name already")
        children[name] = id
        if not node.parent:
            node.parent, node.name = parent, name
        elif node.links is None:
            node.links = [(parent, name)]
        else:
            node.links.append((parent, name))

    def unbind(self, id: int, parent: int, name: bytes) -> None:
        node = self.nodes[id]
        children = self.nodes[parent].children
        if children is None or children.get(name) != id:
            raise KeyError(f"{name!r} in {parent} is not {id}")
        del children[name]
        if (node.parent, node.name) == (parent, name):
            if node.links:
                node.parent, node.name = node.links.pop(0)
                if not node.links:
                    node.links = None
            else:
                node.parent, node.name = 0, b""
        else:
            assert node.links is not None
            node.links.remove((parent, name))
            if not node.links:
                node.links = None

    def discard(self, id: int) -> None:
        """Forget a node that has no names left (a directory: and no children)."""
        node = self.nodes.pop(id)
        assert not node.parent, f"node {id} still has a name"
        assert not node.children, f"directory {id} is not empty"

    def entries_below(self, parent: int, name: bytes) -> list[tuple[int, bytes]]:
        """The entry ``name`` of ``parent`` and every entry below it, children before
        their directory (the order they can be removed in)."""
        entries = []
        stack = [(parent, name)]
        while stack:
            p, n = stack.pop()
            entries.append((p, n))
            child = self.lookup(p, n)
            assert child is not None
            kids = self.nodes[child].children
            if kids:
                stack.extend((child, cn) for cn in kids)
        entries.reverse()
        return entries

    def remove_entry(self, parent: int, name: bytes) -> None:
        """Remove a name; a directory's names below it go first, and a node without a
        name left is forgotten (a file with names elsewhere keeps those)."""
        for p, n in self.entries_below(parent, name):
            id = self.lookup(p, n)
            assert id is not None
            self.unbind(id, p, n)
            if not self.nodes[id].parent:
                self.discard(id)

    def rekey(self, old: int, new: int) -> None:
        """Give node ``old`` the id ``new`` (the inode a full scan found it to be)."""
        node = self.nodes.pop(old)
        if new in self.nodes:
            self.nodes[old] = node
            raise KeyError(f"node {new} exists")
        self.nodes[new] = node
        for parent, name in node.names():
            children = self.nodes[parent].children
            assert children is not None
            children[name] = new
        if node.children:
            for child_id in set(node.children.values()):
                child = self.nodes[child_id]
                if child.parent == old:
                    child.parent = new
                if child.links:
                    child.links = [(new if p == old else p, n) for p, n in child.links]

    def walk(self, top: int = UPPER) -> Iterator[tuple[int, Node]]:
        """Every node below ``top`` (``top`` included), parents first."""
        stack = [top]
        seen = set()
        while stack:
            id = stack.pop()
            if id in seen:  # a hard-linked file shows up once per name
                continue
            seen.add(id)
            node = self.nodes[id]
            yield id, node
            if node.children:
                stack.extend(node.children.values())

    # -- applying records (restart: what the journal says after a checkpoint) -------------

    def resolve(self, path: bytes) -> tuple[int, bytes] | None:
        """(parent id, name) of a layer path whose parent exists; (root id, b"") for a root."""
        parts = path.split(b"/")
        cur = ROOTS.get(parts[0])
        if cur is None:
            return None
        if len(parts) == 1:
            return cur, b""
        for part in parts[1:-1]:
            nxt = self.lookup(cur, part)
            if nxt is None or not self.nodes[nxt].is_dir:
                return None
            cur = nxt
        return cur, parts[-1]

    def _target(self, path: bytes) -> int | None:
        found = self.resolve(path)
        if found is None:
            return None
        parent, name = found
        return parent if not name else self.lookup(parent, name)

    def apply(self, record: rec.Record) -> None:
        """Make ``record``'s effect true in the model, as ``sdeefs.apply`` does on disk.

        Nodes it creates get new negative ids (their inodes are not known); data it
        writes makes the file's sums unknown (its next examination ships it whole).
        """
        match record:
            case rec.Mkdir(path=p, mode=mode, uid=uid, gid=gid):
                self._create(p, Node(stat.S_IFDIR | mode, uid, gid, children={}))
            case rec.Mknod(path=p, mode=mode, uid=uid, gid=gid):
                self._create(p, Node(mode, uid, gid))
            case rec.Mkdev(path=p, mode=mode, rdev=rdev, uid=uid, gid=gid):
                self._create(p, Node(mode, uid, gid, size=rdev))
            case rec.Symlink(path=p, target=target, uid=uid, gid=gid):
                self._create(p, Node(stat.S_IFLNK | 0o777, uid, gid, size=len(target),
                                     data=target))
            case rec.Link(src=src, dst=dst):
                sid, found = self._target(src), self.resolve(dst)
                if sid is not None and found and found[1] and not self.nodes[sid].is_dir \
                        and self.lookup(*found) is None:
                    self.bind(sid, *found)
            case rec.Unlink(path=p) | rec.Rmdir(path=p):
                found = self.resolve(p)
                tid = self.lookup(*found) if found and found[1] else None
                if tid is not None and found and \
                        self.nodes[tid].is_dir == isinstance(record, rec.Rmdir):
                    self.remove_entry(*found)
            case rec.Rename(src=src, dst=dst, flags=flags):
                self._rename(src, dst, flags)
            case rec.Setattr():
                self._setattr(record)
            case rec.Setxattr(path=p, name=name, value=value):
                tid = self._target(p)
                if tid is not None:
                    node = self.nodes[tid]
                    node.xattrs = tuple(sorted({**dict(node.xattrs), name: value}.items()))
            case rec.Removexattr(path=p, name=name):
                tid = self._target(p)
                if tid is not None:
                    node = self.nodes[tid]
                    node.xattrs = tuple((n, v) for n, v in node.xattrs if n != name)
            case rec.Create():
                for part, _ in record.expand():  # what it means (sdeefs.records)
                    self.apply(part)
            case rec.Write(path=p) | rec.Fallocate(path=p):
                tid = self._target(p)
                if tid is not None and stat.S_ISREG(self.nodes[tid].mode):
                    self.nodes[tid].data = None
            case _:
                pass  # markers

    def _create(self, path: bytes, node: Node) -> None:
        found = self.resolve(path)
        if found is None or not found[1] or self.lookup(*found) is not None:
            return
        id = self.new_id()
        self.add(id, node)
        self.bind(id, *found)

    def _rename(self, src: bytes, dst: bytes, flags: int) -> None:
        sfound, dfound = self.resolve(src), self.resolve(dst)
        if not sfound or not dfound or not sfound[1] or not dfound[1]:
            return
        sid = self.lookup(*sfound)
        if sid is None:
            return
        did = self.lookup(*dfound)
        if did == sid:
            return  # two names of one inode: rename(2) does nothing
        if flags & 2:  # RENAME_EXCHANGE
            if did is None:
                return
            self.unbind(sid, *sfound)
            self.unbind(did, *dfound)
            self.bind(sid, *dfound)
            self.bind(did, *sfound)
            return
        if did is not None:
            if flags & 1:  # RENAME_NOREPLACE
                return
            self.remove_entry(*dfound)
        if self.nodes[sid].is_dir and self.is_within(dfound[0], sid):
            return  # the kernel refuses to move a directory below itself
        self.unbind(sid, *sfound)
        self.bind(sid, *dfound)
        if flags & 4:  # RENAME_WHITEOUT
            self._create(src, Node(stat.S_IFCHR))

    def _setattr(self, r: rec.Setattr) -> None:
        tid = self._target(r.path)
        if tid is None:
            return
        node = self.nodes[tid]
        if r.mask & rec.SET_MODE:
            node.mode = stat.S_IFMT(node.mode) | r.mode
        if r.mask & rec.SET_OWNER:
            node.uid, node.gid = r.uid, r.gid
        if r.mask & rec.SET_SIZE and stat.S_ISREG(node.mode):
            node.size, node.data = r.size, None
        if r.mask & rec.SET_MTIME:
            node.mtime = r.mtime_ns

    # -- checkpoint ----------------------------------------------------------------------------

    def encode(self) -> bytes:
        """The checkpoint bytes (format in the module docstring)."""
        out = bytearray(CKPT_HEADER.pack(CKPT_MAGIC, CKPT_VERSION, 0, rec.EXTENT_BLOCK,
                                         self.journal_id, self.seq, self.root_ino,
                                         self.next_id, len(self.nodes)))
        for id, n in self.nodes.items():
            data = n.data if n.data is not None else b""
            links = n.links or []
            out += NODE.pack(id, n.parent, n.mode, n.uid, n.gid, n.mtime, n.ctime, n.size,
                             len(n.name), len(links), len(n.xattrs), len(n.handle),
                             DATA_KNOWN if n.data is not None else 0, len(data))
            out += n.name + n.handle + data
            for parent, name in links:
                out += LINK.pack(parent, len(name)) + name
            for name, value in n.xattrs:
                out += XATTR.pack(len(name), len(value)) + name + value
        out += CRC.pack(zlib.crc32(out))
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> Model:
        """A model from checkpoint bytes; CheckpointError if anything is wrong."""
        if len(data) < CKPT_HEADER.size + CRC.size:
            raise CheckpointError("checkpoint truncated")
        (crc,) = CRC.unpack_from(data, len(data) - CRC.size)
        if zlib.crc32(data[:-CRC.size]) != crc:
            raise CheckpointError("checkpoint checksum mismatch")
        magic, version, _, block, journal_id, seq, root_ino, next_id, count = \
            CKPT_HEADER.unpack_from(data)
        if magic != CKPT_MAGIC or version not in (CKPT_VERSION, CKPT_VERSION_BLAKE2B) \
                or block != rec.EXTENT_BLOCK:
            raise CheckpointError(f"checkpoint format {magic!r} {version} {block}")
        blake2b = version == CKPT_VERSION_BLAKE2B  # its files' sums: not ours (docstring)
        model = cls({}, root_ino, seq, journal_id, next_id)
        names: list[tuple[int, int, bytes]] = []
        pos = CKPT_HEADER.size
        end = len(data) - CRC.size

        def take(n: int) -> bytes:
            nonlocal pos
            if pos + n > end:
                raise CheckpointError("checkpoint entry runs past the end")
            pos += n
            return data[pos - n:pos]

        try:
            for _ in range(count):
                (id, parent, mode, uid, gid, mtime, ctime, size, name_len, nlinks, nxattrs,
                 handle_len, flags, data_len) = NODE.unpack(take(NODE.size))
                name, handle, body = take(name_len), take(handle_len), take(data_len)
                kind = stat.S_IFMT(mode)
                if kind != stat.S_IFREG:
                    known: bytes | None = body
                else:
                    known = (b"" if blake2b else body) if flags & DATA_KNOWN else None
                node = Node(mode, uid, gid, mtime, ctime, size, handle, data=known,
                            children={} if kind == stat.S_IFDIR else None)
                if id in model.nodes or id == 0:
                    raise CheckpointError(f"checkpoint has node {id} twice")
                model.nodes[id] = node
                if parent:
                    names.append((id, parent, name))
                elif id not in (UPPER, WORK) or kind != stat.S_IFDIR:
                    raise CheckpointError(f"checkpoint node {id} has no name")
                for _ in range(nlinks):
                    lparent, lname_len = LINK.unpack(take(LINK.size))
                    names.append((id, lparent, take(lname_len)))
                xattrs = []
                for _ in range(nxattrs):
                    xname_len, value_len = XATTR.unpack(take(XATTR.size))
                    xattrs.append((take(xname_len), take(value_len)))
                node.xattrs = tuple(xattrs) if xattrs else NO_XATTRS
        except struct.error:
            raise CheckpointError("checkpoint entry truncated") from None
        if pos != end:
            raise CheckpointError(f"checkpoint has {end - pos} bytes after its nodes")
        if UPPER not in model.nodes or WORK not in model.nodes:
            raise CheckpointError("checkpoint lacks the layer directories")
        for id, parent, name in names:
            if not _safe_name(name) or parent not in model.nodes:
                raise CheckpointError(f"checkpoint names {name[:64]!r} in {parent}")
            try:
                model.bind(id, parent, name)
            except KeyError as exc:
                raise CheckpointError(f"checkpoint: {exc}") from None
        for id, node in model.nodes.items():
            if id not in (UPPER, WORK) and not node.parent:
                raise CheckpointError(f"checkpoint node {id} has no name")
        # every directory hangs below a layer directory (no cycle)
        reached = {i for top in (UPPER, WORK) for i, _ in model.walk(top)}
        if len(reached) != len(model.nodes):
            raise CheckpointError("checkpoint has nodes outside the tree")
        return model

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_file_atomic(path, self.encode())

    @classmethod
    def load(cls, path: str) -> Model:
        with open(path, "rb") as f:
            return cls.decode(f.read())
