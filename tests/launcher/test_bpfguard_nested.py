"""The BPF guard's keys and the user namespaces an environment nests (branch review).

Finding (failed on 279a0a8): ``bpfguard.live_owners`` counted only the owner of each
process's own user namespace.  The program guards a task by the first key it finds
walking up from the task's namespace (guard.bpf.c), so a rootless container that a
subordinate uid of the environment made is guarded by the *user's* key, while its own
namespace's owner is that subordinate uid.  With every process of the environment's own
namespace gone (an environment sharing the host's PIDs: its container outlives it),
another user's login dropped the user's key as stale and ``forget`` removed it: the
container's processes, which still hold the view, were no longer guarded."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs.config import SiteConfig
from sdeefs.identity import Identity
from sdeefs.launcher.login import bpfguard
from sdeefs.launcher.login.bpfguard import IDENTITY, BpfGuard

from .test_bpfguard import maps_unavailable, private_bpffs

# uids without passwd entries (no environment lock to look at)
OWNER, SUBORDINATE, OTHER = 61010, 61011, 61012
WAIT_FOR_MAP = ("while [ -z \"$(cat /proc/self/uid_map)\" ]; do sleep 0.01; done; "
                "exec setpriv --reuid=1 --regid=1 --clear-groups -- unshare --user -- "
                "sleep infinity")


@contextlib.contextmanager
def nested_only(owner: int, subordinate: int) -> Iterator[int]:
    """One process, in a user namespace ``subordinate`` owns, nested in one ``owner`` owns
    (which maps its 0 to ``owner`` and its 1 to ``subordinate``) that no process is in
    any more: an environment's container outliving it.  Its pid."""
    proc = subprocess.Popen(["setpriv", f"--reuid={owner}", f"--regid={owner}",
                             "--clear-groups", "--", "unshare", "--user", "--", "sh", "-c",
                             WAIT_FOR_MAP], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)
    try:
        host = os.stat("/proc/self/ns/user").st_ino
        deadline = time.monotonic() + 10
        while (outer := os.stat(f"/proc/{proc.pid}/ns/user").st_ino) == host:
            assert time.monotonic() < deadline
            assert proc.poll() is None
            time.sleep(0.01)
        for kind in ("uid", "gid"):  # written as root: both ids may be mapped
            Path(f"/proc/{proc.pid}/{kind}_map").write_text(f"0 {owner} 1\n1 {subordinate} 1\n")
        while os.stat(f"/proc/{proc.pid}/ns/user").st_ino == outer:
            assert time.monotonic() < deadline
            assert proc.poll() is None
            time.sleep(0.01)
        assert bpfguard.userns_owner(f"/proc/{proc.pid}/ns/user") == subordinate
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (user namespaces of other uids)")
def test_a_nested_namespace_keeps_the_owner_of_its_ancestors_live() -> None:
    assert OWNER not in bpfguard.live_owners()
    with nested_only(OWNER, SUBORDINATE) as pid:
        assert {OWNER, SUBORDINATE} <= bpfguard.live_owners()
        assert bpfguard.userns_owners(f"/proc/{pid}/ns/user",
                                      os.stat("/proc/self/ns/user").st_ino) \
            == {OWNER, SUBORDINATE}
    assert OWNER not in bpfguard.live_owners()


@pytest.mark.skipif(maps_unavailable() is not None, reason=maps_unavailable() or "")
@pytest.mark.expect_log("sdeefs.launcher.login.bpfguard")  # "still has processes"
def test_a_key_stays_while_a_nested_namespace_of_its_user_runs(tmp_path: Path) -> None:
    """Neither another user's login (stale keys) nor ``forget`` removes the key."""
    config = SiteConfig(run_dir=str(tmp_path / "run"))
    loader = tmp_path / "sdeefs-bpfguard"
    loader.write_bytes(b"a stand-in: its bytes are the program's version")
    with private_bpffs() as fs:
        guard = BpfGuard(str(tmp_path / "run"), pins=str(fs / "sdeefs"), loader=str(loader))
        lib = guard.lib
        devs, deny = bpfguard.host_devs(config), bpfguard.deny_subset(config.deny)
        pinned = fs / "sdeefs" / f"g-{guard.fingerprint(devs, deny)}"
        pinned.mkdir(parents=True)
        fd = lib.create(lib.BPF_MAP_TYPE_HASH, "guarded", 4, IDENTITY.size,
                        bpfguard.GUARDED_MAX)
        try:
            lib.pin(fd, str(pinned / "map_guarded"))
        finally:
            os.close(fd)
        try:
            guard.add(config, Identity(OWNER, OWNER, (), SUBORDINATE - 1, SUBORDINATE - 1,
                                       2, 1000))
            with nested_only(OWNER, SUBORDINATE):
                guard.add(config, Identity(OTHER, OTHER, (), 300000, 300000, 65536, 1000))
                assert OWNER in guard.entries(), "dropped as stale under a live container"
                assert not guard.forget(OWNER, OWNER)
                assert OWNER in guard.entries()
            assert guard.forget(OWNER, OWNER)
        finally:
            guard.detach_all()
