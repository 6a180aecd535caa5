"""bench/workflow's harness at tiny scale through the real cluster (its smoke test).

Two tasks a stage (8 tasks), one round, the contenders that start fast (sdeefs through the
SPANK plugin, bare, Charliecloud's ch-run when installed; podman's 0.5-1 s per container
is left to the benchmark itself), both shapes (a chain of dependent jobs, steps of one
job).  The program exists only in the user's environment while sdeefs' workflows run (the
harness checks the host has none), so sdeefs' tasks succeed only if every one of them ran
inside; every contender must produce the same outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.workflow import plot
from bench.workflow.run import (
    SHAPES,
    STAGES,
    available,
    dump,
    open_bench,
    parse_tasks,
    summary,
)

from ..launcher.launcher_site import requires_launcher
from .slurm_cluster import requires_slurm


def test_task_lines_are_parsed_and_failures_kept() -> None:
    text = "\n".join([
        "B 1 1000000000",
        "T 1 0 n1 1000000000 1500000000 0 W 0.25",
        "T 1 1 n2 1000000000 1600000000 127",  # wf-task not found: no W line
        "E 1 1: srun: error: n2: task 0: Exited with exit code 127",
    ])
    tasks, errors, began = parse_tasks(text)
    assert [(t.stage, t.index, t.node, t.wall, t.program) for t in tasks] == \
        [(1, 0, "n1", 0.5, 0.25)]
    assert len(errors) == 2
    assert began == {1: 1.0}


@requires_slurm
@requires_launcher
def test_workflow_harness_runs_each_contender_and_shape_through_slurm() -> None:
    names, _ = available(("sdeefs", "bare", "ch-run"))
    # sdeefs in both shapes, the peers in the short one (the suite's time)
    pairs = [("sdeefs", "chain"), ("sdeefs", "steps"), *((n, "steps") for n in names[1:])]
    with open_bench(2, names, SHAPES, out=None, log=lambda _m: None) as b:
        b.run_rounds(1, only=pairs)
    runs = b.runs
    assert sorted((r.contender, r.shape) for r in runs) == sorted(pairs)
    for r in runs:
        assert sorted((t.stage, t.index) for t in r.tasks) == \
            [(s, i) for s in range(1, STAGES + 1) for i in range(2)], r
        assert {t.node for t in r.tasks} == {"n1", "n2"}, r
        # stage s+1 starts after stage s ended (its inputs are there)
        for s in range(2, STAGES + 1):
            assert min(t.start for t in r.tasks if t.stage == s) >= \
                max(t.end for t in r.tasks if t.stage == s - 1), r
        assert 0 < r.makespan < 120
    assert len({r.digest for r in runs}) == 1, [(r.contender, r.digest) for r in runs]
    assert not Path("/usr/local/bin/wf-task").exists()  # bare's copy was removed
    # SLURM's prolog and epilog were timed on both nodes for every job
    for r in runs:
        assert sorted(k for k, _ in r.hooks) == \
            ["epilog"] * (2 * len(r.jobs)) + ["prolog"] * (2 * len(r.jobs)), r
    table = summary(runs)
    assert set(table) == set(SHAPES)
    assert table["chain"]["sdeefs"]["makespan"]["n"] == 1
    assert table["steps"]["bare"]["makespan_vs_bare"] == 1
    data = json.loads(dump(b.data()))  # as results.json
    assert plot.svg(data).startswith("<svg")
    assert len(plot.table(data).splitlines()) == 2 + len(runs)
