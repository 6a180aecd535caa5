"""The product's BPF guard in login environments: run in a guest whose kernel loads it.

``python3 bench/lsmguard/vm.py product`` (as root, on the host) boots Debian 12's kernel
under qemu and runs this file there.  The environments are started through the launcher's
own calls (``launcher.env.ensure``: engine kernel, ``guard = "bpf"``: the user's layer
image, the capture daemon, the mask with the start-time scan, the idmapped lower,
``sdeefs-enter start``, then ``launcher/login/bpfguard.py`` loading and pinning the
program and adding the environment's user namespace), and commands run inside them as a
login runs them (``sdeefs-shell -c`` as the user).  ``test_a_pam_session_gets_the_bpf_guard``
goes through the PAM hook: a PAM service whose session phase runs ``sdeefs-pam`` by
``pam_exec`` (as ``sdeefs install-pam`` writes it), opened and closed through libpam; not
covered: sshd itself (not in the guest).

Each check that something is hidden has its control in
``test_without_the_program_the_environment_is_replaced``: once the pinned programs are
removed, root inside reads the same secret (so what hid it was the program), and the next
``ensure`` does not join the unguarded environment: it starts it anew, guarded.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from launcher import env  # noqa: E402
from launcher.compute import job  # noqa: E402
from launcher.login import bpfguard  # noqa: E402
from launcher.view import MASK_OPAQUE, User  # noqa: E402
from sdeefs import identity  # noqa: E402
from sdeefs.config import DEFAULT_DENY, Engine, Guard, Replication, SiteConfig  # noqa: E402
from sdeefs.errors import QuietError  # noqa: E402
from sdeefs.statedir import ReplicaDirs  # noqa: E402

BASE = Path("/var/lib/sdeefs-bpftest")
RUN = Path("/run/sdeefs-bpftest")
HOST = Path("/srv/bpftest")  # host files the tests make (on the lower: the guest's /)
LATE_GLOB = "/srv/bpftest/late/host_*_key"

PROBE = r"""
import errno, json, os, sys
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
def read(p):
    with open(p, "rb") as f:
        f.read(1)
out = {p: {"lstat": attempt(lambda: os.lstat(p)), "read": attempt(lambda: read(p))}
       for p in sys.argv[2:]}
out["listing"] = sorted(os.listdir(sys.argv[1]))
print(json.dumps(out))
"""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    binary = os.environ.get("SDEEFS_BPFGUARD_BIN")
    if not binary or not os.path.exists(binary):
        return "no SDEEFS_BPFGUARD_BIN (bench/lsmguard/vm.py product sets it)"
    why = bpfguard.BpfGuard(str(RUN)).unavailable()
    return None if why is None else why.why


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def config() -> SiteConfig:
    return SiteConfig(root=str(BASE / "root"), run_dir=str(RUN), engine=Engine.KERNEL,
                      guard=Guard.BPF, shared=(), sockets=(), layer_size=256 << 20,
                      deny=(*DEFAULT_DENY, LATE_GLOB))


def add_user() -> User:
    name = f"bt{uuid.uuid4().hex[:6]}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    return User.lookup(name)


def inside(user: User, listing: Path, *paths: Path) -> dict[str, object]:
    """What root inside ``user``'s environment meets: lstat and read of each path, and the
    names listed in ``listing``."""
    command = " ".join(["python3", "-c", _quote(PROBE), str(listing), *map(str, paths)])
    return json.loads(run_inside(user, command))


def run_inside(user: User, command: str) -> str:
    """``command`` in the user's environment as a login runs it: sdeefs-shell, as the user."""
    result = subprocess.run([os.environ["SDEEFS_SHELL"], "-c", command],
                            env={"SDEEFS_RUN_DIR": str(RUN), "HOME": user.home,
                                 "USER": user.name, "PATH": "/usr/bin:/bin"},
                            user=user.uid, group=user.gid, extra_groups=[], cwd="/",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


@pytest.fixture(scope="module")
def alice() -> Iterator[User]:
    """A running environment (guard bpf); an entry root-only before it started."""
    shutil.rmtree(HOST, ignore_errors=True)
    write(HOST / "early-secret", "root only, before the start\n", 0o600)
    write(HOST / "public", "readable\n", 0o644)
    (HOST / "late").mkdir(mode=0o755)
    user = add_user()
    started = time.monotonic()
    record = env.ensure(config(), user, Engine.KERNEL)
    print(f"alice's environment started in {time.monotonic() - started:.1f} s")
    assert record.guard == "bpf"
    try:
        yield user
    finally:
        env.stop(config(), user)


def test_the_login_is_guarded_by_the_program(alice: User) -> None:
    record = env.EnvRecord.load(env.EnvDirs.login(config().root, str(RUN), alice.name).run)
    assert record is not None
    assert record.guard == "bpf"
    assert record.guard_key == alice.uid  # the owner of the environment's user namespace
    assert bpfguard.userns_owner(f"/proc/{record.init_pid}/ns/user") == alice.uid
    keys = bpfguard.BpfGuard(str(RUN)).entries()
    assert keys[record.guard_key].uid == alice.uid
    # no guard layer: upper + mask + lower
    assert not os.path.ismount(RUN / alice.name / "private" / "guard")
    rows = {r["user"]: r for r in env.status(config())}
    assert rows[alice.name]["guard"] == "bpf"


def fs_type(mountpoint: Path) -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint):
                return fields[fields.index("-") + 1]
    return None


