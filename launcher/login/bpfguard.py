"""The login view's guard in the kernel: the BPF LSM program of launcher/login/bpf (issue 16).

A login view hides, from the user's environment, every host file the user could not read
on the host and whatever the site's deny list names (docs/admin.md, "What a view hides").
The guard layer (sdeefs.fs.guard: FUSE) does it by answering every first lookup in user
space; this program does it in the kernel, at every access, with no layer at all: the
view is upper + mask + idmapped lower, kernel overlayfs' own speed (bench/RESULTS.md,
"The BPF LSM guard in the product").  guard.bpf.c says what it enforces; this module is
the root side that loads it, feeds it and chooses it.

**Which guard** (:func:`choose`, the config's ``guard``).  ``c``/``python``: the guard
layer, as before.  ``bpf``: this program, or the login fails with one line saying why.
``auto`` (the default): bpf when all of these hold, else c, and :class:`Choice` says why:

* the engine is kernel or hybrid: their upper is on another filesystem than the lower (the
  layer image; the journaling daemon's FUSE mount).  Engine overlay keeps the upper on the
  host's filesystem, owned by the user's subordinate ids: the program would hide the
  user's own copied-up files.  Engine fuse has no guard at all (its overlay applies the rules);
* every deny pattern is in the program's subset (:func:`deny_subset`; DEFAULT_DENY is);
* the user is in at most MAX_GROUPS groups (the identity's fixed array, guard.h);
* ``sdeefs-bpfguard`` is built (scripts/install.sh; clang, bpftool, libbpf-dev) and this
  kernel loads its programs (``sdeefs-bpfguard check``: BPF LSM active, trampolines
  allowed, the verifier's verdict), checked once per boot and loader: RUN_DIR/bpfguard.check.

**Lifetime: loaded once per host, pinned, fail closed.**  The programs' links and the maps
are pinned in bpffs under PINS/g-FINGERPRINT/ (PINS: /sys/fs/bpf/sdeefs), so nothing a user
can kill detaches them: the prototype's per-environment loader process (bench/lsmguard)
fails open when it dies, which is right for a bench and wrong here.  The first login that
needs them (:meth:`BpfGuard.add`) loads them.

**The key is the user's uid, not the namespace's inode** (the prototype's).  ``sdeefs-enter
start`` makes the environment's user namespace as the user, so that the user's sessions
can join it (launcher/enter/start.c): the user may ``setns`` into it from the moment it
exists, before ``start`` has even returned its init.  A key added after that (the
namespace's inode) leaves a window in which a process of the user could join, open a
root-only file and keep it open.  The program instead guards every user namespace whose
*owner* (or an ancestor's) is a key, and the key is the user's uid: it is in the map
before the namespace exists (view.start_login adds it before anything is mounted), so no
such moment exists.  It guards the user's other namespaces too (a rootless container):
there the rule is the host's own permission check for the user, counting the user's
subordinate ids as the user's (a container's layers are owned by them), so nothing changes
for them but ACLs (a file readable through an ACL only is hidden).  It is
removed at teardown (:meth:`BpfGuard.forget`: only the key of that uid, and only once no
process is left in a namespace the user owns: a key is never removed under a live
environment).  Keys of users with no such process and no environment being set up (its
lock free) are dropped whenever the map is written.  A join checks that its
environment's key is still there (:meth:`BpfGuard.guarding`, env._usable); if not (an
admin unpinned the programs), the environment is started anew, never joined unguarded.

**A reload** happens when FINGERPRINT changes: the loader binary (the program's version),
the host devices or the deny list.  The new set is loaded and attached beside the old
one, its maps filled (host_devs, deny, then the live keys copied: in that order, since a
zero deny pattern matches every path), then renamed into place, and only then the old
set unpinned: at every moment at least one attached set guards every environment.  All
writers take RUN_DIR/bpfguard.lock (flock), so no key is added to a set being replaced.
A set of another build whose ``guarded`` values have another size (``OtherLayout``: its
keys cannot be copied) is not unpinned: it keeps guarding its environments beside the new
set, and goes once its last key is stale.  Every value is read with its map's own value
size, and only its first field (the uid, first in every build) from another build's.

**The maps' values** are written here, pinned with ``struct`` (IDENTITY, DENY_PATTERN)
against guard.h (tests/launcher/test_bpfguard.py compiles it to check); keys are native
u32s; the map calls go through libbpf1 (ctypes: ``bpf_obj_get``, ``bpf_map_*_elem``).

**What is decided** (the program's ``view_only``): what a task reaches through the view,
on overlayfs' lower entry (an entry with an upper is the user's own).  Host files reached
otherwise, through the binds of the user's home, ``shared`` and ``sockets``, are not the
guard's (the guard layer never saw them either): in the home a 0600 file root inside made
is owned on the host by the user's subordinate uid, and it stays the user's to read; and
the deny list's ``/home`` (the lower's, emptied by the mask) does not reach the bound home.

**host_devs**: the device of ``config.lower``.  The lower is one idmapped bind of it
(``sdeefs-enter idmap``: open_tree without AT_RECURSIVE), so filesystems mounted below
it on the host (/boot, a separate /var) are not in the view at all (empty mountpoints):
its one filesystem is every host filesystem the view shows.

**The one semantic difference to the guard layer**: no LSM hook sees directory entries,
so the program cannot hide a *name*.  The mask therefore hides by name what the scan for
root-only entries (compute/private.py, as for a job) finds at start; an entry created or
made root-only on the host *after* the start shows its name in a listing and answers
ENOENT to stat, open, exec, xattrs and copy-up (and a hidden directory's open for writing
says EISDIR, from may_open() before any hook).  In exchange an entry tightened after its
first lookup is hidden at its next access (the layer decides once, at the first lookup).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import errno
import fcntl
import hashlib
import json
import logging
import os
import pwd
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator

import attrs

from sdeefs import mountinfo
from sdeefs.config import Engine, Guard, SiteConfig
from sdeefs.errors import ExitCode, QuietError
from sdeefs.identity import Identity
from sdeefs.sysio import write_file_atomic

log = logging.getLogger(__name__)

PINS = "/sys/fs/bpf/sdeefs"
BPF_FS_MAGIC = 0xCAFE4A11

# guard.h, which these pin: change one, change both (tests/launcher/test_bpfguard.py)
MAX_GROUPS = 64
GUARDED_MAX = 4096
DEVS_MAX = 16
DENY_MAX = 16
DENY_LEN = 192
SUFFIX_LEN = 32
COMPONENT_LEN = 64  # guard.bpf.c: a starred component longer than this never matches
PATH_LEN = 256

KEY = struct.Struct("=I")  # guarded: the namespace owner's uid; host_devs: s_dev; deny: index
# struct identity: uid, gid, ngroups, subuid, subgid, count, groups
IDENTITY = struct.Struct(f"=IIIIII{MAX_GROUPS}I")
DENY_PATTERN = struct.Struct(f"=III{DENY_LEN}s{SUFFIX_LEN}s")  # struct deny_pattern
DEV_PRESENT = struct.Struct("=B")  # host_devs' value: 1
GUARDED_UID = struct.Struct("=I")  # the first field of guarded's value in every build: guard.h
# struct bpf_map_info's head: type, id, key_size, value_size, max_entries (linux/bpf.h, stable)
MAP_INFO = struct.Struct("=IIIII")
assert IDENTITY.size == 24 + 4 * MAX_GROUPS
assert DENY_PATTERN.size == 12 + DENY_LEN + SUFFIX_LEN

MAPS = ("guarded", "host_devs", "deny", "counts")


class Blocker(enum.Enum):
    """What keeps the BPF guard from a login (doctor names the fix of each)."""

    ENGINE = "engine"  # engine overlay: its upper is on the host's filesystem
    DENY = "deny"  # a deny pattern outside the subset
    GROUPS = "groups"  # the user is in more than MAX_GROUPS groups
    NOT_BUILT = "not built"  # no sdeefs-bpfguard
    KERNEL = "kernel"  # this kernel does not load the programs


@attrs.frozen
class Blocked:
    blocker: Blocker
    why: str  # one line


class GuardUnavailable(QuietError):
    """``guard = "bpf"`` and the program cannot guard this login (one line: why)."""

    def __init__(self, blocked: Blocked) -> None:
        super().__init__(f'guard = "bpf": {blocked.why}', ExitCode.UNAVAILABLE)
        self.blocked = blocked


class GuardError(QuietError):
    """The program could not be loaded or the environment not added: it does not start."""


class OtherLayout(Exception):
    """A pinned set whose ``guarded`` values are not this build's (an older or newer sdeefs
    loaded it): its keys cannot be copied, so it stays attached beside the new set."""

    def __init__(self, pinned: str, value_size: int) -> None:
        super().__init__(f"{pinned}: values of {value_size} bytes, this build's "
                         f"{IDENTITY.size}")
        self.pinned = pinned


class NotInSubset(ValueError):
    """A deny pattern the program cannot match (``pattern``: which; the message: why)."""

    def __init__(self, pattern: str, why: str) -> None:
        super().__init__(f"deny pattern {pattern!r} is not in the BPF subset: {why}")
        self.pattern = pattern


# -- the deny subset ----------------------------------------------------------------------


@attrs.frozen
class DenyPattern:
    """One pattern as guard.bpf.c matches it: ``prefix`` (all of it without a star), and
    after the star ``suffix``."""

    prefix: bytes
    suffix: bytes
    star: bool

    @classmethod
    def parse(cls, pattern: str) -> DenyPattern:
        """The subset: an absolute literal path (the entry and everything below it), or one
        ``*`` inside its last component; no ``?``, ``[``, ``\\``."""
        raw = os.fsencode(pattern)
        if not raw.startswith(b"/"):
            raise NotInSubset(pattern, "not an absolute path")
        if any(c in raw for c in (b"?", b"[", b"\\")):
            raise NotInSubset(pattern, "only `*` is matched, not ?, [...] or escapes")
        stars = raw.count(b"*")
        if stars > 1:
            raise NotInSubset(pattern, "more than one `*`")
        if stars == 1:
            prefix, suffix = raw.split(b"*")
            if b"/" in suffix:
                raise NotInSubset(pattern, "the `*` is not in the last component")
            if len(suffix) >= SUFFIX_LEN:
                raise NotInSubset(pattern, f"{len(suffix)} bytes after the `*` (at most "
                                  f"{SUFFIX_LEN - 1})")
        else:
            prefix, suffix = raw.rstrip(b"/") or b"/", b""
        if len(prefix) >= DENY_LEN:
            raise NotInSubset(pattern, f"{len(prefix)} bytes before the `*` (at most "
                              f"{DENY_LEN - 1})")
        return cls(prefix, suffix, stars == 1)

    def encode(self) -> bytes:
        """struct deny_pattern: the prefix zero-filled, the suffix right-aligned (a zero byte
        of either matches anything: guard.bpf.c's pattern_matches)."""
        return DENY_PATTERN.pack(len(self.prefix), len(self.suffix), int(self.star),
                                 self.prefix, self.suffix.rjust(SUFFIX_LEN, b"\0"))


def deny_subset(patterns: Iterable[str]) -> tuple[DenyPattern, ...]:
    """The deny list as the program matches it; NotInSubset for the first it cannot."""
    parsed = tuple(DenyPattern.parse(p) for p in patterns)
    if len(parsed) > DENY_MAX:
        raise NotInSubset(str(len(parsed)), f"more than {DENY_MAX} patterns")
    return parsed


def view_deny(config: SiteConfig) -> tuple[str, ...]:
    """What the program denies late: the deny list (sdeefs' own directories are in no
    lower a login sees: the mask hides them, and the run dir is a tmpfs elsewhere)."""
    return config.deny


# -- the maps' values ---------------------------------------------------------------------


@attrs.frozen
class Guarded:
    """``guarded``'s value: whose environment (the rule's uid, gid, groups and
    subordinate ranges: Identity.host_readable)."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    subuid: int = 0
    subgid: int = 0
    count: int = 0  # of each subordinate range (0: none)

    @classmethod
    def of(cls, ids: Identity) -> Guarded:
        return cls(ids.uid, ids.gid, ids.groups, ids.subuid, ids.subgid, ids.count)

    def encode(self) -> bytes:
        if len(self.groups) > MAX_GROUPS:
            raise ValueError(f"{len(self.groups)} groups (the program holds {MAX_GROUPS})")
        groups = list(self.groups) + [0] * (MAX_GROUPS - len(self.groups))
        return IDENTITY.pack(self.uid, self.gid, len(self.groups), self.subuid, self.subgid,
                             self.count, *groups)

    @classmethod
    def decode(cls, data: bytes) -> Guarded:
        uid, gid, ngroups, subuid, subgid, count, *groups = IDENTITY.unpack(data)
        return cls(uid, gid, tuple(groups[:min(ngroups, MAX_GROUPS)]), subuid, subgid, count)


def kernel_dev(st_dev: int) -> int:
    """A device number as the kernel keeps it in sb->s_dev (MKDEV: major << 20 | minor)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def host_devs(config: SiteConfig) -> tuple[int, ...]:
    """The host filesystems a login view shows: the lower's one (module docstring)."""
    return (kernel_dev(os.stat(config.lower).st_dev),)


NS_GET_OWNER_UID = 0xB704  # ioctl_ns(2): _IO(0xb7, 0x4), the uid owning a user namespace
NS_GET_PARENT = 0xB702  # ioctl_ns(2): _IO(0xb7, 0x2), an fd of a user namespace's parent
MAX_NS_DEPTH = 32  # user namespaces nest 32 deep at most (the kernel's limit)


def _owner_of(fd: int) -> int:
    raw = fcntl.ioctl(fd, NS_GET_OWNER_UID, b"\0" * 4)
    return int(struct.unpack("=I", raw)[0])


def userns_owner(path: str) -> int:
    """The uid owning the user namespace ``path`` (/proc/PID/ns/user) names."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _owner_of(fd)
    finally:
        os.close(fd)


def userns_owners(path: str, host: int) -> set[int]:
    """The uids owning the user namespace ``path`` names and each of its ancestors below
    the host's (whose inode is ``host``): every key the program looks up for a task there
    (guard.bpf.c walks the same chain)."""
    found: set[int] = set()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for _ in range(MAX_NS_DEPTH):
            if os.fstat(fd).st_ino == host:
                break
            found.add(_owner_of(fd))
            try:
                parent = fcntl.ioctl(fd, NS_GET_PARENT)
            except OSError:  # EPERM: its parent is outside ours (never the case for root)
                break
            os.close(fd)
            fd = parent
    finally:
        os.close(fd)
    return found


def live_owners() -> set[int]:
    """The uids owning the user namespace of some process now, or one of its ancestors,
    other than the host's (root reads every /proc/PID/ns).  Ancestors count: a process
    in a namespace a user's environment made (a rootless container, its root one of the
    user's subordinate uids) is guarded by the user's key (guard.bpf.c walks up to it),
    and that namespace outlives every process of the environment's own when the
    environment shares the host's PIDs."""
    host = os.stat("/proc/self/ns/user").st_ino
    found: set[int] = set()
    seen: set[int] = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            path = f"/proc/{name}/ns/user"
            with contextlib.suppress(OSError):
                ino = os.stat(path).st_ino
                if ino != host and ino not in seen:
                    seen.add(ino)
                    found |= userns_owners(path, host)
    return found


def _setting_up(run_dir: str, uid: int) -> bool:
    """Is the environment of ``uid``'s user being set up or torn down now (its lock held:
    env.locked)?  Then its key is not stale, even with no process in its namespace yet."""
    try:
        lock = os.path.join(run_dir, pwd.getpwuid(uid).pw_name, "lock")
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except (KeyError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


# -- libbpf -------------------------------------------------------------------------------


class Libbpf:
    """The few map calls of libbpf1 this module makes (ctypes); errors as OSError."""

    BPF_ANY = 0
    BPF_MAP_TYPE_HASH = 1
    BPF_MAP_TYPE_ARRAY = 2

    def __init__(self) -> None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            self._lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise GuardError(f"libbpf: {exc} (apt-get install libbpf1)",
                             ExitCode.UNAVAILABLE) from None
        lib = self._lib
        lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        for fn in (lib.bpf_map_update_elem,):
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]
        for fn in (lib.bpf_map_lookup_elem, lib.bpf_map_get_next_key):
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
        lib.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                               ctypes.POINTER(ctypes.c_uint32)]
        lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                                       ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]

    @staticmethod
    def _check(result: int, what: str) -> int:
        if result < 0:
            code = -result if result != -1 else ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}")
        return result

    def open(self, path: str) -> int:
        return self._check(self._lib.bpf_obj_get(os.fsencode(path)), f"bpf_obj_get {path}")

    def pin(self, fd: int, path: str) -> None:
        self._check(self._lib.bpf_obj_pin(fd, os.fsencode(path)), f"bpf_obj_pin {path}")

    def create(self, kind: int, name: str, key_size: int, value_size: int,
               entries: int) -> int:
        """A new map (tests: the pinned maps' shapes where no program loads)."""
        return self._check(self._lib.bpf_map_create(kind, name.encode(), key_size, value_size,
                                                    entries, None), "bpf_map_create")

    def value_size(self, fd: int) -> int:
        """The map's value size: what a lookup writes (a smaller buffer would overflow)."""
        info = ctypes.create_string_buffer(MAP_INFO.size)
        length = ctypes.c_uint32(MAP_INFO.size)
        self._check(self._lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(length)),
                    "bpf_obj_get_info_by_fd")
        return int(MAP_INFO.unpack(info.raw)[3])

    def update(self, fd: int, key: bytes, value: bytes) -> None:
        self._check(self._lib.bpf_map_update_elem(fd, key, value, self.BPF_ANY),
                    "bpf_map_update_elem")

    def lookup(self, fd: int, key: bytes, size: int) -> bytes | None:
        value = ctypes.create_string_buffer(size)
        result = self._lib.bpf_map_lookup_elem(fd, key, value)
        if result < 0:
            if ctypes.get_errno() == errno.ENOENT or result == -errno.ENOENT:
                return None
            self._check(result, "bpf_map_lookup_elem")
        return value.raw

    def delete(self, fd: int, key: bytes) -> bool:
        result = self._lib.bpf_map_delete_elem(fd, key)
        if result < 0 and (result == -errno.ENOENT or ctypes.get_errno() == errno.ENOENT):
            return False
        self._check(result, "bpf_map_delete_elem")
        return True

    def keys(self, fd: int, size: int) -> list[bytes]:
        found: list[bytes] = []
        key = ctypes.create_string_buffer(size)
        previous: bytes | None = None
        while True:
            result = self._lib.bpf_map_get_next_key(fd, previous, key)
            if result < 0:
                if result == -errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
                    return found
                self._check(result, "bpf_map_get_next_key")
            previous = key.raw
            found.append(previous)


