"""sdeefs: self-deployed execution environments for HPC.

The map: folders say where code runs.  Format, protocol and rules live in the named
module's docstring; docs/ has the cross-cutting notes (threading, replication, hard
links, identity).

``sdeefs/`` — the shared core, on every node.  Imports nothing of the rooms below.
    records      journal record types and their pinned binary payloads (the record tables)
    journal      the journal: segment format, writer (group commit, ``Sync`` records), the
                 one reader (``JournalTail``), recovery of a torn tail
    writeahead   ``Write`` records carry data by reference: the writer's and the reader's
                 halves of the rule that makes that safe
    layers       a layer root (upper + work) reached through directory fds (``open_layer_root``)
    apply        applying records to a layer root, idempotently (replay, replicas)
    check        ``sdeefs check``: the invariants of an upper and its journal
    statedir     the one definition of ROOT/U/... (layers, state, journal) on disk
    config       the site configuration (``/etc/sdeefs/sdeefs.toml``), the ``Engine`` enum
    control      JSON-line control sockets (replicad, launchd, capture), errors by kind
    trees, sysio, offload, errors, tools
                 fd-based tree walks; syscall wrappers; the one trio thread offloader;
                 error types and named exit codes; ``diff``/``log`` over an upper

``sdeefs/fs/`` — the login node's journal producers: the daemons behind a user's view.
    cow          overlay semantics (copy-up, whiteouts, renames), testable without a mount
    ops          the pyfuse3 protocol adapter over cow (nothing else)
    inodes, lower   node tables; the read-only lower as the view shows it
    guard, mask  what a user may not see of the host (looked up lazily; a tmpfs mask)
    daemon, mount, cli   forking a daemon and reporting back; mounting the engines; the
                 ``sdeefs mount``/``umount`` commands
    fanotify, model, reconcile, capture, image
                 the ``kernel`` engine: overlayfs on a per-user image, changes captured by
                 fanotify and reconciled into records

``sdeefs/replication/`` — ``sdeefs-replicad``, one daemon per node, two roles.
    wire         frames, their authentication, every payload (the wire format)
    origin       login node: every user's journal as a source
    replica      compute node: a replica of one user's layer, and the link feeding it
    relay        the fan-out tree: placing joiners, relaying, asking the login head
    snapshot     a whole upper as records, and the digest that verifies a copy
    daemon, cli  the daemon (control ops, barriers) and ``sdeefs replica ...``

``launcher/`` (installed as ``sdeefs.launcher``) — environments: namespaces and roots.
    env          the lifecycle's public API (ensure, sessions, stop, status)
    view         building an environment's root over the engines; layout: RUN/U/...
    procs, enter /proc facts about an environment; running the C helper
    enter/       ``sdeefs-enter`` (C): namespaces, id maps, pivot, joining, the shell
    login/       login node: the PAM session hook (pam), ``sdeefs-launchd`` (service)
    compute/     compute node: SLURM prolog/epilog and ``sdeefs-run`` (job), the root-only
                 scan for job roots (private)
    cli          the ``sdeefs`` command, assembled from every room's subcommands

What runs where.  Login node: the fs daemons (one per user view), ``sdeefs-replicad``
as origin, ``sdeefs-launchd`` and the PAM hook.  Compute node: ``sdeefs-replicad`` as
replica (and relay), the SLURM prolog/epilog and ``sdeefs-run``; no FUSE daemon.

Where a write becomes durable: the fs daemon appends its record to the journal before
the bytes reach the upper (``writeahead.DataWriter``); ``journal.Journal.sync`` (group
commit, an ``fdatasync`` then a ``Sync`` record) makes it survive power loss, on the
user's ``fsync`` or every ``sync_interval`` seconds.
"""

__version__ = "0.1.0"
