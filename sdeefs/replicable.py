"""What every replica can apply: the one rule, for the login node's door and for replicas.

A user's journal must never hold a record that no replica will ever apply (a replica
that refuses it is a replica that differs from the user's upper: its jobs fail until it
is resynced).  So the same function decides in both places:

* at the daemon's door on the login node (``sdeefs.fs.cow``): an operation it refuses
  gets EPERM before anything is journaled;
* on every replica (``sdeefs.replication.replica``): a record it refuses is skipped and
  recorded as the user's error (the stream goes on past it), defense in depth against a
  journal written by something else.

The rule (:func:`refusal`) about extended attributes:

* ``user.*`` and the overlay's own ``trusted.overlay.*``: carried;
* ``security.capability``: set only as a v3 file capability (``struct vfs_ns_cap_data``,
  below) whose rootid is one of the user's own host ids (:class:`UserIds`); removing one
  is always carried.  Such a capability grants nothing beyond what that id has in its
  own user namespace, which is exactly what the environment's and a job's namespaces
  are: ``setcap`` inside writes it (the kernel converts whatever the caller wrote into
  v3 with the namespace's root as rootid).  A v2 capability (rootid 0: real host root
  privileges) or a foreign rootid is refused;
* anything else (``security.*``, ``system.*``, other ``trusted.*``): refused.

And about nodes: a character device is carried only as a whiteout (rdev 0/0 is what
``sdeefs.records`` decodes at all), with mode 0.

``security.capability`` v3 value (``linux/capability.h``, little endian, 24 bytes)::

    magic_etc     u32  revision 0x03000000 | flags (VFS_CAP_FLAGS_EFFECTIVE = 1, no other)
    permitted     u32  \\ data[0]
    inheritable   u32  /
    permitted     u32  \\ data[1]
    inheritable   u32  /
    rootid        u32  the host uid of the user namespace root the capability is for
"""

from __future__ import annotations

import pwd
import stat
import struct

import attrs

from . import identity
from . import records as rec
from .identity import Identity, SubidError

CARRIED_XATTR_PREFIXES = (b"user.", b"trusted.overlay.")
CAPABILITY = b"security.capability"
VFS_NS_CAP = struct.Struct("<IIIIII")
assert VFS_NS_CAP.size == 24
VFS_CAP_REVISION_MASK = 0xFF000000
VFS_CAP_REVISION_3 = 0x03000000
VFS_CAP_FLAGS_EFFECTIVE = 0x000001


@attrs.frozen
class UserIds:
    """The host ids a user's files and processes can have: the user's own, no one else's.

    Attributes:
        uids: ranges of host uids (the user's uid, its subordinate uids: docs/identity.md).
        gids: ranges of host gids (its groups, its subordinate gids).
    """

    uids: tuple[range, ...] = ()
    gids: tuple[range, ...] = ()

    def has_uid(self, uid: int) -> bool:
        return uid != 0 and any(uid in r for r in self.uids)

    def has_gid(self, gid: int) -> bool:
        return gid != 0 and any(gid in r for r in self.gids)


NOBODY = UserIds()  # a user this node does not know: nothing is theirs


def user_ids(uid: int, gid: int) -> UserIds:
    """The user's own ids alone: {uid} and {gid} (a user without subordinate ranges)."""
    return UserIds((range(uid, uid + 1),), (range(gid, gid + 1),))


def of_identity(ids: Identity) -> UserIds:
    """Every id of the user in an environment (docs/identity.md): its uid and its
    subordinate uids; its primary and supplementary groups and its subordinate gids."""
    return UserIds((range(ids.uid, ids.uid + 1), range(ids.subuid, ids.subuid + ids.count)),
                   (range(ids.gid, ids.gid + 1), *(range(g, g + 1) for g in ids.groups),
                    range(ids.subgid, ids.subgid + ids.count)))


def ids_of_user(name: str) -> UserIds:
    """The ids of the user called ``name`` on this node (NOBODY if unknown): from its own
    passwd, group, /etc/subuid and /etc/subgid, never allocated (they must be the login
    node's; a user without ranges here has its own ids alone, and the records of its
    subordinate ids are refused, naming those files)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return NOBODY
    try:
        return of_identity(identity.of_user(name, 0, allocate=False))
    except SubidError:
        return user_ids(pw.pw_uid, pw.pw_gid)


def capability_refusal(value: bytes, ids: UserIds) -> str | None:
    """Why a ``security.capability`` value may not be carried (None: it may)."""
    if len(value) != VFS_NS_CAP.size:
        return f"a file capability of {len(value)} bytes (only v3, rootid the user's own)"
    magic, *_, rootid = VFS_NS_CAP.unpack(value)
    if magic & VFS_CAP_REVISION_MASK != VFS_CAP_REVISION_3 \
            or magic & ~VFS_CAP_REVISION_MASK & ~VFS_CAP_FLAGS_EFFECTIVE:
        return f"a file capability of revision/flags {magic:#x} (only v3)"
    if not ids.has_uid(rootid):
        return f"a file capability for rootid {rootid}, not one of the user's ids"
    return None


def refusal(record: rec.Record, ids: UserIds) -> str | None:
    """Why ``record`` is not carried to replicas (None: it is), for the user of ``ids``.

    A ``Create`` is judged as the records it means (``records.Create.expand``): the first
    of them refused says why (a replica applies the others: ``snapshot.apply_from_peer``)."""
    if isinstance(record, rec.Create):
        for part, _ in record.expand():
            reason = refusal(part, ids)
            if reason is not None:
                return reason
        return None
    if isinstance(record, rec.Setxattr | rec.Removexattr):
        name = record.name
        if name.startswith(CARRIED_XATTR_PREFIXES):
            return None
        if name == CAPABILITY:
            if isinstance(record, rec.Removexattr):
                return None
            return capability_refusal(record.value, ids)
        return f"xattr {name[:64]!r} is not replicated"
    if isinstance(record, rec.Mknod) and stat.S_ISCHR(record.mode) and record.mode & 0o7777:
        return "a whiteout must have mode 0"
    return owner_refusal(record, ids)


def owner_refusal(record: rec.Record, ids: UserIds) -> str | None:
    """Owners (docs/identity.md): a record may give an entry only the user's own ids.  Not
    checked for a user the node does not know (NOBODY: no job of theirs runs here), nor
    for whiteouts (0/0: their owner means nothing) and copy-ups staged in ``work/`` as
    0/0 before their chown."""
    if ids is NOBODY or not isinstance(record, rec.Mkdir | rec.Mknod | rec.Symlink |
                                       rec.Setattr):
        return None
    if isinstance(record, rec.Setattr) and not record.mask & rec.SET_OWNER:
        return None
    if isinstance(record, rec.Mknod) and (record.uid, record.gid) == (0, 0) and (
            stat.S_ISCHR(record.mode) or record.path.startswith(b"work/")):
        return None
    if ids.has_uid(record.uid) and ids.has_gid(record.gid):
        return None
    return (f"owner uid {record.uid} / gid {record.gid} is not one of the user's ids on this "
            "node (are /etc/subuid and /etc/subgid the same as on the login node?)")
