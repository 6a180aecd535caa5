"""Helpers of the capture tests: tree signatures, applying records, a random workload that
also notes what fanotify would have reported (``Dirty``)."""

from __future__ import annotations

import hashlib
import os
import random
import stat
from collections.abc import Iterable
from pathlib import Path

from sdeefs import records as rec
from sdeefs.apply import apply_record
from sdeefs.fs.fanotify import handle_of
from sdeefs.fs.model import UPPER, Model
from sdeefs.fs.reconcile import Dirty
from sdeefs.journal import NullJournal
from sdeefs.layers import LayerRoot
from sdeefs.sysio import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2
from sdeefs.writeahead import read_write_data


def tree(root: Path | str, mtimes: bool = True) -> dict[str, tuple[object, ...]]:
    """path -> (type, mode, uid, gid, content / target / rdev, xattrs, mtime, link group)."""
    out: dict[str, list[object]] = {}
    groups: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    body: object = (st.st_size, hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            else:
                body = st.st_rdev
            xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                                  for n in os.listxattr(path, follow_symlinks=False)))
            groups.setdefault(st.st_ino, []).append(rel)
            out[rel] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                        st.st_gid, body, xattrs, st.st_mtime_ns if mtimes else 0, st.st_ino]
    return {rel: (*sig[:-1], tuple(sorted(groups[sig[-1]])))  # type: ignore[index]
            for rel, sig in out.items()}


def tree_diff(want: dict[str, tuple[object, ...]], got: dict[str, tuple[object, ...]]
              ) -> list[str]:
    return [f"{path}: upper {want.get(path)} replay {got.get(path)}"
            for path in sorted(set(want) | set(got)) if want.get(path) != got.get(path)]


def open_layers(root: Path) -> LayerRoot:
    return LayerRoot(os.open(root / "upper", os.O_PATH | os.O_DIRECTORY),
                     os.open(root / "work", os.O_PATH | os.O_DIRECTORY), NullJournal())


def apply_all(records: Iterable[rec.Record], source: LayerRoot, target: LayerRoot) -> None:
    for record in records:
        data = read_write_data(source, record) if isinstance(record, rec.Write) else None
        apply_record(target, record, data)


def model_tree(model: Model) -> dict[bytes, tuple[object, ...]]:
    """What a model says, without ids: path -> (mode, uid, gid, mtime, xattrs, symlink,
    size of a file or rdev of a device, names of its inode)."""
    out: dict[bytes, tuple[object, ...]] = {}
    for id, node in model.walk(UPPER):
        if id == UPPER:
            continue
        names = tuple(sorted(model.entry_path(p, n) for p, n in node.names()))
        for p, n in node.names():
            target = node.data if stat.S_ISLNK(node.mode) else None
            size = node.size if stat.S_IFMT(node.mode) in (stat.S_IFREG, stat.S_IFCHR,
                                                           stat.S_IFBLK) else 0
            out[model.entry_path(p, n)] = (node.mode, node.uid, node.gid, node.mtime,
                                           node.xattrs, target, size, names)
    return out


