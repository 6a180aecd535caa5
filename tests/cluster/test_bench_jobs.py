"""bench/jobs runs: its harnesses, tiny, on the real cluster (the figures are bench/RESULTS.md's).

Each harness starts the SLURM test cluster with the SPANK plugin, the user logs in, and jobs
run every contender; here with the smallest counts, to show that every contender's steps
run and are measured (a contender that fails, e.g. the plugin's step not joining, or
``sdeefs-run`` falling back to bare, fails the harness or shows here).  Timings are not
checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench.jobs import fio, paired, steps

from ..launcher.launcher_site import requires_launcher
from .slurm_cluster import requires_slurm

pytestmark = [requires_slurm, requires_launcher]
needs_peers = pytest.mark.skipif(not all(shutil.which(p) for p in ("fio", "ch-run", "podman")),
                                 reason="bench/jobs needs fio, ch-run and podman "
                                 "(bench/jobs/run.py installs them)")


@needs_peers
def test_steps_measures_every_contender_in_the_environment_or_not(tmp_path: Path) -> None:
    out = tmp_path / "steps.md"
    assert steps.main(["--steps", "2", "--starts", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert sorted(result["steps_user"]) == ["bare", "ch-run", "sdeefs", "sdeefs-run"]
    assert sorted(result["steps_root"]) == ["bare", "podman"]
    assert sorted(result["starts"]) == ["bare", "ch-run", "podman", "sdeefs"]
    assert all(len(v) == 2 for v in result["steps_user"].values())
    for times in result.values():
        if isinstance(times, dict):  # (ms to exec, ms round trip): exec before srun returns
            assert all(0 < e <= t for v in times.values() for e, t in v), times
    assert "Environment starts" in out.read_text()
    assert out.with_name("steps-starts.svg").read_text().startswith("<svg")


@needs_peers
def test_fio_reads_the_users_file_in_the_job(tmp_path: Path) -> None:
    out = tmp_path / "fio.md"
    assert fio.main(["--rounds", "1", "--runtime", "1", "--size", "4m", "--modes", "randrw",
                     "--wrapper", "--out", str(out)]) == 0  # the node's fs: ext4 (loop)
    raw = json.loads(out.with_suffix(".json").read_text())["raw"]
    want = {"fio_randrw_scratch", "fio_randrw_replica", "fio_randrw_replica_first",
            "fio_randrw_replica_cold"}
    assert want <= set(raw["bare"]), raw
    assert want | {"fio_randrw_tmp"} <= set(raw["sdeefs"]), raw
    assert raw["sdeefs-run"]["fio_randrw_scratch"][0] > 0, raw
    # every fio step measured something: the user's file is there and writable in the job
    assert all(v > 0 for name in raw for key, vs in raw[name].items() for v in vs), raw


@pytest.mark.skipif(not all(shutil.which(p) for p in ("sysbench", "hpcc")),
                    reason="bench/jobs/paired.py needs sysbench and hpcc")
def test_paired_runs_each_benchmark_bare_and_in_the_jobs_environment(tmp_path: Path) -> None:
    out = tmp_path / "paired.md"
    assert paired.main(["--rounds", "2", "--kinds", "sysbench", "--out", str(out)]) == 0
    values = json.loads(out.with_suffix(".json").read_text())["values"]
    for key in ("sysbench_cpu_s", "sysbench_wall_s", "sysbench_eps"):
        assert sorted(values[key]) == ["0", "1"], values[key]
        assert all(sorted(pair) == ["bare", "sdeefs"] for pair in values[key].values())
        assert all(v > 0 for pair in values[key].values() for v in pair.values())
    # the plain srun step ran in the job's environment (another mount namespace), the
    # --sdeefs=off step did not: a plugin that let the step run bare fails here
    for pair in values["sysbench_mntns"].values():
        assert pair["sdeefs"] != pair["bare"], pair
    assert "sysbench cpu: CPU seconds" in out.read_text()
    assert out.with_suffix(".svg").read_text().startswith("<svg")
