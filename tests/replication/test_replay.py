"""A replica killed between creating an entry and giving it its owner and mode.

Creating an entry (``open(O_CREAT|O_EXCL)``, ``mkdir``, ``mknod``, ``symlink``) and its
``chown``/``chmod`` are separate syscalls; as root the entry is first root's, with the
record's mode less the umask.  A ``kill -9`` between them leaves it so, and the record
comes again (the replica's position is before it).  The entry exists then: the replay
must still give it the record's owner and mode (``sdeefs.apply.settle_existing``), on
every path that applies records (the batch applier in Python and in C, the per-record
path), or a 0600 file stays root's and the user's job cannot read it.  An entry of
another kind stays as it is, as it always did."""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from sdeefs import records as rec
from sdeefs.replicable import user_ids
from sdeefs.replication import applier
from sdeefs.replication.replica import Replica, _apply_batch
from sdeefs.replication.wire import RECORD, Frame, encode_record_payload, record_frames

USER = "alice"
ALICE = user_ids(4242, 4242)
OWNER = (4242, 4242)
History = list[tuple[int, rec.Record, bytes | None]]

# Each history's first record is the one the kill falls in (between create and chown);
# every entry it makes must end owned by alice with the record's mode.
HISTORIES: dict[str, History] = {
    "mknod": [(1, rec.Mknod(b"upper/f", stat.S_IFREG | 0o750, *OWNER), None),
              (2, rec.Write(b"upper/f", b"", 0, 4), b"data")],
    "mkdir": [(1, rec.Mkdir(b"upper/d", 0o755, *OWNER), None),
              (2, rec.Mknod(b"upper/d/f", stat.S_IFREG | 0o644, *OWNER), None)],
    "create": [(1, rec.Create(b"upper/c", stat.S_IFREG | 0o755, *OWNER, 10**18, b"h", b"",
                              b"hello"), None)],
    "fifo": [(1, rec.Mknod(b"upper/p", stat.S_IFIFO | 0o644, *OWNER), None)],
    "symlink": [(1, rec.Symlink(b"upper/l", b"target", *OWNER), None)],
}
EXPECTED: dict[str, dict[str, tuple[int, bytes | None]]] = {  # entry: (st_mode, contents)
    "mknod": {"f": (stat.S_IFREG | 0o750, b"data")},
    "mkdir": {"d": (stat.S_IFDIR | 0o755, None), "d/f": (stat.S_IFREG | 0o644, b"")},
    "create": {"c": (stat.S_IFREG | 0o755, b"hello")},
    "fifo": {"p": (stat.S_IFIFO | 0o644, None)},
    "symlink": {"l": (stat.S_IFLNK | 0o777, None)},
}


def _frames(history: History) -> list[Frame]:
    return [f for seq, record, data in history for f in record_frames(seq, record, data)]