def mounts_under(directory: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(f"{directory}/")]


def loops_backed_under(directory: Path) -> list[str]:
    """Loop devices whose backing file is (or was: deleted) under ``directory``."""
    found = []
    for name in os.listdir("/sys/block"):
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
        except OSError:
            continue
        if backing.startswith(f"{directory}/"):
            found.append(f"{name}: {backing}")
    return found


def tmpfs_takes_user_xattrs() -> bool:
    """The kernel's answer (tmpfs stores user.* xattrs since 6.6): asked of a fresh tmpfs."""
    probe = Path("/run/sdeefs-xattr-probe")
    probe.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "probe", str(probe)], check=True)
    try:
        os.setxattr(probe, MASK_OPAQUE, b"y")
        return True
    except OSError:
        return False
    finally:
        subprocess.run(["umount", str(probe)], check=True)
        probe.rmdir()


def test_the_mask_is_on_a_filesystem_this_kernel_takes(alice: User) -> None:
    """On 6.1 the mask's tmpfs refuses ``user.overlay.opaque``: the mask is an ext4 image
    (sdeefs/fs/mask.py), without its lost+found (its root is merged with /), and its
    opaque /home shows the user's mountpoint only."""
    mask = RUN / alice.name / "private" / "mask"
    expected = "tmpfs" if tmpfs_takes_user_xattrs() else "ext4"
    print(f"kernel {os.uname().release}: the mask is on {fs_type(mask)}")
    assert fs_type(mask) == expected
    if (mask / "lost+found").exists():  # the guest's root-only one, emptied (the scan);
        assert os.getxattr(mask / "lost+found", MASK_OPAQUE) == b"y"  # not mkfs.ext4's
    assert run_inside(alice, "ls -A /proc/self/ >/dev/null && ls -A /home").split() == [
        alice.home.rsplit("/", 1)[-1]]  # emptied (opaque), with the user's own mountpoint


def test_root_only_at_start_is_hidden_by_name(alice: User) -> None:
    seen = inside(alice, HOST, HOST / "early-secret", HOST / "public")
    assert "early-secret" not in seen["listing"]  # type: ignore[operator]
    assert seen[str(HOST / "early-secret")] == {"lstat": "ENOENT", "read": "ENOENT"}
    assert seen[str(HOST / "public")] == {"lstat": "ok", "read": "ok"}


