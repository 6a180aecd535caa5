"""Escape attempts from inside an sdeefs environment.

One module-scoped site with two users whose environments both run: the attacker A, who makes
every attempt from inside their environment (``site.run``: as if logged in with sdeefs-shell),
and the victim B.  Each attempt must fail with the precise errno (or find nothing), and where an
attempt could change the host, the host is checked afterwards.

Inside snippets are Python (``/usr/bin/python3`` of the view, that is of the host) behind a
small prelude: ``call(label, fn, *args)`` calls a libc function and prints ``label OK`` or
``label ERRNONAME``; ``attempt(label, fn, *args)`` does the same for a Python callable that
raises OSError; ``say(label, value)`` prints anything else (JSON for lists).  ``Escape.inside``
returns these lines as a dict.

The host keeps a probe directory /var/tmp/sdeefs-escape-XXXX, visible in every view (all of the
host's /var/tmp is).  The site's ``deny`` list is the default plus ``PROBE/*_key``; the probe
holds denied ``*_key`` files, a root-only file that no deny pattern names, and a file private
to the victim.

Attempts that may break an environment (the symlink race, the daemon crash) get a fresh user
of their own (``Escape.fresh_user``), so that A's environment stays usable for the others.

Host processes of other users may run tests in parallel (useradd changes /etc/passwd and
/etc/group at any time), so host checks look for what an escape would leave (names, contents)
rather than comparing whole directories.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import pwd
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from sdeefs import mountinfo
from sdeefs.config import DEFAULT_DENY
from sdeefs.fs.daemon import daemon_pid
from sdeefs.identity import of_user

from .launcher_site import ENTER, SHELL, Site, open_site, requires_launcher

PYTHON = "/usr/bin/python3"

pytestmark = [
    requires_launcher,
    pytest.mark.skipif(not os.path.exists(PYTHON), reason=f"{PYTHON} is needed inside the view"),
]

# Capabilities no session may hold, in any of its sets (linux/capability.h numbers).
FORBIDDEN_CAPS = {
    "DAC_READ_SEARCH": 2, "LINUX_IMMUTABLE": 9, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_OWNER": 15,
    "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
    "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_RESOURCE": 24, "SYS_TIME": 25, "MKNOD": 27,
    "AUDIT_CONTROL": 30, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "PERFMON": 38,
    "BPF": 39, "CHECKPOINT_RESTORE": 40,
}
CAP_DAC_READ_SEARCH = FORBIDDEN_CAPS["DAC_READ_SEARCH"]
CAP_SYS_ADMIN = FORBIDDEN_CAPS["SYS_ADMIN"]
# init_module, finit_module have no glibc wrappers: raw syscall numbers.
MODULE_SYSCALLS = {"x86_64": (175, 313), "aarch64": (105, 273)}
SYS_PIDFD_OPEN = 434  # the same on every architecture
# /proc files the helper covers with a read-only /dev/null (those this kernel has)
PROC_MASKED = tuple(p for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list",
                                "/proc/sysrq-trigger", "/proc/sched_debug") if os.path.exists(p))

PRELUDE = r'''
import contextlib, ctypes, errno, json, os, stat, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MNT_DETACH = 2
PTRACE_ATTACH = 16

def say(label, value):
    print(label, value, flush=True)

def name(err):
    return errno.errorcode.get(err, str(err))

def call(label, fn, *args):
    ctypes.set_errno(0)
    r = getattr(libc, fn)(*args)
    say(label, "OK" if r != -1 else name(ctypes.get_errno()))
    return r

def attempt(label, fn, *args):
    try:
        value = fn(*args)
    except OSError as exc:
        say(label, name(exc.errno))
        return None
    say(label, "OK")
    return value

def read(path):
    with open(path, "rb") as f:
        return f.read()

def write(path, data):
    with open(path, "w") as f:
        f.write(data)

def nested_userns():
    """A user + mount namespace inside the environment's (allowed; all capabilities *there*)."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", f"0 {uid} 1")
    write("/proc/self/gid_map", f"0 {gid} 1")

def fs_root_handle():
    """The 'shocker' handle: FILEID_INO32_GEN of inode 2 (an ext* root), generation 0."""
    raw = struct.pack("IiII", 8, 1, 2, 0)
    return ctypes.create_string_buffer(raw, len(raw))
