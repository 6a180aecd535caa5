"""Fixtures of the replication tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_daemon import Site


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    """A login node (journaling mount; the test starts the origin replicad) and replicas."""
    s = Site(tmp_path)
    try:
        s.mount()
        yield s
    finally:
        s.close()


@pytest.fixture
def login(site: Site) -> Site:
    """The same, by the name of the tests that start only the login node's side."""
    return site
