"""Per-user limits (issue 14): a fork bomb, a memory hog and a full /tmp inside one user's
environment are contained by its cgroup, and another user's environment runs meanwhile."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs.launcher.limits import GROUP, Hierarchy

from .launcher_site import SHELL, VENV_BIN, Site, open_site, requires_launcher

pytestmark = [requires_launcher,
              pytest.mark.skipif(Hierarchy.find() is None, reason="no cgroup memory/pids")]

PIDS_MAX = 64
MEMORY_MAX = 256 << 20

SPAWN = """
import subprocess
started = []
for _ in range(200):
    try:
        started.append(subprocess.Popen(["sleep", "60"]))
    except OSError:
        break
print(len(started), flush=True)
for proc in started:
    proc.kill()
"""


@pytest.fixture
def limited() -> Iterator[tuple[Site, subprocess.Popen[bytes]]]:
    """A site with small limits and sdeefs-launchd running (sdeefs-shell asks it, so the
    shell joins its environment's cgroup as a login through PAM would)."""
    with open_site(extra=f'pids_max = {PIDS_MAX}\nmemory_max = "{MEMORY_MAX >> 20}M"\n') as site:
        service = subprocess.Popen([str(VENV_BIN / "sdeefs-launchd")], env=site.env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not (site.run_dir / "launchd.sock").exists():
                assert service.poll() is None
                assert time.monotonic() < deadline
                time.sleep(0.05)
            yield site, service
        finally:
            service.terminate()
            service.wait(30)


def _shell(site: Site, user: str, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", user, "--", "env", f"SDEEFS_RUN_DIR={site.run_dir}",
                           str(SHELL), "-c", command], capture_output=True, text=True,
                          timeout=120)


def _cgroup_dirs(user: str) -> list[Path]:
    hierarchy = Hierarchy.find()
    assert hierarchy is not None
    return [Path(d) for d in hierarchy.dirs(user)]


def test_a_fork_bomb_a_memory_hog_and_a_full_tmp_stay_inside(
        limited: tuple[Site, subprocess.Popen[bytes]]) -> None:
    site, _ = limited
    alice, bob = site.add_user(), site.add_user()
    spawned = _shell(site, alice, f"python3 -c '{SPAWN}'")
    assert spawned.returncode == 0, spawned.stderr
    assert int(spawned.stdout) < PIDS_MAX  # the rest could not fork
    assert all(d.is_dir() for d in _cgroup_dirs(alice))

    hog = _shell(site, alice, f"python3 -c 'x = bytearray({2 * MEMORY_MAX}); print(len(x))'")
    assert hog.returncode != 0
    assert hog.stdout == ""
    tmp = _shell(site, alice, f"head -c {2 * MEMORY_MAX} /dev/zero > /tmp/big; echo $?")
    assert tmp.stdout.strip() != "0" or tmp.returncode != 0

    other = _shell(site, bob, "echo fine; id -u")  # another user: unaffected
    assert other.stdout == "fine\n0\n", other.stderr
    rows = {r["user"]: r for r in json.loads(site.sdeefs("status", "--json").stdout)}
    assert 0 < rows[alice]["usage"]["pids"] <= PIDS_MAX
    assert rows[alice]["usage"]["memory"] <= MEMORY_MAX
    assert "processes" in site.sdeefs("status").stdout

    site.stop(alice)
    assert not any(d.exists() for d in _cgroup_dirs(alice))
    assert all(d.parent.name == GROUP for d in _cgroup_dirs(alice))
