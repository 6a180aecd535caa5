"""The end of a user's day, through the PAM hook (pamtester): logout, lockout, relogin."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator

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
    holder = InitProcess.find(init_pid).holder_pid  # type: ignore[union-attr]
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
        site.run(user, "nohup sh -c 'sleep 4; echo done > /tmp/work' >/dev/null 2>&1 &")
        work_started = time.monotonic()
        _close(site, service, user)
        time.sleep(1)
        assert os.path.exists(f"/proc/{init}/ns"), "the logout ended the running work"
        _open(site, service, user)  # back in: the same environment, the work still runs
        assert _init_pid(site, user) == init
        assert "sleep" in site.run(user, "ps -eo comm").stdout
        _close(site, service, user)
        _wait_for(lambda: not os.path.exists(f"/proc/{init}/ns"), 30, "the environment ends")
        ended = time.monotonic() - work_started
        assert ended >= 4 + 2 - 0.5, f"ended {ended:.1f} s after the work started"
        _wait_for(lambda: site.leftovers() == [], 10, "its mounts are gone")
        assert site.sdeefs("status", "--json").stdout.count('"running": true') == 0
        # nothing was left to watch: the watchers are gone too
        _wait_for(lambda: not _watchers(site), 10, "the watchers exit")


def _watchers(site: Site) -> list[int]:
    log = str(site.run_dir)
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(log)
                       for fd in (1, 2)):
                    found.append(int(entry))
    return found
