"""The kernel engine through the front door: PAM logins (pamtester), real namespaces, the
layer image, the supervised capture, real replicads on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs.fs import image, kernel
from tests.fs.capture_util import tree, tree_diff

from .launcher_site import SHELL, Site, open_site, requires_launcher
from .test_job import _start_replicad, replication_config

pytestmark = requires_launcher


@contextlib.contextmanager
def kernel_site() -> Iterator[tuple[Site, Path, list[subprocess.Popen[bytes]]]]:
    """A kernel-engine site with a login replicad (origin) and one replica node ``n1``."""
    with open_site("kernel", 'layer_size = "256M"\ngrace = 0\n') as site:
        base, _ = replication_config(site, 60)
        daemons: list[subprocess.Popen[bytes]] = []
        try:
            start_replicads(site, base, daemons)
            yield site, base, daemons
        finally:
            kill_all(daemons)


def start_replicads(site: Site, base: Path, daemons: list[subprocess.Popen[bytes]]) -> None:
    """The login node's replicad (origin) and n1's (a replica), appended to ``daemons``."""
    daemons.append(_start_replicad(site, base, "login"))
    daemons.append(_start_replicad(site, base, "n1"))


def kill_all(daemons: list[subprocess.Popen[bytes]]) -> None:
    for proc in daemons:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def barrier(site: Site, base: Path, user: str) -> None:
    """The replica of ``user`` on n1 at the login node's head as of now (drained)."""
    result = site.sdeefs("replica", "follow", user, "--wait", "--control", str(base / "n1.sock"))
    assert result.returncode == 0, result.stderr


def replica_diff(site: Site, base: Path, user: str) -> list[str]:
    return tree_diff(tree(site.upper(user), mtimes=False),
                     tree(base / "n1-replicas" / user / "upper", mtimes=False))


