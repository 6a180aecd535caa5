"""Where things live on disk: the one definition of every per-user and per-layer path.

Shared core.  Every module that needs one of these paths asks here, so a reader
finds the whole on-disk layout in one page and a change of it is one change.

On a login node (``ROOT`` is ``[sdeefs] root`` of the site config)::

    ROOT/U/                    UserDirs: one user's layer and its state (root, 0700)
        upper/                 the user's layer, kernel overlayfs format (owned by U)
        state/                 StateDir (root, 0700): what the daemons keep about it
            journal/           journal segments and the history id (sdeefs.journal)
            work/              overlayfs work directory (on the upper's filesystem)
            lock               flock'ed by the one daemon writing the journal; its pid
            daemon.log         the journaling daemon's log
            mnt/               engine hybrid: where the journaling passthrough is mounted
            mask/              engine hybrid (sdeefs mount): the mask tmpfs
            capture.sock       engine kernel: the capture daemon's control socket
            capture/           engine kernel: the capture's model checkpoint
            replicas.json      the login replicad's placement of this user's replicas

On a compute node (``REPLICA_DIR`` is ``[replication] replica_dir``)::

    REPLICA_DIR/U/             ReplicaDirs: a replica of U's layer root
        upper/ work/           the copy
        position               the applied position (rewritten in place per record)
        durable                the last position known to be on stable storage
        incoming/              a snapshot being received, until verified and swapped in
"""

from __future__ import annotations

import os

import attrs


@attrs.frozen
class StateDir:
    """``STATE``: a layer's journal and what its daemons keep (see the module docstring)."""

    path: str

    journal = property(lambda self: os.path.join(self.path, "journal"))
    work = property(lambda self: os.path.join(self.path, "work"))
    lock = property(lambda self: os.path.join(self.path, "lock"))
    daemon_log = property(lambda self: os.path.join(self.path, "daemon.log"))
    mnt = property(lambda self: os.path.join(self.path, "mnt"))
    mask = property(lambda self: os.path.join(self.path, "mask"))
    capture_socket = property(lambda self: os.path.join(self.path, "capture.sock"))
    capture = property(lambda self: os.path.join(self.path, "capture"))
    replicas = property(lambda self: os.path.join(self.path, "replicas.json"))

    @classmethod
    def beside(cls, upper: str) -> StateDir:
        """The default state of an upper given alone (``sdeefs mount --upper U``): U/../state."""
        return cls(os.path.join(os.path.dirname(os.path.abspath(upper.rstrip("/"))), "state"))


@attrs.frozen
class UserDirs:
    """``ROOT/U``: one user's layer and its state on the login node."""

    path: str

    @classmethod
    def of(cls, root: str, user: str) -> UserDirs:
        return cls(os.path.join(root, user))

    upper = property(lambda self: os.path.join(self.path, "upper"))
    state = property(lambda self: StateDir(os.path.join(self.path, "state")))


@attrs.frozen
class ReplicaDirs:
    """``REPLICA_DIR/U``: a replica of one user's layer root on a compute node."""

    path: str

    @classmethod
    def of(cls, replica_dir: str, user: str) -> ReplicaDirs:
        return cls(os.path.join(replica_dir, user))

    upper = property(lambda self: os.path.join(self.path, "upper"))
    work = property(lambda self: os.path.join(self.path, "work"))
    position = property(lambda self: os.path.join(self.path, "position"))
    durable = property(lambda self: os.path.join(self.path, "durable"))
    incoming = property(lambda self: os.path.join(self.path, "incoming"))
    skipped = property(lambda self: os.path.join(self.path, "skipped"))
