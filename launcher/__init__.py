"""sdeefs launcher: the isolated login and job environments (installed as ``sdeefs.launcher``).

    cli.py        the ``sdeefs`` command: composes the rooms' subcommands and its own
                  (install-pam, start, stop, status, stop-idle, scan-private, job-prolog/epilog)
    env.py        the lifecycle of environments: the public API (ensure, open/close_session,
                  stop, stop_idle, status, EnvRecord, User)
    view.py       building an environment's root: mask, guard, idmapped lower, the layers
    layout.py     the RUN side of the on-disk layout (RUN/U/...), and a job's directories
    procs.py      what /proc says: start times, liveness, a namespace's processes
    enter.py      running the C helper sdeefs-enter
    login/        runs on the login node: pam.py (the PAM hook), service.py (sdeefs-launchd)
    compute/      runs on compute nodes: job.py (prolog, epilog, sdeefs-run), private.py
    enter/        the C helper (idmap, start, join, and sdeefs-shell), built by its Makefile
    systemd/      the unit of sdeefs-launchd
"""
