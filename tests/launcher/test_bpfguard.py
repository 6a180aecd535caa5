"""The BPF LSM guard's root side (launcher/login/bpfguard.py) on this machine.

This VM's kernel refuses every BPF trampoline program (bench/RESULTS.md), so here the
program never attaches: these tests check what runs without it, for real (the choice and
its reasons through the front door, the maps' layouts against guard.h compiled, the map
calls on real pinned maps in a private bpffs, an explicit ``guard = "bpf"`` failing the
login).  What the program hides is tested in a guest whose kernel loads it:
``bench/lsmguard/vm.py product`` (bench/lsmguard/test_product.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs.config import DEFAULT_DENY, SiteConfig
from sdeefs.identity import Identity
from sdeefs.launcher.login import bpfguard
from sdeefs.launcher.login.bpfguard import (
    DENY_PATTERN,
    IDENTITY,
    BpfGuard,
    DenyPattern,
    Guarded,
    NotInSubset,
)

from .launcher_site import VENV_BIN, Site, open_site, requires_launcher

GUARD_H = Path(__file__).resolve().parents[2] / "launcher" / "login" / "bpf" / "guard.h"


# -- the deny subset and the layouts (no kernel needed) ---------------------------------------


def test_the_default_deny_list_is_in_the_subset() -> None:
    parsed = bpfguard.deny_subset(DEFAULT_DENY)
    assert len(parsed) == len(DEFAULT_DENY)
    key = DenyPattern.parse("/etc/ssh/ssh_host_*_key")
    assert key == DenyPattern(b"/etc/ssh/ssh_host_", b"_key", True)
    assert DenyPattern.parse("/etc/munge/") == DenyPattern(b"/etc/munge", b"", False)
    # the layout guard.bpf.c's matcher expects: prefix zero-filled, suffix right-aligned
    prefix_len, suffix_len, star, prefix, suffix = DENY_PATTERN.unpack(key.encode())
    assert (prefix_len, suffix_len, star) == (18, 4, 1)
    assert prefix == b"/etc/ssh/ssh_host_".ljust(bpfguard.DENY_LEN, b"\0")
    assert suffix == b"_key".rjust(bpfguard.SUFFIX_LEN, b"\0")


@pytest.mark.parametrize(("pattern", "why"), [
    ("/etc/ssh/ssh_host_?sa_key", "only `*`"),
    ("/etc/*/ssh_host_*_key", "more than one"),
    ("/etc/*/secret", "not in the last component"),
    ("/etc/[ab]", "only `*`"),
    ("etc/shadow", "not an absolute path"),
    ("/" + "x" * 200, "bytes before"),
    ("/etc/a*" + "b" * 40, "bytes after"),
])
def test_patterns_outside_the_subset_are_refused_with_the_reason(pattern: str, why: str) -> None:
    with pytest.raises(NotInSubset, match=why) as caught:
        bpfguard.deny_subset(("/etc/shadow", pattern))
    assert caught.value.pattern == pattern
    with pytest.raises(NotInSubset, match="more than 16"):
        bpfguard.deny_subset([f"/p{i}" for i in range(17)])


LAYOUT_PROBE = r"""
#include <stddef.h>
#include <stdio.h>
#include <linux/types.h>
#include "guard.h"
int main(void)
{
    struct identity id = {.uid = 1000, .gid = 100, .ngroups = 2, .subuid = 231072,
                          .subgid = 231073, .count = 65536, .groups = {27, 44}};
    const unsigned char *b = (const unsigned char *)&id;
    printf("%zu %zu %zu %zu %zu %zu %zu %zu\n", sizeof(struct identity),
           offsetof(struct identity, uid), offsetof(struct identity, gid),
           offsetof(struct identity, ngroups), offsetof(struct identity, subuid),
           offsetof(struct identity, subgid), offsetof(struct identity, count),
           offsetof(struct identity, groups));
    printf("%zu %zu %zu %zu %zu %zu\n", sizeof(struct deny_pattern),
           offsetof(struct deny_pattern, prefix_len), offsetof(struct deny_pattern, suffix_len),
           offsetof(struct deny_pattern, star), offsetof(struct deny_pattern, prefix),
           offsetof(struct deny_pattern, suffix));
    printf("%d %d %d %d %d %d\n", MAX_GROUPS, GUARDED_MAX, DEVS_MAX, DENY_MAX, DENY_LEN,
           SUFFIX_LEN);
    for (size_t i = 0; i < sizeof(id); i++)
        printf("%02x", b[i]);
    printf("\n");
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc to compile guard.h")
def test_the_values_python_writes_match_guard_h(tmp_path: Path) -> None:
    """IDENTITY and DENY_PATTERN (struct) are guard.h's structs: sizes, offsets, limits,
    and the bytes of one identity as C lays it out."""
    source = tmp_path / "probe.c"
    source.write_text(LAYOUT_PROBE)
    subprocess.run(["gcc", "-Wall", "-Werror", f"-I{GUARD_H.parent}", "-o",
                    str(tmp_path / "probe"), str(source)], check=True, capture_output=True)
    out = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True,
                         text=True).stdout
    identity, deny, limits, raw = out.split("\n")[:4]
    groups = 4 * bpfguard.MAX_GROUPS
    assert identity.split() == [str(IDENTITY.size), "0", "4", "8", "12", "16", "20", "24"]
    assert IDENTITY.size == 24 + groups
    assert deny.split() == [str(DENY_PATTERN.size), "0", "4", "8", "12",
                            str(12 + bpfguard.DENY_LEN)]
    assert [int(n) for n in limits.split()] == [
        bpfguard.MAX_GROUPS, bpfguard.GUARDED_MAX, bpfguard.DEVS_MAX, bpfguard.DENY_MAX,
        bpfguard.DENY_LEN, bpfguard.SUFFIX_LEN]
    written = Guarded(1000, 100, (27, 44), 231072, 231073, 65536)
    assert bytes.fromhex(raw) == written.encode()
    assert Guarded.decode(bytes.fromhex(raw)) == written


