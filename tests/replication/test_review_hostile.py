"""Hostile-input review of the replica's batch path, C applier and frame reader (branch
review): what a peer's records and a peer's timing can make a replica do.

Each test names what it guards; those marked as findings failed on 279a0a8."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
import trio

from sdeefs import records as rec
from sdeefs.layers import open_layer_root
from sdeefs.offload import Offload
from sdeefs.replication import applier, receiver
from sdeefs.replication.replica import Replica
from sdeefs.replication.wire import (
    DOWN,
    MAX_FRAME_PAYLOAD,
    SNAPSHOT,
    UP,
    Frame,
    LinkKey,
    record_frames,
)
from sdeefs.sysio import inotify_drain, inotify_watch
from sdeefs.writeahead import open_write_data

from .test_applyc_hostile import apply_frames
from .test_protocol import ALICE, ALICE_OWNER, USER

IN_OPEN = 0x20  # inotify(7)
DRIBBLE_S = 10.0  # seconds a trickling upstream sends for at most
NULL_DEVICE = os.makedev(1, 3)  # /dev/null's numbers: opening it does nothing, but is seen


@pytest.mark.expect_log("sdeefs.replication.replica")
@pytest.mark.parametrize("how", ["native", "python", "per-record"])
def test_a_device_node_a_peer_made_is_never_opened(tmp_path: Path, how: str) -> None:
    """Finding (failed on 279a0a8, batch paths): a peer sends ``Mkdev`` (carried to every
    replica: host root may make device nodes in a view) and then a ``Write`` to the same
    path.  The batch applier opened the name O_WRONLY *before* looking at what it was
    (``BatchApplier._file``), and ``Setattr(SET_SIZE)`` opened it O_WRONLY on every path
    (``layers.apply_setattr``): the replica daemon, as root, opened a device of the
    peer's choosing for writing (a watchdog's open starts it; a tape's close rewinds it).
    Now a name is looked at through O_PATH and only a regular file is opened; the Write
    has nothing to do (as for a FIFO), the truncate is refused (EINVAL, as the kernel's)."""
    if how == "native" and applier._applyc is None:
        pytest.skip("sdeefs.replication._applyc is not built")
    replica = Replica.open(str(tmp_path / USER), ALICE)
    node = tmp_path / USER / "upper" / "dev"
    replica.accept(record_frames(1, rec.Mkdev(b"upper/dev", stat.S_IFCHR | 0o666, NULL_DEVICE,
                                              *ALICE_OWNER), None)[0])
    assert stat.S_ISCHR(node.lstat().st_mode)
    frames = record_frames(2, rec.Write(b"upper/dev", b"", 0, 4), b"boom") + \
        record_frames(3, rec.Setattr(b"upper/dev", rec.SET_SIZE, size=0), None)
    watch = inotify_watch(str(node), IN_OPEN)
    try:
        apply_frames(replica, frames, how)
        assert inotify_drain(watch) & IN_OPEN == 0, "the device node was opened"
    finally:
        os.close(watch)
    assert replica.applied == 3
    assert [r.seq for r in replica.skipped.records] == [3]  # a truncate of a device: refused
    replica.close()


def _dribble(sock: socket.socket, data: bytes, stop: threading.Event) -> None:
    """Send ``data`` a byte every few ms until told to stop (or DRIBBLE_S passed), then
    close the socket."""
    sock.settimeout(30)
    deadline = time.monotonic() + DRIBBLE_S
    with sock:
        for index in range(len(data)):
            if stop.wait(0.005) or time.monotonic() > deadline:
                return
            sock.sendall(data[index:index + 1])


async def test_a_link_whose_upstream_trickles_bytes_can_still_be_cancelled(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding (failed on 279a0a8): the reading thread looked for a cancellation only when
    the socket stayed empty for POLL_MS.  An upstream sending a byte every few ms (a
    frame of 4 MiB takes hours so) kept it reading: neither the link's silence deadline
    nor the daemon's shutdown could end the link (``trio.to_thread`` waits for its
    thread).  Now it looks after every read too.  (POLL_MS is made long here so that a
    pause of the sender on a loaded machine cannot stand in for the look that is
    missing; the sender stops after DRIBBLE_S: the old reader then fails the frame.)"""
    monkeypatch.setattr(receiver, "POLL_MS", 600_000)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    frame = bytes(Frame(SNAPSHOT, 1, b"x" * MAX_FRAME_PAYLOAD).encode(LinkKey(b"k" * 32, DOWN)))
    stop = threading.Event()
    reading = Offload(trio.CapacityLimiter(1))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, _dribble, theirs, frame, stop)
            reader = receiver.ThreadReader(ours.fileno(), MAX_FRAME_PAYLOAD, b"")
            with trio.move_on_after(0.3) as scope:
                await reading.run(reader.frames, LinkKey(b"k" * 32, UP), 8 << 20)
            still_sending = not stop.is_set() and theirs.fileno() >= 0
            stop.set()
    finally:
        ours.close()
    assert scope.cancelled_caught
    assert still_sending  # (the cancellation came through while bytes still arrived)


def test_a_fifo_put_where_a_write_records_file_was_is_not_waited_on(tmp_path: Path) -> None:
    """Finding (failed on 279a0a8): where the upper's filesystem has no file handles, a
    Write record names its file by path alone, and the shipper (``open_write_data``: the
    origin, replay, ``sdeefs check``) opened that path O_RDONLY as it found it.  A user
    who put a FIFO there (mkfifo works in a user namespace) held the root daemon's
    thread in ``open`` until someone wrote to the FIFO: one such thread per follower,
    from the pool every user's shipping shares.  Now the path is looked at first and
    only a regular file is opened; anything else is a file gone (None)."""
    for sub in ("upper", "work"):
        (tmp_path / sub).mkdir()
    os.mkfifo(tmp_path / "upper" / "f")
    source = open_layer_root(str(tmp_path / "upper").encode(), str(tmp_path / "work").encode())
    got: list[int | None] = []
    opener = threading.Thread(target=lambda: got.append(
        open_write_data(source, rec.Write(b"upper/f", b"", 0, 4))), daemon=True)
    opener.start()
    opener.join(20)
    waited = opener.is_alive()
    if waited:  # let the thread go: a writer opens the FIFO
        os.close(os.open(tmp_path / "upper" / "f", os.O_WRONLY | os.O_NONBLOCK))
        opener.join(20)
    for fd in got:
        if fd is not None:
            os.close(fd)
    source.close()
    assert not waited, "open_write_data waited on a FIFO"
    assert got == [None]