def test_root_only_created_after_start_is_enoent(alice: User) -> None:
    write(HOST / "late-secret", "root only, after the start\n", 0o600)
    (HOST / "late-dir").mkdir(mode=0o700)
    write(HOST / "late-dir" / "f", "inside a root-only directory\n", 0o644)
    seen = inside(alice, HOST, HOST / "late-secret", HOST / "late-dir", HOST / "late-dir" / "f")
    assert seen[str(HOST / "late-secret")] == {"lstat": "ENOENT", "read": "ENOENT"}
    assert seen[str(HOST / "late-dir")]["lstat"] == "ENOENT"  # type: ignore[index]
    assert seen[str(HOST / "late-dir" / "f")] == {"lstat": "ENOENT", "read": "ENOENT"}
    # the one difference to the guard layer: a late entry's name is listed
    assert "late-secret" in seen["listing"]  # type: ignore[operator]
    # from a user namespace root inside makes (owned by root inside, its parent by the user)
    out = run_inside(alice, f"unshare --user --map-root-user cat {HOST}/late-secret 2>&1; "
                            "echo rc=$?")
    assert out.endswith("No such file or directory\nrc=1\n"), out


def test_read_then_chmod_on_the_host_is_enoent_at_the_next_access(alice: User) -> None:
    path = HOST / "tightened"
    write(path, "readable, then not\n", 0o644)
    assert inside(alice, HOST, path)[str(path)] == {"lstat": "ok", "read": "ok"}
    os.chmod(path, 0o600)
    assert inside(alice, HOST, path)[str(path)] == {"lstat": "ENOENT", "read": "ENOENT"}


def test_a_deny_glob_matched_late(alice: User) -> None:
    late = HOST / "late"
    write(late / "host_rsa_key", "denied by the glob\n", 0o644)
    write(late / "host_rsa_key.pub", "not denied\n", 0o644)
    seen = inside(alice, late, late / "host_rsa_key", late / "host_rsa_key.pub")
    assert seen[str(late / "host_rsa_key")] == {"lstat": "ENOENT", "read": "ENOENT"}
    assert seen[str(late / "host_rsa_key.pub")] == {"lstat": "ok", "read": "ok"}


def test_read_then_chown_on_the_host_is_enoent_at_the_next_access(alice: User) -> None:
    """The decision is cached per inode (guard.bpf.c, view_guard), keyed with the lower
    inode's owner too: a chown on the host after a read takes effect at the next access."""
    path = HOST / "given-away"
    write(path, "the user's, then root's\n", 0o600)
    os.chown(path, alice.uid, alice.gid)
    first = inside(alice, HOST, path)[str(path)]
    again = inside(alice, HOST, path)[str(path)]  # decided from the cache
    os.chown(path, 0, 0)
    assert (first, again) == ({"lstat": "ok", "read": "ok"}, {"lstat": "ok", "read": "ok"})
    assert inside(alice, HOST, path)[str(path)] == {"lstat": "ENOENT", "read": "ENOENT"}
    os.chown(path, 0, alice.gid)  # the group's: 0600 still hides it
    assert inside(alice, HOST, path)[str(path)] == {"lstat": "ENOENT", "read": "ENOENT"}
    os.chmod(path, 0o640)
    assert inside(alice, HOST, path)[str(path)] == {"lstat": "ok", "read": "ok"}


def test_a_host_rename_into_and_out_of_a_denied_path(alice: User) -> None:
    """The deny verdict is cached per inode, valid until a rename or link on the host
    (guard.bpf.c, deny_gen): a file read, then renamed on the host to a path the globs
    deny, is denied at its next access, and one renamed out of it is readable again; the
    same for a directory renamed over a denied name, and a hard link made into it."""
    late = HOST / "late"
    src, dst = HOST / "moving_key", late / "host_moved_key"
    write(src, "allowed here, denied there\n", 0o644)
    late.mkdir(exist_ok=True)
    assert inside(alice, HOST, src)[str(src)] == {"lstat": "ok", "read": "ok"}
    assert inside(alice, HOST, src)[str(src)] == {"lstat": "ok", "read": "ok"}  # cached
    os.rename(src, dst)
    assert inside(alice, late, dst)[str(dst)] == {"lstat": "ENOENT", "read": "ENOENT"}
    os.rename(dst, src)
    assert inside(alice, HOST, src)[str(src)] == {"lstat": "ok", "read": "ok"}
    # a directory renamed to a denied name: every entry below it is denied
    outer = HOST / "outer"
    write(outer / "f", "allowed, then below a denied directory\n", 0o644)
    assert inside(alice, outer, outer / "f")[str(outer / "f")] == {"lstat": "ok", "read": "ok"}
    os.rename(outer, late / "host_dir_key")
    below = late / "host_dir_key" / "f"
    assert inside(alice, late, below)[str(below)] == {"lstat": "ENOENT", "read": "ENOENT"}
    os.rename(late / "host_dir_key", outer)
    assert inside(alice, outer, outer / "f")[str(outer / "f")] == {"lstat": "ok", "read": "ok"}
    # a hard link into the denied path of a file read (and cached) elsewhere
    plain = HOST / "linked"
    write(plain, "read, then linked\n", 0o644)
    assert inside(alice, HOST, plain)[str(plain)] == {"lstat": "ok", "read": "ok"}
    os.link(plain, late / "host_linked_key")
    os.unlink(plain)
    linked = late / "host_linked_key"
    assert inside(alice, late, linked)[str(linked)] == {"lstat": "ENOENT", "read": "ENOENT"}


