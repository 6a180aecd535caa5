"""Run ``sdeefs-replicad`` under cProfile, every thread: ``profiled.py OUT ARGS...``.

Times are each thread's CPU time (``time.thread_time``), not wall time: a thread
waiting for the GIL or the CPU costs nothing (each call profiled costs about a
microsecond more: many small calls look bigger than they are).

cProfile sees only the thread that enables it; the daemon's blocking work (applying,
reading the journal, encoding) runs in worker threads.  Each thread gets its own profiler
on its first call (``threading.setprofile``); at exit (SIGINT ends the daemon) all of them
are merged into OUT (``pstats``).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import threading
import time
from types import FrameType


def main() -> int:
    out, args = sys.argv[1], sys.argv[2:]
    profiles: list[cProfile.Profile] = []

    def start(frame: FrameType, event: str, arg: object) -> None:
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.enable()  # replaces this hook in this thread

    threading.setprofile(start)  # type: ignore[arg-type]
    main_profile = cProfile.Profile(time.thread_time)
    profiles.append(main_profile)
    from sdeefs.replication.daemon import main as daemon_main

    main_profile.enable()
    try:
        code = daemon_main(args)
    finally:
        main_profile.disable()
        stats = pstats.Stats(main_profile)
        for profile in profiles:
            if profile is not main_profile:
                stats.add(profile)
        stats.dump_stats(out)
    return code


if __name__ == "__main__":
    sys.exit(main())
