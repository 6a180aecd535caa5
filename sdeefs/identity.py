"""A user's identities inside an environment: the id maps, the id set, subordinate ranges.

The model (docs/identity.md).  User U has host uid ``u``, primary gid ``g`` and
supplementary groups; ``S``/``T`` are U's subordinate uid/gid ranges of ``count``
(N >= 65536) ids, from ``/etc/subuid`` and ``/etc/subgid`` (allocated when missing, as
useradd does: :func:`subordinate_range`).

* The environment's user namespace (login and jobs) maps inside ``0..N-1`` to host
  ``S..S+N-1``, except inside ``u`` -> host ``u``; gids likewise with ``g``/``T``, plus
  every supplementary group G of U as itself (carved out of the subordinate line when
  G < N).  Inside root is host ``S``: never host root, never U.
* The idmapped lower (the host root seen from inside) maps host ids below ``system``
  (the site's ``min_uid``) to ``S..`` (gids to ``T..``), ``u``/``g``/U's groups to
  themselves, and nothing else: other users' files show as nobody, and inside root has
  no override on them.
* What may land in U's upper and replicas (:meth:`Identity.owns_uid`, ``owns_gid``):
  ``u``, ``S..S+N-1``; ``g``, U's groups, ``T..T+N-1``.

Host id 0 is never mapped to anything but a subordinate id: a group 0 among U's
supplementary groups is left out (it would make inside gid 0 host gid 0).

Map lines are ``(inside, host, count)`` triples, as ``/proc/PID/uid_map`` reads them
(and as ``sdeefs-enter --uid-map`` takes them: "INSIDE:HOST:COUNT,...").
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
import threading
import time
from collections.abc import Iterable, Iterator

import attrs

from .errors import ExitCode, QuietError

SUBUID = "/etc/subuid"
SUBGID = "/etc/subgid"
LOGIN_DEFS = "/etc/login.defs"
MIN_COUNT = 65536  # what the map needs: every 16-bit id a distribution uses inside
MAX_MAP_LINES = 340  # the kernel's limit for uid_map/gid_map (since 4.15)
LOCK_TIMEOUT = 15.0  # seconds to wait for shadow's lock on /etc/subuid (as its tools do)

MapLine = tuple[int, int, int]  # (inside first, host first, count)


class SubidError(QuietError):
    """A subordinate range is missing, too small or cannot be allocated."""


@attrs.frozen
class Identity:
    """U's ids and subordinate ranges; everything the maps and the id set derive from."""

    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups (without g, without 0)
    subuid: int  # S
    subgid: int  # T
    count: int  # N
    system: int  # host ids below this are the system's (the site's min_uid)

    @classmethod
    def build(cls, uid: int, gid: int, groups: Iterable[int], subuid: tuple[int, int],
              subgid: tuple[int, int], system: int) -> Identity:
        """From the pieces; refuses ranges that are too small or overlap U's own ids."""
        count = min(subuid[1], subgid[1])
        if count < MIN_COUNT:
            raise SubidError(f"the subordinate ranges of uid {uid} hold {count} ids; "
                             f"environments need {MIN_COUNT} (/etc/subuid, /etc/subgid)",
                             ExitCode.UNAVAILABLE)
        own = sorted({g for g in groups if g not in (0, gid)})
        for what, first, ids in (("uid", subuid[0], (uid,)), ("gid", subgid[0], (gid, *own))):
            if first == 0 or any(first <= i < first + count for i in ids):
                raise SubidError(f"the subordinate {what} range {first}-{first + count - 1} of "
                                 f"uid {uid} holds id 0 or one of the user's own ids",
                                 ExitCode.UNAVAILABLE)
        if len(own) + 3 > MAX_MAP_LINES // 2:
            raise SubidError(f"uid {uid} is in {len(own)} groups; an environment maps at most "
                             f"{MAX_MAP_LINES // 2 - 3}", ExitCode.UNAVAILABLE)
        return cls(uid, gid, tuple(own), subuid[0], subgid[0], count, system)

    # -- the environment's user namespace --------------------------------------------------

    def env_uid_map(self) -> list[MapLine]:
        return _carved(self.subuid, self.count, (self.uid,))

    def env_gid_map(self) -> list[MapLine]:
        return _carved(self.subgid, self.count, (self.gid, *self.groups))

    # -- the idmapped lower ------------------------------------------------------------------

    def lower_uid_map(self) -> list[MapLine]:
        """On-disk uid -> host uid the view shows (then seen through the env map)."""
        return _carved(self.subuid, min(self.system, self.count), (self.uid,))

    def lower_gid_map(self) -> list[MapLine]:
        return _carved(self.subgid, min(self.system, self.count), (self.gid, *self.groups))

    def shown_uid(self, uid: int) -> int:
        """A host file's uid as the idmapped lower shows it, in host terms (an id the lower
        does not map keeps its own: it is not mapped in the environment either)."""
        return self.subuid + uid if uid < min(self.system, self.count) and uid != self.uid \
            else uid

    def shown_gid(self, gid: int) -> int:
        if gid == self.gid or gid in self.groups:
            return gid
        return self.subgid + gid if gid < min(self.system, self.count) else gid

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        return self.shown_uid(uid), self.shown_gid(gid)

    @property
    def root(self) -> tuple[int, int]:
        """Inside root, in host ids."""
        return self.subuid, self.subgid

    # -- the id set ----------------------------------------------------------------------------

    def owns_uid(self, uid: int) -> bool:
        """May a file of U's layer, or a record of U's journal, carry this host uid?"""
        return uid == self.uid or self.subuid <= uid < self.subuid + self.count

    def owns_gid(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups or \
            self.subgid <= gid < self.subgid + self.count

    # -- the guard's rule ----------------------------------------------------------------------

    def host_readable(self, st: os.stat_result) -> bool:
        """Could U read this entry on the host (list *and* search it, for a directory)?

        Owner, group and other bits are checked as the kernel would for U (only the
        first class that applies counts); a symlink is always readable.  U's subordinate
        ids count as U's own (:meth:`owns_uid`, :meth:`owns_gid`): U is each of them in a
        namespace of its own (root inside is one), so an entry they own is U's business,
        as the files root inside makes in U's home or a rootless container's layers are.
        """
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            return True
        need = 0o5 if stat.S_ISDIR(mode) else 0o4
        if self.owns_uid(st.st_uid):
            bits = mode >> 6
        elif self.owns_gid(st.st_gid):
            bits = mode >> 3
        else:
            bits = mode
        return bits & need == need


def _carved(first: int, count: int, identities: Iterable[int]) -> list[MapLine]:
    """Inside 0..count-1 -> host first.., except each of ``identities`` -> itself."""
    lines: list[MapLine] = []
    start = 0
    for i in sorted(set(identities)):
        if i < count:
            if i > start:
                lines.append((start, first + start, i - start))
            start = i + 1
    if start < count:
        lines.append((start, first + start, count - start))
    lines += [(i, i, 1) for i in sorted(set(identities))]
    return lines


def format_map(lines: Iterable[MapLine]) -> str:
    """``sdeefs-enter``'s --uid-map/--gid-map argument."""
    return ",".join(f"{a}:{b}:{c}" for a, b, c in lines)


# -- /etc/subuid and /etc/subgid -----------------------------------------------------------


@attrs.frozen
class SubidRules:
    """Where and how ranges are allocated: shadow's SUB_UID_MIN/MAX/COUNT (or GID)."""

    path: str
    minimum: int = 100000
    maximum: int = 600100000
    count: int = MIN_COUNT

    @classmethod
    def from_login_defs(cls, path: str, kind: str, login_defs: str = LOGIN_DEFS) -> SubidRules:
        """``kind`` is "UID" or "GID"; missing keys keep shadow's defaults."""
        values: dict[str, int] = {}
        with contextlib.suppress(FileNotFoundError), open(login_defs) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].startswith(f"SUB_{kind}_"):
                    with contextlib.suppress(ValueError):
                        values[parts[0]] = int(parts[1], 0)
        return cls(path, values.get(f"SUB_{kind}_MIN", 100000),
                   values.get(f"SUB_{kind}_MAX", 600100000),
                   max(MIN_COUNT, values.get(f"SUB_{kind}_COUNT", MIN_COUNT)))


