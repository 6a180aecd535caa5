"""Hostile-input review of the replica's batch path, C applier and frame reader (branch
review): what a peer's records and a peer's timing can make a replica do.

Each test names what it guards; those marked as findings failed on 279a0a8."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sdeefs import records as rec
from sdeefs.replication import applier
from sdeefs.replication.replica import Replica, _apply_batch
from sdeefs.replication.wire import record_frames
from sdeefs.sysio import inotify_drain, inotify_watch

from .test_protocol import ALICE, ALICE_OWNER, USER

IN_OPEN = 0x20  # inotify(7)
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
        if how == "per-record":
            for frame in frames:
                replica.accept(frame)
        else:
            replica.batch_applier().native = how == "native"
            _apply_batch(replica, frames)
        assert inotify_drain(watch) & IN_OPEN == 0, "the device node was opened"
    finally:
        os.close(watch)
    assert replica.applied == 3
    assert [r.seq for r in replica.skipped.records] == [3]  # a truncate of a device: refused
    replica.close()