def check(site: Site, user: str) -> None:
    result = site.sdeefs("check", "--upper", str(site.upper(user)), "--state",
                         str(site.root / user / "state"), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def capture_pid(site: Site, user: str) -> int | None:
    return kernel.capture_pid(str(site.root / user / "state"))


def wait_for(what: str, condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def in_env(site: Site, user: str, command: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["runuser", "-u", user, "--", "env", f"SDEEFS_RUN_DIR={site.run_dir}",
                             f"HOME={site.home(user)}", str(SHELL), "-c", command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_pam_login_with_the_kernel_engine_reaches_a_replica_through_a_capture_kill() -> None:
    """Files written inside reach the replica at the barrier (which drains the capture);
    kill -9 of the capture mid-write: the writer does not notice, the capture is restarted
    and the replica converges byte-identical; the logout stops the capture cleanly and
    unmounts the image."""
    with kernel_site() as (site, base, daemons):
        user = site.add_user()
        service = site.pam_service()
        opened = site.pamtester(service, user, "open_session")
        assert opened.returncode == 0, opened.stderr
        [row] = [r for r in json.loads(site.sdeefs("status", "--json").stdout)
                 if r["user"] == user]
        assert row["running"]
        assert row["engine"] == "kernel"
        layer = site.root / user / "layer"
        assert image.is_mounted(str(site.root / user / "layer.img"), str(layer))
        assert site.upper(user) == layer / "upper"

        # written, then at once the barrier: everything is on the replica
        site.run(user, "mkdir -p /opt/k && for i in $(seq 1 200); do echo file$i > /opt/k/a$i;"
                       " done && ln -s a1 /opt/k/link && mv /opt/k/a2 /opt/k/moved")
        barrier(site, base, user)
        assert (base / "n1-replicas" / user / "upper" / "opt" / "k" / "a200").read_text() \
            == "file200\n"
        assert replica_diff(site, base, user) == []

        # kill -9 of the capture while the user writes
        first = capture_pid(site, user)
        assert first is not None
        writer = in_env(site, user, "for i in $(seq 1 3000); do echo b$i > /opt/k/b$i; done; "
                                    "rm /opt/k/a3; echo done")
        wait_for("the writer has started", lambda: (site.upper(user) / "opt/k/b50").exists())
        os.kill(first, signal.SIGKILL)
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        assert out == "done\n"
        wait_for("the capture is restarted",
                 lambda: capture_pid(site, user) not in (None, first)
                 and kernel.capture_answers(str(site.root / user / "state")))
        barrier(site, base, user)
        assert replica_diff(site, base, user) == []
        check(site, user)

        # logout: the capture drains and stops, then the image is unmounted (the login
        # replicad stops first: a reader keeps a layer mounted)
        kill_all(daemons)
        closed = site.pamtester(service, user, "close_session")
        assert closed.returncode == 0, closed.stderr
        state = str(site.root / user / "state")
        assert kernel.supervisor_pid(state) is None
        assert kernel.capture_pid(state) is None
        assert not kernel.capture_expected(state)
        assert not image.is_mounted(str(site.root / user / "layer.img"), str(layer))
        assert site.leftovers() == []


def test_an_unclean_image_is_checked_and_scanned_at_the_next_login() -> None:
    """kill -9 of everything and the image as the disk holds it after a crash: the next
    login runs e2fsck, the capture's full scan journals what it missed; nothing the user
    fsync'ed is lost and the replica converges."""
    with kernel_site() as (site, base, daemons):
        user = site.add_user()
        site.start(user)
        site.run(user, "mkdir /opt/u && echo before > /opt/u/before")
        barrier(site, base, user)
        state = site.root / user / "state"
        sup, cap = kernel.supervisor_pid(str(state)), capture_pid(site, user)
        assert sup is not None
        assert cap is not None
        os.kill(sup, signal.SIGKILL)
        os.kill(cap, signal.SIGKILL)  # nothing journals what follows
        kill_all(daemons)  # the login replicad too (it keeps the layer open)
        site.run(user, "echo synced > /opt/u/synced && sync /opt/u/synced && rm /opt/u/before")
        record = json.loads((site.run_dir / user / "private" / "env.json").read_text())
        os.kill(record["init_pid"], signal.SIGKILL)
        img = site.root / user / "layer.img"
        os.sync()
        shutil.copy(img, site.base / "crash.img")  # what the disk holds at the crash
        wait_for("the environment is gone",
                 lambda: not os.path.exists(f"/proc/{record['init_pid']}/ns"))
        # the crash: the environment's mounts gone, the image as it was on disk
        for path in sorted((p for p in site.leftovers() if p.startswith(str(site.run_dir))),
                           key=len, reverse=True):
            subprocess.run(["umount", "-l", path], capture_output=True)
        result = subprocess.run(["umount", str(site.root / user / "layer")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        wait_for("the loop device is detached", lambda: not image.loop_devices_of(str(img)))
        shutil.move(site.base / "crash.img", img)
        assert image.superblock_state(str(img))[0]  # needs recovery
        site.start(user)
        daemons.clear()
        start_replicads(site, base, daemons)
        assert site.run(user, "cat /opt/u/synced").stdout == "synced\n"
        assert site.run(user, "ls /opt/u").stdout == "synced\n"
        barrier(site, base, user)
        assert replica_diff(site, base, user) == []
        check(site, user)


def engine_finding(site: Site) -> dict[str, str]:
    result = site.sdeefs("doctor", "--role", "login", "--json", check=False)
    assert result.returncode in (0, 1), result.stderr
    [found] = [c for c in json.loads(result.stdout)["checks"] if c["check"] == "engine"]
    return found


def test_users_with_an_upper_of_another_engine_stay_on_hybrid_until_migrated() -> None:
    """The site's engine becomes kernel; a user whose journal was written by the hybrid
    engine keeps it (their upper is on the host filesystem) until ``sdeefs migrate``,
    which copies the upper into an image and starts a new journal history."""
    with open_site("hybrid") as site:
        user = site.add_user()
        site.start(user)
        site.run(user, "echo old > /etc/old.conf")
        site.stop(user)
        # the hybrid engine's hard links can give ESTALE (docs/hardlinks.md): the doctor
        # says so while new environments get it, then names the users it still holds
        assert "new environments get the hybrid engine" in engine_finding(site)["detail"]
        text = site.config.read_text().replace('engine = "hybrid"', 'engine = "kernel"')
        site.config.write_text(text)
        found = engine_finding(site)
        assert found["verdict"] == "warn"
        assert user in found["detail"]
        assert "sdeefs migrate USER" in found["fix"]
        site.start(user)
        [row] = [r for r in json.loads(site.sdeefs("status", "--json").stdout)
                 if r["user"] == user]
        assert row["engine"] == "hybrid"
        assert row["hybrid"]
        assert f"sdeefs migrate {user}" in site.sdeefs("status").stdout
        assert site.run(user, "cat /etc/old.conf").stdout == "old\n"
        assert not (site.root / user / "layer.img").exists()
        site.run(user, "ln /etc/old.conf /etc/hard.conf && mkfifo /etc/fifo && rm /etc/hostname")
        site.stop(user)
        site.sdeefs("migrate", user)
        assert (site.root / user / "layer.img").exists()
        site.start(user)
        [row] = [r for r in json.loads(site.sdeefs("status", "--json").stdout)
                 if r["user"] == user]
        assert row["engine"] == "kernel"
        assert not row["hybrid"]
        assert "sdeefs migrate" not in site.sdeefs("status").stdout
        assert engine_finding(site)["verdict"] == "ok"
        assert site.run(user, "cat /etc/hard.conf; test -p /etc/fifo; test ! -e /etc/hostname; "
                              "stat -c %h /etc/old.conf").stdout == "old\n2\n"
        check(site, user)
        assert (site.root / user / "pre-kernel" / "upper" / "etc" / "old.conf").exists()


def test_a_login_restarts_a_capture_whose_supervisor_was_killed_and_check_drains() -> None:
    """kill -9 of the capture and of its supervisor: the sessions go on; the next login
    (``sdeefs start``, as the PAM hook) starts them again, the restarted capture scans
    what nobody journaled, and ``sdeefs check`` (which drains first) finds replay == upper."""
    with open_site("kernel", 'layer_size = "256M"\ngrace = 0\n') as site:
        user = site.add_user()
        site.start(user)
        site.run(user, "echo one > /etc/one")
        state = str(site.root / user / "state")
        sup, cap = kernel.supervisor_pid(state), kernel.capture_pid(state)
        assert sup is not None
        assert cap is not None
        os.kill(sup, signal.SIGKILL)
        os.kill(cap, signal.SIGKILL)
        wait_for("the capture is gone", lambda: kernel.capture_pid(state) is None)
        site.run(user, "echo two > /etc/two && rm /etc/one && mkdir -p /srv/d/e")
        assert kernel.capture_expected(state)
        site.start(user)  # the running environment: joined, its capture started again
        wait_for("the capture answers", lambda: kernel.capture_answers(state))
        assert kernel.supervisor_pid(state) not in (None, sup)
        check(site, user)
        journal = site.sdeefs("log", "--upper", str(site.upper(user)), "--state", state).stdout
        assert "upper/etc/two" in journal
        # found by the restarted capture's scan: a new small file, one Create record
        created = [line for line in journal.splitlines()
                   if "create      path=upper/etc/two " in line]
        assert len(created) == 1
        assert "data=4 bytes" in created[0]


def test_a_layer_still_live_in_another_mount_namespace_is_mounted_again() -> None:
    """A mount namespace that copied the host's mounts while the layer was mounted (a root
    ``unshare -m``, a daemon with PrivateTmp: issue 11 item 6) keeps the image's filesystem
    live after the logout; the next login mounts that live filesystem again (no e2fsck and
    no second loop device on a mounted filesystem) and the user's files are there."""
    with open_site("kernel", 'layer_size = "256M"\ngrace = 0\n') as site:
        user = site.add_user()
        site.start(user)
        site.run(user, "echo a > /etc/a")
        img = str(site.root / user / "layer.img")
        pin = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "120"])
        try:
            wait_for("the namespace is made", lambda: os.readlink(f"/proc/{pin.pid}/ns/mnt")
                     != os.readlink("/proc/self/ns/mnt"))
            site.stop(user)
            assert not image.is_mounted(img, str(site.root / user / "layer"))
            assert len(image.loop_devices_of(img)) == 1  # live in the other namespace
            site.start(user)
            assert site.run(user, "cat /etc/a").stdout == "a\n"
            assert len(image.loop_devices_of(img)) == 1
            site.run(user, "echo b > /etc/b")
            check(site, user)
            site.stop(user)
        finally:
            pin.kill()
            pin.wait()


def test_a_device_node_host_root_makes_by_hand_reaches_the_replica_inert() -> None:
    """Issue 9 item 6 under the kernel engine: inside the environment the kernel refuses
    mknod of a device (EPERM); host root, mounting the user's layer by hand (``sdeefs mount
    --engine kernel``), may make one: the capture journals it (Mkdev), a replica holds it
    with the same number, mode and owner, ``sdeefs check`` is clean, and it is inert in
    the user's view (nodev)."""
    with kernel_site() as (site, base, daemons):
        user = site.add_user()
        pw = pwd.getpwnam(user)
        site.start(user)
        inside = site.run(user, "mkdir /opt/devs && mknod /opt/devs/dev0 c 1 3", check=False)
        assert inside.returncode != 0
        assert "Operation not permitted" in inside.stderr, inside.stderr
        site.stop(user)

        layer, state = site.root / user / "layer", site.root / user / "state"
        mnt = site.base / "by-hand"
        mnt.mkdir()
        site.sdeefs("mount", "--engine", "kernel", "--upper", str(layer / "upper"),
                    "--state", str(state), str(mnt))
        want = {"null2": (stat.S_IFCHR | 0o640, os.makedev(1, 3)),
                "loop9": (stat.S_IFBLK | 0o600, os.makedev(7, 9)),
                "fifo": (stat.S_IFIFO | 0o644, 0)}
        try:  # (in the user's directory: a replica keeps only entries of the user's ids)
            for name, (mode, rdev) in want.items():
                os.mknod(mnt / "opt" / "devs" / name, mode, rdev)
                os.chmod(mnt / "opt" / "devs" / name, stat.S_IMODE(mode))
                os.chown(mnt / "opt" / "devs" / name, pw.pw_uid, pw.pw_gid)
            with pytest.raises(PermissionError):  # the view is nodev
                os.open(mnt / "opt" / "devs" / "null2", os.O_RDONLY)
            barrier(site, base, user)
            replica = base / "n1-replicas" / user / "upper" / "opt" / "devs"
            for name, (mode, rdev) in want.items():
                st = os.lstat(replica / name)
                assert (st.st_mode, st.st_rdev, st.st_uid, st.st_gid) == \
                    (mode, rdev, pw.pw_uid, pw.pw_gid), name
            assert replica_diff(site, base, user) == []
            check(site, user)
        finally:
            kill_all(daemons)  # (the login replicad reads the layer: it would stay mounted)
            daemons.clear()
            site.sdeefs("umount", str(mnt))
        start_replicads(site, base, daemons)

        # inert where the user meets them: their view (a job's overlay on a replica is
        # mounted the same way, by a user namespace: nodev)
        site.start(user)
        seen = site.run(user, "stat -c '%F %t:%T %U' /opt/devs/null2; cat /opt/devs/null2",
                        check=False)
        assert seen.stdout.splitlines() == [f"character special file 1:3 {user}"], seen.stdout
        assert "Permission denied" in seen.stderr, seen.stderr


def guard_pids(site: Site, user: str) -> list[int]:
    [row] = [r for r in json.loads(site.sdeefs("status", "--json").stdout) if r["user"] == user]
    return list(row["guard_pids"])


def test_a_pam_login_survives_kill_9_of_its_guard() -> None:
    """kill -9 of the guard's server (sdeefs-guard, guard.c "surviving a crash"), twice, while
    a shell inside reads host directories, looks up names the guard decides afresh and
    writes files: the loop never notices, hidden files stay hidden, a new server serves
    (``sdeefs status`` shows keeper and server), ``sdeefs check`` is clean and the replica
    converges.  (Before the keeper, the loop died with "Transport endpoint is not connected".)"""
    with kernel_site() as (site, base, _):
        user = site.add_user()
        service = site.pam_service()
        opened = site.pamtester(service, user, "open_session")
        assert opened.returncode == 0, opened.stderr
        keeper, first = guard_pids(site, user)
        loop = in_env(site, user,
                      "mkdir -p /opt/g && for i in $(seq 1 1500); do "
                      "ls /usr/share /etc >/dev/null || exit 3; "
                      "test ! -e /usr/share/never-$i || exit 4; "
                      "test ! -e /etc/shadow || exit 5; "
                      "cat /etc/hostname >/dev/null || exit 6; "
                      "echo g$i > /opt/g/f$i || exit 7; done; echo done")
        wait_for("the loop has started", lambda: (site.upper(user) / "opt/g/f50").exists())
        os.kill(first, signal.SIGKILL)
        wait_for("a new server", lambda: guard_pids(site, user)[1:] not in ([], [first]))
        second = guard_pids(site, user)[1]
        count = len(list((site.upper(user) / "opt/g").iterdir()))
        wait_for("the loop goes on", lambda: len(list((site.upper(user) / "opt/g").iterdir()))
                 > count + 50)
        os.kill(second, signal.SIGKILL)
        out, err = loop.communicate(timeout=300)
        assert loop.returncode == 0, (loop.returncode, err)
        assert out == "done\n"
        assert guard_pids(site, user)[0] == keeper
        assert guard_pids(site, user)[1] not in (first, second)
        assert site.run(user, "cat /opt/g/f1500; test ! -e /etc/shadow && echo hidden").stdout \
            == "g1500\nhidden\n"
        barrier(site, base, user)
        assert replica_diff(site, base, user) == []
        check(site, user)
        log = (site.run_dir / user / "private" / "guard.log").read_text()
        assert log.count("a new one takes over its session") == 2, log
