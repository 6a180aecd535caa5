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


def run(args: list[str], output: str | None = None) -> str:
    """``sdeefs-enter ARGS...``: its standard output, or its error line as a QuietError.
    ``output``: its standard output goes to this file (made or emptied, 0600) instead of a
    pipe, and stays there: what it printed outlives the caller (a caller killed meanwhile
    leaves a pipe nobody reads, and the helper's output with it)."""
    if output is not None:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                     os.O_CLOEXEC, 0o600)
        try:
            result = subprocess.run([helper_path(), *args], stdout=fd,
                                    stderr=subprocess.PIPE, text=True)
        finally:
            os.close(fd)
        with open(output) as f:
            result.stdout = f.read()
    else:
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