def test_own_and_copied_up_files_work(alice: User) -> None:
    out = run_inside(alice, "echo mine > /etc/bpftest-own && cat /etc/bpftest-own && "
                            f"echo more >> {HOST}/public && cat {HOST}/public && "
                            "(umask 077; echo home > ~/bpftest-home) && cat ~/bpftest-home && "
                            "id -u")
    assert out == "mine\nreadable\nmore\nhome\n0\n"
    # in the bound home (not through the view: not the guard's), a 0600 file root inside
    # made is owned on the host by the user's first subordinate uid, not the user: read
    assert (Path(alice.home) / "bpftest-home").stat().st_mode & 0o777 == 0o600
    assert (HOST / "public").read_text() == "readable\n"  # the host's is unchanged


def test_teardown_removes_its_key_and_leaves_the_others(alice: User) -> None:
    guard = bpfguard.BpfGuard(str(RUN))
    bob = add_user()
    bob_record = env.ensure(config(), bob, Engine.KERNEL)
    assert bob_record.guard == "bpf"
    carol = add_user()
    carol_record = env.ensure(config(), carol, Engine.KERNEL)
    assert {bob_record.guard_key, carol_record.guard_key} <= set(guard.entries())
    env.stop(config(), carol)
    keys = guard.entries()
    assert carol_record.guard_key not in keys
    assert keys[bob_record.guard_key].uid == bob.uid
    # bob is still guarded, his own files work
    write(HOST / "for-bob", "root only\n", 0o600)
    seen = inside(bob, HOST, HOST / "for-bob", HOST / "public")
    assert seen[str(HOST / "for-bob")] == {"lstat": "ENOENT", "read": "ENOENT"}
    assert run_inside(bob, "echo b > /etc/bob && cat /etc/bob") == "b\n"
    env.stop(config(), bob)
    assert bob_record.guard_key not in guard.entries()


def test_without_the_program_the_environment_is_replaced(alice: User) -> None:
    """The control: with the pinned programs removed (what an admin's rm under
    /sys/fs/bpf/sdeefs would do), root inside reads the secrets (so the program was what
    hid them) -- and the next login does not join that environment: it starts it anew,
    guarded again (fail closed)."""
    guard = bpfguard.BpfGuard(str(RUN))
    before = env.EnvRecord.load(env.EnvDirs.login(config().root, str(RUN), alice.name).run)
    assert before is not None
    guard.detach_all()
    # the links' release (and a sleepable program's grace period) may lag their unpinning
    deadline = time.monotonic() + 60
    while (seen := inside(alice, HOST, HOST / "late-secret")[str(HOST / "late-secret")]) != {
            "lstat": "ok", "read": "ok"} and time.monotonic() < deadline:
        time.sleep(1)
    assert seen == {"lstat": "ok", "read": "ok"}
    after = env.ensure(config(), alice, Engine.KERNEL)
    assert after.init_pid != before.init_pid
    assert guard.entries()[after.guard_key].uid == alice.uid
    assert inside(alice, HOST, HOST / "late-secret")[str(HOST / "late-secret")] == {
        "lstat": "ENOENT", "read": "ENOENT"}