@contextlib.contextmanager
def opened(lib: Libbpf, path: str) -> Iterator[int]:
    fd = lib.open(path)
    try:
        yield fd
    finally:
        os.close(fd)


# -- choosing -----------------------------------------------------------------------------


@attrs.frozen
class Choice:
    """Which guard a login gets (``guard``: BPF, C or PYTHON; None: engine fuse, whose
    overlay applies the rules itself) and why, for the login, doctor and status."""

    guard: Guard | None
    why: str
    blocked: Blocked | None = None  # auto: what kept it from bpf


def loader_path() -> str:
    """``sdeefs-bpfguard`` (``$SDEEFS_BPFGUARD_BIN``, or next to this Python: scripts/setup.sh
    and scripts/install.sh build it there from launcher/login/bpf/)."""
    return os.environ.get("SDEEFS_BPFGUARD_BIN") or os.path.join(os.path.dirname(sys.executable),
                                                                 "sdeefs-bpfguard")


def pins_path() -> str:
    """Where the programs and maps are pinned (``$SDEEFS_BPF_PINS``: tests, a private bpffs)."""
    return os.environ.get("SDEEFS_BPF_PINS") or PINS


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


@attrs.define(eq=False)
class BpfGuard:
    """The root side of the program on this host: check, load, add, forget.

    ``run_dir``: the site's run dir (the check's cache, the writers' lock); ``pins``: the
    bpffs directory of the pinned sets; ``loader``: sdeefs-bpfguard."""

    run_dir: str
    pins: str = attrs.field(factory=pins_path)
    loader: str = attrs.field(factory=loader_path)
    _lib: Libbpf | None = None

    @property
    def lib(self) -> Libbpf:
        if self._lib is None:
            self._lib = Libbpf()
        return self._lib

    # -- can this kernel? --------------------------------------------------------------------

    def unavailable(self) -> Blocked | None:
        """None if sdeefs-bpfguard is built and this kernel loads its programs, else why
        not.  The kernel's verdict is cached per boot and loader build."""
        try:
            st = os.stat(self.loader)
        except OSError:
            return Blocked(Blocker.NOT_BUILT, f"{self.loader} is not built (scripts/install.sh "
                           "builds it; it needs clang, bpftool and libbpf-dev)")
        if os.geteuid() != 0:  # not cached: the kernel's answer to root is what counts
            return Blocked(Blocker.KERNEL, "only root may load BPF programs: check as root")
        build = f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        cache = os.path.join(self.run_dir, "bpfguard.check")
        boot = _boot_id()
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(cache) as f:
                cached = json.load(f)
            if cached["boot"] == boot and cached["build"] == build:
                return None if cached["why"] is None else Blocked(Blocker.KERNEL, cached["why"])
        result = subprocess.run([self.loader, "check"], capture_output=True, text=True,
                                check=False)
        why = None if result.returncode == 0 else _last_line(result.stderr)
        if why is not None and "Operation not permitted" in why:
            why += (" (this kernel refuses BPF trampoline programs: BPF LSM not active, or "
                    "its text patching refused)")
        os.makedirs(self.run_dir, mode=0o755, exist_ok=True)
        write_file_atomic(cache, json.dumps({"boot": boot, "build": build, "why": why}).encode(),
                          mode=0o644)
        return None if why is None else Blocked(Blocker.KERNEL, why)

    # -- the pinned set ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.run_dir, mode=0o755, exist_ok=True)
        fd = os.open(os.path.join(self.run_dir, "bpfguard.lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def sets(self) -> list[str]:
        """The pinned sets (directories PINS/g-*), complete ones only."""
        try:
            names = sorted(os.listdir(self.pins))
        except FileNotFoundError:
            return []
        return [os.path.join(self.pins, n) for n in names if n.startswith("g-")]

    def fingerprint(self, devs: tuple[int, ...], deny: tuple[DenyPattern, ...]) -> str:
        digest = hashlib.sha256()
        with open(self.loader, "rb") as f:
            digest.update(f.read())  # the program's version: its object is inside
        digest.update(repr(sorted(devs)).encode())
        for pattern in deny:
            digest.update(pattern.encode())
        return digest.hexdigest()[:16]

    def _ensure_bpffs(self) -> None:
        parent = os.path.dirname(self.pins.rstrip("/"))
        if _fs_type(parent) != "bpf":
            subprocess.run(["mount", "-t", "bpf", "bpf", parent], check=True,
                           capture_output=True)
        os.makedirs(self.pins, mode=0o700, exist_ok=True)

    def _ensure_attached(self, devs: tuple[int, ...], deny: tuple[DenyPattern, ...]) -> str:
        """The set for ``devs`` and ``deny``, loaded and attached if it is not (a reload:
        module docstring).  The caller holds the lock."""
        self._ensure_bpffs()
        target = os.path.join(self.pins, f"g-{self.fingerprint(devs, deny)}")
        if os.path.isdir(target):
            return target
        # bpffs refuses dots in names ("reserved for the system"): new-g-..., then g-...
        staging = os.path.join(self.pins, f"new-{os.path.basename(target)}")
        _unpin(staging)  # a load that died half-way
        result = subprocess.run([self.loader, "attach", staging, str(len(deny))],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise GuardError(f"the BPF guard did not load: {_last_line(result.stderr)}",
                             ExitCode.UNAVAILABLE)
        try:
            with opened(self.lib, os.path.join(staging, "map_host_devs")) as fd:
                for dev in devs:
                    self.lib.update(fd, KEY.pack(dev), DEV_PRESENT.pack(1))
            with opened(self.lib, os.path.join(staging, "map_deny")) as fd:
                for index, pattern in enumerate(deny):
                    self.lib.update(fd, KEY.pack(index), pattern.encode())
            kept = []  # sets of another build's layout: they keep guarding their keys
            with opened(self.lib, os.path.join(staging, "map_guarded")) as new:
                for old in self.sets():  # every key, stale or not: those go at the next add
                    try:
                        entries = self._entries(old)
                    except OtherLayout as exc:
                        log.warning("the BPF guard: %s: left attached until its "
                                    "environments ended", exc)
                        kept.append(old)
                        continue
                    for key, value in entries.items():
                        self.lib.update(new, KEY.pack(key), value.encode())
            os.rename(staging, target)
        except BaseException:
            _unpin(staging)
            raise
        for old in self.sets():
            if old != target and old not in kept:
                _unpin(old)  # the new set guards every live key already
        log.info("the BPF guard attached: %s", target)
        return target

    def _entries(self, pinned: str) -> dict[int, Guarded]:
        """The keys of a set of this build's layout and their values (else OtherLayout)."""
        with opened(self.lib, os.path.join(pinned, "map_guarded")) as fd:
            size = self.lib.value_size(fd)
            if size != IDENTITY.size:
                raise OtherLayout(pinned, size)
            entries = {}
            for key in self.lib.keys(fd, KEY.size):
                value = self.lib.lookup(fd, key, IDENTITY.size)
                if value is not None:
                    entries[KEY.unpack(key)[0]] = Guarded.decode(value)
            return entries

    def _uids(self, pinned: str) -> dict[int, int]:
        """The keys of a set of any build and the uid each is held for."""
        with opened(self.lib, os.path.join(pinned, "map_guarded")) as fd:
            size = self.lib.value_size(fd)
            uids = {}
            for key in self.lib.keys(fd, KEY.size):
                value = self.lib.lookup(fd, key, size)
                if value is not None and size >= GUARDED_UID.size:
                    uids[KEY.unpack(key)[0]] = GUARDED_UID.unpack_from(value)[0]
            return uids

    def _drop_stale(self, pinned: str, live: set[int], keep: int | None = None) -> int:
        """Remove the keys of ``pinned`` no process and no set-up holds (other than
        ``keep``); how many keys are left."""
        uids = self._uids(pinned)
        with opened(self.lib, os.path.join(pinned, "map_guarded")) as fd:
            for stale in set(uids) - live - {keep}:
                if not _setting_up(self.run_dir, stale):
                    self.lib.delete(fd, KEY.pack(stale))
                    del uids[stale]
                    log.info("the BPF guard: dropped the stale key of uid %d", stale)
        return len(uids)

    # -- environments ------------------------------------------------------------------------

    def add(self, config: SiteConfig, ids: Identity) -> int:
        """Guard every user namespace ``ids``' user owns (loading the program first if
        needed), as that user; the key.  Stale keys are dropped on the way."""
        if ids.uid == 0:
            raise GuardError("refusing to guard the namespaces root owns")
        deny = deny_subset(view_deny(config))
        with self._locked():
            pinned = self._ensure_attached(host_devs(config), deny)
            live = live_owners()
            self._drop_stale(pinned, live, keep=ids.uid)
            with opened(self.lib, os.path.join(pinned, "map_guarded")) as fd:
                self.lib.update(fd, KEY.pack(ids.uid), Guarded.of(ids).encode())
            for old in self.sets():  # another build's set, kept for its environments
                if old != pinned and self._drop_stale(old, live) == 0:
                    _unpin(old)
        return ids.uid

    def guarding(self, key: int, uid: int) -> bool:
        """Is the key ``key`` held for ``uid`` in an attached set now?"""
        try:
            return any(self._uids(pinned).get(key) == uid for pinned in self.sets())
        except (OSError, GuardError):
            return False

    def forget(self, key: int, uid: int) -> bool:
        """Remove ``key``, if it is held for ``uid`` (what this environment added) and no
        process is left in a namespace that uid owns; True if a key was removed."""
        if not key or not os.path.isdir(self.pins):
            return False
        removed = False
        with self._locked():
            ours = [p for p in self.sets() if self._uids(p).get(key) == uid]
            if ours and key in live_owners():
                log.warning("the BPF guard: a user namespace of uid %d still has processes; "
                            "its key stays (dropped once none has)", key)
                return False
            for pinned in ours:
                with opened(self.lib, os.path.join(pinned, "map_guarded")) as fd:
                    removed = self.lib.delete(fd, KEY.pack(key)) or removed
        return removed

    def entries(self) -> dict[int, Guarded]:
        """Every guarded environment of every attached set of this build's layout (status,
        tests)."""
        found: dict[int, Guarded] = {}
        for pinned in self.sets():
            with contextlib.suppress(OtherLayout):
                found.update(self._entries(pinned))
        return found

    def unload(self) -> tuple[int, list[int]]:
        """Unpin every set (an uninstall), unless one still guards someone: a key whose uid
        has processes in a user namespace it owns, or whose environment is being set up.
        Returns how many sets were unpinned and the uids that keep them (then none is)."""
        if not os.path.isdir(self.pins):
            return 0, []
        with self._locked():
            keys = {key for pinned in self.sets() for key in self._uids(pinned)}
            live = live_owners()
            keeping = sorted(k for k in keys if k in live or _setting_up(self.run_dir, k))
            if keeping:
                return 0, keeping
            # with the sets a load that died half-way left (attached links, never renamed)
            names = [n for n in os.listdir(self.pins) if n.startswith(("g-", "new-g-"))]
            for name in names:
                _unpin(os.path.join(self.pins, name))
            with contextlib.suppress(OSError):
                os.rmdir(self.pins)
            return len(names), []

    def detach_all(self) -> None:
        """Unpin every set (the programs detach): for an uninstall, and tests."""
        with self._locked():
            for pinned in self.sets():
                _unpin(pinned)


def _unpin(directory: str) -> None:
    """Remove a pinned set (links unpinned: their programs detach)."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory), key=lambda n: not n.startswith("link_")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(directory)


def _fs_type(path: str) -> str | None:
    """The filesystem type mounted exactly at ``path`` (/proc/self/mountinfo), or None."""
    mount = mountinfo.at(path)
    return mount.fstype if mount is not None else None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("sdeefs-bpfguard")]
    return (ours or lines or ["no output"])[-1]


def choose(config: SiteConfig, engine: Engine, ids: Identity | None = None,
           guard: BpfGuard | None = None) -> Choice:
    """Which guard a login of ``engine`` (of ``ids``' user, if known) gets, and why
    (module docstring); GuardUnavailable if ``guard = "bpf"`` and the program cannot."""
    if engine == Engine.FUSE:
        return Choice(None, "engine fuse: its overlay applies the rules itself (no guard)")
    if config.guard in (Guard.C, Guard.PYTHON):
        return Choice(config.guard, f'guard = "{config.guard}" (configured)')
    blocked = bpf_unavailable(config, engine, ids, guard or BpfGuard(config.run_dir))
    if blocked is None:
        return Choice(Guard.BPF, "the BPF LSM guard: this kernel loads it, every deny pattern "
                                 "is in its subset" + (" (configured)"
                                                       if config.guard == Guard.BPF else ""))
    if config.guard == Guard.BPF:
        raise GuardUnavailable(blocked)
    return Choice(Guard.C, f"the guard layer (sdeefs-guard), since {blocked.why}", blocked)


def bpf_unavailable(config: SiteConfig, engine: Engine, ids: Identity | None,
                    guard: BpfGuard) -> Blocked | None:
    """Why the BPF guard cannot guard a login of ``engine`` (of ``ids``' user), or None."""
    if engine not in (Engine.KERNEL, Engine.HYBRID):
        return Blocked(Blocker.ENGINE, f"engine {engine} keeps the upper on the host's "
                       "filesystem, where the program would hide the user's own copied-up files")
    try:
        deny_subset(view_deny(config))
    except NotInSubset as exc:
        return Blocked(Blocker.DENY, str(exc))
    if ids is not None and len(ids.groups) > MAX_GROUPS:
        return Blocked(Blocker.GROUPS, f"uid {ids.uid} is in {len(ids.groups)} groups (the "
                       f"program holds {MAX_GROUPS})")
    return guard.unavailable()


__all__ = ["Blocked", "Blocker", "BpfGuard", "Choice", "DenyPattern", "GuardError",
           "GuardUnavailable", "Guarded", "NotInSubset", "choose", "deny_subset", "host_devs",
           "kernel_dev", "live_owners", "userns_owner"]
