"""The login environment end to end: real PAM (pamtester), real users, real namespaces."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sdeefs import config as config_mod
from sdeefs import control
from sdeefs.errors import QuietError
from sdeefs.fs.daemon import daemon_pid
from sdeefs.identity import of_user
from sdeefs.launcher.layout import SiteRun
from sdeefs.launcher.login.pam import install, uninstall

from .launcher_site import SHELL, VENV_BIN, Site, open_site, requires_launcher

pytestmark = requires_launcher

PYTHON_MODULE_DIR = "/usr/lib/python3/dist-packages"


def test_two_users_are_isolated_and_the_host_unchanged(site: Site) -> None:
    alice, bob = site.add_user(), site.add_user()
    site.start(alice)
    site.start(bob)
    # alice installs things as root would
    site.run(alice, "printf '#!/bin/sh\\necho alice-tool\\n' > /usr/local/bin/alice-tool && "
                    "chmod 755 /usr/local/bin/alice-tool && "
                    "echo 'export ALICE=1' > /etc/profile.d/alice.sh && "
                    f"mkdir -p {PYTHON_MODULE_DIR}/sdeefs_demo_mod && "
                    f"echo 'VERSION = 2' > {PYTHON_MODULE_DIR}/sdeefs_demo_mod/__init__.py && "
                    "echo done > ~/result.txt")
    assert site.run(alice, "alice-tool").stdout == "alice-tool\n"
    assert site.run(alice, "python3 -c 'import sdeefs_demo_mod; print(sdeefs_demo_mod.VERSION)'"
                    ).stdout == "2\n"
    # bob sees none of it, and neither does the host
    out = site.run(bob, "ls /usr/local/bin/alice-tool /etc/profile.d/alice.sh 2>&1; true").stdout
    assert out.count("No such file") == 2
    for path in ("/usr/local/bin/alice-tool", "/etc/profile.d/alice.sh",
                 f"{PYTHON_MODULE_DIR}/sdeefs_demo_mod"):
        assert not os.path.exists(path)
    # results land in the real home; the upper holds the rest, owned by the user's inside
    # root (its first subordinate uid: docs/identity.md)
    assert (site.home(alice) / "result.txt").read_text() == "done\n"
    tool = site.upper(alice) / "usr/local/bin/alice-tool"
    assert tool.stat().st_uid == of_user(alice, 1000, allocate=False).subuid
    # each sees only its own processes, and root inside is the user outside
    ps = site.run(alice, "ps -eo pid,comm --no-headers").stdout.split("\n")
    assert ps[0].split() == ["1", "sdeefs-init"]
    assert all("sleep" not in line for line in ps)
    assert site.run(alice, "id -u").stdout == "0\n"
    assert site.run(alice, "cat /proc/self/uid_map").stdout.split()[:3] == [
        "0", str(of_user(alice, 1000, allocate=False).subuid), str(site.uid(alice))]
    # bob's home and the sdeefs directories are not visible from alice's view
    assert site.run(alice, f"ls {site.home(bob)} 2>&1; true").stdout.count("No such file") == 1
    assert "No such file" in site.run(alice, f"ls -A {site.root} 2>&1; true").stdout


def _view(site: Site, user: str) -> str:
    """What an environment shows: names, types, owners and modes, a file, the hidden paths."""
    return site.run(user, "find /etc /opt/tool /usr/local -maxdepth 1 -printf '%p %y %u %g %m\\n'"
                          " | sort; cat /etc/engine-test.conf; id -u; stat -c '%U %a' /etc/passwd;"
                          f" ls -d /etc/shadow /root {site.root} 2>&1; true").stdout


def test_fuse_engine_shows_the_same_environment(site: Site) -> None:
    """--engine fuse (the pure sdeefs overlay) over the same upper: same view, same rules."""
    user = site.add_user()
    site.start(user)
    site.run(user, "echo hybrid > /etc/engine-test.conf && mkdir -p /opt/tool && "
                   "echo 1 > /opt/tool/version && chmod 700 /opt/tool")
    hybrid = _view(site, user)
    # every session shares the one environment: no other engine while it runs
    shell = subprocess.run(["runuser", "-u", user, "--", "env", f"SDEEFS_RUN_DIR={site.run_dir}",
                            str(SHELL), "--engine", "fuse", "-c", "true"],
                           capture_output=True, text=True, timeout=30)
    assert shell.returncode == 3
    assert "runs the hybrid engine, not fuse" in shell.stderr
    assert len(shell.stderr.strip().splitlines()) == 1
    busy = site.sdeefs("start", user, "--engine", "fuse", check=False)
    assert busy.returncode == 4
    assert "runs the hybrid engine" in busy.stderr
    site.stop(user)
    assert "fuse environment" in site.sdeefs("start", user, "--engine", "fuse").stdout
    assert _view(site, user) == hybrid
    status = json.loads(site.sdeefs("status", "--json").stdout)
    assert next(row for row in status if row["user"] == user)["engine"] == "fuse"
    # root-only and denied host entries made after the start stay hidden here too
    late = Path(tempfile.mkdtemp(dir="/var/tmp"))
    try:
        late.chmod(0o755)
        (late / "secret").write_text("root only\n")
        (late / "secret").chmod(0o600)
        (late / "public").write_text("public\n")
        out = site.run(user, f"cat {late}/public; cat {late}/secret 2>&1; ls {late}").stdout
        assert out == f"public\ncat: {late}/secret: No such file or directory\npublic\n"
    finally:
        shutil.rmtree(late)
    assert subprocess.run(["runuser", "-u", user, "--", "env", f"SDEEFS_RUN_DIR={site.run_dir}",
                           str(SHELL), "--engine", "fuse", "-c", "echo joined"],
                          capture_output=True, text=True, timeout=30).stdout == "joined\n"
    site.run(user, "echo fuse >> /etc/engine-test.conf")  # journaled into the same upper
    site.stop(user)
    assert site.leftovers() == []
    site.start(user)  # hybrid again (the site's engine): everything is there
    assert site.run(user, "cat /etc/engine-test.conf").stdout == "hybrid\nfuse\n"
    site.stop(user)


def test_sessions_share_one_environment(site: Site) -> None:
    user = site.add_user()
    site.start(user)
    sleeper = subprocess.Popen(["runuser", "-u", user, "--", "env",
                                f"SDEEFS_RUN_DIR={site.run_dir}", str(SHELL),
                                "-c", "exec sleep 30"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if "sleep" in site.run(user, "ps -eo comm --no-headers").stdout:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the first session's sleep is not visible to the second session")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_pam_sessions_start_count_and_end_the_environment(site: Site) -> None:
    user = site.add_user()
    service = site.pam_service()
    first = site.pamtester(service, user, "open_session")
    assert first.returncode == 0, first.stderr
    second = site.pamtester(service, user, "open_session")
    assert second.returncode == 0, second.stderr
    [row] = [r for r in json.loads(site.sdeefs("status", "--json").stdout) if r["user"] == user]
    assert row["running"]
    assert row["sessions"] == 2
    assert row["engine"] == "hybrid"
    assert row["daemon_pid"]
    assert site.run(user, "echo logged-in").stdout == "logged-in\n"
    init_pid = row["init_pid"]
    assert site.pamtester(service, user, "close_session").returncode == 0
    assert os.path.exists(f"/proc/{init_pid}")  # one session left
    assert site.pamtester(service, user, "close_session").returncode == 0
    # grace (default 10 s) after the last logout, with nothing left running, the whole tree
    # ends and is unmounted; the upper and journal stay
    deadline = time.monotonic() + 30
    while (os.path.exists(f"/proc/{init_pid}/ns") or site.leftovers()) and \
            time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{init_pid}/ns")
    assert site.leftovers() == []
    assert (site.root / user / "state" / "journal").is_dir()


def test_relogin_after_the_daemon_died_recovers(site: Site) -> None:
    user = site.add_user()
    site.start(user)
    site.run(user, "echo before > /etc/kept.conf")
    state = site.root / user / "state"
    pid = daemon_pid(str(state))
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    site.stop(user)  # what a crashed machine leaves behind, minus the reboot
    site.start(user)
    assert site.run(user, "cat /etc/kept.conf").stdout == "before\n"
    assert site.run(user, "echo after >> /etc/kept.conf && cat /etc/kept.conf").stdout == \
        "before\nafter\n"
    site.stop(user)
    check = site.sdeefs("check", "--upper", str(site.upper(user)), "--state", str(state))
    assert check.stdout.strip().endswith("ok")


def test_stop_leaves_nothing_behind(site: Site) -> None:
    user = site.add_user()
    init_pid = site.start(user)
    site.run(user, "sleep 60 >/dev/null 2>&1 & true")
    site.stop(user)
    assert not os.path.exists(f"/proc/{init_pid}/ns")
    assert site.leftovers() == []
    # (zombies are left for the host's init to reap: they hold no namespace or mount)
    out = subprocess.run(["ps", "-u", user, "-o", "pid=,stat=,comm="], capture_output=True,
                         text=True)
    assert [line for line in out.stdout.splitlines() if line.split()[1][0] != "Z"] == []
    assert site.sdeefs("stop", user).stdout.strip().endswith("was not running; mounts cleaned up")


def test_overlay_engine_without_journal() -> None:
    """engine = overlay: plain kernel overlayfs on the upper (its filesystem must not be /'s)."""
    with open_site("overlay") as site:
        os.makedirs(site.root, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "sdeefs-test", str(site.root)],
                       check=True)
        try:
            user = site.add_user()
            site.start(user)
            site.run(user, "echo overlay > /etc/engine.txt")
            assert (site.upper(user) / "etc" / "engine.txt").read_text() == "overlay\n"
            assert not (site.root / user / "state" / "journal").exists()
            site.stop(user)
        finally:
            site.cleanup()
            subprocess.run(["umount", "-l", str(site.root)], capture_output=True)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    for text, key in (('[sdeefs]\nengine = "docker"\n', "sdeefs.engine"),
                      ('[sdeefs]\nroot = "relative"\n', "sdeefs.root"),
                      ('[sdeefs]\nshred = []\n', "sdeefs.shred"),
                      ('[sdeefs]\nidle_timeout = -1\n', "sdeefs.idle_timeout"),
                      ('[sdeefs]\nguard = "rust"\n', "sdeefs.guard")):
        bad.write_text(text)
        result = subprocess.run([sys.executable, "-m", "sdeefs", "status"],
                                env={**os.environ, "SDEEFS_CONFIG": str(bad)},
                                capture_output=True, text=True)
        assert result.returncode == 2
        assert key in result.stderr
        assert result.stderr.count("\n") == 1
    assert config_mod.parse({}) == config_mod.SiteConfig()
    assert config_mod.parse({"sdeefs": {"guard": "python"}}).guard == config_mod.Guard.PYTHON
    assert config_mod.SiteConfig().guard == config_mod.Guard.AUTO


