"""Nothing a user does stalls replication or takes a node out of service (issue 12).

On the real SLURM cluster of test_slurm_jobs (3 nodes in network namespaces, the login
node's sdeefs-replicad as origin, SLURM's Prolog/Epilog the shipped `sdeefs-prolog` and
`sdeefs-epilog`): a file capability set with the real `setcap` inside the environment
reaches every replica, and a record no replica may apply fails the user's job with one
line while the nodes stay in service, until `sdeefs replica resync` repairs the replicas.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdeefs import records as rec
from sdeefs.identity import of_user
from sdeefs.journal import Journal

from ..launcher.launcher_site import VENV_BIN, requires_launcher
from .slurm_cluster import requires_slurm
from .test_slurm_jobs import LOGIN_NODE, NODES, Grid, job_lines, open_grid

IN_SERVICE = ("idle", "allocated", "mixed", "completing")


@pytest.fixture
def grid() -> Iterator[Grid]:
    # A short barrier: a stream that wedges (as it did) fails the test in 20 s, not 90.
    with open_grid(NODES, barrier_timeout=20) as g:
        yield g


def file_cap(path: Path) -> tuple[int, int | None]:
    """(revision, rootid) of a file's security.capability, as the host reads it."""
    raw = os.getxattr(path, "security.capability")
    revision = struct.unpack_from("<I", raw)[0] >> 24
    return revision, struct.unpack_from("<I", raw, 20)[0] if revision == 3 else None


def assert_in_service(g: Grid) -> None:
    states = g.slurm.node_states()
    assert all(states.get(f"n{i}") in IN_SERVICE for i in range(1, g.nodes + 1)), states


def sdeefs_on(g: Grid, i: int, *args: str, check: bool = True) -> str:
    """``sdeefs ARGS`` as root on node i (0: the login node)."""
    env = {"SDEEFS_CONFIG": str(g.site.config), "SDEEFS_RUN_DIR": str(g.site.run_dir),
           "SLURMD_NODENAME": LOGIN_NODE if i == 0 else f"n{i}"}
    argv = [str(VENV_BIN / "sdeefs"), *args]
    result = g.slurm.run(argv, env=env, check=check) if i == 0 else \
        g.slurm.node_run(i, argv, env=env, check=check)
    return result.stdout + result.stderr


@requires_slurm
@requires_launcher
def test_setcap_inside_reaches_every_replica_and_no_node_leaves_service(grid: Grid) -> None:
    g = grid
    root_inside = of_user(g.user, 1000, allocate=False).subuid  # setcap's rootid (identity.md)
    g.site.start(g.user)
    g.site.run(g.user, "cp /bin/cat /usr/local/bin/rawcat && "
               "setcap cap_net_raw+ep /usr/local/bin/rawcat && echo capped > /etc/sdeefs-demo")
    assert file_cap(g.site.upper(g.user) / "usr/local/bin/rawcat") == (3, root_inside)
    script = (f"#!/bin/sh\nsrun -N3 {VENV_BIN / 'sdeefs-run'} -- sh -c "
              "'echo $(hostname) $(cat /etc/sdeefs-demo) $(getcap /usr/local/bin/rawcat)'\n")
    text = g.submit(script, "-N3")
    lines = job_lines(text)
    assert len(lines) == 3, text
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"n{i} capped /usr/local/bin/rawcat cap_net_raw=ep"), text
        assert file_cap(g.replica_upper(i) / "usr/local/bin/rawcat") == (3, root_inside)
    assert_in_service(g)
    g.assert_converged()
    for i in range(1, g.nodes + 1):
        assert "skipped" not in sdeefs_on(g, i, "replica", "status")


def append_refused_record(g: Grid) -> int:
    """Write into the user's journal, behind the daemon's back (its door refuses it), an
    xattr no replica carries (the environment is stopped for it: start it again); its seq."""
    g.site.stop(g.user)
    journal = Journal.open(str(g.site.root / g.user / "state" / "journal"))
    try:
        bad = journal.append(rec.Setxattr(b"upper/etc/sdeefs-demo", b"trusted.evil", b"1"))
        journal.append(rec.Done(bad))
        journal.sync()
    finally:
        journal.close()
    return bad


@requires_slurm
@requires_launcher
def test_a_record_no_replica_may_apply_fails_the_job_never_the_node(grid: Grid) -> None:
    g = grid
    g.site.start(g.user)
    g.site.run(g.user, "echo before > /etc/sdeefs-demo")
    for i in range(1, g.nodes + 1):
        g.sync(i)
    bad = append_refused_record(g)
    g.site.start(g.user)
    g.site.run(g.user, "echo after > /etc/sdeefs-demo")  # the stream goes on past it

    run = VENV_BIN / "sdeefs-run"
    script = f"#!/bin/sh\nsrun -N3 {run} -- cat /etc/sdeefs-demo\n"
    job, out = g.start_job(script, "-N3")
    state = g.slurm.wait_job(job, timeout=120)
    text = out.read_text() if out.exists() else ""
    assert state == "FAILED", (state, text, g.hook_logs())
    errors = [line for line in text.splitlines() if line.strip()]
    assert len([e for e in errors if e.startswith("sdeefs-run: ")]) == 3, text  # one a node
    for line in errors:
        if line.startswith("sdeefs-run: "):
            assert f"record {bad} was skipped" in line, text
            assert f"sdeefs replica resync {g.user}" in line, text
    assert "Traceback" not in text
    assert_in_service(g)  # nothing drained
    for i in range(1, g.nodes + 1):
        status = sdeefs_on(g, i, "replica", "status")
        assert f"record {bad} skipped" in status, status
        assert "trusted.evil" in status, status
        # every replica applied past it: the stream did not stop there
        assert (g.replica_upper(i) / "etc/sdeefs-demo").read_text() == "after\n"
    login = sdeefs_on(g, 0, "status")
    assert f"error: record {bad} is skipped by every replica" in login, login

    # The recovery: a verified snapshot from the login node, on each node.
    for i in range(1, g.nodes + 1):
        sdeefs_on(g, i, "replica", "resync", g.user)
        assert "skipped" not in sdeefs_on(g, i, "replica", "status")
    assert "error:" not in sdeefs_on(g, 0, "status")
    text = g.submit(script, "-N3")
    assert text.split() == ["after"] * 3, text
    assert_in_service(g)
    g.assert_converged()
