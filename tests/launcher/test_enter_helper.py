"""Real-namespace tests of the C helper ``launcher/enter/`` (idmap, start, join).

They run as root: the helper is compiled into a tmp dir, a throw-away user is created with
``useradd`` and removed with ``userdel -r`` in a ``finally``, and the layers are built here
without the FUSE daemon:

- lower: an idmapped bind (``sdeefs-enter idmap``) of the host ``/``, plus a small top layer;
- upper/work: plain directories owned by the test user under a root-owned 0700 directory.

The upper, work and top layer sit on a tmpfs mounted inside that 0700 directory, not directly on
``/tmp``: overlayfs refuses a layer that lives below another layer's root on the same filesystem
("overlayfs: overlapping lowerdir path", ELOOP), and every directory of the root filesystem is
below the lower's root.  In production the upper is on the FUSE mount, which is its own filesystem.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "launcher" / "enter"  # built with its Makefile
CAP_SYS_ADMIN = 21
CAP_SYS_PTRACE = 19
CAP_CHOWN = 0


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "sdeefs-enter idmap/start need root (idmapped mounts, another user's id maps)"
    for tool in ("gcc", "make", "useradd", "userdel", "runuser", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/proc/self/ns/user").exists():
        return "this kernel has no user namespaces"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


# ---------------------------------------------------------------------------------------------
# helpers


def _poll(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _proc_field(pid: int | str, field: str) -> str | None:
    """A field of /proc/PID/status, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _alive(pid: int) -> bool:
    state = _proc_field(pid, "State")
    return state is not None and not state.startswith("Z")


def _wait_gone(pid: int) -> bool:
    return _poll(lambda: not _alive(pid))


def _live_pids_of_uid(uid: int) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            uids = _proc_field(entry, "Uid")
            if uids is not None and int(uids.split()[0]) == uid and _alive(int(entry)):
                pids.add(int(entry))
    return pids


def _pids_in_pid_ns(ns: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                    found.append(int(entry))
    return found


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if str(path) in line]


