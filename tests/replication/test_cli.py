"""``sdeefs replica`` as an admin types it on a terminal."""

from __future__ import annotations

import os
import subprocess

from ..conftest import requires_fuse
from .test_daemon import SDEEFS, USER, Site, converged, write_mb


@requires_fuse
def test_follow_wait_on_a_terminal_shows_progress(login: Site) -> None:
    """``follow --wait`` of a big upper on a terminal: lines of records, bytes, rate and
    time left while it waits, then the answer; without a terminal only the answer."""
    write_mb(login.view / "big.bin", 256)
    login.start_origin()
    login.start_replica("n1")
    command = " ".join([*SDEEFS, "replica", "follow", USER, "--wait", "--control",
                        str(login.tmp / "n1.sock")])
    shown = subprocess.run(["script", "-qec", command, "/dev/null"], capture_output=True,
                           text=True, timeout=300, env={**os.environ, "TERM": "dumb"})
    assert shown.returncode == 0, shown.stdout
    assert f"{USER}: " in shown.stdout, shown.stdout
    assert " records, " in shown.stdout
    assert "/s" in shown.stdout
    assert f"user={USER} applied=" in shown.stdout
    assert converged(login, "n1")
    plain = subprocess.run([*SDEEFS, "replica", "follow", USER, "--wait", "--control",
                            str(login.tmp / "n1.sock")], capture_output=True, text=True,
                           timeout=60)
    assert plain.stderr == ""
    assert plain.stdout.startswith(f"user={USER} applied=")
