"""The login node's journal-to-frames path alone, in-process: ``JournalSender.next_batch``
over a whole journal, as a cold follower gets it (no socket, no replica).

Usage (as root, a journal ``bench/deploy/coldcpu.py`` built)::

    .venv/bin/python bench/deploy/originbatch.py [--size 1G] [--runs 3] [--profile FILE]
        [--root ROOT]

``--root``: another login root than coldcpu.py's passthrough journal of ``--size`` (its
kernel-engine one: ``WORK/SIZE-kernel/login``, the layer image mounted).

Reported per run: CPU seconds of the thread (``time.thread_time``), frames, bytes; with
``--digest`` also the SHA-256 of every frame sent in order, their MAC made deterministic
(a hash of the frame in place of the random GMAC nonce and tag): the same digest from two
releases says their frames are byte for byte the same for this journal (the hashing then
costs more CPU than what it checks).  ``PYTHONPATH=TREE`` runs another
release (a ``git archive`` of it) on the same journal.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

WORK = Path("/var/tmp/sdeefs-coldcpu")
USER = "benchuser"


def deterministic_mac() -> None:
    """Replace the GMAC field by a hash of the frame (same size), for comparing releases."""
    from sdeefs.replication import mac

    def seal(key: bytes, *parts: object) -> bytes:
        digest = hashlib.sha256(key)
        for part in parts:
            digest.update(part)  # type: ignore[arg-type]
        return digest.digest()[:mac.FIELD - 4] + bytes(4)

    mac.seal = seal  # type: ignore[assignment]


def one_run(root: Path, profile: str | None, check: bool) -> dict[str, object]:
    from sdeefs.journal import JournalTail
    from sdeefs.replicable import ids_of_user
    from sdeefs.replication.origin import JournalSender, OriginUser
    from sdeefs.replication.relay import Downstreams
    from sdeefs.statedir import UserDirs

    user = OriginUser(USER, UserDirs.of(str(root), USER), Downstreams(4))
    user.ids = ids_of_user(USER)
    source = user.source()
    tail = JournalTail(user.journal_dir, 1)
    link = SimpleNamespace(key=bytes(32))
    sender = JournalSender(link, user, tail, source, None)  # type: ignore[arg-type]
    digest = hashlib.sha256()
    frames = size = 0
    profiler = cProfile.Profile() if profile else None
    start = time.thread_time()
    if profiler:
        profiler.enable()
    idle = 0
    while idle < 3:
        buffers, _last = sender.next_batch()
        if not buffers:
            idle += 1
            time.sleep(0.06)  # past HOLD_BACK: the trailing record goes
            continue
        idle = 0
        for buf in buffers:
            if check:
                digest.update(buf)
            frames += 1
            size += len(buf)
    if profiler:
        profiler.disable()
        profiler.dump_stats(profile)
    cpu = time.thread_time() - start
    tail.close()
    source.close()
    return {"cpu": round(cpu, 3), "frames": frames, "bytes": size,
            "sha256": digest.hexdigest()[:16] if check else "", "refused": len(user.refused)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile")
    parser.add_argument("--digest", action="store_true")
    parser.add_argument("--root", type=Path)
    args = parser.parse_args()
    if args.digest:
        deterministic_mac()
    root = args.root or WORK / args.size / "login"
    for _ in range(args.runs):
        print(json.dumps(one_run(root, args.profile, args.digest)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