def _umount_lazy(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@attrs.frozen
class EnvUser:
    name: str
    uid: int
    gid: int
    home: Path


@attrs.define(eq=False)
class Helper:
    """The compiled helper and the layers it starts environments on."""

    binary: Path
    fsopen_binary: Path
    user: EnvUser
    base: Path  # root-owned 0700
    lower: Path  # idmapped bind of /
    layers: Path  # tmpfs holding mask/, upper-*/ and work-*/
    started: list[int] = attrs.field(factory=list)

    def run(self, *args: str, user: str | None = None, binary: Path | None = None,
            timeout: float = 10) -> subprocess.CompletedProcess[str]:
        prefix = ["runuser", "-u", user, "--"] if user else []
        return subprocess.run([*prefix, str(binary or self.binary), *args], capture_output=True,
                              text=True, timeout=timeout, check=False)

    def new_upper(self, name: str) -> tuple[Path, Path]:
        upper, work = self.layers / f"upper-{name}", self.layers / f"work-{name}"
        for path in (upper, work):
            path.mkdir()
            os.chown(path, self.user.uid, self.user.gid)
        return upper, work

    def start(self, name: str, *extra: str, lower: Path | None = None,
              binary: Path | None = None) -> int:
        upper, work = self.new_upper(name)
        result = self.run("start", "--uid", str(self.user.uid), "--gid", str(self.user.gid),
                          "--root-lower", str(self.layers / "mask"),
                          "--root-lower", str(lower or self.lower),
                          "--root-upper", str(upper), "--root-work", str(work),
                          "--home", str(self.user.home), *extra, binary=binary)
        assert result.returncode == 0, result.stderr
        pid = int(result.stdout)
        self.started.append(pid)
        return pid

    def join(self, pid: int, *cmd: str, user: str | None = None,
             options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return self.run("join", "--pid", str(pid), *options, "--", *cmd, user=user)

    def out(self, pid: int, *cmd: str, user: str | None = None) -> str:
        result = self.join(pid, *cmd, user=user)
        assert result.returncode == 0, (cmd, result.stderr)
        return result.stdout

    def stop(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        assert _wait_gone(pid), f"environment {pid} survived SIGKILL"


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def env_user() -> Iterator[EnvUser]:
    name = f"sdeefs-t{secrets.token_hex(4)}"
    subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        yield EnvUser(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))
    finally:
        # -f: the environments' exited launchers may linger as zombies until PID 1 reaps them.
        subprocess.run(["userdel", "-r", "-f", name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def helper(env_user: EnvUser) -> Iterator[Helper]:
    bindir = Path(tempfile.mkdtemp(prefix="sdeefs-enter-bin-"))
    bindir.chmod(0o755)  # the test user runs it too
    base = Path(tempfile.mkdtemp(prefix="sdeefs-enter-test-"))  # root-owned, 0700
    lower, layers = base / "lower", base / "layers"
    h = Helper(bindir / "sdeefs-enter", bindir / "sdeefs-enter-fsopen", env_user, base, lower,
               layers)
    try:
        make = ["make", "-s", "-C", str(SOURCE)]
        subprocess.run([*make, f"OUT={h.binary}"], check=True)
        subprocess.run([*make, f"OUT={h.fsopen_binary}",
                        "EXTRA_CFLAGS=-DSDEEFS_TEST_FSOPEN_ONLY"], check=True)
        lower.mkdir()
        layers.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "sdeefs-test", str(layers)],
                       check=True)
        (layers / "mask" / "etc").mkdir(parents=True)
        (layers / "mask" / "etc" / "sdeefs-marker").write_text("from the top layer\n")
        result = h.run("idmap", "--uid", str(env_user.uid), "--gid", str(env_user.gid), "/",
                       str(lower))
        assert result.returncode == 0, result.stderr
        yield h
    finally:
        for pid in h.started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in h.started:
            _wait_gone(pid)
        for path in base.iterdir():
            _umount_lazy(path)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(bindir, ignore_errors=True)


@pytest.fixture(scope="module")
def env(helper: Helper) -> Iterator[int]:
    """One environment shared by the read-mostly tests."""
    # Bind sources are opened as the user (root inside, U outside): not below the 0700 base.
    public = Path(tempfile.mkdtemp(prefix="sdeefs-enter-pub-"))
    pid = None
    try:
        public.chmod(0o755)
        for path in (public / "data", public / "ro"):
            path.mkdir()
            (path / "hello").write_text("hello\n")
            os.chown(path, helper.user.uid, helper.user.gid)
        pid = helper.start("main", "--hide", "/etc/shadow", "--hide", "/nonexistent/thing",
                           "--bind", f"{public}/data:/srv/data",
                           "--ro-bind", f"{public}/ro:/srv/ro", "--tmp-size", "16m")
        yield pid
    finally:
        if pid is not None:
            helper.stop(pid)
        shutil.rmtree(public, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# idmap / start / join


def test_idmap_shows_host_root_as_the_user(helper: Helper) -> None:
    st = (helper.lower / "etc" / "passwd").stat()
    assert (st.st_uid, st.st_gid) == (helper.user.uid, helper.user.gid)
    assert os.listdir(helper.lower / "proc") == []  # not recursive: /proc's mount is not in it
    options = next(m for m in _mounts_under(helper.lower) if f" {helper.lower} " in m).split()[3]
    assert {"ro", "nosuid", "nodev", "idmapped"} <= set(options.split(","))
    with pytest.raises(OSError, match="Read-only"):
        (helper.lower / "tmp" / "x").write_text("")


def test_start_prints_the_init_pid(helper: Helper, env: int) -> None:
    with open(f"/proc/{env}/comm") as f:
        assert f.read() == "sdeefs-init\n"
    uids = _proc_field(env, "Uid")
    assert uids is not None
    assert {int(u) for u in uids.split()} == {helper.user.uid}
    assert os.readlink(f"/proc/{env}/ns/pid") != os.readlink("/proc/self/ns/pid")
    assert os.readlink(f"/proc/{env}/ns/user") != os.readlink("/proc/self/ns/user")


def test_root_inside_user_outside(helper: Helper, env: int) -> None:
    assert helper.out(env, "id", "-u") == "0\n"
    assert helper.out(env, "cat", "/proc/self/uid_map").split() == ["0", str(helper.user.uid), "1"]
    assert helper.out(env, "cat", "/proc/self/gid_map").split() == ["0", str(helper.user.gid), "1"]


def test_only_the_environments_processes_are_visible(helper: Helper, env: int) -> None:
    listing = helper.out(env, "sh", "-c",
                         'for p in /proc/[0-9]*; do echo "${p#/proc/} $(cat $p/comm)"; done')
    procs = dict(line.split(" ", 1) for line in listing.splitlines())
    assert procs["1"] == "sdeefs-init"
    assert set(procs.values()) <= {"sdeefs-init", "sh", "cat"}, procs
    assert len(procs) <= 3


def test_host_files_visible_and_writes_go_to_the_upper(helper: Helper, env: int) -> None:
    assert "root:x:0:0:" in helper.out(env, "cat", "/etc/passwd")
    assert helper.out(env, "cat", "/etc/sdeefs-marker") == "from the top layer\n"
    name = f"sdeefs-x-{secrets.token_hex(4)}"
    target = f"/usr/local/bin/{name}"
    helper.out(env, "sh", "-c", f"echo hi > {target} && chmod 755 {target}")
    assert helper.out(env, "stat", "-c", "%u %a", target) == "0 755\n"
    in_upper = helper.layers / "upper-main" / "usr" / "local" / "bin" / name
    st = in_upper.stat()
    assert (st.st_uid, st.st_gid) == (helper.user.uid, helper.user.gid)
    assert in_upper.read_text() == "hi\n"
    assert not Path("/usr/local/bin", name).exists()


def test_join_as_the_user(helper: Helper, env: int) -> None:
    user = helper.user
    assert helper.out(env, "id", "-u", user=user.name) == "0\n"
    helper.out(env, "sh", "-c", f"echo mine > {user.home}/from-inside", user=user.name)
    st = (user.home / "from-inside").stat()
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)


def test_another_user_is_refused(helper: Helper, env: int) -> None:
    result = helper.join(env, "id", user="nobody")
    assert result.returncode == 1
    assert result.stderr.startswith("sdeefs-enter: check pid")
    assert "belong to uid" in result.stderr or "belongs to uid" in result.stderr


def test_a_non_sdeefs_pid_is_refused(helper: Helper) -> None:
    result = helper.join(os.getpid(), "id")
    assert result.returncode == 1
    assert "not an sdeefs environment" in result.stderr
    with open("/proc/sys/kernel/pid_max") as f:
        missing = int(f.read()) + 1
    result = helper.join(missing, "id")
    assert (result.returncode, result.stderr) == (
        1, f"sdeefs-enter: check pid {missing}: no such process\n")


def test_hidden_paths(helper: Helper, env: int) -> None:
    assert Path("/etc/shadow").stat().st_size > 0
    assert helper.out(env, "cat", "/etc/shadow") == ""
    # A nested user namespace cannot peel the mask off: the mounts are locked.
    peeled = helper.join(env, "unshare", "-Urm", "sh", "-c",
                         "umount -l /etc/shadow; wc -c < /etc/shadow")
    assert peeled.stdout.strip() == "0"


def test_binds(helper: Helper, env: int) -> None:
    assert helper.out(env, "cat", "/srv/data/hello", "/srv/ro/hello") == "hello\nhello\n"
    helper.out(env, "sh", "-c", "echo new > /srv/data/new")
    result = helper.join(env, "sh", "-c", "echo no > /srv/ro/no")
    assert result.returncode != 0
    assert "Read-only file system" in result.stderr
    assert helper.out(env, "findmnt", "-no", "OPTIONS", "/tmp").startswith("rw,nosuid,nodev")
    assert "size=16384k" in helper.out(env, "findmnt", "-no", "OPTIONS", "/tmp")


def test_tmp_dir_is_a_host_directory_bound_by_root(helper: Helper) -> None:
    """--tmp-dir (a job's /tmp): the host directory, bound, even below root-only
    directories the user could not walk (the layers' tmpfs is 0700 root)."""
    tmp = helper.layers / "job-tmp"
    tmp.mkdir(mode=0o1777)
    os.chmod(tmp, 0o1777)
    (tmp / "from-host").write_text("host\n")
    pid = helper.start("tmpdir", "--tmp-dir", str(tmp))
    try:
        assert helper.out(pid, "cat", "/tmp/from-host") == "host\n"
        helper.out(pid, "sh", "-c", "echo inside > /tmp/from-inside")
        assert (tmp / "from-inside").read_text() == "inside\n"
        options = helper.out(pid, "findmnt", "-no", "OPTIONS", "/tmp")
        assert options.startswith("rw,nosuid,nodev"), options
        # not a tmpfs of its own: the directory of the layers' filesystem
        assert helper.out(pid, "findmnt", "-no", "FSROOT", "/tmp") == "/job-tmp\n"
    finally:
        helper.stop(pid)


def test_volatile_mounts_the_upper_as_scratch_and_only_then(helper: Helper) -> None:
    """--volatile (a job's scratch upper, discarded at its end): overlayfs' "volatile", with
    either mount API; a copy-up and an fsync inside work as before.  Without it (a login's
    upper, journaled and kept): not volatile."""
    for binary in (helper.binary, helper.fsopen_binary):
        name = f"volatile-{binary.name}"
        mine = helper.layers / "mask" / name / "f"  # a file of the user's in a lower layer
        mine.parent.mkdir()
        mine.write_text("lower\n")
        for path in (mine.parent, mine):
            os.chown(path, helper.user.uid, helper.user.gid)
        pid = helper.start(name, "--volatile", binary=binary)
        try:
            options = helper.out(pid, "findmnt", "-no", "OPTIONS", "/").strip()
            assert "fsync=volatile" in options.split(","), (binary, options)
            helper.out(pid, "sh", "-c", f"echo x >> /{name}/f && sync /{name}/f")
            assert (helper.layers / f"upper-{name}" / name / "f").read_text() == \
                "lower\nx\n"  # copied up, then written
            assert mine.read_text() == "lower\n"
        finally:
            helper.stop(pid)
    pid = helper.start("kept")
    try:
        assert "fsync=volatile" not in helper.out(pid, "findmnt", "-no", "OPTIONS", "/").strip() \
            .split(",")
    finally:
        helper.stop(pid)


def test_capabilities(helper: Helper, env: int) -> None:
    status = dict(line.split(":\t", 1) for line in
                  helper.out(env, "cat", "/proc/self/status").splitlines() if ":\t" in line)
    bounding = int(status["CapBnd"], 16)
    assert not bounding & (1 << CAP_SYS_ADMIN)
    assert not bounding & (1 << CAP_SYS_PTRACE)
    assert bounding & (1 << CAP_CHOWN)
    assert int(status["CapEff"], 16) == bounding
    assert int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert helper.join(env, "mount", "-t", "tmpfs", "x", "/mnt").returncode != 0
    assert helper.join(env, "sh", "-c", "echo h > /proc/sysrq-trigger").returncode != 0
    assert helper.join(env, "sh", "-c", "echo 1 > /proc/sys/kernel/sysrq").returncode != 0
    kept = helper.join(env, "grep", "CapBnd", "/proc/self/status",
                       options=("--keep-cap", "CAP_SYS_PTRACE"))
    assert int(kept.stdout.split()[1], 16) & (1 << CAP_SYS_PTRACE)


def test_cwd_exit_status_and_signals(helper: Helper, env: int) -> None:
    assert helper.join(env, "pwd", options=("--cwd", "/etc")).stdout == "/etc\n"
    assert helper.join(env, "sh", "-c", "exit 7").returncode == 7
    missing = helper.join(env, "/no/such/command")
    assert (missing.returncode, missing.stderr) == (
        1, "sdeefs-enter: exec /no/such/command: No such file or directory\n")
    proc = subprocess.Popen([str(helper.binary), "join", "--pid", str(env), "--", "sleep", "30"])
    try:
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # forwarded to the command
        assert proc.wait(timeout=5) == 128 + signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_usage_and_setup_errors_leave_nothing(helper: Helper, env: int) -> None:
    assert helper.run("bogus").returncode == 2
    assert helper.run("start", "--uid", "x").returncode == 2
    before = _live_pids_of_uid(helper.user.uid)
    upper, work = helper.new_upper("broken")
    result = helper.run("start", "--uid", str(helper.user.uid), "--gid", str(helper.user.gid),
                        "--root-lower", str(helper.lower), "--root-upper", str(upper),
                        "--root-work", str(work), "--home", str(helper.user.home),
                        "--bind", "/no/such/source:/x")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "sdeefs-enter: bind /x: source /no/such/source: No such file or directory\n")
    assert _poll(lambda: _live_pids_of_uid(helper.user.uid) <= before)


def test_fsopen_fallback(helper: Helper) -> None:
    pid = helper.start("fsopen", binary=helper.fsopen_binary)
    try:
        assert helper.out(pid, "id", "-u") == "0\n"
        assert "lowerdir+=" in helper.out(pid, "findmnt", "-no", "OPTIONS", "/")
    finally:
        helper.stop(pid)


def test_kill_ends_the_environment_and_nothing_stays_mounted(helper: Helper) -> None:
    own_lower = helper.base / "lower-kill"
    own_lower.mkdir()
    result = helper.run("idmap", "--uid", str(helper.user.uid), "--gid", str(helper.user.gid),
                        "/", str(own_lower))
    assert result.returncode == 0, result.stderr
    pid = helper.start("kill", lower=own_lower)
    ns = os.readlink(f"/proc/{pid}/ns/pid")
    joined = subprocess.Popen([str(helper.binary), "join", "--pid", str(pid), "--", "sh", "-c",
                               "sleep 100 & sleep 100 & wait"])
    try:
        assert _poll(lambda: len(_pids_in_pid_ns(ns)) >= 4)  # init, sh, two sleeps
        os.kill(pid, signal.SIGKILL)
        assert joined.wait(timeout=5) == 128 + signal.SIGKILL
        assert _poll(lambda: not _pids_in_pid_ns(ns)), _pids_in_pid_ns(ns)
    finally:
        joined.kill()
        joined.wait()
        helper.stop(pid)
    subprocess.run(["umount", str(own_lower)], check=True)  # not busy: the namespace is gone
    assert _mounts_under(own_lower) == []
    assert [m for m in _mounts_under(helper.layers) if "overlay" in m] == []


# ---------------------------------------------------------------------------------------------
# the full id map (docs/identity.md) and the SLURM client shims


def test_bad_id_maps_are_usage_errors(helper: Helper) -> None:
    common = ["--uid", str(helper.user.uid), "--gid", str(helper.user.gid)]
    for maps in (["--uid-map", "0:0:1", "--gid-map", "0:200000:65536"],  # host root: never
                 ["--uid-map", "0:200000:65536,", "--gid-map", "0:200000:65536"],
                 ["--uid-map", "0:200000", "--gid-map", "0:200000:65536"],
                 ["--uid-map", "0:200000:0", "--gid-map", "0:200000:65536"],
                 ["--uid-map", "0:200000:65536"]):  # one without the other
        for command in ("start", "idmap"):
            result = helper.run(command, *common, *maps, "/", str(helper.base / "x"))
            assert result.returncode == 2, (command, maps, result.stderr)
            assert result.stderr.startswith("sdeefs-enter: usage:"), result.stderr
    result = helper.run("start", *common, "--uid-map", "0:0:1", "--gid-map", "0:1:1",
                        "--root-view", "/", "--home", "/")
    assert "refusing a map to host id 0" in result.stderr


def test_a_full_map_and_the_slurm_shims(helper: Helper) -> None:
    """Inside root is a subordinate id, the user itself; a shim run by inside root runs the
    real client as the user, with the user's USER and HOME; run by the user, unchanged."""
    u, g = helper.user.uid, helper.user.gid
    sub = 4_000_000_000  # far above what useradd allocates: this test writes no /etc/subuid
    maps = ["--uid-map", f"0:{sub}:{u},{u + 1}:{sub + u + 1}:{65536 - u - 1},{u}:{u}:1",
            "--gid-map", f"0:{sub}:{g},{g + 1}:{sub + g + 1}:{65536 - g - 1},{g}:{g}:1"]
    pid = helper.start("fullmap", *maps, "--ro-bind", "/usr/bin/id:/run/sdeefs/slurm/sinfo",
                       "--ro-bind", "/usr/bin/env:/run/sdeefs/slurm/squeue",
                       "--ro-bind", f"{helper.binary}:/usr/local/bin/sinfo",
                       "--ro-bind", f"{helper.binary}:/usr/local/bin/squeue")
    try:
        assert helper.out(pid, "cat", "/proc/self/uid_map").split()[:3] == ["0", str(sub), str(u)]
        assert helper.out(pid, "cat", "/proc/self/setgroups").strip() == "allow"
        assert _proc_field(pid, "Uid") == f"{sub}\t{sub}\t{sub}\t{sub}"  # the init: inside root
        assert helper.out(pid, "id", "-u").strip() == "0"
        assert helper.out(pid, "/usr/local/bin/sinfo", "-u").strip() == str(u)
        assert helper.out(pid, "/usr/local/bin/sinfo", "-g").strip() == str(g)
        env = dict(line.split("=", 1) for line in
                   helper.out(pid, "/usr/local/bin/squeue").splitlines() if "=" in line)
        assert (env["USER"], env["LOGNAME"], env["HOME"]) == (helper.user.name,
                                                              helper.user.name,
                                                              str(helper.user.home))
        # the user joining (as the user namespace's owner) is root inside too
        assert helper.out(pid, "/usr/local/bin/sinfo", "-u", user=helper.user.name).strip() \
            == str(u)
        assert helper.out(pid, "setpriv", f"--reuid={u}", f"--regid={g}", "--clear-groups",
                          "/usr/local/bin/sinfo", "-u").strip() == str(u)
    finally:
        helper.stop(pid)