# -- the maps, pinned in a private bpffs (maps load here; programs do not) ---------------------


@contextlib.contextmanager
def private_bpffs() -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="sdeefs-bpffs-", dir="/var/tmp"))
    subprocess.run(["mount", "-t", "bpf", "bpf", str(where)], check=True, capture_output=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
        where.rmdir()


@contextlib.contextmanager
def holder(uid: int) -> Iterator[int]:
    """A user namespace owned by ``uid`` with a process in it (ended by its pid); its inode."""
    proc = subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                             "--", "unshare", "--user", "--", "sleep", "infinity"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        host = os.stat("/proc/self/ns/user").st_ino
        deadline = time.monotonic() + 10
        while (ino := os.stat(f"/proc/{proc.pid}/ns/user").st_ino) == host:
            assert time.monotonic() < deadline
            assert proc.poll() is None
            time.sleep(0.01)
        assert bpfguard.userns_owner(f"/proc/{proc.pid}/ns/user") == uid
        yield ino
    finally:
        proc.kill()
        proc.wait()


def maps_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (bpffs, BPF maps)"
    try:
        bpfguard.Libbpf()
    except bpfguard.GuardError as exc:
        return str(exc)
    return None


def handmade_set(guard: BpfGuard, config: SiteConfig, *keys: int) -> Path:
    """The pinned set a login of ``config`` would find (its maps only, made by hand: the
    loader's programs do not load on this kernel), holding ``keys``."""
    devs, deny = bpfguard.host_devs(config), bpfguard.deny_subset(config.deny)
    pinned = Path(guard.pins) / f"g-{guard.fingerprint(devs, deny)}"
    pinned.mkdir(parents=True)
    lib = guard.lib
    fd = lib.create(lib.BPF_MAP_TYPE_HASH, "guarded", 4, IDENTITY.size, bpfguard.GUARDED_MAX)
    try:
        lib.pin(fd, str(pinned / "map_guarded"))
        for key in keys:
            lib.update(fd, bpfguard.KEY.pack(key), Guarded(key, key, ()).encode())
    finally:
        os.close(fd)
    return pinned


@pytest.mark.skipif(maps_unavailable() is not None, reason=maps_unavailable() or "")
@pytest.mark.expect_log("sdeefs.launcher.login.bpfguard")  # "still has processes"
def test_add_forget_and_stale_keys_on_the_pinned_map(tmp_path: Path) -> None:
    """The set a login finds pinned (made here by hand, the maps only: the loader's
    programs do not load on this kernel) gets the user's key; stale keys (no process in a
    namespace that uid owns, no environment being set up) go when the map is written;
    forget removes only a key held for that uid, and never while a namespace of that uid
    has processes."""
    config = SiteConfig(run_dir=str(tmp_path / "run"))
    loader = tmp_path / "sdeefs-bpfguard"
    loader.write_bytes(b"a stand-in: its bytes are the program's version")
    alice, bob, gone = 61000, 61001, 61002  # uids without passwd entries: no lock to look at
    with private_bpffs() as fs:
        guard = BpfGuard(str(tmp_path / "run"), pins=str(fs / "sdeefs"), loader=str(loader))
        lib = guard.lib
        pinned = handmade_set(guard, config)
        assert gone not in bpfguard.live_owners()
        with bpfguard.opened(lib, str(pinned / "map_guarded")) as fd:
            lib.update(fd, bpfguard.KEY.pack(gone), Guarded(gone, gone, ()).encode())
        ids = Identity(alice, alice, (27,), 100000, 100000, 65536, 1000)
        assert guard.add(config, ids) == alice  # before its namespace exists: a login's order
        # gone's dropped
        assert guard.entries() == {alice: Guarded(alice, alice, (27,), 100000, 100000, 65536)}
        with holder(alice), holder(bob):
            assert guard.guarding(alice, alice)
            assert not guard.guarding(alice, bob)
            guard.add(config, Identity(bob, bob, (), 200000, 200000, 65536, 1000))
            assert set(guard.entries()) == {alice, bob}  # both live: nothing stale
            assert not guard.forget(bob, alice)  # held for another uid: left alone
            assert not guard.forget(alice, alice)  # a namespace of alice's still runs
            assert set(guard.entries()) == {alice, bob}
        # the processes are gone: forget removes the key of that uid, and only that one
        assert guard.forget(alice, alice)
        assert not guard.forget(alice, alice)
        assert set(guard.entries()) == {bob}
        with pytest.raises(bpfguard.GuardError, match="root owns"):
            guard.add(config, Identity(0, 0, (), 300000, 300000, 65536, 1000))
        guard.detach_all()
        assert guard.sets() == []


@pytest.mark.skipif(maps_unavailable() is not None, reason=maps_unavailable() or "")
def test_unload_guard_keeps_a_set_while_it_guards_someone(tmp_path: Path) -> None:
    """``sdeefs unload-guard`` (what ``install.sh --uninstall`` runs): while a guarded uid
    has a process in a user namespace it owns, one line naming it, exit 4, the set stays;
    once none has, every set is unpinned (also one a load left half-way)."""
    run = tmp_path / "run"
    conf = tmp_path / "sdeefs.toml"
    conf.write_text(f'[sdeefs]\nrun_dir = "{run}"\n')
    loader = tmp_path / "sdeefs-bpfguard"
    loader.write_bytes(b"a stand-in: its bytes are the program's version")
    alice = 61010
    with private_bpffs() as fs:
        pins = fs / "sdeefs"
        guard = BpfGuard(str(run), pins=str(pins), loader=str(loader))
        pinned = handmade_set(guard, SiteConfig(run_dir=str(run)), alice)
        (pins / "new-g-0123456789abcdef").mkdir()  # a load that died before its rename
        env = {**os.environ, "SDEEFS_CONFIG": str(conf), "SDEEFS_BPF_PINS": str(pins),
               "SDEEFS_BPFGUARD_BIN": str(loader)}

        def unload() -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(VENV_BIN / "sdeefs"), "unload-guard"], env=env,
                                  capture_output=True, text=True, timeout=60)

        with holder(alice):
            kept = unload()
            assert kept.returncode == 4, kept
            assert kept.stderr.count("\n") == 1, kept.stderr
            assert "uid 61010" in kept.stderr
            assert (pinned / "map_guarded").exists()
        done = unload()
        assert done.returncode == 0, done
        assert "2 pinned set(s) removed" in done.stdout
        assert not pins.exists()
        again = unload()
        assert (again.returncode, again.stdout.strip()) == (0, "no BPF guard is loaded")


