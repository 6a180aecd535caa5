"""The directory fds replicas keep open are bounded for the whole daemon (``applier.DirFds``).

Each user's batch applier keeps the directories it resolved open across batches; one
bound per user (256) let a few hundred users hold every fd of the daemon, and then any
user's apply failed with EMFILE.  The bound is now shared by every replica of a daemon,
and chosen from RLIMIT_NOFILE."""

from __future__ import annotations

import multiprocessing
import os
import resource
import stat
import threading
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from sdeefs import records as rec
from sdeefs.replicable import user_ids
from sdeefs.replication import applier
from sdeefs.replication.applier import DirFds
from sdeefs.replication.replica import Replica, _apply_batch
from sdeefs.replication.wire import Frame, record_frames

ALICE = user_ids(4242, 4242)
OWNER = (4242, 4242)


def _batch(first_seq: int, batch: int, dirs: int) -> list[Frame]:
    """``dirs`` new directories, each with a file written: every record of the file
    resolves its parent (the applier keeps it open)."""
    history: list[tuple[rec.Record, bytes | None]] = []
    for n in range(dirs):
        d = b"upper/b%d-%d" % (batch, n)
        history += [(rec.Mkdir(d, 0o755, *OWNER), None),
                    (rec.Mknod(d + b"/f", stat.S_IFREG | 0o644, *OWNER), None),
                    (rec.Write(d + b"/f", b"", 0, 2), b"%02d" % n)]
    return [f for seq, (record, data) in enumerate(history, first_seq)
            for f in record_frames(seq, record, data)]


def _check_tree(upper: Path, batches: int, dirs: int) -> None:
    for batch in range(batches):
        for n in range(dirs):
            f = upper / f"b{batch}-{n}" / "f"
            assert f.read_bytes() == b"%02d" % n
            assert (f.stat().st_uid, f.stat().st_gid) == OWNER


def _dir_fds_inside(root: Path, replicas: list[Replica]) -> int:
    """fds of this process open on a directory of some ``<root>/<user>/upper``, but the
    layer roots' own (``LayerRoot``: upper_fd, mount_fd)."""
    roots = {fd for r in replicas if r._layers is not None
             for fd in (r._layers.upper_fd, r._layers._mount_fd)}
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
            if not stat.S_ISDIR(os.stat(f"/proc/self/fd/{name}").st_mode):
                continue  # (a file a batch holds)
        except OSError:
            continue
        head, _, rest = target.partition(str(root) + "/")
        if not head and rest.partition("/")[2].partition("/")[0] == "upper" \
                and int(name) not in roots:
            count += 1
    return count


@pytest.mark.parametrize("native", [True, False])
def test_many_users_replicas_never_hold_more_than_the_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Twelve users' replicas in one daemon, each resolving more directories than the
    bound: the fds kept open, all users together, never exceed it (before: 12 x 10),
    and every copy is complete."""
    if native and applier._applyc is None:
        pytest.skip("sdeefs.replication._applyc is not built")
    fds = DirFds(8)
    peaks: list[int] = []
    original = DirFds.acquire

    def acquire(self: DirFds, who: applier.BatchApplier) -> None:
        original(self, who)
        peaks.append(self.held)
        peaks.append(_dir_fds_inside(tmp_path, replicas) + 1)  # (+ the one being opened)

    replicas = [Replica.open(str(tmp_path / f"u{n}"), ALICE, fds) for n in range(12)]
    monkeypatch.setattr(DirFds, "acquire", acquire)
    try:
        for batch in range(3):
            for replica in replicas:
                replica.batch_applier().native = native
                _apply_batch(replica, _batch(replica.applied + 1, batch, 10))
                assert fds.held <= 8
                assert _dir_fds_inside(tmp_path, replicas) == fds.held
        assert max(peaks) <= 8
        assert max(peaks) == 8  # (the bound was reached: the property is not trivially true)
        assert [r.skipped.count for r in replicas] == [0] * len(replicas)
    finally:
        monkeypatch.undo()
        for replica in replicas:
            replica.close()
    for n in range(len(replicas)):
        _check_tree(tmp_path / f"u{n}" / "upper", 3, 10)
    assert fds.held == 0
    assert _dir_fds_inside(tmp_path, []) == 0


def test_users_applying_at_once_share_the_bound(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Users in different worker threads at once: an applier inside a batch never has
    an fd closed under it by another's (the copies are exact), and the fds held stay
    within the bound plus one for each applier inside a batch."""
    fds = DirFds(6)
    users = 8
    peaks: list[int] = []
    original = DirFds.acquire

    def acquire(self: DirFds, who: applier.BatchApplier) -> None:
        original(self, who)
        peaks.append(self.held)

    replicas = [Replica.open(str(tmp_path / f"u{n}"), ALICE, fds) for n in range(users)]
    errors: list[str] = []

    def apply(replica: Replica) -> None:
        try:
            for batch in range(5):
                _apply_batch(replica, _batch(replica.applied + 1, batch, 10))
        except BaseException:
            errors.append(traceback.format_exc())

    monkeypatch.setattr(DirFds, "acquire", acquire)
    try:
        threads = [threading.Thread(target=apply, args=(r,)) for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert max(peaks) <= 6 + users
        assert fds.held <= 6
        assert [r.skipped.count for r in replicas] == [0] * users
    finally:
        monkeypatch.undo()
        for replica in replicas:
            replica.close()
    for n in range(users):
        _check_tree(tmp_path / f"u{n}" / "upper", 5, 10)
    assert fds.held == 0


def _many_users_under_a_low_limit(root: str, users: int, send: Connection) -> None:
    """(A child process.)  RLIMIT_NOFILE 256, the daemon's bound from it, ``users``
    replicas each keeping 20 directories: every apply must succeed."""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
        fds = DirFds.from_rlimit()
        assert fds.limit == 64
        replicas = [Replica.open(os.path.join(root, f"u{n}"), ALICE, fds)
                    for n in range(users)]
        for batch in range(2):
            for replica in replicas:
                _apply_batch(replica, _batch(replica.applied + 1, batch, 20))
                assert replica.skipped.count == 0, replica.skipped.records
        for replica in replicas:
            replica.close()
        send.send("")
    except BaseException:
        send.send(traceback.format_exc())


def test_one_users_traffic_never_makes_anothers_apply_fail_with_emfile(
        tmp_path: Path) -> None:
    """40 users under RLIMIT_NOFILE 256 (as 250 under the unit's 65536): before, each
    kept its 20 directories (800 fds) and the applies after the ninth user's or so
    failed with EMFILE (skipped records, or a retry forever)."""
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(
        target=_many_users_under_a_low_limit, args=(str(tmp_path), 40, send))
    child.start()
    child.join(300)
    assert child.exitcode == 0
    assert receive.recv() == ""
    for n in range(40):
        _check_tree(tmp_path / f"u{n}" / "upper", 2, 20)


def test_the_bound_comes_from_rlimit_nofile() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert DirFds.from_rlimit().limit == max(applier.MIN_DIR_FDS,
                                              soft // applier.DIR_FDS_SHARE)
