"""Journal producers of the login node that watch a filesystem instead of serving one.

The ``kernel`` engine (issue 16) lets kernel overlayfs write the user's upper
directly, on a per-user ext4 image (``image``), and turns what the kernel did into
journal records after the fact: ``fanotify`` is the binding to the kernel's change
notifications, ``model`` what the journal says the upper is, ``reconcile`` the
comparison of that model with the live upper that yields ordered records, and
``capture`` the daemon that reads events, reconciles in batches and answers drain
requests (the barrier a job waits for).  The records are those of ``sdeefs.records``,
so replay, check and replicas take them as they take the FUSE engines'.
"""
