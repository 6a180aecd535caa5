"""The 3-way merge of dpkg's status files (launcher/dpkgmerge.py), without a mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdeefs.launcher.dpkgmerge import (
    MAX_BYTES,
    Database,
    Unmergeable,
    differences,
    merge,
    merge_layer,
)


def stanza(package: str, version: str = "1.0", status: str = "install ok installed",
           arch: str = "amd64") -> bytes:
    return (f"Package: {package}\nStatus: {status}\nArchitecture: {arch}\n"
            f"Version: {version}\nDescription: {package}\n the long\n .\n description\n"
            ).encode()


def db(*stanzas: bytes) -> bytes:
    return b"".join(s + b"\n" for s in stanzas)


def names(data: bytes) -> dict[str, bytes]:
    return {k[0].decode(): v for k, v in Database.parse(data).paragraphs.items()}


def test_the_user_keeps_their_packages_and_gets_the_admins() -> None:
    origin = db(stanza("bash"), stanza("old"), stanza("sl", "1"), stanza("curl"))
    host = db(stanza("bash", "2"),                 # the admin upgraded bash
              stanza("sl", "2"),                   # and sl, which the user removed
              stanza("curl"),                      # the admin removed old
              stanza("hello"))                     # and installed hello
    user = db(stanza("bash"), stanza("old"),
              stanza("sl", "1", "deinstall ok config-files"),
              stanza("curl", "1.0", "hold ok installed"),  # the user holds curl
              stanza("mine"))                      # and installed their own
    merged = names(merge(origin, host, user))
    assert sorted(merged) == ["bash", "curl", "hello", "mine", "sl"]
    assert b"Version: 2" in merged["bash"]
    assert b"deinstall ok config-files" in merged["sl"]
    assert b"hold ok installed" in merged["curl"]
    assert merged["hello"] == stanza("hello").rstrip(b"\n")
    assert merged["mine"] == stanza("mine").rstrip(b"\n")


def test_a_purge_by_the_user_stays_and_one_by_the_admin_reaches_the_user() -> None:
    origin = db(stanza("a"), stanza("b"))
    merged = names(merge(origin, host=db(stanza("a")), user=db(stanza("b"))))
    assert merged == {}


def test_nothing_changed_is_the_identity_and_the_merge_is_idempotent() -> None:
    origin = db(stanza("a"), stanza("b"))
    host = db(stanza("a", "2"), stanza("b"), stanza("c"))
    user = db(stanza("a"), stanza("b", "3"))
    once = merge(origin, host, user)
    # a start that crashed before it stored the new origin merges again: the same result
    assert merge(origin, host, once) == once
    assert merge(host, host, once) == once
    assert merge(origin, origin, Database.parse(user).render()) == Database.parse(user).render()


def test_architectures_are_packages_of_their_own() -> None:
    origin = db(stanza("libc6", arch="amd64"))
    host = db(stanza("libc6", "2", arch="amd64"), stanza("libc6", "2", arch="i386"))
    user = db(stanza("libc6", arch="amd64"), stanza("libfoo", arch="i386"))
    keys = sorted(Database.parse(merge(origin, host, user)).paragraphs)
    assert keys == [(b"libc6", b"amd64"), (b"libc6", b"i386"), (b"libfoo", b"i386")]


@pytest.mark.parametrize("bad", [
    b"Status: install ok installed\nVersion: 1\n\n",       # no Package
    db(stanza("a"), stanza("a")),                           # twice
    b"x" * (MAX_BYTES + 1),                                 # too big
])
def test_a_hostile_user_file_is_refused_not_merged(bad: bytes) -> None:
    with pytest.raises(Unmergeable):
        merge(db(stanza("a")), db(stanza("a")), bad)


def test_differences_list_the_users_packages() -> None:
    host = db(stanza("a"), stanza("b"), stanza("c"))
    user = db(stanza("a"), stanza("b", "2"), stanza("d"))
    assert [c.line() for c in differences(host, user)] == ["C b:amd64", "D c:amd64",
                                                            "A d:amd64"]


def _layer(tmp_path: Path) -> tuple[Path, Path, Path]:
    lower, upper, origins = tmp_path / "lower", tmp_path / "upper", tmp_path / "origins"
    (lower / "var/lib/dpkg").mkdir(parents=True)
    upper.mkdir()
    return lower, upper, origins


def test_merge_layer_records_the_origin_and_merges_later_admin_changes(tmp_path: Path) -> None:
    lower, upper, origins = _layer(tmp_path)
    host = lower / "var/lib/dpkg/status"
    host.write_bytes(db(stanza("a")))
    # no copy of the user's yet: only the origin is recorded
    assert merge_layer(str(lower), str(upper), str(upper), str(origins)) == []
    assert (origins / "status.origin").read_bytes() == db(stanza("a"))
    assert not (upper / "var").exists()
    # the user installs "mine" (their dpkg copies the file up); the admin installs "b"
    own = upper / "var/lib/dpkg/status"
    own.parent.mkdir(parents=True)
    own.write_bytes(db(stanza("a"), stanza("mine")))
    os.chmod(own, 0o644)
    os.chown(own, 4321, 4322)
    host.write_bytes(db(stanza("a"), stanza("b")))
    assert merge_layer(str(lower), str(upper), str(upper), str(origins)) == ["status"]
    assert sorted(names(own.read_bytes())) == ["a", "b", "mine"]
    st = own.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (4321, 4322, 0o644)
    assert (origins / "status.origin").read_bytes() == host.read_bytes()
    assert sorted(p.name for p in own.parent.iterdir()) == ["status"]  # no temporary left


def test_merge_layer_follows_no_symbolic_link_of_the_user(tmp_path: Path) -> None:
    lower, upper, origins = _layer(tmp_path)
    (lower / "var/lib/dpkg/status").write_bytes(db(stanza("a"), stanza("b")))
    (origins).mkdir()
    (origins / "status.origin").write_bytes(db(stanza("a")))
    target = tmp_path / "precious"
    target.write_bytes(db(stanza("a")))
    (upper / "var/lib/dpkg").mkdir(parents=True)
    (upper / "var/lib/dpkg/status").symlink_to(target)
    assert merge_layer(str(lower), str(upper), str(upper), str(origins)) == []
    assert target.read_bytes() == db(stanza("a"))
    # nor a symbolic link among the directories
    (upper / "var/lib/dpkg/status").unlink()
    (upper / "var/lib/dpkg").rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "status").write_bytes(db(stanza("a")))
    (upper / "var/lib/dpkg").symlink_to(elsewhere)
    assert merge_layer(str(lower), str(upper), str(upper), str(origins)) == []
    assert (elsewhere / "status").read_bytes() == db(stanza("a"))