def test_the_guard_daemon_is_chosen_by_config_or_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    choose = config_mod.guard_daemon
    assert choose(config_mod.GuardDaemon.C) == config_mod.GuardDaemon.C
    monkeypatch.setenv("SDEEFS_GUARD", "python")
    assert choose(config_mod.GuardDaemon.C) == config_mod.GuardDaemon.PYTHON
    monkeypatch.setenv("SDEEFS_GUARD", "perl")
    with pytest.raises(QuietError, match="SDEEFS_GUARD must be one of c, python"):
        choose(config_mod.GuardDaemon.C)


def test_install_pam_edits_only_its_own_line(tmp_path: Path) -> None:
    service = tmp_path / "login"
    original = "auth required pam_unix.so\nsession required pam_unix.so"
    service.write_text(original)
    install("login", pam_dir=str(tmp_path))
    install("login", pam_dir=str(tmp_path))  # idempotent
    lines = service.read_text().splitlines()
    assert lines[:2] == original.splitlines()
    assert len(lines) == 3
    assert "pam_exec.so" in lines[2]
    assert "sdeefs-pam" in lines[2]
    assert uninstall("login", pam_dir=str(tmp_path))
    assert service.read_text() == original + "\n"
    assert not uninstall("login", pam_dir=str(tmp_path))


