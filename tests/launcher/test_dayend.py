"""The end of a user's day, through the PAM hook (pamtester): logout, lockout, relogin."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from sdeefs.fs.daemon import daemon_pid
from sdeefs.launcher.procs import InitProcess

from .launcher_site import Site, open_site, requires_launcher

pytestmark = requires_launcher


def _open(site: Site, service: str, user: str) -> None:
    result = site.pamtester(service, user, "open_session")
    assert result.returncode == 0, result.stderr


def _close(site: Site, service: str, user: str) -> None:
    result = site.pamtester(service, user, "close_session")
    assert result.returncode == 0, result.stderr


def _wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


@contextlib.contextmanager
def _pinning_namespace() -> Iterator[int]:
    """What issue 11 reproduces with: root copies every mount into a private mount namespace
    (``unshare -m``) that outlives the user's logout.  Yields its pid; killed at the end."""
    own = os.readlink("/proc/self/ns/mnt")
    pin = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "120"])
    try:
        _wait_for(lambda: _comm(pin.pid) == "sleep" and
                  os.readlink(f"/proc/{pin.pid}/ns/mnt") != own, 10, "unshare runs sleep")
        yield pin.pid
    finally:
        pin.kill()
        pin.wait()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_login_after_a_logout_pinned_by_another_mount_namespace() -> None:
    """Issue 11, item 6: a daemon whose mount another namespace still holds must not lock
    the user out; nothing written before is lost.  (grace 0: the logout ends the
    environment at once, as it did when the lockout was seen.)"""
    with open_site(extra="grace = 0\n") as site:
        _pinned_logout_and_login(site)


def _pinned_logout_and_login(site: Site) -> None:
    user = site.add_user()
    service = site.pam_service()
    state = str(site.root / user / "state")
    _open(site, service, user)
    site.run(user, "echo before > /etc/pinned.conf")
    first_daemon = daemon_pid(state)
    assert first_daemon is not None
    with _pinning_namespace():
        started = time.monotonic()
        _close(site, service, user)
        assert time.monotonic() - started < 10, "the logout waited out a timeout"
        _wait_for(lambda: daemon_pid(state) is None, 10, "the pinned daemon exits")
        _wait_for(lambda: not _site_processes(site), 10, "the pinned guard daemon exits")
        started = time.monotonic()
        _open(site, service, user)
        assert time.monotonic() - started < 10
        assert site.run(user, "cat /etc/pinned.conf").stdout == "before\n"
        site.run(user, "echo after >> /etc/pinned.conf")
        assert daemon_pid(state) not in (None, first_daemon)
        _close(site, service, user)
    site.stop(user)
    assert site.leftovers() == []
    check = site.sdeefs("check", "--upper", str(site.upper(user)), "--state", state)
    assert check.stdout.strip().endswith("ok")
    assert (site.upper(user) / "etc" / "pinned.conf").read_text() == "before\nafter\n"