def _parse(text: str) -> list[tuple[str, int, int]]:
    """(owner as written, first, count) of each well-formed line; others are skipped, as
    shadow's tools skip them."""
    found = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            found.append((parts[0], int(parts[1]), int(parts[2])))
    return found


def _find(entries: list[tuple[str, int, int]], name: str, uid: int) -> tuple[int, int] | None:
    """The user's first range of at least MIN_COUNT ids (by name or by uid, as newuidmap
    accepts both)."""
    for owner, first, count in entries:
        if owner in (name, str(uid)) and count >= MIN_COUNT:
            return first, count
    return None


def lookup_range(path: str, name: str, uid: int) -> tuple[int, int] | None:
    try:
        with open(path) as f:
            return _find(_parse(f.read()), name, uid)
    except FileNotFoundError:
        return None


def subordinate_range(rules: SubidRules, name: str, uid: int, allocate: bool) -> tuple[int, int]:
    """The user's (first, count) in ``rules.path``; with ``allocate``, the next free range
    of ``rules.count`` ids at or above ``rules.minimum`` is added when there is none (under
    shadow's lock, so that useradd and usermod running meanwhile do not collide)."""
    found = lookup_range(rules.path, name, uid)
    if found is not None:
        return found
    if not allocate:
        raise SubidError(f"{name} has no subordinate range of {MIN_COUNT} ids in {rules.path} "
                         "(it must be the same on every node: docs/identity.md)",
                         ExitCode.UNAVAILABLE)
    with _shadow_lock(rules.path):
        try:
            with open(rules.path) as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        entries = _parse(text)
        found = _find(entries, name, uid)
        if found is not None:
            return found
        first = _free_range(entries, rules)
        line = f"{name}:{first}:{rules.count}\n"
        _replace(rules.path, text + ("" if not text or text.endswith("\n") else "\n") + line)
        return first, rules.count


