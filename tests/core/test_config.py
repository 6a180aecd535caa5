"""The site config's keys: defaults, values and one-line refusals."""

from __future__ import annotations

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
