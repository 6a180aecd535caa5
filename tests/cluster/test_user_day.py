"""A user's day through the front door: a real sshd, the PAM hook, sdeefs-shell as the login
shell, a real 2-node SLURM cluster (issue 11; docs/identity.md).

sshd (Debian's openssh-server) runs on a loopback port of the cluster's login node (its hub
network namespace) with its own sshd_config: key authentication, UsePAM, and the PAM hook
installed the documented way (``sdeefs install-pam``) into a service of its own (sshd names
its PAM service after its program name, so it runs as a link named after that service).
Over ssh the user, with no flags anywhere: apt-get update + install from a local repository,
pip install into the system site-packages, a shared library in /usr/local/lib + ldconfig,
then sbatch, squeue, scancel and srun -N2.  The jobs run bare on the nodes (running them
inside the environment there is issue 12) but belong to the user's own uid.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from sdeefs.identity import of_user

from ..launcher.launcher_site import SHELL, Site, open_site, requires_launcher
from ..launcher.test_identity import apt_day, build_repo, walk_ids
from .slurm_cluster import Cluster, cluster, requires_slurm

pytestmark = [requires_slurm, requires_launcher,
              pytest.mark.skipif(not os.path.exists("/usr/sbin/sshd"),
                                 reason="no /usr/sbin/sshd (openssh-server)")]

SSH_PORT = 2222  # on the hub's own loopback: no clash with the host's


def build_wheel(where: Path) -> Path:
    """A pure-Python wheel, made by hand (no network, no build backend)."""
    files = {"sdtdemo.py": b"VALUE = 42\n",
             "sdtdemo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: sdtdemo\n"
                                                b"Version: 1.0\n",
             "sdtdemo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: sdeefs-test\n"
                                             b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{name},sha256={digest(data)},{len(data)}\n"
                     for name, data in files.items())
    files["sdtdemo-1.0.dist-info/RECORD"] = (record + "sdtdemo-1.0.dist-info/RECORD,,\n").encode()
    wheel = where / "sdtdemo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    wheel.chmod(0o644)
    return wheel


@attrs.define
class Day:
    site: Site
    slurm: Cluster
    base: Path
    user: str
    key: Path

    def ssh(self, command: str, timeout: float = 120) -> str:
        """``command`` over ssh, as the user, from the login node."""
        result = self.slurm.run(
            ["ssh", "-i", str(self.key), "-p", str(SSH_PORT), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR", f"{self.user}@127.0.0.1", command],
            timeout=timeout, check=False)
        assert result.returncode == 0, (command, result.stdout, result.stderr,
                                        (self.base / "sshd.log").read_text(errors="replace"))
        return result.stdout


@pytest.fixture
def day() -> Iterator[Day]:
    base = Path(tempfile.mkdtemp(prefix="sdeefs-day-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    made_privsep = not os.path.isdir("/run/sshd")
    try:
        with cluster(str(base / "cluster"), nodes=2) as slurm, \
                open_site(extra=f'sockets = ["{base}/cluster/munge"]\n') as site:
            user = site.add_user()
            subprocess.run(["chsh", "-s", str(SHELL), user], check=True, capture_output=True)
            home = site.home(user)
            pw = pwd.getpwnam(user)
            (home / ".ssh").mkdir(mode=0o700)
            key = base / "id_ed25519"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
            (home / ".ssh/authorized_keys").write_text(key.with_suffix(".pub").read_text())
            for path in (home / ".ssh", home / ".ssh/authorized_keys"):
                os.chown(path, pw.pw_uid, pw.pw_gid)
            # the PAM hook, as README says, into a service of this sshd's own
            service = f"sshd-{user}"
            shutil.copy("/etc/pam.d/sshd", f"/etc/pam.d/{service}")
            site.pam_services.append(Path(f"/etc/pam.d/{service}"))
            site.sdeefs("install-pam", "--service", service, "--control", "required")
            os.symlink("/usr/sbin/sshd", base / service)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            str(base / "host_key")], check=True)
            (base / "sshd_config").write_text(
                f"Port {SSH_PORT}\nListenAddress 127.0.0.1\nHostKey {base}/host_key\n"
                f"PidFile {base}/sshd.pid\nUsePAM yes\nPubkeyAuthentication yes\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                f"AuthorizedKeysFile .ssh/authorized_keys\nAllowUsers {user}\n"
                # the test site's run dir and config, and the test cluster's slurm.conf (a
                # real site has them at their default paths)
                f"SetEnv SDEEFS_RUN_DIR={site.run_dir} SDEEFS_CONFIG={site.config} "
                f"SLURM_CONF={slurm.conf}\n")
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
            log = open(base / "sshd.log", "ab")  # noqa: SIM115 (sshd keeps it)
            sshd = slurm.hub_popen([str(base / service), "-D", "-e", "-f",
                                    str(base / "sshd_config")], stdout=log, stderr=log)
            deadline = time.monotonic() + 10
            while slurm.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{SSH_PORT}"],
                            check=False).returncode != 0:
                assert sshd.poll() is None, (base / "sshd.log").read_text()
                assert time.monotonic() < deadline, "sshd did not listen"
                time.sleep(0.1)
            try:
                yield Day(site, slurm, base, user, key)
            finally:
                sshd.terminate()
                sshd.wait(10)
                log.close()
    finally:
        if made_privsep:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def test_a_users_day_over_ssh(day: Day) -> None:
    d = day
    uid = d.site.uid(d.user)
    home = d.site.home(d.user)
    repo = build_repo(d.base / "apt")
    wheel = build_wheel(d.base)
    (home / "greet.c").write_text('const char *greet(void) { return "hello from libsdtgreet"; }\n')
    (home / "main.c").write_text('#include <stdio.h>\nconst char *greet(void);\n'
                                 'int main(void) { puts(greet()); return 0; }\n')

    assert d.ssh("id -u; id -un").split() == ["0", "root"]  # the PAM hook started it
    out = d.ssh(apt_day(repo), timeout=300)
    assert "hello from the package" in out
    assert "Status: install ok installed" in out
    out = d.ssh(f"python3 -m pip install -q --no-index --break-system-packages {wheel} && "
                "python3 -c 'import sdtdemo, sys; print(sdtdemo.VALUE, sdtdemo.__file__)'")
    assert out.split()[0] == "42"
    assert out.split()[1].startswith("/usr/local/lib/python3")  # the system site-packages
    out = d.ssh(f"gcc -shared -fPIC -o /usr/local/lib/libsdtgreet.so {home}/greet.c && "
                "ldconfig && "
                f"gcc -o /usr/local/bin/sdtgreet {home}/main.c -lsdtgreet && sdtgreet")
    assert out.strip() == "hello from libsdtgreet"
    for path in ("/usr/local/bin/sdtgreet", "/usr/local/lib/libsdtgreet.so", "/usr/bin/sdt-hello"):
        assert not os.path.exists(path)  # the host did not change

    # SLURM from inside, no flags: the jobs are the user's
    out = d.ssh("srun -N2 sh -c 'echo $(hostname) $(id -u)'")
    assert sorted(out.split("\n")[:2]) == [f"n1 {uid}", f"n2 {uid}"], out
    job = d.ssh(f"sbatch --parsable -o {home}/day.out --wrap 'id -u; sleep 300'").strip()
    assert job.isdigit(), job
    assert f"{job} {d.user}" in d.ssh("squeue -h -o '%i %u'")
    d.ssh(f"scancel {job}")
    assert d.slurm.wait_job(int(job), timeout=60) == "CANCELLED"
    job = d.ssh(f"sbatch --parsable -o {home}/day2.out --wrap 'id -u'").strip()
    assert d.slurm.wait_job(int(job), timeout=60) == "COMPLETED"
    assert (home / "day2.out").read_text().split() == [str(uid)]

    # what landed in the upper: the user's ids only
    ids = of_user(d.user, 1000, allocate=False)
    assert all(ids.owns_uid(u) and ids.owns_gid(g) for u, g in walk_ids(d.site.upper(d.user)))