MAPS_ONLY_LOADER = """#!{python}
# A stand-in for `sdeefs-bpfguard attach DIR N` where programs do not load: the set's maps.
import os, sys
from sdeefs.launcher.login import bpfguard as g
assert sys.argv[1] == "attach"
lib, where = g.Libbpf(), sys.argv[2]
os.makedirs(where)
for name, kind, value, entries in (
        ("guarded", lib.BPF_MAP_TYPE_HASH, g.IDENTITY.size, g.GUARDED_MAX),
        ("host_devs", lib.BPF_MAP_TYPE_HASH, g.DEV_PRESENT.size, g.DEVS_MAX),
        ("deny", lib.BPF_MAP_TYPE_ARRAY, g.DENY_PATTERN.size, g.DENY_MAX)):
    fd = lib.create(kind, name, 4, value, entries)
    lib.pin(fd, os.path.join(where, "map_" + name))
    os.close(fd)
"""


@pytest.mark.skipif(maps_unavailable() is not None, reason=maps_unavailable() or "")
@pytest.mark.expect_log("sdeefs.launcher.login.bpfguard")  # "left attached"
def test_a_set_of_another_layout_keeps_guarding_its_environments(tmp_path: Path) -> None:
    """A set another build pinned, whose values are bigger than this build's: a login of
    this build loads its own set beside it, reads the old one's keys with the old map's own
    value size (a buffer of this build's size would overflow), leaves it attached while a
    namespace of its user runs, and unpins it once its keys are stale."""
    config = SiteConfig(run_dir=str(tmp_path / "run"))
    loader = tmp_path / "sdeefs-bpfguard"
    loader.write_text(MAPS_ONLY_LOADER.format(python=sys.executable))
    loader.chmod(0o755)
    alice, bob, gone = 61020, 61021, 61022
    with private_bpffs() as fs:
        guard = BpfGuard(str(tmp_path / "run"), pins=str(fs / "sdeefs"), loader=str(loader))
        lib = guard.lib
        old = fs / "sdeefs" / "g-00000000000000ff"
        old.mkdir(parents=True)
        wider = IDENTITY.size + 64  # a newer layout: the uid first, as in every build
        fd = lib.create(lib.BPF_MAP_TYPE_HASH, "guarded", 4, wider, bpfguard.GUARDED_MAX)
        try:
            lib.pin(fd, str(old / "map_guarded"))
            for key in (alice, gone):
                value = struct.pack("=I", key) + b"\xee" * (wider - 4)
                lib.update(fd, bpfguard.KEY.pack(key), value)
        finally:
            os.close(fd)
        with holder(alice):
            guard.add(config, Identity(bob, bob, (), 200000, 200000, 65536, 1000))
            deny = bpfguard.deny_subset(config.deny)
            new = fs / "sdeefs" / f"g-{guard.fingerprint(bpfguard.host_devs(config), deny)}"
            assert sorted(guard.sets()) == sorted([str(old), str(new)])
            assert guard.guarding(alice, alice)  # still, by the old set
            assert not guard.guarding(gone, gone)  # stale: dropped from the old set
            assert guard.entries() == {bob: Guarded(bob, bob, (), 200000, 200000, 65536)}
            assert guard.unload() == (0, [alice])
        guard.add(config, Identity(bob, bob, (), 200000, 200000, 65536, 1000))
        assert str(old) not in guard.sets()  # its last key went stale: unpinned
        assert len(guard.sets()) == 1


