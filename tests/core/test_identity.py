"""sdeefs.identity: the id maps of an environment, the id set, and /etc/subuid allocation."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sdeefs.identity import (
    MIN_COUNT,
    Identity,
    SubidError,
    SubidRules,
    format_map,
    subordinate_range,
)

IDS = Identity.build(1001, 1001, (27, 100, 5000), (165536, 65536), (231072, 65536), 1000)


def covered(lines: list[tuple[int, int, int]]) -> dict[int, int]:
    """inside -> host, for the ids of interest (the maps are too large to expand)."""
    probe = [0, 1, 27, 42, 99, 100, 101, 999, 1000, 1001, 1002, 5000, 65534, 65535, 70000]
    out = {}
    for inside in probe:
        for first, host, count in lines:
            if first <= inside < first + count:
                out[inside] = host + inside - first
    return out


def no_overlap(lines: list[tuple[int, int, int]]) -> None:
    """What the kernel demands of uid_map: neither side of two lines overlaps."""
    for side in (0, 1):
        spans = sorted((line[side], line[side] + line[2]) for line in lines)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, lines


def test_the_environment_map_carves_out_the_users_own_ids() -> None:
    uids = IDS.env_uid_map()
    no_overlap(uids)
    got = covered(uids)
    assert got[0] == 165536
    assert got[42] == 165536 + 42
    assert got[65535] == 165536 + 65535
    assert got[1001] == 1001  # the user is itself inside
    assert 70000 not in got
    gids = IDS.env_gid_map()
    no_overlap(gids)
    got = covered(gids)
    assert got[0] == 231072
    assert got[1001] == 1001
    assert got[27] == 27
    assert got[100] == 100
    assert got[5000] == 5000
    assert got[99] == 231072 + 99
    assert all(host != 0 for _, host, _ in uids + gids)  # never host root


def test_a_uid_above_the_range_is_mapped_besides_it() -> None:
    ids = Identity.build(70000, 70000, (), (165536, 65536), (231072, 65536), 1000)
    lines = ids.env_uid_map()
    no_overlap(lines)
    assert lines == [(0, 165536, 65536), (70000, 70000, 1)]


def test_the_lower_map_shows_system_ids_as_subordinate_and_nobody_else() -> None:
    got = covered(IDS.lower_uid_map())
    assert got[0] == 165536
    assert got[42] == 165536 + 42
    assert got[999] == 165536 + 999
    assert got[1001] == 1001
    assert 1000 not in got
    assert 1002 not in got
    assert 65534 not in got
    got = covered(IDS.lower_gid_map())
    assert got[27] == 27
    assert got[100] == 100
    assert got[5000] == 5000
    assert got[42] == 231072 + 42
    assert 1002 not in got
    # the FUSE layers show the same owners, in host terms
    assert IDS.shown(0, 0) == IDS.root == (165536, 231072)
    assert IDS.shown(1001, 100) == (1001, 100)
    assert IDS.shown(1002, 1002) == (1002, 1002)  # unmapped inside: nobody


def test_the_id_set() -> None:
    assert all(IDS.owns_uid(u) for u in (1001, 165536, 165536 + 65535))
    assert not any(IDS.owns_uid(u) for u in (0, 1000, 1002, 165535, 165536 + 65536))
    assert all(IDS.owns_gid(g) for g in (1001, 27, 100, 5000, 231072))
    assert not any(IDS.owns_gid(g) for g in (0, 1002, 231071, 231072 + 65536))


def test_group_zero_is_never_mapped_to_itself() -> None:
    ids = Identity.build(1001, 1001, (0, 27), (165536, 65536), (231072, 65536), 1000)
    assert ids.groups == (27,)
    assert covered(ids.env_gid_map())[0] == 231072


@pytest.mark.parametrize(("subuid", "subgid"), [((165536, 1000), (231072, 65536)),
                                            ((0, 65536), (231072, 65536)),
                                            ((1000, 65536), (231072, 65536))])
def test_bad_ranges_are_refused(subuid: tuple[int, int], subgid: tuple[int, int]) -> None:
    with pytest.raises(SubidError):
        Identity.build(1001, 1001, (), subuid, subgid, 1000)


def test_format_map_is_what_sdeefs_enter_takes() -> None:
    assert format_map([(0, 165536, 1001), (1001, 1001, 1)]) == "0:165536:1001,1001:1001:1"


# -- /etc/subuid -------------------------------------------------------------------------------


def test_allocation_takes_the_first_free_range_like_useradd(tmp_path: Path) -> None:
    path = tmp_path / "subuid"
    path.write_text("alice:100000:65536\n# comment\nbob:231072:65536\n1234:500000:70000")
    rules = SubidRules(str(path))
    assert subordinate_range(rules, "alice", 1000, allocate=True) == (100000, 65536)
    assert subordinate_range(rules, "carol", 1234, allocate=False) == (500000, 70000)  # by uid
    assert subordinate_range(rules, "dave", 1235, allocate=True) == (165536, 65536)  # the gap
    assert subordinate_range(rules, "erin", 1236, allocate=True) == (296608, 65536)
    assert subordinate_range(rules, "dave", 1235, allocate=True) == (165536, 65536)  # kept
    assert path.read_text().endswith("1234:500000:70000\ndave:165536:65536\nerin:296608:65536\n")
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert not list(tmp_path.glob("subuid.*"))
    assert not (tmp_path / "subuid+").exists()


def test_no_range_without_allocation_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SubidError, match="no subordinate range"):
        subordinate_range(SubidRules(str(tmp_path / "subuid")), "x", 1, allocate=False)


def test_a_full_id_space_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "subuid"
    path.write_text("a:100000:65536\n")
    with pytest.raises(SubidError, match="no free"):
        subordinate_range(SubidRules(str(path), 100000, 200000), "b", 2, allocate=True)


def test_login_defs_rules(tmp_path: Path) -> None:
    defs = tmp_path / "login.defs"
    defs.write_text("SUB_UID_MIN 200000\nSUB_UID_COUNT 100000\nSUB_GID_MIN 300000\n")
    uid = SubidRules.from_login_defs("/x", "UID", str(defs))
    gid = SubidRules.from_login_defs("/x", "GID", str(defs))
    assert (uid.minimum, uid.count, gid.minimum, gid.count) == (200000, 100000, 300000, MIN_COUNT)


def test_parallel_allocations_never_share_a_range(tmp_path: Path) -> None:
    """Two processes (two logins at once, or useradd) serialise on shadow's lock file."""
    path = tmp_path / "subuid"
    code = ("import sys; from sdeefs.identity import SubidRules, subordinate_range; "
            f"print(subordinate_range(SubidRules({str(path)!r}), sys.argv[1], 1, True)[0])")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"u{i}"], stdout=subprocess.PIPE,
                              text=True) for i in range(6)]
    starts = sorted(int(p.communicate()[0]) for p in procs)
    assert starts == [100000 + i * 65536 for i in range(6)]
    assert len(path.read_text().splitlines()) == 6


def test_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "subuid"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "subuid.lock").write_text(str(dead.pid))
    assert subordinate_range(SubidRules(str(path)), "a", 1, allocate=True) == (100000, 65536)
    assert not (tmp_path / "subuid.lock").exists()


def test_a_held_lock_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "subuid"
    lock = tmp_path / "subuid.lock"
    lock.write_text(str(os.getpid()))  # held by a live process: us
    threading.Timer(0.3, lock.unlink).start()
    assert subordinate_range(SubidRules(str(path)), "a", 1, allocate=True) == (100000, 65536)


def test_threads_of_one_process_allocate_apart(tmp_path: Path) -> None:
    """sdeefs-launchd starts environments of several users at once, in worker threads."""
    path = tmp_path / "subuid"
    got: list[int] = []

    def allocate(name: str) -> None:
        got.append(subordinate_range(SubidRules(str(path)), name, 1, allocate=True)[0])

    threads = [threading.Thread(target=allocate, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [100000 + i * 65536 for i in range(8)]
