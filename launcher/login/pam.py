"""The PAM session hook and its installer.

``sdeefs-pam`` is run by ``pam_exec`` (as root, in a child of the login
process) at session open and close.  It cannot change the login process's
namespaces (pam_exec runs a separate program), so it only makes sure the
user's environment exists and counts sessions; the login shell
(``sdeefs-shell``, or sshd's ``ForceCommand sdeefs-shell``) joins it.

Snippet installed by ``sdeefs install-pam --service NAME`` (one marked line,
nothing else in the file is touched)::

    session optional pam_exec.so quiet /path/to/sdeefs-pam  # sdeefs

``optional``: a failure to build the environment is logged and the login
proceeds; ``sdeefs-shell`` then says why it cannot enter.  Sites that want
no login without an environment use ``--control required``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys

from sdeefs import config as config_mod
from sdeefs.errors import ExitCode, QuietError

from .. import env

log = logging.getLogger(__name__)
MARKER = "# sdeefs"
PAM_DIR = "/etc/pam.d"


def hook_main() -> int:
    """Entry point of ``sdeefs-pam`` (pam_exec passes PAM_USER and PAM_TYPE)."""
    logging.basicConfig(level=logging.INFO, format="sdeefs-pam: %(message)s")
    # pam_exec passes no environment of ours: the config file comes as an argument.
    args = sys.argv[1:]
    config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    user_name, pam_type = os.environ.get("PAM_USER"), os.environ.get("PAM_TYPE")
    if not user_name or pam_type not in ("open_session", "close_session"):
        return 0  # auth/account phases, or misuse: nothing to do
    try:
        cfg = config_mod.load(config_path)
        user = env.User.lookup(user_name)
        if user.uid < cfg.min_uid:
            return 0
        if pam_type == "open_session":
            # pam_exec's parent is the login's own process (sshd's or login's session
            # process, which then runs the shell): it and all it starts join the limits.
            record = env.open_session(cfg, user, os.getppid())
            log.info("%s: environment pid %d, %d session(s)", user.name, record.init_pid,
                     record.sessions)
        else:
            env.close_session(cfg, user)
    except QuietError as exc:
        print(f"sdeefs-pam: {exc}", file=sys.stderr)
        return exc.exitcode
    return 0


def hook_path() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "sdeefs-pam")
    return path if os.path.exists(path) else shutil.which("sdeefs-pam") or path


def install(service: str, control: str = "optional", pam_dir: str = PAM_DIR,
            config: str | None = None) -> str:
    """Append the session line to /etc/pam.d/SERVICE (idempotent); return the file."""
    path = os.path.join(pam_dir, service)
    if not os.path.exists(path):
        raise QuietError(f"no PAM service file {path}", ExitCode.USAGE)
    config_arg = f" --config {config}" if config else ""
    line = f"session {control} pam_exec.so quiet {hook_path()}{config_arg}  {MARKER}\n"
    with open(path) as f:
        lines = f.readlines()
    lines = [existing for existing in lines if not existing.rstrip().endswith(MARKER)]
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    _write(path, "".join(lines) + line)
    return path


def uninstall(service: str, pam_dir: str = PAM_DIR) -> bool:
    """Remove exactly the lines install() added; True if there were any."""
    path = os.path.join(pam_dir, service)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if not line.rstrip().endswith(MARKER)]
    if kept == lines:
        return False
    _write(path, "".join(kept))
    return True


def _write(path: str, text: str) -> None:
    st = os.stat(path)
    tmp = f"{path}.sdeefs-tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, st.st_mode & 0o7777)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, path)
