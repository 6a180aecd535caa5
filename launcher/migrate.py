"""The one-time migration of a user's layer to the id map of docs/identity.md.

Before that map, an environment mapped one id, inside 0 -> host U: every entry of U's
upper was made by "root inside" and is owned by host ``u``/``g`` (nothing else could be
created).  Now inside root is host ``S``/``T`` and ``u`` is the user's own uid inside,
so those entries would show as the user's instead of root's.  At the first start under
the new map, every entry of the upper owned by ``u`` becomes ``S`` and every one of
group ``g`` becomes ``T``: exactly what inside root owns now.  The chowns go through the
journaling daemon (engines hybrid and fuse), so replicas follow; the overlay engine has
no journal and is changed in place.

``STATE/idmap`` ("sdeefs-idmap 2 S T\\n", root's) records that the layer is in the new
map and for which ranges: a layer whose recorded ranges differ from the user's current
ones is refused (its files would belong to someone else's subordinate ids).
"""

from __future__ import annotations

import contextlib
import os

from sdeefs.errors import ExitCode, QuietError
from sdeefs.identity import Identity
from sdeefs.sysio import write_file_atomic

from .layout import EnvDirs

MARK = "sdeefs-idmap 2"


def _marker(dirs: EnvDirs) -> str:
    return os.path.join(dirs.layer.state.path, "idmap")


def needed(dirs: EnvDirs, ids: Identity) -> bool:
    """Does the layer still need migrating?  QuietError if it was made for other ranges."""
    try:
        with open(_marker(dirs)) as f:
            text = f.read()
    except FileNotFoundError:
        return True
    expected = f"{MARK} {ids.subuid} {ids.subgid}\n"
    if text != expected:
        raise QuietError(f"the layer of uid {ids.uid} was made for the subordinate ranges "
                         f"{text.strip().removeprefix(MARK).strip()!r}, the user now has "
                         f"{ids.subuid} {ids.subgid} (/etc/subuid, /etc/subgid): restore them "
                         "(docs/identity.md)", ExitCode.UNAVAILABLE)
    return False


def chown_tree(top: str, ids: Identity) -> int:
    """Inside root's entries of the old map (u/g) below ``top`` become S/T; how many."""
    changed = 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                uid = ids.subuid if st.st_uid == ids.uid else -1
                gid = ids.subgid if st.st_gid == ids.gid else -1
                if uid != -1 or gid != -1:
                    os.lchown(path, uid, gid)
                    changed += 1
    return changed


def mark(dirs: EnvDirs, ids: Identity) -> None:
    write_file_atomic(_marker(dirs), f"{MARK} {ids.subuid} {ids.subgid}\n".encode())