# -- through the front door ---------------------------------------------------------------------


def _bpf_runs_here() -> bool:
    loader = VENV_BIN / "sdeefs-bpfguard"
    if not loader.exists():
        return False
    with tempfile.TemporaryDirectory() as run:
        return BpfGuard(run, loader=str(loader)).unavailable() is None


@requires_launcher
@pytest.mark.skipif(_bpf_runs_here(), reason="this kernel loads the BPF guard: auto picks bpf")
def test_auto_uses_the_guard_layer_here_and_says_why(site: Site) -> None:
    """guard = "auto" (the default) on a kernel that refuses the program: the login gets
    the guard layer as before, and doctor and status say which guard and why."""
    user = site.add_user()
    site.start(user)
    assert site.run(user, "ls /etc/shadow 2>&1; true").stdout.endswith("No such file or "
                                                                      "directory\n")
    rows = {r["user"]: r for r in json.loads(site.sdeefs("status", "--json").stdout)}
    assert rows[user]["guard"] == "c"
    assert rows[user]["guard_mount"]
    assert "guard: c layer" in site.sdeefs("status").stdout
    result = site.sdeefs("doctor", "--role", "login", "--json", check=False)
    found = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    guard = found["login guard"]
    assert guard["verdict"] == "warn"
    assert guard["detail"].startswith("c: the guard layer (sdeefs-guard), since ")
    assert "BPF" in guard["fix"] or "scripts/install.sh" in guard["fix"]
    # the kernel's answer is kept for this boot
    if (VENV_BIN / "sdeefs-bpfguard").exists():
        cached = json.loads((site.run_dir / "bpfguard.check").read_text())
        assert cached["why"]
        assert cached["why"] in guard["detail"]


@requires_launcher
@pytest.mark.skipif(_bpf_runs_here(), reason="this kernel loads the BPF guard")
def test_explicit_bpf_fails_the_login_in_one_line_and_leaves_nothing_mounted() -> None:
    with open_site(extra='guard = "bpf"\n') as site:
        user = site.add_user()
        result = site.sdeefs("start", user, check=False)
        assert result.returncode == 3, result.stderr
        assert result.stderr.startswith('sdeefs: guard = "bpf": ')
        assert result.stderr.count("\n") == 1
        assert site.leftovers() == []
        rows = {r["user"]: r for r in json.loads(site.sdeefs("status", "--json").stdout)}
        assert not rows.get(user, {}).get("running")
        found = {c["check"]: c for c in json.loads(site.sdeefs(
            "doctor", "--role", "login", "--json", check=False).stdout)["checks"]}
        assert found["login guard"]["verdict"] == "fail"
        assert "every login fails" in found["login guard"]["detail"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