class Workload:
    """Random changes of a directory tree, noting what fanotify would report about them."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.dirty = Dirty()
        self.counter = 0

    # -- what events would say ------------------------------------------------------------

    def _note_dir(self, dir_path: Path, name: str | None = None) -> None:
        parent = os.open(dir_path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            handle = handle_of(parent, os.fsencode(dir_path.name))
        finally:
            os.close(parent)
        ino = os.lstat(dir_path).st_ino
        self.dirty.dirs[ino] = handle
        if name is not None:
            self.dirty.names.add((ino, os.fsencode(name)))

    def _note_object(self, path: Path, data: bool = False) -> None:
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            handle = handle_of(parent, os.fsencode(path.name))
        finally:
            os.close(parent)
        ino = os.lstat(path).st_ino
        self.dirty.objects[ino] = handle
        if data:
            self.dirty.data.add(ino)

    def take(self) -> Dirty:
        dirty, self.dirty = self.dirty, Dirty()
        return dirty

    # -- the tree -------------------------------------------------------------------------

    def entries(self) -> list[Path]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in dirnames + filenames:
                found.append(Path(dirpath) / name)
        return sorted(found)

    def dirs(self) -> list[Path]:
        return [self.root] + [p for p in self.entries() if stat.S_ISDIR(os.lstat(p).st_mode)]

    def files(self) -> list[Path]:
        return [p for p in self.entries() if stat.S_ISREG(os.lstat(p).st_mode)]

    def pick(self, items: list[Path]) -> Path | None:
        return self.rng.choice(items) if items else None

    def new_name(self) -> str:
        self.counter += 1
        return self.rng.choice(["f", "g", "dir", "x", "é", "sp ace", "n"]) + "-" + str(self.counter)

    def data(self) -> bytes:
        size = self.rng.choice([0, 1, 300, 4096, 65536, 65537, 200_000, 300_000])
        if self.rng.random() < 0.3:
            return bytes(size)
        return self.rng.randbytes(size)

    # -- operations -----------------------------------------------------------------------

    def create(self) -> None:
        d = self.pick(self.dirs())
        assert d is not None
        name = self.new_name()
        kind = self.rng.choice(["file", "file", "file", "dir", "symlink", "fifo", "whiteout"])
        path = d / name
        if kind == "file":
            path.write_bytes(self.data())
            os.chmod(path, self.rng.choice([0o644, 0o600, 0o755, 0o4755]))
        elif kind == "dir":
            path.mkdir(mode=self.rng.choice([0o755, 0o700, 0o1777]))
        elif kind == "symlink":
            os.symlink(self.rng.choice(["target", "../up", "/abs/path", "x" * 300]), path)
        elif kind == "fifo":
            os.mkfifo(path, 0o640)
        else:
            os.mknod(path, stat.S_IFCHR, 0)
        self._note_dir(d, name)
        self._note_object(path, data=kind == "file")

    def write(self) -> None:
        f = self.pick(self.files())
        if f is None:
            return
        size = f.stat().st_size
        offset = self.rng.choice([0, size, size // 2, 70_000, 300_000])
        with open(f, "r+b") as fh:
            fh.seek(offset)
            fh.write(self.rng.randbytes(self.rng.choice([1, 100, 70_000])))
        self._note_object(f, data=True)

    def truncate(self) -> None:
        f = self.pick(self.files())
        if f is None:
            return
        os.truncate(f, self.rng.choice([0, 10, 65536, 100_000, 1 << 20]))
        self._note_object(f, data=True)

    def chattr(self) -> None:
        p = self.pick(self.entries())
        if p is None:
            return
        what = self.rng.choice(["mode", "owner", "mtime", "xattr", "rmxattr"])
        st = os.lstat(p)
        if (stat.S_ISLNK(st.st_mode) or stat.S_ISCHR(st.st_mode)) and what == "mode":
            what = "owner"  # no lchmod; a whiteout's mode is 0 (records cannot say more)
        if what == "mode":
            os.chmod(p, self.rng.choice([0o600, 0o644, 0o700, 0o2755, 0]))
        elif what == "owner":
            os.chown(p, self.rng.choice([0, 1000, 4242]), self.rng.choice([0, 100, 4343]),
                     follow_symlinks=False)
        elif what == "mtime":
            t = self.rng.randrange(10**18)
            os.utime(p, ns=(t, t), follow_symlinks=False)
        elif what == "xattr":
            # user.* only on files and directories (the kernel refuses it elsewhere)
            plain = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)
            name = self.rng.choice(["user.a", "user.b", "trusted.overlay.opaque", "trusted.x"]
                                   if plain else ["trusted.t", "trusted.overlay.origin"])
            os.setxattr(p, name, self.rng.randbytes(self.rng.choice([0, 1, 100])),
                        follow_symlinks=False)
        else:
            names = os.listxattr(p, follow_symlinks=False)
            if names:
                os.removexattr(p, self.rng.choice(names), follow_symlinks=False)
        self._note_object(p)

    def link(self) -> None:
        f = self.pick([p for p in self.entries() if not stat.S_ISDIR(os.lstat(p).st_mode)])
        d = self.pick(self.dirs())
        if f is None or d is None:
            return
        name = self.new_name()
        os.link(f, d / name, follow_symlinks=False)
        self._note_dir(d, name)
        self._note_object(f)

    def remove(self) -> None:
        p = self.pick(self.entries())
        if p is None:
            return
        self._remove_tree(p)

    def _remove_tree(self, p: Path) -> None:
        if stat.S_ISDIR(os.lstat(p).st_mode):
            for child in sorted(p.iterdir()):
                self._remove_tree(child)
            self._note_dir(p.parent, p.name)
            self._note_dir(p)
            p.rmdir()
        else:
            self._note_dir(p.parent, p.name)
            self._note_object(p)
            p.unlink()

    def rename(self) -> None:
        src = self.pick(self.entries())
        if src is None:
            return
        src_dir = stat.S_ISDIR(os.lstat(src).st_mode)
        candidates = [d for d in self.dirs() if not (src_dir and (d == src or src in d.parents))]
        d = self.pick(candidates)
        if d is None:
            return
        flags = 0
        if self.rng.random() < 0.5:
            others = [e for e in self.entries() if e.parent == d and e != src
                      and src not in e.parents and e not in src.parents]
            picked = self.pick(others)
            dst = picked if picked is not None else d / self.new_name()
            if os.path.lexists(dst):
                flags = RENAME_EXCHANGE if self.rng.random() < 0.6 else 0
        else:
            dst = d / self.new_name()
            flags = RENAME_NOREPLACE if self.rng.random() < 0.3 else 0
        if flags & RENAME_EXCHANGE and (src_dir and dst in src.parents or stat.S_ISDIR(
                os.lstat(dst).st_mode) and src in dst.parents):
            return
        self._note_dir(src.parent, src.name)
        self._note_dir(d, dst.name)
        self._note_object(src)
        if os.path.lexists(dst):
            self._note_object(dst)
        sfd = os.open(src.parent, os.O_RDONLY)
        dfd = os.open(d, os.O_RDONLY)
        try:
            renameat2(sfd, os.fsencode(src.name), dfd, os.fsencode(dst.name), flags)
        except OSError:
            pass  # replacing a non-empty directory, a file by a directory ...: refused
        finally:
            os.close(sfd)
            os.close(dfd)

    def reuse(self) -> None:
        """Delete a file and create another at once (ext4 often hands out its number)."""
        f = self.pick(self.files())
        if f is None:
            return
        self._note_dir(f.parent, f.name)
        self._note_object(f)
        f.unlink()
        d = self.pick(self.dirs())
        assert d is not None
        name = self.rng.choice([f.name, self.new_name()])
        (d / name).write_bytes(self.data())
        self._note_dir(d, name)
        self._note_object(d / name, data=True)

    OPS = ("create", "create", "create", "write", "truncate", "chattr", "chattr", "link",
           "remove", "rename", "rename", "reuse")

    def run(self, op: str) -> None:
        getattr(self, op)()