PAM_SERVICE = "sdeefs-bpftest"
# sdeefs-pam as install.sh puts it beside its Python; here the guest's binaries are in
# /opt/lsmbuild (pam_exec passes none of our environment: they are set in the script)
HOOK = """#!/usr/bin/python3
import os, sys
sys.path[:0] = ["/opt/sdeefs", "/opt/sdeefs/pydeps"]
os.environ.update(SDEEFS_ENTER={enter!r}, SDEEFS_BPFGUARD_BIN={bpfguard!r})
from launcher.login.pam import hook_main
sys.exit(hook_main())
"""
PAM_LOG = Path("/tmp/sdeefs-pam.log")


class PamConv(ctypes.Structure):
    _fields_ = [("conv", ctypes.c_void_p), ("appdata_ptr", ctypes.c_void_p)]


def pam_session(user: User, config_file: Path) -> Iterator[None]:
    """A PAM session of ``user`` on a service whose session phase runs the sdeefs hook."""
    hook = Path("/opt/lsmbuild/sdeefs-pam")
    hook.write_text(HOOK.format(enter=os.environ["SDEEFS_ENTER"],
                                bpfguard=os.environ["SDEEFS_BPFGUARD_BIN"]))
    hook.chmod(0o755)
    Path("/etc/pam.d", PAM_SERVICE).write_text(
        "auth required pam_permit.so\naccount required pam_permit.so\n"
        f"session required pam_exec.so quiet log={PAM_LOG} {hook} --config {config_file}"
        "  # sdeefs\n")
    pam = ctypes.CDLL("libpam.so.0")
    handle = ctypes.c_void_p()
    conv = PamConv(None, None)  # pam_exec quiet asks nothing
    assert pam.pam_start(PAM_SERVICE.encode(), user.name.encode(), ctypes.byref(conv),
                         ctypes.byref(handle)) == 0
    try:
        assert pam.pam_open_session(handle, 0) == 0, PAM_LOG.read_text(errors="replace")
        yield
        assert pam.pam_close_session(handle, 0) == 0
    finally:
        pam.pam_end(handle, 0)


def test_a_pam_session_gets_the_bpf_guard(alice: User) -> None:
    """The PAM hook (pam_exec -> sdeefs-pam -> env.open_session) with ``guard = "bpf"`` in
    the site's file: the session's environment is guarded, and the key goes at its end."""
    config_file = BASE / "sdeefs.toml"
    deny = ", ".join(json.dumps(p) for p in config().deny)
    config_file.write_text(f'[sdeefs]\nroot = "{config().root}"\nrun_dir = "{RUN}"\n'
                           'engine = "kernel"\nguard = "bpf"\nshared = []\nsockets = []\n'
                           f'layer_size = "256M"\ngrace = 0\ndeny = [{deny}]\n')
    dave = add_user()
    guard = bpfguard.BpfGuard(str(RUN))
    session = pam_session(dave, config_file)
    next(session)
    record = env.EnvRecord.load(env.EnvDirs.login(config().root, str(RUN), dave.name).run)
    assert record is not None
    assert (record.guard, record.sessions) == ("bpf", 1)
    assert guard.entries()[dave.uid].uid == dave.uid
    write(HOST / "for-dave", "root only\n", 0o600)
    seen = inside(dave, HOST, HOST / "for-dave", HOST / "public")
    assert seen[str(HOST / "for-dave")] == {"lstat": "ENOENT", "read": "ENOENT"}
    assert seen[str(HOST / "public")]["read"] == "ok"  # type: ignore[index]
    with pytest.raises(StopIteration):
        next(session)  # the session closes: grace 0, nothing running: the end
    assert env.EnvRecord.load(env.EnvDirs.login(config().root, str(RUN), dave.name).run) is None
    assert dave.uid not in guard.entries()