def test_processes_left_running_by_the_launcher_have_cwd_root(site: Site) -> None:
    """A daemon or an environment's holder whose cwd is a host path keeps that path's mount
    busy (and, in the holder's mount namespace, a copy of every host mount alive)."""
    user = site.add_user()
    service = site.pam_service()
    cwd = site.base / "elsewhere"
    cwd.mkdir()
    result = subprocess.run(["pamtester", service, user, "open_session"], cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [r for r in json.loads(site.sdeefs("status", "--json").stdout)
            if r["user"] == user]
    init_pid = rows[0]["init_pid"]
    init = InitProcess.find(init_pid)
    assert init is not None
    holder = init.holder_pid
    daemon = rows[0]["daemon_pid"]
    for pid in (holder, daemon):
        assert os.readlink(f"/proc/{pid}/cwd") == "/", pid
    _close(site, service, user)


def _init_pid(site: Site, user: str) -> int:
    [row] = [r for r in json.loads(site.sdeefs("status", "--json").stdout) if r["user"] == user]
    assert row["running"]
    return int(row["init_pid"])


def test_logout_keeps_running_work_until_it_ends_and_the_grace_passes() -> None:
    """Issue 11, item 5: a process left running at logout (nohup) keeps the environment;
    it ends ``grace`` seconds after that process, and a re-login meanwhile joins it."""
    with open_site(extra="grace = 2\n") as site:
        user = site.add_user()
        service = site.pam_service()
        _open(site, service, user)
        init = _init_pid(site, user)
        # the work runs until told to stop (a fixed sleep raced a loaded machine's re-login)
        site.run(user, "nohup sh -c 'while [ ! -e /tmp/stop ]; do sleep 0.2; done; "
                       "echo done > /tmp/work' >/dev/null 2>&1 &")
        _close(site, service, user)
        time.sleep(1)
        assert os.path.exists(f"/proc/{init}/ns"), "the logout ended the running work"
        _open(site, service, user)  # back in: the same environment, the work still runs
        assert _init_pid(site, user) == init
        assert "sleep" in site.run(user, "ps -eo comm").stdout
        _close(site, service, user)
        # one watcher per environment, however often the user comes and goes
        assert len(_site_processes(site, "linger.log")) == 1
        time.sleep(1)
        assert os.path.exists(f"/proc/{init}/ns"), "the environment ended under running work"
        site.run(user, "touch /tmp/stop")  # joins it: a session of its own, ended at once
        work_ends = time.monotonic()
        _wait_for(lambda: not os.path.exists(f"/proc/{init}/ns"), 30, "the environment ends")
        ended = time.monotonic() - work_ends
        assert ended >= 2 - 0.5, f"ended {ended:.1f} s after the work ended (grace 2)"
        _wait_for(lambda: site.leftovers() == [], 10, "its mounts are gone")
        assert site.sdeefs("status", "--json").stdout.count('"running": true') == 0
        # nothing was left to watch: the watchers are gone too
        try:
            _wait_for(lambda: not _site_processes(site), 10, "the watchers exit")
        except AssertionError:
            raise AssertionError([(pid, _comm(pid), os.readlink(f"/proc/{pid}/fd/2"))
                                  for pid in _site_processes(site)]) from None


def _site_processes(site: Site, log: str = "") -> list[int]:
    """Processes logging into the site's RUN (into files named ``log``, if given): the
    guard daemons (guard.log), the logout watchers (linger.log)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(str(site.run_dir)) and
                       os.readlink(f"/proc/{entry}/fd/{fd}").endswith(log) for fd in (1, 2)):
                    found.append(int(entry))
    return found


SBIN_PATH = "export PATH=/usr/local/sbin:/usr/sbin:/sbin:$PATH; "


def _deb(directory: Path, name: str) -> Path:
    """A package of one file, /opt/NAME/file, built with dpkg-deb."""
    tree = directory / name
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "opt" / name).mkdir(parents=True)
    (tree / "opt" / name / "file").write_text(f"{name} payload\n")
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: sdeefs tests "
        f"<root@localhost>\nDescription: sdeefs test package {name}\n")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), f"{tree}.deb"],
                   check=True, capture_output=True)
    return Path(f"{tree}.deb")


def test_the_admins_packages_reach_the_users_dpkg_database() -> None:
    """Issue 11, item 3: the user installs a package with dpkg (their copy of the status
    file now shadows the host's); the admin installs another on the host; at the next
    login the user's dpkg knows both, and the merge went through the journal."""
    tag = uuid.uuid4().hex[:6]
    mine, admins = f"sdt-user-{tag}", f"sdt-admin-{tag}"
    with open_site(extra="grace = 0\n") as site:
        user = site.add_user()
        service = site.pam_service()
        home = site.home(user)
        shutil.copy(_deb(site.base, mine), home / "mine.deb")
        admin_deb = _deb(site.base, admins)
        state = site.root / user / "state"
        _open(site, service, user)
        site.run(user, SBIN_PATH + "dpkg -i ~/mine.deb")
        _close(site, service, user)
        try:
            subprocess.run(["dpkg", "-i", str(admin_deb)], check=True, capture_output=True,
                           timeout=120)
            # the user's copy shadows the host's: without the merge, dpkg would not know it
            status = (site.upper(user) / "var/lib/dpkg/status").read_text()
            assert f"Package: {mine}\n" in status
            assert f"Package: {admins}\n" not in status
            diff = site.sdeefs("diff", "--upper", str(site.upper(user))).stdout
            assert f"C /var/lib/dpkg/status  (packages: D {admins}:all, A {mine}:all)\n" \
                in diff
            _open(site, service, user)
            out = site.run(user, f"dpkg -s {mine} {admins} | grep -E '^(Package|Status):'"
                                 f"; dpkg -L {admins}; cat /opt/{admins}/file").stdout
            assert out == (f"Package: {mine}\nStatus: install ok installed\n"
                           f"Package: {admins}\nStatus: install ok installed\n"
                           f"/.\n/opt\n/opt/{admins}\n/opt/{admins}/file\n"
                           f"{admins} payload\n")
            # the user's dpkg goes on working on the merged database
            site.run(user, SBIN_PATH + f"dpkg -r {mine} >/dev/null")
            assert site.run(user, f"dpkg -s {mine}", check=False).returncode == 1
            _close(site, service, user)
        finally:
            subprocess.run(["dpkg", "-P", admins], capture_output=True, timeout=120)
        # the merged file is in the journal: a replay of the journal is the upper
        log = site.sdeefs("log", "--upper", str(site.upper(user)), "--state", str(state))
        assert "var/lib/dpkg/status.sdeefs-merge" in log.stdout
        check = site.sdeefs("check", "--upper", str(site.upper(user)), "--state", str(state))
        assert check.stdout.strip().endswith("ok"), check.stdout
        # and the admin's purge reaches the user too; their own removal stays
        _open(site, service, user)
        out = site.run(user, f"dpkg -s {mine} {admins} 2>&1; true").stdout
        assert f"package '{mine}' is not installed" in out
        assert f"package '{admins}' is not installed" in out
        assert site.run(user, "dpkg -s dpkg | grep Status").stdout == \
            "Status: install ok installed\n"
        _close(site, service, user)



def test_sdeefs_shell_says_why_the_login_could_not_start_the_environment(site: Site) -> None:
    """The PAM hook's output reaches nobody: sdeefs-shell says the real cause, not "is the
    sdeefs PAM hook installed?"."""
    user = site.add_user()
    service = site.pam_service()
    home = site.home(user)
    shutil.rmtree(home)  # the environment cannot bind the user's home
    assert site.pamtester(service, user, "open_session").returncode != 0
    shell = site.run(user, "true", check=False)
    assert shell.returncode == 1
    [line] = shell.stderr.splitlines()
    assert line.startswith("sdeefs-enter: shell: your environment could not start at login: "), \
        line
    assert f"{home}: No such file or directory" in line, line
    home.mkdir()
    os.chown(home, site.uid(user), site.uid(user))
    _open(site, service, user)  # a start that works forgets the failure
    assert not (site.run_dir / user / "failure").exists()
    assert site.run(user, "echo in").stdout == "in\n"
