"""Admin updates reach the user's package database: a 3-way merge of dpkg's status files.

Once the user ran dpkg inside, their copy of ``/var/lib/dpkg/status`` sits in their
upper and shadows the host's: a package the admin installs afterwards has its files
in the view (the lower) but is "not installed" for the user's dpkg.  At every start of
a login environment (env.py), before any process runs in it, the user's copy becomes

    merge(origin, host, user):  for every package (Package + Architecture),
        the user's stanza  if the user's copy differs from the origin's for it
                           (installed, removed, upgraded, held, configured inside),
        the host's stanza  otherwise (whatever the admin did, removals included),

where the *origin* is the host's file as it was when the user's copy was last in step
with it: a copy of the host's file kept in ``STATE/dpkg/`` (root's, like the journal),
written at every start (after the merge, or whenever the user has no copy of their own
yet).  Without an origin (a layer from before this module) the host's file stands in:
everything the user's copy differs in counts as the user's, nothing is lost, and
later admin changes merge.  ``available`` is merged the same way.  The package
scripts and file lists of ``info/`` need nothing: the user's dpkg writes only its own
packages' files there, so the admin's come through from the lower.

The merged file is written through the journal (the hybrid engine's passthrough
mount, or the fuse engine's view): replicas get it like any change of the user's.
``sdeefs diff`` shows the user's copy as a changed file and, beside it, the packages in
which it differs from the host's (:func:`describe_changes`), e.g.
``C /var/lib/dpkg/status  (packages: A mine:amd64, C bash:amd64)``.

Format (deb822 as dpkg writes it): paragraphs of ``Field: value`` lines and
continuation lines (starting with a space or tab), separated by empty lines.  The
input is hostile (the user wrote it): a file over MAX_BYTES, a paragraph without a
``Package`` field or two paragraphs of one package make :func:`merge` refuse
(:class:`Unmergeable`), and the user's file stays as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat

import attrs

from sdeefs.sysio import filesystem_ids, write_file_atomic
from sdeefs.tools import Change

log = logging.getLogger(__name__)

MAX_BYTES = 64 << 20  # a status file of 10,000 packages is about 10 MiB
FILES = (b"status", b"available")  # in /var/lib/dpkg
_PARAGRAPH_BREAK = re.compile(rb"\n(?:[ \t]*\n)+")

Key = tuple[bytes, bytes]  # (package, architecture); architecture b"" when absent


class Unmergeable(ValueError):
    """A status file the merge will not touch (too big, not dpkg's format)."""


@attrs.frozen
class Database:
    """One status (or available) file: its paragraphs by package, without their blank line."""

    paragraphs: dict[Key, bytes]

    @classmethod
    def parse(cls, data: bytes) -> Database:
        if len(data) > MAX_BYTES:
            raise Unmergeable(f"{len(data)} bytes (more than {MAX_BYTES})")
        paragraphs: dict[Key, bytes] = {}
        for paragraph in _PARAGRAPH_BREAK.split(data.strip(b"\n")):
            if not paragraph.strip():
                continue
            key = _key(paragraph)
            if key in paragraphs:
                raise Unmergeable(f"package {key[0]!r} ({key[1]!r}) appears twice")
            paragraphs[key] = paragraph
        return cls(paragraphs)

    def render(self) -> bytes:
        """dpkg's own layout: paragraphs in package order, each followed by an empty line."""
        return b"".join(self.paragraphs[key] + b"\n\n" for key in sorted(self.paragraphs))


def _key(paragraph: bytes) -> Key:
    fields: dict[bytes, bytes] = {}
    for line in paragraph.split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon and line[:1] not in (b" ", b"\t"):
            fields[name.strip().lower()] = value.strip()
    package = fields.get(b"package")
    if not package:
        raise Unmergeable(f"a paragraph without a Package field: {paragraph[:60]!r}")
    return package, fields.get(b"architecture", b"")


def merge(origin: bytes, host: bytes, user: bytes) -> bytes:
    """The user's database with the admin's changes since ``origin`` (module docstring)."""
    base, theirs, ours = Database.parse(origin), Database.parse(host), Database.parse(user)
    merged: dict[Key, bytes] = {}
    for key in base.paragraphs.keys() | theirs.paragraphs.keys() | ours.paragraphs.keys():
        mine = ours.paragraphs.get(key)
        chosen = mine if mine != base.paragraphs.get(key) else theirs.paragraphs.get(key)
        if chosen is not None:
            merged[key] = chosen
    return Database(merged).render()


@attrs.frozen
class PackageChange:
    """A package in which the user's database differs from the host's (``sdeefs dpkg-diff``)."""

    kind: str  # "added" (only the user's), "removed" (only the host's), "changed"
    package: str
    architecture: str

    def line(self) -> str:
        mark = {"added": "A", "removed": "D", "changed": "C"}[self.kind]
        arch = f":{self.architecture}" if self.architecture else ""
        return f"{mark} {self.package}{arch}"


def differences(host: bytes, user: bytes) -> list[PackageChange]:
    """The packages the user's database has, lacks or describes otherwise than the host's."""
    theirs, ours = Database.parse(host).paragraphs, Database.parse(user).paragraphs
    found = []
    for key in sorted(theirs.keys() | ours.keys()):
        if theirs.get(key) == ours.get(key):
            continue
        kind = "added" if key not in theirs else "removed" if key not in ours else "changed"
        found.append(PackageChange(kind, key[0].decode(errors="replace"),
                                   key[1].decode(errors="replace")))
    return found


def describe_changes(changes: list[Change], upper: str, lower: str) -> list[Change]:
    """``sdeefs diff``'s changes, those of the user's FILES with the packages they change."""
    described = []
    for change in changes:
        name = change.path.rpartition(b"/")[2]
        if change.kind == "changed" and change.path == b"/".join(
                (*(p.encode() for p in DPKG_DIR), name)) and name in FILES:
            own = _read_own(upper, name)
            try:
                with open(os.path.join(lower, *DPKG_DIR, name.decode()), "rb") as f:
                    host = f.read(MAX_BYTES + 1)
                packages = differences(host, own) if own is not None else []
            except (OSError, Unmergeable):
                packages = []
            if packages:
                shown = ", ".join(p.line() for p in packages[:DIFF_PACKAGES])
                more = len(packages) - DIFF_PACKAGES
                change = attrs.evolve(change, detail=f"packages: {shown}" +
                                      (f" and {more} more" if more > 0 else ""))
        described.append(change)
    return described


DIFF_PACKAGES = 20  # packages named on the line of a changed status file


# -- the layer: reading the user's copy, writing the merge through the journal ----------------

DPKG_DIR = ("var", "lib", "dpkg")


def merge_layer(lower: str, upper: str, write_root: str, origin_dir: str) -> list[str]:
    """Merge the admin's changes into the user's copies of FILES (the module docstring).

    ``upper`` is the user's layer as it is on disk (read), ``write_root`` the same layer
    through the journaling mount (written: the passthrough of the hybrid engine, the fuse
    engine's view, or the upper itself without a journal), ``origin_dir`` where the
    origins are kept (``STATE/dpkg``, root's).  Every path below ``upper`` and
    ``write_root`` is the user's: opened component by component without following a
    symbolic link.  Returns the names of the files it rewrote.
    """
    os.makedirs(origin_dir, mode=0o700, exist_ok=True)
    rewritten = []
    for name in FILES:
        text = name.decode()
        try:
            with open(os.path.join(lower, *DPKG_DIR, text), "rb") as f:
                host = f.read(MAX_BYTES + 1)
        except FileNotFoundError:
            continue  # not a dpkg system, or no such file: nothing to follow
        origin_path = os.path.join(origin_dir, f"{text}.origin")
        user = _read_own(upper, name)
        if user is not None:
            try:
                with open(origin_path, "rb") as f:
                    origin = f.read(MAX_BYTES + 1)
            except FileNotFoundError:
                origin = host  # a layer from before the merge: the user's differences stay
            try:
                merged = merge(origin, host, user)
            except Unmergeable as exc:
                log.warning("%s: the user's %s is left as it is: %s", upper, text, exc)
                continue
            if merged != user:
                _replace_own(write_root, name, merged)
                rewritten.append(text)
        write_file_atomic(origin_path, host)  # in step with the host from now on
    return rewritten


def _open_dpkg_dir(root: str) -> int | None:
    """``root/var/lib/dpkg`` as an O_PATH fd, no component a symbolic link; None if absent."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for part in DPKG_DIR:
        try:
            child = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=fd)
        except OSError:  # missing, a whiteout, a symbolic link, not a directory
            os.close(fd)
            return None
        os.close(fd)
        fd = child
    return fd


def _read_own(upper: str, name: bytes) -> bytes | None:
    """The user's own copy of var/lib/dpkg/NAME in ``upper``: a regular file, or None."""
    directory = _open_dpkg_dir(upper)
    if directory is None:
        return None
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=directory)
    except OSError:
        return None
    finally:
        os.close(directory)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(MAX_BYTES + 1)


def _replace_own(root: str, name: bytes, data: bytes) -> None:
    """Replace ``root``/var/lib/dpkg/NAME with ``data`` as dpkg does (a new file, renamed
    over the old one after fsync), with the old one's owner and mode."""
    directory = _open_dpkg_dir(root)
    if directory is None:
        raise FileNotFoundError(f"{root}/var/lib/dpkg vanished")
    tmp = name + b".sdeefs-merge"
    try:
        old = os.stat(name, dir_fd=directory, follow_symlinks=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=directory)
        # created as the directory's owner (the user's id in a layer: the journaling
        # daemon's id door refuses host root as a creator), then given the old file's owner
        owner = os.fstat(directory)
        with filesystem_ids(owner.st_uid, owner.st_gid):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600, dir_fd=directory)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchown(fd, old.st_uid, old.st_gid)
            os.fchmod(fd, stat.S_IMODE(old.st_mode))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
    finally:
        os.close(directory)