def test_launchd_starts_environments_for_sdeefs_shell(site: Site) -> None:
    """sdeefs-launchd: sdeefs-shell with no running environment asks it for one."""
    alice, bob = site.add_user(), site.add_user()
    service = subprocess.Popen([str(VENV_BIN / "sdeefs-launchd")], env=site.env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    launchd = SiteRun(config_mod.load(str(site.config)).run_dir).launchd_socket
    try:
        sock = site.run_dir / "launchd.sock"
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            assert service.poll() is None, service.stderr.read() if service.stderr else ""
            time.sleep(0.05)

        def shell(user: str, *args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["runuser", "-u", user, "--", "env",
                                   f"SDEEFS_RUN_DIR={site.run_dir}", str(SHELL), *args],
                                  capture_output=True, text=True, timeout=60)

        assert shell(alice, "-c", "id -u; echo $((6*7))").stdout == "0\n42\n"
        # The daemons forked by the service (a trio process) do not inherit its loop's
        # signal handling: trio warns in a daemon's log when it finds a wakeup fd set.
        for log in (site.run_dir / alice / "private" / "guard.log",
                    site.root / alice / "state" / "daemon.log"):
            text = log.read_text()
            assert "Warning" not in text, (log, text)
            assert "Traceback" not in text, (log, text)
        status = {row["user"]: row for row in json.loads(site.sdeefs("status", "--json").stdout)}
        assert status[alice]["running"]
        assert status[alice]["engine"] == "hybrid"
        assert status[alice]["guard_mount"] == str(site.run_dir / alice / "private" / "guard")
        guard_pid = int((site.run_dir / alice / "private" / "guard.pid").read_text().split()[0])
        assert os.readlink(f"/proc/{guard_pid}/exe").endswith("/sdeefs-guard")  # C, the default
        assert not status.get(bob, {}).get("running")  # nobody asked for bob's
        got = shell(bob, "--engine", "fuse", "-c", "echo fuse; ls /etc/shadow 2>&1; true")
        assert got.stdout == "fuse\nls: cannot access '/etc/shadow': No such file or directory\n"
        status = {row["user"]: row for row in json.loads(site.sdeefs("status", "--json").stdout)}
        assert status[bob]["engine"] == "fuse"
        # the kernel says who asks: a user cannot start or stop somebody else's environment
        probe = ("import json, socket, sys; s = socket.socket(socket.AF_UNIX); "
                 f"s.connect({str(sock)!r}); s.sendall(sys.argv[1].encode() + b'\\n'); "
                 "print(s.makefile().readline().strip())")
        for request, error in (
                ({"op": "stop", "user": alice}, "only root may start or stop another user's"),
                ({"op": "start", "engine": "nfs"}, "unknown engine 'nfs'"),
                ({"op": "reboot"}, "unknown op 'reboot'"),
                (["start"], "not a JSON object")):
            out = subprocess.run(["runuser", "-u", bob, "--", str(VENV_BIN / "python"), "-c",
                                  probe, json.dumps(request)], capture_output=True, text=True,
                                 timeout=30)
            reply = json.loads(out.stdout)
            assert reply["ok"] is False, request
            assert error in reply["error"]
        raw = subprocess.run(["runuser", "-u", bob, "--", str(VENV_BIN / "python"), "-c", probe,
                              "not json"], capture_output=True, text=True, timeout=30)
        assert json.loads(raw.stdout)["error"] == "bad request: not JSON"
        assert service.poll() is None  # still serving after all of that
        # Connections are answered concurrently: one that never sends its line holds up
        # nobody (a service reading them one at a time would answer it first, after 2 s).
        with socket.socket(socket.AF_UNIX) as idle:
            idle.connect(str(sock))
            with pytest.raises(control.ControlError, match="unknown op 'reboot'"):
                control.request(launchd, {"op": "reboot"})  # answered at once
            idle.setblocking(False)
            with pytest.raises(BlockingIOError):
                idle.recv(1)
        assert control.request(launchd, {"op": "stop", "user": bob})["stopped"] is True
        # a refusal reaches the user as one line with its exit code
        os.chmod(site.home(bob), 0o700)
        free = next(uid for uid in range(999, 500, -1) if not _uid_taken(uid))
        subprocess.run(["usermod", "-u", str(free), bob], check=True, capture_output=True)
        refused = shell(bob, "-c", "true")  # now below min_uid
        assert refused.returncode == 3
        assert refused.stderr == f"sdeefs-shell: {bob} is below min_uid 1000: no environment\n"
        assert control.request(launchd, {"op": "stop", "user": alice})["stopped"] is True
        assert site.leftovers() == []
    finally:
        service.terminate()
        service.wait(timeout=10)
    assert not (site.run_dir / "launchd.sock").exists()


def _uid_taken(uid: int) -> bool:
    import pwd
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_private_scan_refreshes_may_race(tmp_path: Path) -> None:
    """Several job prologs on one machine refresh the root-only scan at once (a CI failure:
    they shared one temporary file name)."""
    import threading

    from sdeefs.launcher.compute import private

    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "secret").write_text("x")
    (lower / "etc" / "secret").chmod(0o600)
    errors: list[BaseException] = []

    def refresh() -> None:
        try:
            for _ in range(20):
                private.refresh(str(lower), str(tmp_path / "run"), ())
        except BaseException as exc:  # noqa: BLE001 - collected for the assert below
            errors.append(exc)

    threads = [threading.Thread(target=refresh) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert (tmp_path / "run" / "private-paths").read_bytes() == b"etc/secret\n"


def test_private_scan_stays_on_the_lowers_own_mount(tmp_path: Path) -> None:
    """A bind of the same filesystem mounted below the lower (a container image: ``/``
    bound under /var/tmp) is not part of the idmapped lower (a bind without submounts): the
    scan used to walk it in full (6,506 more root-only paths here, 3 s more per job mask)."""
    import subprocess

    from sdeefs.launcher.compute import private

    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "secret").write_text("x")
    (lower / "etc" / "secret").chmod(0o600)
    (lower / "img").mkdir()
    subprocess.run(["mount", "--bind", str(lower / "etc"), str(lower / "img")], check=True)
    try:
        found = private.refresh(str(lower), str(tmp_path / "run"), ())
    finally:
        subprocess.run(["umount", str(lower / "img")], check=True)
    assert found == [b"etc/secret"]
