"""Running the C helper ``sdeefs-enter`` (its source: launcher/enter/, built by scripts/setup.sh).

The helper makes and joins the namespaces (``idmap``, ``start``, ``join``); everything it
reports is one line on stderr, which becomes the :class:`QuietError` of the command
that asked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import NoReturn

from sdeefs.errors import ExitCode, QuietError


def helper_path() -> str:
    """The compiled sdeefs-enter (``$SDEEFS_ENTER``, or next to this Python)."""
    path = os.environ.get("SDEEFS_ENTER") or os.path.join(os.path.dirname(sys.executable),
                                                           "sdeefs-enter")
    if not os.access(path, os.X_OK):
        raise QuietError(f"{path} is missing: run scripts/setup.sh to build sdeefs-enter",
                         ExitCode.UNAVAILABLE)
    return path


def run(args: list[str]) -> str:
    """``sdeefs-enter ARGS...``: its standard output, or its error line as a QuietError."""
    result = subprocess.run([helper_path(), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise QuietError(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                         else f"sdeefs-enter {args[0]} failed ({result.returncode})",
                         ExitCode.FAILURE)
    return result.stdout


def exec_join(pid: int, cwd: str, command: list[str]) -> NoReturn:
    """Become ``sdeefs-enter join``: ``command`` in the environment whose init is ``pid``."""
    helper = helper_path()
    os.execv(helper, [helper, "join", "--pid", str(pid), "--cwd", cwd, "--", *command])
