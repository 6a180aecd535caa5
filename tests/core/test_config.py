"""The site config's keys: defaults, values and one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdeefs.config import parse
from sdeefs.errors import ExitCode, QuietError


def test_fuse_nodes_bounds_the_fuse_daemon() -> None:
    assert parse({}).fuse_nodes == 50_000
    assert parse({"sdeefs": {"fuse_nodes": 8000}}).fuse_nodes == 8000
    for bad in (10, "many", True):
        with pytest.raises(QuietError) as caught:
            parse({"sdeefs": {"fuse_nodes": bad}}, "sdeefs.toml")
        assert caught.value.exitcode == ExitCode.USAGE
        assert "sdeefs.fuse_nodes must be a number >= 1000" in str(caught.value)


def test_replication_fanout() -> None:
    assert parse({}).replication.fanout == 4
    assert parse({"replication": {"fanout": 2}}).replication.fanout == 2
    with pytest.raises(QuietError) as caught:
        parse({"replication": {"fanout": 0}})
    assert "replication.fanout must be a number >= 1" in str(caught.value)


@pytest.mark.parametrize(("table", "key"), [("sdeefs", "root_dir"), ("replication", "fanuot")])
def test_a_misspelt_key_is_refused_in_one_line_before_anything_is_written(
        tmp_path: Path, table: str, key: str) -> None:
    """Through the admin's command: ``sdeefs install-slurm`` with a typo in the site config."""
    config = tmp_path / "sdeefs.toml"
    config.write_text(f"[{table}]\n{key} = 2\n")
    plugstack = tmp_path / "plugstack.conf.d"
    plugstack.mkdir()
    result = subprocess.run([str(Path(sys.executable).parent / "sdeefs"), "install-slurm",
                             "--plugstack-dir", str(plugstack)], capture_output=True, text=True,
                            env={**os.environ, "SDEEFS_CONFIG": str(config)}, timeout=60)
    assert result.returncode == ExitCode.USAGE
    assert result.stderr.strip().splitlines() == [
        f"sdeefs: {config}: unknown key {table}.{key}"]
    assert list(plugstack.iterdir()) == []