def test_a_rootless_containers_layers_in_the_home(alice: User) -> None:
    """A container root inside runs (its own user and mount namespaces and overlay, layers
    in the bound home): a file root inside made there is owned on the host by the user's
    first subordinate uid, which the rule counts as the user's own
    (Identity.host_readable), so the guard hides none of it — through the container's
    overlay (inode hooks), nor at its copy-up."""
    ctr = f"{alice.home}/bpftest-ctr"
    out = run_inside(alice, f"rm -rf {ctr} && mkdir -p {ctr}/lower {ctr}/merged && "
                            f"(umask 077; echo layer > {ctr}/lower/f) && "
                            "mkdir -p /tmp/ctr-u /tmp/ctr-w && "
                            "unshare --user --map-root-user --mount sh -c '"
                            f"mount -t overlay overlay -o lowerdir={ctr}/lower,upperdir=/tmp/ctr-u,"
                            f"workdir=/tmp/ctr-w,userxattr {ctr}/merged && "
                            f"cat {ctr}/merged/f && echo more >> {ctr}/merged/f && "
                            f"cat {ctr}/merged/f' 2>&1; echo rc=$?")
    assert out == "layer\nlayer\nmore\nrc=0\n", out
    # the control: on the host the layer's file is a subordinate uid's, 0600
    st = (Path(alice.home) / "bpftest-ctr" / "lower" / "f").stat()
    assert st.st_mode & 0o777 == 0o600
    assert st.st_uid != alice.uid


# -- the guard layer (FUSE) instead of the program ----------------------------------------------


def test_a_login_with_the_guard_layer(alice: User) -> None:
    """``guard = "c"``: the guard layer (sdeefs-guard, FUSE) between the mask and the lower,
    on this kernel too: what it hides (root-only at start, and created after), the user's
    own files, and its stop leaving no mount and no loop device."""
    cfg = attrs.evolve(config(), guard=Guard.C)
    user = add_user()
    write(HOST / "c-early", "root only, before the start\n", 0o600)
    record = env.ensure(cfg, user, Engine.KERNEL)
    private = RUN / user.name / "private"
    try:
        assert record.guard == "c"
        assert fs_type(private / "guard") is not None  # the FUSE layer is mounted
        print(f"kernel {os.uname().release}: guard layer {fs_type(private / 'guard')}, "
              f"mask {fs_type(private / 'mask')}")
        write(HOST / "c-late", "root only, after the start\n", 0o600)
        seen = inside(user, HOST, HOST / "c-early", HOST / "c-late", HOST / "public")
        assert seen[str(HOST / "c-early")] == {"lstat": "ENOENT", "read": "ENOENT"}
        assert seen[str(HOST / "c-late")] == {"lstat": "ENOENT", "read": "ENOENT"}
        # the layer hides the late name too (the program cannot: its one difference)
        assert "c-late" not in seen["listing"]  # type: ignore[operator]
        assert seen[str(HOST / "public")] == {"lstat": "ok", "read": "ok"}
        assert run_inside(user, "echo c > /etc/c-own && cat /etc/c-own && id -u") == "c\n0\n"
    finally:
        env.stop(cfg, user)
    assert mounts_under(private) == []
    assert loops_backed_under(private) == []


# -- a job's environment on this kernel: the shared mask, a volatile scratch upper ------------

JOBFS = Path("/srv/sdeefs-jobfs")  # the node's local scratch: not on the lower's filesystem