'''


@attrs.frozen
class Escape:
    site: Site
    a: str  # the attacker
    b: str  # the victim
    init_a: int  # host pids of the environments' inits
    init_b: int
    probe: Path  # host dir, visible in the views; its *_key files are denied
    inits: dict[str, int]  # every started user's init (host pid), for the teardown

    def fresh_user(self) -> str:
        """Another user with a running environment, for attempts that may break it."""
        user = self.site.add_user()
        self.inits[user] = self.site.start(user)
        return user

    def inside(self, code: str, user: str | None = None) -> dict[str, str]:
        """Run a Python snippet in an environment (A's by default); its ``label value`` lines."""
        script = PRELUDE + textwrap.dedent(code)
        result = self.site.run(user or self.a, f"{PYTHON} -c {shlex.quote(script)}",
                               check=False)
        assert result.returncode == 0, f"the probe itself failed: {result.stderr.strip()}"
        found = {}
        for line in result.stdout.splitlines():
            label, _, value = line.partition(" ")
            found[label] = value
        return found

    def sh(self, command: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.site.run(user or self.a, command, check=False)

    def on_host(self, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a command on the host (in no environment) as an unprivileged user."""
        return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True,
                              text=True, timeout=30)


# -- the site -------------------------------------------------------------------------------


def _force_stop(site: Site, user: str, init_pid: int) -> None:
    """Take an environment down without the per-user lock: kill its init (the PID namespace
    dies with it), then detach the upper's FUSE mount so that its daemon exits."""
    with contextlib.suppress(OSError):
        with open(f"/proc/{init_pid}/comm") as f:
            is_init = f.read().strip() == "sdeefs-init"
        if is_init and os.stat(f"/proc/{init_pid}").st_uid == site.uid(user):
            os.kill(init_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{init_pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.02)
    state = site.root / user / "state"
    subprocess.run(["umount", "-l", str(state / "mnt")], capture_output=True)
    subprocess.run(["umount", "-l", str(site.run_dir / user / "private" / "guard")],
                   capture_output=True)
    while daemon_pid(str(state)) is not None and time.monotonic() < deadline:
        time.sleep(0.02)


def _stop(site: Site, inits: dict[str, int]) -> None:
    """``sdeefs stop`` every user in parallel, with a short timeout and a forced fallback.

    A safety net: ``sdeefs stop`` once blocked forever (the upper's FUSE daemon, forked while
    ``user_lock`` was held, inherited the flock'ed lock fd; fixed in fc95142).  Should that
    come back, the site's cleanup would take 120 s per user and leave the environments running.
    """
    procs = {user: subprocess.Popen([sys.executable, "-m", "sdeefs", "stop", user],
                                    env=site.env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
             for user in inits}
    deadline = time.monotonic() + 5
    for user, proc in procs.items():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            warnings.warn(f"sdeefs stop {user} hung (is the user lock held by the upper's "
                          "daemon?); forcing the environment down", stacklevel=1)
            _force_stop(site, user, inits[user])


@pytest.fixture(scope="module")
def env() -> Iterator[Escape]:
    probe = Path(tempfile.mkdtemp(prefix="sdeefs-escape-", dir="/var/tmp"))
    try:
        probe.chmod(0o755)
        for name, text, mode in (("host-only_key", "HOST-ONLY MARKER\n", 0o644),
                                 ("early_key", "EARLY KEY\n", 0o600),
                                 ("root-only", "ROOT-ONLY SECRET\n", 0o600)):
            (probe / name).write_text(text)
            (probe / name).chmod(mode)
        deny = [*DEFAULT_DENY, f"{probe}/*_key"]
        with open_site(extra=f"deny = {json.dumps(deny)}\n") as site:
            a, b = site.add_user(), site.add_user()
            secret = probe / "victim-only"
            secret.write_text("VICTIM SECRET\n")
            secret.chmod(0o600)
            os.chown(secret, site.uid(b), _gid(b))
            inits = {a: site.start(a), b: site.start(b)}
            try:
                yield Escape(site, a, b, inits[a], inits[b], probe, inits)
            finally:
                _stop(site, inits)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    """A command failed, and said why."""
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr


def _gid(user: str) -> int:
    return pwd.getpwnam(user).pw_gid


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def _host_names(directory: str, prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(prefix))


# -- 1. chroot ------------------------------------------------------------------------------


def test_chroot_is_refused_and_roots_are_the_view(env: Escape) -> None:
    marker = env.probe / "host-only_key"  # on the host under /var/tmp, masked in the view
    site_marker = env.site.root / "sdeefs-escape-marker"  # in sdeefs' own (masked) root
    site_marker.write_text("SITE MARKER\n")
    prefixes = ("", "/proc/self/root", "/proc/1/root", "/../../..", "/proc/self/cwd/../..")
    try:
        out = env.inside(f"""
            os.makedirs("/tmp/jail/x", exist_ok=True)
            os.chdir("/tmp/jail")
            keep = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
            attempt("chroot", os.chroot, "x")
            attempt("chroot_dot", os.chroot, ".")
            # the classic escape, carried on as if chroot had worked
            os.fchdir(keep)
            for _ in range(40):
                os.chdir("..")
            say("cwd", os.getcwd())
            say("same_root", os.stat(".").st_ino == os.stat("/").st_ino)
            for marker in ({str(marker)!r}, {str(site_marker)!r}):
                for prefix in {prefixes!r}:
                    attempt("read:" + prefix + marker, read, prefix + marker)
            attempt("readlink_init_root", os.readlink, "/proc/1/root")
            say("self_root", os.readlink("/proc/self/root"))
        """)
        assert out["chroot"] == "EPERM"
        assert out["chroot_dot"] == "EPERM"
        assert out["cwd"] == "/"
        assert out["same_root"] == "True"
        for path in (marker, site_marker):
            for prefix in prefixes:
                # /proc/1/root: the init holds capabilities the session lacks (ptrace check)
                expected = "EACCES" if prefix == "/proc/1/root" else "ENOENT"
                assert out[f"read:{prefix}{path}"] == expected, (prefix, path)
        assert out["readlink_init_root"] == "EACCES"
        assert out["self_root"] == "/"
        result = env.sh("chroot /tmp/jail/x /bin/true")
        _refused(result, "Operation not permitted")
        # From the host: the init's root is the view, not the host's root.
        init_root = f"/proc/{env.init_a}/root"
        assert os.readlink(init_root) == "/"
        assert marker.exists()
        assert site_marker.exists()
        assert not os.path.exists(f"{init_root}{marker}")
        assert not os.path.exists(f"{init_root}{site_marker}")
        assert not os.path.exists(f"{init_root}{env.site.upper(env.b)}")
        assert not os.path.exists(f"{init_root}/etc/shadow")
        assert os.path.exists(f"{init_root}/etc/passwd")
    finally:
        site_marker.unlink()


# -- 2. mounts ------------------------------------------------------------------------------


def test_mount_and_umount_are_refused(env: Escape) -> None:
    mounts = (*PROC_MASKED, "/proc/sys", "/dev/null", "/")
    out = env.inside(f"""
        call("tmpfs", "mount", b"none", b"/mnt", b"tmpfs", 0, None)
        call("bind", "mount", b"/etc", b"/mnt", None, MS_BIND, None)
        call("rbind_root", "mount", b"/", b"/mnt", None, MS_BIND | MS_REC, None)
        call("remount_sys_rw", "mount", None, b"/proc/sys", None, MS_REMOUNT | MS_BIND, None)
        for path in {mounts!r} + ("/etc/shadow",):
            call("umount:" + path, "umount2", path.encode(), MNT_DETACH)
        call("unshare_mnt", "unshare", CLONE_NEWNS)
        attempt("shadow", read, "/etc/shadow")
    """)
    for label in ("tmpfs", "bind", "rbind_root", "remount_sys_rw", "unshare_mnt"):
        assert out[label] == "EPERM", label
    for path in mounts:
        assert out[f"umount:{path}"] == "EPERM", path
    assert out["umount:/etc/shadow"] == "ENOENT"  # a whiteout in a layer: nothing to unmount
    assert out["shadow"] == "ENOENT"
    for command in ("mount -t tmpfs none /mnt", "mount --bind /etc /mnt", "umount /proc/sys",
                    "unshare -m true"):
        result = env.sh(command)
        assert result.returncode != 0, command


def test_nested_user_namespace_cannot_unmask(env: Escape) -> None:
    """A nested user + mount namespace is allowed and holds every capability *there*; still,
    the mounts it inherits are locked, and the hidden files are layers, not mounts."""
    locked = (*PROC_MASKED, "/proc/sys", "/dev/null", "/", "/tmp", "/sys",
              str(env.site.home(env.a)))
    out = env.inside(f"""
        nested_userns()
        say("capeff", [l for l in read("/proc/self/status").decode().splitlines()
                       if l.startswith("CapEff")][0].split()[1])
        for path in {locked!r} + ("/etc/shadow", "/root"):
            call("umount:" + path, "umount2", path.encode(), MNT_DETACH)
        call("remount_sys_rw", "mount", None, b"/proc/sys", None, MS_REMOUNT | MS_BIND, None)
        call("bind_proc_nonrec", "mount", b"/proc", b"/mnt", None, MS_BIND, None)
        call("mount_proc", "mount", b"proc", b"/mnt", b"proc", 0, None)
        call("tmpfs", "mount", b"none", b"/mnt", b"tmpfs", 0, None)
        attempt("shadow", read, "/etc/shadow")
        attempt("gshadow", read, "/etc/gshadow")
        say("root", json.dumps(sorted(os.listdir("/root")) if os.path.isdir("/root") else []))
        say("home", json.dumps(sorted(os.listdir("/home"))))
        attempt("core_pattern", open, "/proc/sys/kernel/core_pattern", "w")
        # open_by_handle_at relative to the overlay root, the home (a bind of the host's
        # root filesystem) and /tmp, with the nested namespace's CAP_DAC_READ_SEARCH
        for mnt in ("/", os.environ["HOME"], "/tmp"):
            fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
            call("handle:" + mnt, "open_by_handle_at", fd, fs_root_handle(),
                 os.O_RDONLY | os.O_DIRECTORY)
    """)
    assert int(out["capeff"], 16) & (1 << CAP_SYS_ADMIN)  # the nested ns is really "root"
    for path in locked:
        assert out[f"umount:{path}"] == "EINVAL", path  # MNT_LOCKED
    assert out["umount:/etc/shadow"] == "ENOENT"  # whiteout in a layer
    assert out["umount:/root"] == "ENOENT"  # a whiteout in a layer, not a mount
    assert out["remount_sys_rw"] == "EPERM"  # read-only is locked too
    assert out["bind_proc_nonrec"] == "EINVAL"  # would reveal what the locked masks cover
    assert out["mount_proc"] == "EPERM"  # the PID namespace is not the nested ns's
    assert out["tmpfs"] == "OK"  # allowed, but only in the nested mount namespace
    assert out["shadow"] == out["gshadow"] == "ENOENT"
    assert json.loads(out["root"]) == []
    assert json.loads(out["home"]) == [env.a]
    assert out["core_pattern"] == "EROFS"
    assert out["handle:/"] == "EPERM"
    for mnt in (str(env.site.home(env.a)), "/tmp"):
        # Linux >= 6.9 lets a namespace that could mount decode handles, but only below the
        # mount's root (ESTALE for a filesystem root); older kernels refuse outright (EPERM)
        assert out[f"handle:{mnt}"] in ("ESTALE", "EPERM"), mnt


# -- 3. kernel modules ----------------------------------------------------------------------


def test_kernel_module_loading_is_refused(env: Escape) -> None:
    numbers = MODULE_SYSCALLS.get(platform.machine())
    if numbers is None:
        pytest.skip(f"no module syscall numbers for {platform.machine()}")
    init_module, finit_module = numbers
    # /proc/modules exists exactly when the kernel can load modules (CONFIG_MODULES)
    expected = "EPERM" if os.path.exists("/proc/modules") else "ENOSYS"
    out = env.inside(f"""
        image = ctypes.create_string_buffer(b"\\x7fELF" + bytes(60))
        call("init_module", "syscall", {init_module}, image, 64, b"")
        fd = os.open("/usr/bin/true", os.O_RDONLY)
        call("finit_module", "syscall", {finit_module}, fd, b"", 0)
        attempt("modprobe_path", open, "/proc/sys/kernel/modprobe", "w")
    """)
    assert out["init_module"] == expected
    assert out["finit_module"] == expected
    assert out["modprobe_path"] == ("EROFS" if os.path.exists("/proc/sys/kernel/modprobe")
                                    else "ENOENT")
    for tool in ("modprobe", "insmod"):
        if shutil.which(tool):
            result = env.sh(f"{tool} sdeefs_escape_no_such_module")
            assert result.returncode != 0, tool


# -- 4. reboot, sysrq -----------------------------------------------------------------------


def test_reboot_and_sysrq_are_refused(env: Escape) -> None:
    # reboot(2) with LINUX_REBOOT_CMD_CAD_OFF (0) only: harmless even if it went through.
    # sysrq: "h" (print help) instead of "b": were the protection broken, "b" would reboot the
    # test machine.
    out = env.inside("""
        call("reboot_cad_off", "reboot", 0)
        def sysrq():
            with open("/proc/sysrq-trigger", "w") as f:
                f.write("h")
        attempt("sysrq", sysrq)
    """)
    assert out["reboot_cad_off"] == "EPERM"
    # masked by a read-only bind of /dev/null when the kernel has it
    assert out["sysrq"] == ("EROFS" if os.path.exists("/proc/sysrq-trigger") else "ENOENT")


# -- 5. device nodes ------------------------------------------------------------------------


def test_mknod_of_devices_is_refused(env: Escape) -> None:
    nodes = {"blk_tmp": ("/tmp/sda", stat.S_IFBLK, 8, 0),
             "chr_dev": ("/dev/mem2", stat.S_IFCHR, 1, 1),
             "chr_usr": ("/usr/sdeefs-escape-null", stat.S_IFCHR, 1, 3),  # upper: the FUSE fs
             "blk_usr": ("/usr/sdeefs-escape-sda", stat.S_IFBLK, 8, 0),
             "chr_home": (f"{env.site.home(env.a)}/sdeefs-escape-mem", stat.S_IFCHR, 1, 1)}
    out = env.inside(f"""
        for label, (path, kind, major, minor) in {nodes!r}.items():
            attempt(label, os.mknod, path, kind | 0o666, os.makedev(major, minor))
            say("exists:" + label, os.path.lexists(path))
    """)
    for label in nodes:
        assert out[label] == "EPERM", label
        assert out[f"exists:{label}"] == "False", label
    result = env.sh("mknod /tmp/sda b 8 0")
    _refused(result, "Operation not permitted")
    # On the host: no device node in A's upper (0/0 whiteouts are not devices) nor home.
    for top in (env.site.upper(env.a), env.site.home(env.a)):
        for dirpath, dirnames, filenames in os.walk(top):
            for entry in dirnames + filenames:
                path = os.path.join(dirpath, entry)
                st = os.lstat(path)
                assert not stat.S_ISBLK(st.st_mode), path
                assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev != 0), path


# -- 6. secrets -----------------------------------------------------------------------------


def test_secrets_are_absent_or_unreadable(env: Escape) -> None:
    site, b = env.site, env.b
    paths = {
        "shadow": "/etc/shadow", "shadow-": "/etc/shadow-", "gshadow": "/etc/gshadow",
        "gshadow-": "/etc/gshadow-", "munge_key": "/etc/munge/munge.key",
        "victim_home": str(site.home(b)), "victim_bashrc": f"{site.home(b)}/.bashrc",
        "victim_upper": str(site.upper(b)), "victim_layers": str(site.root / b),
        "victim_fuse_upper": str(site.root / b / "state" / "mnt" / "upper"),
        "victim_journal": str(site.root / b / "state" / "journal"),
        "victim_lower": str(site.run_dir / b / "private" / "lower"),
        "victim_init": str(site.run_dir / b / "init"),
        "own_upper": str(site.upper(env.a)),
        "early_key": str(env.probe / "early_key"),
    }
    for i, key in enumerate(sorted(Path("/etc/ssh").glob("ssh_host_*_key"))):
        paths[f"ssh_host_key{i}"] = str(key)
    prefixes = ("", "/proc/self/root", "/../..")
    out = env.inside(f"""
        for label, path in {paths!r}.items():
            for prefix in {prefixes!r}:
                attempt(label + ":" + prefix, os.stat, prefix + path)
        attempt("victim_file", read, {str(env.probe / "victim-only")!r})
        for d in ("/root", "/home", "/var/log", "/etc/sudoers.d", "/etc/munge",
                  {str(site.root)!r}, {str(site.run_dir)!r}):
            say("ls:" + d, json.dumps(sorted(os.listdir(d)) if os.path.isdir(d) else []))
        say("ssh_keys", json.dumps(sorted(n for n in os.listdir("/etc/ssh")
                                          if n.endswith("_key"))
                                   if os.path.isdir("/etc/ssh") else []))
    """)
    for label in paths:
        for prefix in prefixes:
            assert out[f"{label}:{prefix}"] == "ENOENT", (label, prefix)
    # a file of the victim's outside their home that A cannot read on the host: hidden by
    # the guard (docs/identity.md; it showed as B's, unreadable, before)
    assert out["victim_file"] == "ENOENT"
    assert json.loads(out["ls:/home"]) == [env.a]
    for d in ("/root", "/var/log", "/etc/sudoers.d", "/etc/munge", str(site.root),
              str(site.run_dir)):
        assert json.loads(out[f"ls:{d}"]) == [], d
    assert json.loads(out["ssh_keys"]) == []


# Regression (was a SECURITY finding): the idmapped lower maps host uid 0 to the user, so
# inside-root owned every root-only file no deny pattern hid.  launcher/compute/private.py scans
# for root-only entries and the mask hides them (ENOENT; EACCES would do as well).
def test_root_only_files_outside_the_deny_list_stay_unreadable(env: Escape) -> None:
    path = env.probe / "root-only"
    on_host = env.on_host(env.a, "cat", str(path))
    _refused(on_host, "Permission denied")  # not A's
    out = env.inside(f"""
        attempt("read", read, {str(path)!r})
    """)
    assert out["read"] in ("EACCES", "ENOENT"), "A read a root-only host file from inside"


# Regression (was a strict xfail, SECURITY): deny globs and the root-only scan were applied
# once, when the environment started; a matching file created later was visible, and readable
# when root-owned.  The guard layer (sdeefs.fs.guard) now decides at lookup time.
def test_deny_patterns_hide_files_created_after_start(env: Escape) -> None:
    late = env.probe / "late_key"  # matches the site's deny pattern PROBE/*_key
    late.write_text("LATE KEY\n")
    late.chmod(0o644)  # readable by everybody: only the deny pattern can hide it
    try:
        out = env.inside(f"""
            attempt("stat", os.stat, {str(late)!r})
            attempt("read", read, {str(late)!r})
            say("listed", json.dumps("late_key" in os.listdir({str(env.probe)!r})))
        """)
    finally:
        late.unlink()
    assert out["stat"] == "ENOENT", out
    assert out["read"] == "ENOENT", out
    assert out["listed"] == "false"


def test_root_only_entries_created_after_start_stay_hidden(env: Escape) -> None:
    late = env.probe / "late"
    late.mkdir(mode=0o755)
    try:
        for name, mode in (("secret", 0o600), ("group-root", 0o640), ("public", 0o644)):
            (late / name).write_text(f"{name}\n")
            (late / name).chmod(mode)
        (late / "private-dir").mkdir(mode=0o700)
        (late / "private-dir" / "inside").write_text("readable, in a root-only directory\n")
        (late / "private-dir" / "inside").chmod(0o644)
        out = env.inside(f"""
            for entry in ("secret", "group-root", "private-dir", "private-dir/inside"):
                attempt("read:" + entry, read, {str(late)!r} + "/" + entry)
            attempt("read:public", read, {str(late)!r} + "/public")
            say("listing", json.dumps(sorted(os.listdir({str(late)!r}))))
            # root inside may still make an entry of a hidden name: it lands in its upper
            attempt("create", lambda: open({str(late)!r} + "/secret", "x").write("mine"))
            attempt("mine", read, {str(late)!r} + "/secret")
        """)
        for name in ("secret", "group-root", "private-dir", "private-dir/inside"):
            assert out[f"read:{name}"] == "ENOENT", (name, out)
        assert out["read:public"] == "OK"
        assert json.loads(out["listing"]) == ["public"]
        assert out["create"] == "OK"
        assert out["mine"] == "OK"
        assert (late / "secret").read_text() == "secret\n"  # the host's file is untouched
    finally:
        shutil.rmtree(late)


def test_a_dead_guard_fails_closed_and_relogin_recovers(env: Escape) -> None:
    """kill -9 of the guard's server: a new one takes over (guard.c "surviving a crash") and
    a root-only file made meanwhile stays hidden; kill -9 of every process holding the
    guard's connection (keeper and server): the view fails closed, a login recovers."""
    user = env.fresh_user()
    site = env.site
    guard = site.run_dir / user / "private" / "guard"
    keeper = int((site.run_dir / user / "private" / "guard.pid").read_text().split()[0])
    [server] = [p for p in _mount_daemon_pids(guard) if p != keeper]
    late = env.probe / "late-after-guard-death"
    later = env.probe / "later-after-guard-death"
    late.write_text("root only\n")
    late.chmod(0o600)
    try:
        os.kill(server, signal.SIGKILL)
        result = env.sh(f"cat {late}", user=user)
        assert result.returncode != 0
        assert "root only" not in result.stdout
        assert "No such file or directory" in result.stderr  # hidden by the new server
        assert server not in _mount_daemon_pids(guard)
        for pid in _mount_daemon_pids(guard):
            os.kill(pid, signal.SIGKILL)
        later.write_text("root only\n")  # a name the view never looked up
        later.chmod(0o600)
        result = env.sh(f"cat {later}", user=user)
        assert result.returncode != 0
        assert "root only" not in result.stdout
        # the view fails closed: ENOTCONN, or ECONNABORTED for a lookup the kernel had
        # already queued when the connection was aborted
        assert ("Transport endpoint is not connected" in result.stderr
                or "Software caused connection abort" in result.stderr), result.stderr
        env.inits[user] = site.start(user)  # a login replaces the broken environment
        out = env.inside(f"""
            attempt("read", read, {str(late)!r})
            attempt("read-later", read, {str(later)!r})
            attempt("public", read, "/etc/hostname")
        """, user=user)
        assert out["read"] == "ENOENT", out
        assert out["read-later"] == "ENOENT", out
        assert out["public"] == "OK", out
    finally:
        late.unlink()
        later.unlink(missing_ok=True)


def _mount_daemon_pids(mountpoint: Path) -> list[int]:
    """The pids of the FUSE daemon serving ``mountpoint`` (the processes holding /dev/fuse for
    it: sdeefs-guard's keeper and server)."""
    mount = mountinfo.at(mountpoint, resolve=False)
    assert mount is not None, f"nothing mounted at {mountpoint}"
    minor = mount.minor
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") == "/dev/fuse":
                    with open(f"/proc/{entry}/fdinfo/{fd}") as info:
                        if any(line.split() == ["fuse_connection:", str(minor)]
                               for line in info):
                            found.append(int(entry))
                            break
    assert found, f"no daemon found for {mountpoint}"
    return found


# -- 7. /proc/sys and other global settings -------------------------------------------------


def test_proc_sys_and_clock_are_read_only(env: Escape) -> None:
    # Each write would store the host's current value (drop_caches: 1, the page cache only),
    # so even a broken protection leaves the host as it was.
    knobs = ["kernel/core_pattern", "kernel/panic", "kernel/sysrq", "kernel/hostname",
             "kernel/modprobe", "kernel/printk", "vm/drop_caches", "vm/overcommit_memory"]
    present = [k for k in knobs if os.path.exists(f"/proc/sys/{k}")]
    assert "kernel/core_pattern" in present
    before = {}
    for knob in present:
        with contextlib.suppress(OSError), open(f"/proc/sys/{knob}") as f:
            before[knob] = f.read()
    values = {k: before.get(k, "1\n") for k in present}
    hostname = os.uname().nodename
    out = env.inside(f"""
        import socket, time
        for knob, value in {values!r}.items():
            attempt(knob, write, "/proc/sys/" + knob, value)
        attempt("sethostname", socket.sethostname, {hostname!r})
        now = time.clock_gettime_ns(time.CLOCK_REALTIME)
        ts = struct.pack("qq", now // 10**9, now % 10**9)  # "now": harmless if it went through
        call("clock_settime", "clock_settime", time.CLOCK_REALTIME,
             ctypes.create_string_buffer(ts, len(ts)))
    """)
    for knob in present:
        assert out[knob] == "EROFS", knob
    assert out["sethostname"] == "EPERM"
    assert out["clock_settime"] == "EPERM"
    after = {}
    for knob in before:
        with open(f"/proc/sys/{knob}") as f:
            after[knob] = f.read()
    assert after == before
    assert os.uname().nodename == hostname
    result = env.sh("echo 1 > /proc/sys/vm/drop_caches")
    _refused(result, "Read-only file system")


# -- 8. host processes ----------------------------------------------------------------------


def test_host_processes_are_invisible(env: Escape) -> None:
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        sleepers.append(subprocess.Popen(["sleep", "300"]))  # root's
        sleepers.append(subprocess.Popen(["sleep", "300"], user=env.site.uid(env.b),
                                         group=_gid(env.b), extra_groups=[]))  # the victim's
        targets = {"root_sleep": sleepers[0].pid, "victim_sleep": sleepers[1].pid,
                   "victim_init": env.init_b, "own_init_hostpid": env.init_a}
        out = env.inside(f"""
            for label, pid in {targets!r}.items():
                attempt("kill:" + label, os.kill, pid, 0)
                say("proc:" + label, os.path.exists(f"/proc/{{pid}}"))
                call("ptrace:" + label, "ptrace", PTRACE_ATTACH, pid, None, None)
                call("pidfd:" + label, "syscall", {SYS_PIDFD_OPEN}, pid, 0)
            call("ptrace:init", "ptrace", PTRACE_ATTACH, 1, None, None)
            procs = []
            for entry in os.listdir("/proc"):
                if entry.isdigit():
                    with contextlib.suppress(OSError):
                        lines = read(f"/proc/{{entry}}/status").decode().splitlines()
                        fields = dict(l.split(":", 1) for l in lines if ":" in l)
                        procs.append((int(entry), fields["Name"].strip(),
                                      int(fields["Uid"].split()[1])))
            say("procs", json.dumps(sorted(procs)))
        """)
        for label in targets:
            assert out[f"kill:{label}"] == "ESRCH", label
            assert out[f"proc:{label}"] == "False", label
            assert out[f"ptrace:{label}"] == "ESRCH", label
            assert out[f"pidfd:{label}"] == "ESRCH", label
        assert out["ptrace:init"] == "EPERM"  # the init has capabilities the session lacks
        procs = [tuple(p) for p in json.loads(out["procs"])]
        assert (1, "sdeefs-init", 0) in procs
        assert all(uid == 0 for _, _, uid in procs), procs  # all A's (inside root = A)
        assert "sleep" not in [name for _, name, _ in procs], procs
        ps = env.sh("ps -e -o pid=,comm=")
        assert ps.returncode == 0
        names = [line.split()[1] for line in ps.stdout.splitlines()]
        assert "sdeefs-init" in names, names
        assert "sleep" not in names, names
        assert all(p.poll() is None for p in sleepers)  # untouched
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()


# -- 9. set-id and capability bits made in the upper ----------------------------------------


def _file_cap(path: Path) -> tuple[int, int | None]:
    """(revision, rootid) of a file's security.capability, as the host reads it."""
    raw = os.getxattr(path, "security.capability")
    revision = struct.unpack_from("<I", raw)[0] >> 24
    return revision, struct.unpack_from("<I", raw, 20)[0] if revision == 3 else None


def test_setuid_and_file_caps_made_inside_grant_only_the_user(env: Escape) -> None:
    uid_b = env.site.uid(env.b)
    home_a = env.site.home(env.a)
    # a v2 file capability (effective; permitted CAP_DAC_READ_SEARCH): the kernel stores it as
    # v3 with the setter's root (host A) as rootid
    cap_v2 = struct.pack("<IIIII", 0x02000001, 1 << CAP_DAC_READ_SEARCH, 0, 0, 0)
    out = env.inside(f"""
        import shutil
        for path in ("/tmp/suid-id", "/usr/local/bin/suid-id"):
            shutil.copy("/usr/bin/id", path)
            os.chmod(path, 0o4755)
        for path in ("/usr/local/bin/capcat", os.environ["HOME"] + "/capcat"):
            shutil.copy("/bin/cat", path)
            os.chmod(path, 0o755)
            attempt("setcap:" + path, os.setxattr, path, "security.capability", {cap_v2!r})
    """)
    assert out["setcap:/usr/local/bin/capcat"] == "OK"
    assert out[f"setcap:{home_a}/capcat"] == "OK"
    # (a) inside: inside root, nothing more (nosuid view, no_new_privs, bounded capabilities)
    for path in ("/tmp/suid-id", "/usr/local/bin/suid-id"):
        result = env.sh(f"{path} -u")
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["0"], path
    result = env.sh("/usr/local/bin/capcat /proc/self/status")
    assert result.returncode == 0
    capeff = [line for line in result.stdout.splitlines() if line.startswith("CapEff")][0]
    assert not int(capeff.split()[1], 16) & (1 << CAP_DAC_READ_SEARCH)
    # the home is not nosuid, but the kernel refuses to exec a file whose (effective) file
    # capabilities the bounding set cannot grant
    result = env.sh(f"{home_a}/capcat /proc/self/status")
    _refused(result, "Operation not permitted")
    # (b) on the host: A's upper belongs to A's ids (inside root is A's first subordinate
    # id, docs/identity.md), out of everyone's reach but root's
    ids_a = of_user(env.a, 1000, allocate=False)
    upper = env.site.upper(env.a)
    suid = upper / "usr" / "local" / "bin" / "suid-id"
    st = suid.stat()
    assert (st.st_uid, st.st_gid) == ids_a.root
    assert st.st_mode & stat.S_ISUID  # kept, but it is A's subordinate id's bit
    for dirpath, dirnames, filenames in os.walk(upper):
        for entry in dirnames + filenames:
            path = os.path.join(dirpath, entry)
            st = os.lstat(path)
            assert ids_a.owns_uid(st.st_uid), path  # nothing in the upper is root's
            assert ids_a.owns_gid(st.st_gid), path
    for user in (env.a, env.b):
        result = env.on_host(user, "ls", str(upper))
        _refused(result, "Permission denied")
        result = env.on_host(user, str(suid), "-u")
        _refused(result, "Permission denied")
    assert _file_cap(upper / "usr" / "local" / "bin" / "capcat") == (3, ids_a.subuid)
    assert _file_cap(home_a / "capcat") == (3, ids_a.subuid)
    # Copies (as an admin might make) run on the host by B: euid A at most, no capabilities.
    scratch = Path(tempfile.mkdtemp(prefix="sdeefs-escape-copy-", dir="/var/tmp"))
    try:
        scratch.chmod(0o755)
        for name in ("suid-id", "capcat"):
            subprocess.run(["cp", "--preserve=all", str(upper / "usr/local/bin" / name),
                            str(scratch / name)], check=True)
        assert (scratch / "suid-id").stat().st_mode & stat.S_ISUID
        result = env.on_host(env.b, str(scratch / "suid-id"), "-u")
        assert result.returncode == 0, result.stderr
        assert int(result.stdout) == ids_a.subuid != 0  # never root, nor A
        result = env.on_host(env.b, str(scratch / "suid-id"), "-ru")
        assert result.returncode == 0, result.stderr
        assert int(result.stdout) == uid_b
        for user, binary in ((env.b, scratch / "capcat"), (env.a, home_a / "capcat")):
            result = env.on_host(user, str(binary), "/proc/self/status")
            assert result.returncode == 0, result.stderr
            caps = dict(line.split(":\t") for line in result.stdout.splitlines()
                        if line.startswith("Cap"))
            assert int(caps["CapEff"], 16) == int(caps["CapPrm"], 16) == 0, (user, caps)
            result = env.on_host(user, str(binary), "/etc/shadow")
            _refused(result, "Permission denied")
    finally:
        shutil.rmtree(scratch)


# -- 10. open_by_handle_at ------------------------------------------------------------------


def test_open_by_handle_at_is_refused(env: Escape) -> None:
    out = env.inside("""
        handles = {"guessed": fs_root_handle()}
        for label, path in (("passwd", "/etc/passwd"), ("home", os.environ["HOME"])):
            buf = ctypes.create_string_buffer(8 + 128)
            struct.pack_into("I", buf, 0, 128)
            mount_id = ctypes.c_int()
            if call("encode:" + label, "name_to_handle_at", -100, path.encode(), buf,
                    ctypes.byref(mount_id), 0) == 0:
                handles[label] = buf
        for mnt in ("/", os.environ["HOME"], "/tmp"):
            fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
            for label, handle in handles.items():
                call("open:" + label + ":" + mnt, "open_by_handle_at", fd, handle, os.O_RDONLY)
    """)
    # encoding is unprivileged (the overlay view cannot encode); decoding is the danger
    assert out["encode:passwd"] in ("EOPNOTSUPP", "ENOTSUP", "OK")  # same number on Linux
    assert out["encode:home"] == "OK"
    opened = {label: value for label, value in out.items() if label.startswith("open:")}
    assert len(opened) >= 6
    assert set(opened.values()) == {"EPERM"}, opened  # needs CAP_DAC_READ_SEARCH


# -- 11. leaked fds -------------------------------------------------------------------------


def test_no_host_fds_leak_into_the_environment(env: Escape) -> None:
    result = env.sh("ls /proc/self/fd")
    assert result.returncode == 0
    assert sorted(result.stdout.split()) == ["0", "1", "2", "3"]  # 3: ls's own directory fd
    out = env.inside("""
        say("fds", json.dumps(sorted(int(n) for n in os.listdir("/proc/self/fd"))))
        for fd in (0, 1, 2):
            say("fd%d" % fd, os.readlink("/proc/self/fd/%d" % fd))
        init_fds = attempt("init_fds", os.listdir, "/proc/1/fd") or []
        say("init_fd_names", json.dumps(sorted(init_fds)))
        for n in init_fds:
            attempt("init_fd_link:" + n, os.readlink, "/proc/1/fd/" + n)
        attempt("init_cwd", os.readlink, "/proc/1/cwd")
    """)
    assert json.loads(out["fds"]) == [0, 1, 2, 3]  # 3: the listing's own directory fd
    assert out["fd0"] == "/dev/null"
    assert out["fd1"].startswith("pipe:")
    assert out["fd2"].startswith("pipe:")
    assert out["init_fds"] in ("OK", "EACCES")
    assert set(json.loads(out["init_fd_names"])) <= {"0", "1", "2"}
    for label, value in out.items():
        if label.startswith("init_fd_link:"):
            assert value == "EACCES", (label, value)
    assert out["init_cwd"] == "EACCES"
    # On the host: the init and its parent (the helper) hold nothing but /dev/null.
    with open(f"/proc/{env.init_a}/status") as f:
        ppid = int([line for line in f if line.startswith("PPid:")][0].split()[1])
    for pid in (env.init_a, ppid):
        links = {n: os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        assert set(links) == {"0", "1", "2"}, (pid, links)
        # The helper's /dev/null is the one of the host tree it detached: its name may read
        # "/null" (its mount is no longer below a root anybody holds); the device tells.
        null = os.stat("/dev/null").st_rdev
        assert {os.stat(f"/proc/{pid}/fd/{n}").st_rdev for n in links} == {null}, (pid, links)


# -- 12. capabilities -----------------------------------------------------------------------


def test_capabilities_and_id_maps(env: Escape) -> None:
    result = env.sh("grep -E '^(Cap|NoNewPrivs)' /proc/self/status; "
                    "cat /proc/self/uid_map /proc/self/gid_map /proc/self/setgroups")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    status = {k: v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
    for field in ("CapBnd", "CapEff", "CapPrm", "CapInh", "CapAmb"):
        mask = int(status[field], 16)
        for cap, bit in FORBIDDEN_CAPS.items():
            assert not mask & (1 << bit), f"{field} has CAP_{cap}"
    assert int(status["CapAmb"], 16) == int(status["CapInh"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    rest = [line.split() for line in lines if ":" not in line]
    # the map of docs/identity.md: A's subordinate ids and A's own; nothing else, and setgroups
    # allowed only over those (apt and su switch groups inside)
    ids = of_user(env.a, 1000, allocate=False)
    maps = [tuple(int(x) for x in line) for line in rest[:-1]]
    assert maps == [*ids.env_uid_map(), *ids.env_gid_map()]
    assert rest[-1] == ["allow"]


# -- 13. writes stay in the user's view -----------------------------------------------------


def test_writes_stay_in_the_view(env: Escape) -> None:
    hostname = _sha256("/etc/hostname")
    local_bin = sorted(os.listdir("/usr/local/bin"))
    result = env.sh(
        "set -e; echo escaped > /etc/sdeefs-escape-marker; "
        "printf '#!/bin/sh\\necho x\\n' > /usr/local/bin/sdeefs-escape-x; "
        "chmod 755 /usr/local/bin/sdeefs-escape-x; "
        "echo 'sdeefs-escape:x:0:0::/:/bin/sh' >> /etc/passwd; "
        "rm -f /etc/hostname; ln -s /etc/group /usr/local/bin/sdeefs-escape-link; "
        "echo sdeefs-escape-appended >> /usr/local/bin/sdeefs-escape-link; "
        "cat /etc/sdeefs-escape-marker; /usr/local/bin/sdeefs-escape-x; "
        "grep -c sdeefs-escape /etc/passwd; test ! -e /etc/hostname; tail -1 /etc/group")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["escaped", "x", "1", "sdeefs-escape-appended"]  # in view
    # ... and nowhere else
    assert _host_names("/etc", "sdeefs-escape") == []
    assert sorted(os.listdir("/usr/local/bin")) == local_bin
    assert _sha256("/etc/hostname") == hostname
    for path in ("/etc/passwd", "/etc/group"):
        with open(path) as f:
            assert "sdeefs-escape" not in f.read(), path
    upper = env.site.upper(env.a)
    assert (upper / "etc" / "sdeefs-escape-marker").read_text() == "escaped\n"
    assert (upper / "usr" / "local" / "bin" / "sdeefs-escape-x").exists()
    # The victim's view shows the host, not A's changes.
    out = env.inside("""
        for path in ("/etc/sdeefs-escape-marker", "/usr/local/bin/sdeefs-escape-x",
                     "/usr/local/bin/sdeefs-escape-link"):
            attempt("stat:" + path, os.lstat, path)
        say("passwd", b"sdeefs-escape" in read("/etc/passwd"))
        say("group", b"sdeefs-escape" in read("/etc/group"))
        say("hostname", os.path.exists("/etc/hostname"))
    """, user=env.b)
    for path in ("/etc/sdeefs-escape-marker", "/usr/local/bin/sdeefs-escape-x",
                 "/usr/local/bin/sdeefs-escape-link"):
        assert out[f"stat:{path}"] == "ENOENT", path
    assert out["passwd"] == out["group"] == "False"
    assert out["hostname"] == str(hostname is not None)


def test_symlink_swap_race_stays_in_the_upper(env: Escape) -> None:
    """Swap a directory with a symlink to /etc while creating files through it: the root FUSE
    daemon under the upper must never follow the link on the host.

    A user of its own: the race also trips the daemon crash of the next test, which ends the
    race early (and that environment) while that bug stands.
    """
    user = env.fresh_user()
    out = env.inside("""
        import time
        base = "/opt/sdeefs-escape-race"
        os.makedirs(base + "/d", exist_ok=True)
        pid = os.fork()
        if pid == 0:
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                with contextlib.suppress(OSError):
                    os.rename(base + "/d", base + "/d.real")
                    os.symlink("/etc", base + "/d")
                    os.unlink(base + "/d")
                    os.rename(base + "/d.real", base + "/d")
            os._exit(0)
        made, n = 0, 0
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            n += 1
            with contextlib.suppress(OSError):
                write(base + "/d/sdeefs-escape-race-%d" % n, "x")
                made += 1
        os.waitpid(pid, 0)
        say("made", made)
    """, user=user)
    assert int(out["made"]) > 0
    assert _host_names("/etc", "sdeefs-escape-race") == []
    upper = env.site.upper(user)
    race = upper / "opt" / "sdeefs-escape-race"
    for dirpath, _, filenames in os.walk(upper):
        if any(name.startswith("sdeefs-escape-race-") for name in filenames):
            # below the race directory, or (when the link was in place) the view's /etc,
            # copied up: the user's upper either way
            assert Path(dirpath) in (race / "d", race / "d.real", upper / "etc"), dirpath


# Regression (was a denial of service): readlink of a symlink unlinked while still referenced
# reached an assert in cow.CowFS.readlink; the AssertionError killed the upper's daemon.
def test_upper_daemon_survives_readlink_of_an_unlinked_symlink(env: Escape) -> None:
    user = env.fresh_user()
    out = env.inside("""
        os.symlink("/etc", "/opt/sdeefs-escape-link")
        fd = os.open("/opt/sdeefs-escape-link", os.O_PATH | os.O_NOFOLLOW)
        os.unlink("/opt/sdeefs-escape-link")
        attempt("readlink", lambda: os.readlink("", dir_fd=fd))  # readlinkat(fd, "")
        attempt("after", os.listdir, "/opt")
    """, user=user)
    assert out["readlink"] in ("OK", "ENOENT"), out
    assert out["after"] == "OK", out
    assert daemon_pid(str(env.site.root / user / "state")) is not None


def test_overlay_xattrs_cannot_be_forged(env: Escape) -> None:
    """overlayfs reads its metadata from user.overlay.* xattrs of the upper (userxattr): set
    through the view they must be refused or stored escaped, never as the real thing."""
    wanted = {"/opt/sdeefs-escape-xattr": {"redirect": b"/root", "opaque": b"y"},
              "/etc/passwd": {"redirect": b"/etc/shadow", "metacopy": b"", "origin": b""}}
    out = env.inside(f"""
        os.makedirs("/opt/sdeefs-escape-xattr", exist_ok=True)
        for path, xattrs in {wanted!r}.items():
            for key, value in xattrs.items():
                attempt(path + ":" + key, os.setxattr, path, "user.overlay." + key, value)
        attempt("trusted", os.setxattr, "/etc/passwd", "trusted.overlay.redirect", b"/root")
        say("passwd_is_passwd", read("/etc/passwd").startswith(b"root:"))
        attempt("shadow", os.stat, "/etc/shadow")
        say("dir", json.dumps(os.listdir("/opt/sdeefs-escape-xattr")))
    """)
    assert out["trusted"] == "EPERM"
    assert out["passwd_is_passwd"] == "True"
    assert out["shadow"] == "ENOENT"
    assert json.loads(out["dir"]) == []
    upper = env.site.upper(env.a)
    for path, xattrs in wanted.items():
        on_host = upper / path.lstrip("/")
        for key, value in xattrs.items():
            result = out[f"{path}:{key}"]
            assert result in ("OK", "EPERM"), (path, key, result)  # EPERM before Linux 6.7
            if result == "OK":  # escaped: user.overlay.overlay.KEY, inert for overlayfs
                assert os.getxattr(on_host, f"user.overlay.overlay.{key}") == value
            with contextlib.suppress(OSError):  # overlay's own (origin on copy-up) may exist
                assert os.getxattr(on_host, f"user.overlay.{key}") != value or key == "origin"


# -- joining someone else's environment -----------------------------------------------------


def test_attacker_cannot_join_the_victims_environment(env: Escape) -> None:
    victim_init = (env.site.run_dir / env.b / "init").read_text()
    pid = victim_init.split()[0]
    result = env.on_host(env.a, str(ENTER), "join", "--pid", pid, "--", "id")
    assert result.returncode == 1
    assert "belong to uid" in result.stderr or "belongs to uid" in result.stderr
    # the kernel's own barrier, without the helper's check
    result = env.on_host(env.a, PYTHON, "-c", textwrap.dedent(f"""
        import errno, os
        for ns in ("user", "mnt", "pid"):
            try:
                os.open("/proc/{pid}/ns/" + ns, os.O_RDONLY)
                print(ns, "OK")
            except OSError as exc:
                print(ns, errno.errorcode[exc.errno])
    """))
    assert result.stdout.split() == ["user", "EACCES", "mnt", "EACCES", "pid", "EACCES"]
    # a forged run dir that names the victim's init as A's own
    forged = Path(tempfile.mkdtemp(prefix="sdeefs-escape-run-", dir="/var/tmp"))
    try:
        forged.chmod(0o755)
        (forged / env.a).mkdir(mode=0o755)
        (forged / env.a / "init").write_text(victim_init)
        (forged / env.a / "init").chmod(0o644)
        result = env.on_host(env.a, "env", f"SDEEFS_RUN_DIR={forged}", str(SHELL), "-c", "id")
        assert result.returncode == 1
        assert "belong to uid" in result.stderr or "belongs to uid" in result.stderr
    finally:
        shutil.rmtree(forged)
