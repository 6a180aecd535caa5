"""The login node's journal producers: what turns a user's changes into journal records.

The FUSE daemons (``sdeefs mount``, engines ``fuse`` and ``hybrid``) serve the view
and journal every change as they make it:

* ``ops`` - the pyfuse3 protocol adapter, only that (FUSE types in, ``FUSEError`` out);
* ``cow`` - the overlay semantics (``CowFS``), copy-up decided there, in two phases;
* ``inodes`` - the node tables (lookup counts, names) of the overlay and the guard;
* ``lower`` - the read-only lower: visibility, owner mapping, the origin handle format;
* ``guard`` - the read-only layer that hides what only host root may read; ``mask`` -
  the tmpfs layer that shows excluded paths empty (both for kernel overlayfs);
* ``daemon`` - fork, report on a pipe, detach, STATE/lock; ``mount`` - requests,
  checks, the engines, umount; ``cli`` - the ``mount`` and ``umount`` subcommands.

The ``kernel`` engine (issue 16) lets kernel overlayfs write the user's upper
directly, on a per-user ext4 image (``image``), and turns what the kernel did into
journal records after the fact: ``fanotify`` is the binding to the kernel's change
notifications, ``model`` what the journal says the upper is, ``reconcile`` the
comparison of that model with the live upper that yields ordered records, and
``capture`` the daemon that reads events, reconciles in batches and answers drain
requests (the barrier a job waits for); ``kernel`` opens the layer and runs the
capture under a supervisor that restarts it (what the launcher and ``sdeefs mount
--engine kernel`` call).

Either way the records are those of ``sdeefs.records``, so replay, check and
replicas take them all alike.  This package imports only the shared core.
"""
