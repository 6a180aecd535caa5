"""The one rule of what replicas carry (sdeefs.replicable), as the door and replicas apply it."""

from __future__ import annotations

import os
import pwd
import stat
import struct

import pytest

from sdeefs import records as rec
from sdeefs.replicable import NOBODY, ids_of_user, refusal, user_ids

U, G = 4242, 4343
IDS = user_ids(U, G)


def cap(magic: int, rootid: int, size: int = 24) -> bytes:
    return struct.pack("<IIIIII", magic, 1 << 13, 0, 0, 0, rootid)[:size]


def setcap(value: bytes) -> rec.Setxattr:
    return rec.Setxattr(b"upper/f", b"security.capability", value)


@pytest.mark.parametrize("record", [
    rec.Setxattr(b"upper/f", b"user.mime", b"x"),
    rec.Setxattr(b"upper/d", b"trusted.overlay.opaque", b"y"),
    setcap(cap(0x03000001, U)),  # what `setcap cap_net_raw+ep` inside writes
    setcap(cap(0x03000000, U)),  # not effective
    rec.Removexattr(b"upper/f", b"security.capability"),  # dropping a capability is harmless
    rec.Removexattr(b"upper/f", b"user.mime"),
    rec.Mknod(b"upper/gone", stat.S_IFCHR, U, G),  # a whiteout
    rec.Mkdir(b"upper/d", 0o755, U, G),
])
def test_carried(record: rec.Record) -> None:
    assert refusal(record, IDS) is None


@pytest.mark.parametrize(("record", "why"), [
    (setcap(cap(0x03000001, U + 1)), "rootid 4243"),  # another user's
    (setcap(cap(0x03000001, 0)), "rootid 0"),  # host root
    (setcap(cap(0x02000001, 0, 20)), "20 bytes"),  # v2: host root's privileges
    (setcap(cap(0x02000001, U)), "revision"),  # v2 header, v3 size
    (setcap(cap(0x03000003, U)), "revision/flags"),  # an unknown flag
    (setcap(b""), "0 bytes"),
    (rec.Setxattr(b"upper/f", b"security.selinux", b"x"), "not replicated"),
    (rec.Setxattr(b"upper/f", b"system.posix_acl_access", b"x"), "not replicated"),
    (rec.Setxattr(b"upper/f", b"trusted.evil", b"x"), "not replicated"),
    (rec.Removexattr(b"upper/f", b"security.selinux"), "not replicated"),
    (rec.Mknod(b"upper/w", stat.S_IFCHR | 0o644, U, G), "whiteout"),
])
def test_refused(record: rec.Record, why: str) -> None:
    reason = refusal(record, IDS)
    assert reason is not None
    assert why in reason


def test_a_user_this_node_does_not_know_owns_no_capability() -> None:
    assert ids_of_user("no-such-user-sdeefs") == NOBODY
    assert refusal(setcap(cap(0x03000001, U)), NOBODY) is not None


def test_the_users_ids_come_from_the_password_database() -> None:
    pw = pwd.getpwuid(os.getuid())
    ids = ids_of_user(pw.pw_name)
    assert ids == user_ids(pw.pw_uid, pw.pw_gid)
    assert not ids.has_uid(0)  # never host root, even for root's own records
