"""The admin's install command (scripts/install.sh), run as the admin guide says, into
directories of the test's own: what it installs, that users can run it, that it is
idempotent, and that --uninstall removes exactly what it added."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs.config import SiteConfig
from sdeefs.launcher.login.bpfguard import BpfGuard

from .test_bpfguard import handmade_set, maps_unavailable, private_bpffs

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "scripts" / "install.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the system install runs as root")


@pytest.fixture
def site_dir() -> Iterator[Path]:
    """A directory every user may search (pytest's own tmp_path is 0700 root's)."""
    path = Path(tempfile.mkdtemp(prefix="sdeefs-install-test-", dir="/var/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path / "site"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _install(tmp: Path, *extra: str,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALL), "--prefix", str(tmp / "opt"), "--bin-dir", str(tmp / "bin"),
         "--sbin-dir", str(tmp / "sbin"), "--unit-dir", str(tmp / "units"), *extra],
        capture_output=True, text=True, timeout=600, env=env)


def test_install_then_uninstall(site_dir: Path) -> None:
    tmp = site_dir
    shells_before = Path("/etc/shells").read_text()
    try:
        first = _install(tmp)
        assert first.returncode == 0, first.stderr
        for name in ("sdeefs", "sdeefs-shell", "sdeefs-run"):
            assert os.readlink(tmp / "bin" / name) == str(tmp / "opt" / "bin" / name)
        for name in ("sdeefs-replicad", "sdeefs-launchd", "sdeefs-pam"):
            assert (tmp / "sbin" / name).resolve().is_relative_to(tmp / "opt")
        shell = str(tmp / "bin" / "sdeefs-shell")
        assert shell in Path("/etc/shells").read_text().splitlines()
        # Every user can run it: nobody runs the installed command (a 0700 checkout's own
        # venv would give "Permission denied" here).
        ran = subprocess.run(["runuser", "-u", "nobody", "--", str(tmp / "bin" / "sdeefs"),
                              "--help"], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        assert os.access(tmp / "opt" / "bin" / "sdeefs-enter", os.X_OK)
        assert os.access(tmp / "opt" / "bin" / "sdeefs-guard", os.X_OK)  # the guard's daemon
        # the BPF guard's loader: built where its build packages are (scripts/apt.sh)
        bpf = tmp / "opt" / "bin" / "sdeefs-bpfguard"
        if shutil.which("clang") and shutil.which("bpftool", path="/usr/sbin:/usr/bin"):
            assert os.access(bpf, os.X_OK), (tmp / "opt" / "bpfguard-build.log").read_text()
        units = {p.name: p.read_text() for p in (tmp / "units").iterdir()}
        assert set(units) == {"sdeefs-launchd.service", "sdeefs-replicad@.service",
                              "sdeefs-stop-idle.service", "sdeefs-stop-idle.timer",
                              "sdeefs-scan-private.service", "sdeefs-scan-private.timer"}
        assert f"ExecStart={tmp}/sbin/sdeefs-replicad --role %i" in \
            units["sdeefs-replicad@.service"]
        assert f"ExecStopPost={tmp}/bin/sdeefs end-spares --role %i" in \
            units["sdeefs-replicad@.service"]
        assert not any("@" in line for text in units.values()
                       for line in text.splitlines()
                       if line.startswith(("Exec", "Documentation")))
        if shutil.which("systemd-analyze"):
            verify = subprocess.run(["systemd-analyze", "verify", "--man=no",
                                     *(str(tmp / "units" / u) for u in units
                                       if not u.endswith("@.service"))],
                                    capture_output=True, text=True, timeout=60)
            assert "ExecStart" not in verify.stderr, verify.stderr
        again = _install(tmp)  # unchanged source: nothing reinstalled
        assert again.returncode == 0, again.stderr
        assert "installing into" not in again.stderr

        # A BPF guard set the installed sdeefs loaded (by hand here: this kernel loads its
        # maps, not its programs), guarding nobody now: the uninstall unpins it.
        with contextlib.ExitStack() as stack:
            env = None
            if maps_unavailable() is None:
                pins = stack.enter_context(private_bpffs()) / "sdeefs"
                guard = BpfGuard(str(tmp / "run"), pins=str(pins),
                                 loader=str(tmp / "opt" / "bin" / "sdeefs-bpfguard"))
                handmade_set(guard, SiteConfig(run_dir=str(tmp / "run")))
                conf = tmp / "sdeefs.toml"
                conf.write_text(f'[sdeefs]\nrun_dir = "{tmp / "run"}"\n')
                env = {**os.environ, "SDEEFS_BPF_PINS": str(pins), "SDEEFS_CONFIG": str(conf)}
            gone = _install(tmp, "--uninstall", env=env)
            assert gone.returncode == 0, gone.stderr
            if env is not None:
                assert "the BPF guard is unloaded (1 pinned set(s) removed)" in gone.stdout
                assert not pins.exists()
        assert not (tmp / "opt").exists()
        assert not list((tmp / "bin").iterdir())
        assert not list((tmp / "sbin").iterdir())
        assert not list((tmp / "units").iterdir())
        assert Path("/etc/shells").read_text() == shells_before
    finally:
        if Path("/etc/shells").read_text() != shells_before:
            Path("/etc/shells").write_text(shells_before)


def test_install_leaves_a_foreign_file_alone(site_dir: Path) -> None:
    tmp = site_dir
    (tmp / "bin").mkdir(parents=True)
    (tmp / "bin" / "sdeefs").write_text("#!/bin/sh\necho the site's own\n")
    result = _install(tmp, "--no-system-files")
    assert result.returncode == 0, result.stderr
    assert "exists and is not a link: left alone" in result.stderr
    assert (tmp / "bin" / "sdeefs").read_text() == "#!/bin/sh\necho the site's own\n"
    assert _install(tmp, "--no-system-files", "--uninstall").returncode == 0
    assert (tmp / "bin" / "sdeefs").exists()


def test_bad_options_change_nothing() -> None:
    result = subprocess.run([str(INSTALL), "--prefix", "relative/dir"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "install.sh: relative/dir is not an absolute path\n"
    assert not Path("relative").exists()
