"""Fixtures of the replication tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_daemon import Site


@pytest.fixture
def login(tmp_path: Path) -> Iterator[Site]:
    """A login node (journaling mount; the test starts the origin replicad) and replicas."""
    s = Site(tmp_path)
    try:
        s.mount()
        yield s
    finally:
        s.close()