def _killed_between_create_and_chown(root: str, history: History, batched: bool) -> None:
    """(A child process.)  Apply ``history`` the Python way and be killed with SIGKILL at
    the first chown: the entry is made, root's, its mode less the umask (077 here)."""
    os.umask(0o077)
    replica = Replica.open(root, ALICE)

    def die(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    os.fchown = die
    os.chown = die
    if batched:
        replica.batch_applier().native = False  # C cannot be stopped inside; its state is this
        _apply_batch(replica, _frames(history))
    else:
        for frame in _frames(history):
            replica.accept(frame)
    os._exit(0)  # not reached


def _check(upper: Path, expected: dict[str, tuple[int, bytes | None]]) -> None:
    for name, (mode, contents) in expected.items():
        st = (upper / name).lstat()
        assert (name, st.st_mode, st.st_uid, st.st_gid) == (name, mode, *OWNER)
        if contents is not None:
            assert (upper / name).read_bytes() == contents


@pytest.mark.parametrize("replay", ["c", "python", "per-record"])
@pytest.mark.parametrize("batched", [True, False], ids=["killed-batched", "killed-per-record"])
@pytest.mark.parametrize("case", sorted(HISTORIES))
def test_a_kill_between_create_and_chown_is_settled_by_the_replay(
        tmp_path: Path, case: str, batched: bool, replay: str) -> None:
    if replay == "c" and applier._applyc is None:
        pytest.skip("sdeefs.replication._applyc is not built")
    root = str(tmp_path / USER)
    history = HISTORIES[case]
    child = multiprocessing.get_context("fork").Process(
        target=_killed_between_create_and_chown, args=(root, history, batched))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    upper = tmp_path / USER / "upper"
    first = next(iter(EXPECTED[case]))
    crashed = (upper / first).lstat()
    assert crashed.st_uid == 0  # the state a crash leaves: made, never chowned
    replica = Replica.open(root, ALICE)
    assert replica.applied == 0  # the record comes again
    if replay == "per-record":
        for frame in _frames(history):
            replica.accept(frame)
    else:
        replica.batch_applier().native = replay == "c"
        _apply_batch(replica, _frames(history))
    assert replica.applied == history[-1][0]
    assert replica.skipped.count == 0
    replica.close()
    _check(upper, EXPECTED[case])


Make = Callable[[Path], object]
OTHER_KINDS: dict[str, tuple[rec.Record, Make]] = {  # a record, and another kind at its path
    "mknod-on-dir": (rec.Mknod(b"upper/x", stat.S_IFREG | 0o644, *OWNER),
                     lambda p: p.mkdir(mode=0o700)),
    "mkdir-on-file": (rec.Mkdir(b"upper/x", 0o755, *OWNER), lambda p: p.write_bytes(b"k")),
    "mknod-on-fifo": (rec.Mknod(b"upper/x", stat.S_IFREG | 0o644, *OWNER),
                      lambda p: os.mkfifo(p, 0o600)),
    "fifo-on-file": (rec.Mknod(b"upper/x", stat.S_IFIFO | 0o644, *OWNER),
                     lambda p: p.write_bytes(b"k")),
    "mknod-on-symlink": (rec.Mknod(b"upper/x", stat.S_IFREG | 0o644, *OWNER),
                         lambda p: p.symlink_to("/etc/passwd")),
    "mkdir-on-symlink": (rec.Mkdir(b"upper/x", 0o755, *OWNER),
                         lambda p: p.symlink_to("/etc")),
}


@pytest.mark.parametrize("path", ["c", "python", "per-record"])
@pytest.mark.parametrize("case", sorted(OTHER_KINDS))
def test_an_entry_of_another_kind_is_left_as_it_is(tmp_path: Path, case: str,
                                                   path: str) -> None:
    """The rule for an entry of another kind is what it was: the record does nothing
    (no refusal, nothing changed, nothing followed)."""
    if path == "c" and applier._applyc is None:
        pytest.skip("sdeefs.replication._applyc is not built")
    record, make = OTHER_KINDS[case]
    replica = Replica.open(str(tmp_path / USER), ALICE)
    x = tmp_path / USER / "upper" / "x"
    make(x)
    before = x.lstat()
    passwd, etc = os.stat("/etc/passwd"), os.stat("/etc")
    if path == "per-record":
        replica.accept(Frame(RECORD, 1, encode_record_payload(record)))
    else:
        replica.batch_applier().native = path == "c"
        _apply_batch(replica, [Frame(RECORD, 1, encode_record_payload(record))])
    assert (replica.applied, replica.skipped.count) == (1, 0)
    replica.close()
    after = x.lstat()
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_ino) == \
        (before.st_mode, before.st_uid, before.st_gid, before.st_ino)
    assert os.stat("/etc/passwd") == passwd
    assert os.stat("/etc") == etc


def test_the_c_path_leaves_an_existing_file_to_python(tmp_path: Path) -> None:
    """C takes a new file's Mknod; for one already there it does nothing and says so
    (not taken), and Python's ``_mknod`` gives it its owner and mode."""
    if applier._applyc is None:
        pytest.skip("sdeefs.replication._applyc is not built")
    replica = Replica.open(str(tmp_path / USER), ALICE)
    f = tmp_path / USER / "upper" / "f"
    f.write_bytes(b"kept")
    os.chmod(f, 0o600)  # root's, 0600: what a crash before the chown leaves
    payload = encode_record_payload(rec.Mknod(b"upper/f", stat.S_IFREG | 0o4644, *OWNER))
    batch = replica.batch_applier()
    assert not batch.take(payload, 1)
    assert (f.stat().st_uid, stat.S_IMODE(f.stat().st_mode)) == (0, 0o600)  # nothing done
    record = rec.Mknod(b"upper/f", stat.S_IFREG | 0o644, *OWNER)  # as sanitized (no set-ID)
    batch.apply(record, b"", "record 1")
    batch.close()
    s = f.stat()
    assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode), f.read_bytes()) == \
        (*OWNER, 0o644, b"kept")
    replica.close()