def _free_range(entries: list[tuple[str, int, int]], rules: SubidRules) -> int:
    """The lowest start >= minimum whose ``count`` ids overlap no range (shadow's rule)."""
    first = rules.minimum
    for _, start, count in sorted(entries, key=lambda e: e[1]):
        if start + count <= first:
            continue
        if start >= first + rules.count:
            break
        first = start + count
    if first + rules.count - 1 > rules.maximum:
        raise SubidError(f"no free subordinate range of {rules.count} ids below {rules.maximum} "
                         f"in {rules.path}", ExitCode.UNAVAILABLE)
    return first


@contextlib.contextmanager
def _shadow_lock(path: str) -> Iterator[None]:
    """shadow's lock of ``path`` (commonio): ``PATH.lock`` made by link(2) from a file
    holding our pid; a lock whose pid is gone is stale and removed."""
    # shadow names its file PATH.PID; the thread too here: sdeefs-launchd's workers may
    # allocate for two users at once
    lock, mine = f"{path}.lock", f"{path}.{os.getpid()}.{threading.get_native_id()}"
    with open(mine, "w") as f:
        f.write(str(os.getpid()))
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                os.link(mine, lock)
                break
            except FileExistsError:
                if _stale(lock):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(lock)
                    continue
                if time.monotonic() > deadline:
                    raise SubidError(f"{lock} is held by another process (useradd?); try again",
                                     ExitCode.BUSY) from None
                time.sleep(0.05)
    finally:
        os.unlink(mine)
    try:
        yield
    finally:
        os.unlink(lock)


def _stale(lock: str) -> bool:
    try:
        with open(lock) as f:
            pid = int(f.read().strip() or "0")
    except (FileNotFoundError, ValueError):
        return True
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _replace(path: str, text: str) -> None:
    """Write ``path`` anew (mode 0644, root's), atomically, as shadow's tools do."""
    tmp = f"{path}+"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, 0o644)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


# -- a user's identity ----------------------------------------------------------------------


def user_groups(name: str, gid: int) -> tuple[int, ...]:
    """U's supplementary groups as the group database says (initgroups' list)."""
    try:
        return tuple(g for g in os.getgrouplist(name, gid) if g != gid)
    except OSError:
        return ()


def of_user(name: str, system: int, allocate: bool, subuid: str = SUBUID,
            subgid: str = SUBGID, login_defs: str = LOGIN_DEFS) -> Identity:
    """The identity of the passwd user ``name``; its ranges allocated if ``allocate`` (the
    login node; compute nodes only read them: they must be the same everywhere)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise QuietError(f"no such user: {name}", ExitCode.USAGE) from None
    ranges = []
    for path, kind in ((subuid, "UID"), (subgid, "GID")):
        rules = SubidRules.from_login_defs(path, kind, login_defs)
        ranges.append(subordinate_range(rules, pw.pw_name, pw.pw_uid, allocate))
    return Identity.build(pw.pw_uid, pw.pw_gid, user_groups(pw.pw_name, pw.pw_gid),
                          ranges[0], ranges[1], system)


__all__ = ["Identity", "MapLine", "SubidError", "SubidRules", "format_map", "lookup_range",
           "of_user", "subordinate_range", "user_groups"]