@pytest.fixture
def jobfs() -> Iterator[Path]:
    """An ext4 scratch filesystem for the replica and job directories (a compute node's
    local disk: the kernel refuses layers on the lower's filesystem, and a scratch upper
    needs user xattrs, which tmpfs lacks before 6.6)."""
    image = Path("/var/tmp/sdeefs-jobfs.img")
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    JOBFS.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(JOBFS)], check=True)
    image.unlink()
    try:
        yield JOBFS
    finally:
        for mountpoint in sorted(mounts_under(JOBFS), key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        subprocess.run(["umount", "-l", str(JOBFS)], check=True)


def test_a_job_environment_starts_and_its_end_leaves_nothing(jobfs: Path) -> None:
    """``job.start_environment`` as the prolog runs it (no replicad: the replica is made by
    hand): the shared mask and idmapped lower, the replica as a middle layer, a volatile
    scratch upper; inside, a replica's file, a lower directory removed and made anew (a
    whiteout and an opaque directory in the upper); then the epilog's end and the layers'
    end leave no mount and no loop device."""
    cfg = SiteConfig(root=str(BASE / "root"), run_dir=str(RUN), engine=Engine.OVERLAY,
                     shared=(), sockets=(), deny=DEFAULT_DENY,
                     replication=Replication(replica_dir=str(jobfs / "replica"),
                                             job_dir=str(jobfs / "jobs")))
    user = add_user()
    ids = identity.of_user(user.name, cfg.min_uid, allocate=True)
    replica = Path(ReplicaDirs.of(cfg.replication.replica_dir, user.name).upper)
    write(replica / "etc" / "from-replica", "the user's layer\n", 0o644)
    for path in (replica, replica / "etc", replica / "etc" / "from-replica"):
        os.chown(path, *ids.root)
    (HOST / "jobdir").mkdir(parents=True, exist_ok=True)
    write(HOST / "jobdir" / "old", "host\n", 0o644)
    record = job.start_environment(cfg, "node1", user, "42")
    layers = job.UserLayers.of(cfg, "node1", user.name)
    masks = [m for m in mounts_under(Path(layers.path)) if "/mask-" in m]
    print(f"kernel {os.uname().release}: the job's mask is on {fs_type(Path(masks[0]))}")
    assert fs_type(Path(masks[0])) == ("tmpfs" if tmpfs_takes_user_xattrs() else "ext4")
    result = subprocess.run(
        ["nsenter", "-t", str(record.init_pid), "-U", "-m", "--", "sh", "-c",
         f"cat /etc/from-replica && rm -r {HOST}/jobdir && mkdir {HOST}/jobdir && "
         f"ls -A {HOST}/jobdir | wc -l && ls -A /proc/self/ >/dev/null && id -u"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["the", "user's", "layer", "0", "0"]
    ended, gone = job.end_job(cfg, "node1", "42")
    assert ended
    if gone is not None:
        job.remove_gone(gone)
    job.end_user_layers(layers)
    assert mounts_under(jobfs) == []
    assert loops_backed_under(jobfs) == []
    assert (HOST / "jobdir" / "old").read_text() == "host\n"  # the host's is unchanged


def test_a_job_dir_without_user_xattrs_is_one_line(jobfs: Path) -> None:
    """A scratch upper on a filesystem without user xattrs (tmpfs before 6.6): the kernel
    mounts the overlay, then fails the first directory made where a lower one was removed
    (its opaque mark); the prolog refuses such a job_dir in one line instead."""
    takes = tmpfs_takes_user_xattrs()
    scratch = Path("/run/sdeefs-tmpfs-scratch")
    scratch.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "scratch", str(scratch)], check=True)
    try:
        write(jobfs / "lower" / "d" / "f", "lower\n", 0o644)
        for name in ("upper", "work"):
            (scratch / name).mkdir()
        (jobfs / "merged").mkdir()
        options = (f"userxattr,lowerdir={jobfs}/lower,upperdir={scratch}/upper,"
                   f"workdir={scratch}/work")
        raw = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "--", "sh", "-c",
             f"mount -t overlay probe -o {options} {jobfs}/merged && rm -r {jobfs}/merged/d "
             f"&& mkdir {jobfs}/merged/d"], capture_output=True, text=True, timeout=60)
        print(f"kernel {os.uname().release}: tmpfs takes user xattrs: {takes}; a directory "
              f"made again on a tmpfs upper: rc {raw.returncode} {raw.stderr.strip()}")
        assert (raw.returncode == 0) == takes
        cfg = SiteConfig(root=str(BASE / "root"), run_dir=str(RUN), engine=Engine.OVERLAY,
                         shared=(), sockets=(),
                         replication=Replication(replica_dir=str(jobfs / "replica"),
                                                 job_dir=str(scratch / "jobs")))
        user = add_user()
        os.makedirs(ReplicaDirs.of(cfg.replication.replica_dir, user.name).upper)
        if takes:
            return  # (a kernel whose tmpfs has them: the job_dir is fine)
        with pytest.raises(QuietError, match=r"replication.job_dir .*: its filesystem stores "
                           r"no user.\* xattrs") as refused:
            job.start_environment(cfg, "node1", user, "43")
        print(f"refused: {refused.value}")
        assert mounts_under(scratch) == []
    finally:
        subprocess.run(["umount", "-l", str(scratch)], check=True)
