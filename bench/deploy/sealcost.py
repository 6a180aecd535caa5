"""CPU per frame of sealing and verifying a frame, of the release in TREE (process time).

Usage: ``.venv/bin/python bench/deploy/sealcost.py TREE`` (a ``git archive`` of a release,
or this tree).  20,000 frames of 256 payload bytes sealed, then verified, five times;
the medians.  Version 8 seals under a random nonce (bytes key), version 9 under the
frame's place (``wire.LinkKey``): this shows what the counter costs per frame, which a
cold stream's CPU on a loaded machine cannot resolve (~23,500 frames per GB).
"""

from __future__ import annotations

import statistics
import sys
import time

sys.path.insert(0, sys.argv[1])

from sdeefs.replication import wire  # noqa: E402

FRAMES = 20_000
KEY = b"k" * 32


def once(frame: wire.Frame) -> tuple[float, float]:
    if hasattr(wire, "LinkKey"):
        sender, receiver = wire.LinkKey(KEY, wire.DOWN), wire.LinkKey(KEY, wire.UP)
    else:
        sender = receiver = KEY  # type: ignore[assignment]
    start = time.process_time()
    sealed = [frame.encode(sender) for _ in range(FRAMES)]
    seal = time.process_time() - start
    start = time.process_time()
    for buf in sealed:
        wire.Frame.decode(bytes(buf[:24]), bytes(buf[24:-32]), bytes(buf[-32:]), receiver)
    return seal / FRAMES * 1e6, (time.process_time() - start) / FRAMES * 1e6


def main() -> None:
    frame = wire.Frame(wire.RECORD, 7, b"x" * 256)
    runs = [once(frame) for _ in range(5)]
    print(f"{sys.argv[1]}: seal {statistics.median(r[0] for r in runs):.2f} us/frame, "
          f"verify {statistics.median(r[1] for r in runs):.2f} us/frame")


if __name__ == "__main__":
    main()
