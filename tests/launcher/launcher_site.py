"""A throw-away sdeefs site for launcher tests: its own config, root, run dir and users.

Everything it creates (users, environments, mounts, PAM service files) is removed
in ``cleanup()``, which the fixtures call even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from sdeefs import mountinfo
from sdeefs.fs import kernel

# The installed runtime (tests/conftest.py installs it with scripts/install.sh), or this
# venv's when pytest runs without root.
VENV_BIN = Path(os.environ.get("SDEEFS_TEST_BIN") or Path(sys.executable).parent)
ENTER = VENV_BIN / "sdeefs-enter"
SHELL = VENV_BIN / "sdeefs-shell"


def launcher_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the launcher needs root (PAM hook, idmapped mounts)"
    if not ENTER.exists():
        return f"{ENTER} is not built (run scripts/setup.sh)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


requires_launcher = pytest.mark.skipif(launcher_skip_reason() is not None,
                                       reason=launcher_skip_reason() or "")


def _mounts_under(prefix: str) -> list[str]:
    found = [mount.point for mount in mountinfo.mounts()]
    return [m for m in found if m == prefix or m.startswith(prefix.rstrip("/") + "/")]


@attrs.define
class Site:
    base: Path
    root: Path
    run_dir: Path
    config: Path
    engine: str = "hybrid"
    users: list[str] = attrs.field(factory=list)
    pam_services: list[Path] = attrs.field(factory=list)

    @classmethod
    def create(cls, engine: str = "hybrid", extra: str = "") -> Site:
        base = Path(tempfile.mkdtemp(prefix="sdeefs-site-", dir="/var/tmp"))
        os.chmod(base, 0o755)
        run_dir = Path(f"/run/sdeefs-test-{uuid.uuid4().hex[:8]}")
        site = cls(base, base / "lib", run_dir, base / "sdeefs.toml", engine)
        site.config.write_text(
            f'[sdeefs]\nroot = "{site.root}"\nrun_dir = "{run_dir}"\nengine = "{engine}"\n'
            f'shared = []\n{extra}')
        return site

    # -- users ------------------------------------------------------------------------------

    def add_user(self) -> str:
        name = f"sdt{uuid.uuid4().hex[:8]}"
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True,
                       capture_output=True)
        self.users.append(name)
        return name

    def uid(self, user: str) -> int:
        return pwd.getpwnam(user).pw_uid

    def home(self, user: str) -> Path:
        return Path(pwd.getpwnam(user).pw_dir)

    def upper(self, user: str) -> Path:
        if (self.root / user / "layer.img").exists():  # engine kernel: on the layer image
            return self.root / user / "layer" / "upper"
        return self.root / user / "upper"

    # -- commands ---------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        return {**os.environ, "SDEEFS_CONFIG": str(self.config),
                "SDEEFS_RUN_DIR": str(self.run_dir)}

    def sdeefs(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(VENV_BIN / "sdeefs"), *args], env=self.env(),
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"sdeefs {' '.join(args)}: {result.stderr.strip()}")
        return result

    def start(self, user: str) -> int:
        out = self.sdeefs("start", user).stdout
        return int(out.split()[-1])

    def stop(self, user: str) -> None:
        self.sdeefs("stop", user)

    def run(self, user: str, command: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the user's environment, as the user logs in (sdeefs-shell)."""
        result = subprocess.run(
            ["runuser", "-u", user, "--", "env", f"SDEEFS_RUN_DIR={self.run_dir}",
             f"HOME={self.home(user)}", str(SHELL), "-c", command],
            capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"in {user}'s environment, {command!r} failed "
                                 f"({result.returncode}): {result.stderr.strip()}")
        return result

    def pam_service(self) -> str:
        """A private PAM service whose session phase runs the sdeefs hook with this config."""
        name = f"sdeefs-test-{uuid.uuid4().hex[:8]}"
        path = Path("/etc/pam.d") / name
        path.write_text("auth required pam_permit.so\naccount required pam_permit.so\n"
                        f"session required pam_exec.so quiet {VENV_BIN / 'sdeefs-pam'} "
                        f"--config {self.config}\n")
        self.pam_services.append(path)
        return name

    def pamtester(self, service: str, user: str, *ops: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["pamtester", service, user, *ops], capture_output=True,
                              text=True, timeout=120)

    # -- teardown ---------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        return _mounts_under(str(self.root)) + _mounts_under(str(self.run_dir))

    def cleanup(self) -> None:
        for user in self.users:
            with contextlib.suppress(Exception):
                self.sdeefs("stop", user, check=False)
        for state in self.root.glob("*/state"):  # engine kernel, if a stop failed: the
            # capture's supervisor and capture, by the pids their held locks name
            for pid in (kernel.supervisor_pid(str(state)), kernel.capture_pid(str(state))):
                if pid is not None and pid > 1:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, 9)
        for mountpoint in sorted(self.leftovers(), key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        for user in self.users:
            subprocess.run(["userdel", "-r", "-f", user], capture_output=True)
        for path in self.pam_services:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)


@contextlib.contextmanager
def open_site(engine: str = "hybrid", extra: str = "") -> Iterator[Site]:
    site = Site.create(engine, extra)
    try:
        yield site
    finally:
        site.cleanup()


@pytest.fixture
def site() -> Iterator[Site]:
    with open_site() as s:
        yield s
