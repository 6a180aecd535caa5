"""The admin's commands on a real site: ``sdeefs remove-user`` and ``sdeefs doctor``."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

from sdeefs.config import SiteConfig
from sdeefs.launcher.doctor import Verdict, subids

from .launcher_site import VENV_BIN, Site, requires_launcher

pytestmark = requires_launcher


def test_remove_user_after_userdel(site: Site) -> None:
    """userdel leaves the layers: status says "deleted"; remove-user ends the environment
    and deletes them (or keeps the upper aside, root-only, with --keep-upper)."""
    gone, kept = site.add_user(), site.add_user()
    for user in (gone, kept):
        site.start(user)
        site.run(user, "echo mine > /etc/motd.local")
    subprocess.run(["userdel", "-f", gone], check=True, capture_output=True)
    status = json.loads(site.sdeefs("status", "--json").stdout)
    assert {row["user"]: row["exists"] for row in status}[gone] is False
    assert "deleted" in site.sdeefs("status").stdout

    removed = site.sdeefs("remove-user", gone).stdout
    assert f"removed {site.root / gone}" in removed
    assert not (site.root / gone).exists()
    assert not (site.run_dir / gone).exists()
    assert not site.leftovers() or all(gone not in m for m in site.leftovers())

    out = site.sdeefs("remove-user", "--keep-upper", kept).stdout
    kept_dir = Path(out.split("kept ", 1)[1].split()[0])
    assert kept_dir.parent == site.root / ".removed"
    assert (kept_dir / "etc" / "motd.local").read_text() == "mine\n"
    assert os.stat(kept_dir.parent).st_mode & 0o777 == 0o700
    assert kept not in [row["user"] for row in json.loads(site.sdeefs("status", "--json").stdout)]

    again = site.sdeefs("remove-user", gone, check=False)
    assert again.returncode == 2
    assert again.stderr == f"sdeefs: nothing of {gone} on this node\n"
    bad = site.sdeefs("remove-user", "../etc", check=False)
    assert bad.returncode == 2
    assert bad.stderr == "sdeefs: not a user name: '../etc'\n"


def test_doctor_names_what_is_wrong_and_the_fix(site: Site, tmp_path: Path) -> None:
    key = site.base / "replication.key"
    key.write_text(os.urandom(32).hex())
    key.chmod(0o644)
    replicas = site.base / "replicas"
    replicas.mkdir()
    control = site.base / "replicad.sock"
    with site.config.open("a") as f:
        f.write(f'\n[replication]\nlogin = "127.0.0.1:9"\nkey_file = "{key}"\n'
                f'control = "{control}"\nreplica_dir = "{replicas}"\n'
                f'job_dir = "{site.base / "jobs"}"\n')

    def doctor() -> dict[str, dict[str, str]]:
        result = site.sdeefs("doctor", "--role", "compute", "--json", check=False)
        assert result.returncode in (0, 1), result.stderr
        return {c["check"]: c for c in json.loads(result.stdout)["checks"]}

    found = doctor()
    assert found["replication key"]["verdict"] == "fail"
    assert "chmod 600" in found["replication key"]["detail"]
    assert found["replicad"]["verdict"] == "fail"
    assert "sdeefs-replicad@compute" in found["replicad"]["fix"]
    assert found["replicas"]["verdict"] == "warn"  # on / here
    assert found["idmapped mounts"]["verdict"] == "ok"
    assert found["sdeefs-guard"]["verdict"] == "ok"  # built by scripts/install.sh

    key.chmod(0o600)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "doctor-test", str(replicas)],
                   check=True)
    daemon = subprocess.Popen([str(VENV_BIN / "sdeefs-replicad"), "--role", "compute",
                               "--node", "doctor-test"], env=site.env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not control.exists() and time.monotonic() < deadline:
            assert daemon.poll() is None
            time.sleep(0.05)
        found = doctor()
        assert found["replication key"]["verdict"] == "ok"
        assert found["replicad"]["verdict"] == "ok", found["replicad"]
        assert found["replicas"]["verdict"] == "ok"
        text = site.sdeefs("doctor", "--role", "compute", check=False).stdout
        assert all(line.split()[0] in ("ok", "warn", "fail") for line in text.splitlines())
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(["umount", str(replicas)], check=True)


def test_a_reader_that_goes_away_is_not_an_error(site: Site) -> None:
    """``sdeefs status | head``: the output's reader leaves; sdeefs ends quietly as shell
    tools do (it printed "sdeefs: Broken pipe")."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([str(VENV_BIN / "sdeefs"), "doctor", "--json"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, env=site.env(), timeout=60)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 128 + signal.SIGPIPE


def test_doctor_names_users_without_subordinate_ids(site: Site, tmp_path: Path) -> None:
    user = site.add_user()
    uid = site.uid(user)
    cfg = SiteConfig(min_uid=uid)  # this user and later ones
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("")
    subgid.write_text("")
    compute = list(subids(cfg, "compute", str(subuid), str(subgid)))
    assert compute[0].verdict == Verdict.FAIL
    assert user in compute[0].detail
    assert list(subids(cfg, "login", str(subuid), str(subgid)))[0].verdict == Verdict.WARN
    for path in (subuid, subgid):
        path.write_text("".join(f"{pw.pw_name}:{100000 + i * 65536}:65536\n"
                                for i, pw in enumerate(pwd.getpwall()) if pw.pw_uid >= uid))
    assert list(subids(cfg, "compute", str(subuid), str(subgid)))[0].verdict == Verdict.OK
