"""The layout's rules, checked from the source: folders say where code runs.

* the shared core (``sdeefs/*.py``) imports none of the rooms (``sdeefs.fs``,
  ``sdeefs.replication``, ``sdeefs.launcher``);
* ``sdeefs/fs/ops.py`` is a protocol adapter: it does not build journal records;
* pyproject's package list names every package directory, so an install ships them all;
* ruff and mypy (over ``sdeefs``, ``launcher`` and ``tests``) are clean;
* every Hypothesis test draws the same examples on every run, with no example database
  (tests/conftest.py's profile), and enough of them to mean something.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOMS = ("sdeefs.fs", "sdeefs.replication", "sdeefs.launcher")


def _imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, relative imports resolved against ``package``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_the_shared_core_imports_no_room() -> None:
    offenders = {
        f"{path.name}: {name}"
        for path in sorted((REPO / "sdeefs").glob("*.py"))
        if path.name != "__main__.py"  # `python -m sdeefs` runs the assembled command
        for name in _imports(path, "sdeefs")
        if name.startswith(ROOMS)
    }
    assert not offenders


def test_ops_is_an_adapter_only() -> None:
    names = _imports(REPO / "sdeefs" / "fs" / "ops.py", "sdeefs.fs")
    assert not {n for n in names if n.startswith(("sdeefs.records", "sdeefs.journal"))}


def test_pyproject_ships_every_package() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(project["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts)
               for p in (REPO / "sdeefs").rglob("__init__.py")}
    on_disk |= {".".join(("sdeefs", *p.parent.relative_to(REPO).parts))
                for p in (REPO / "launcher").rglob("__init__.py")}
    assert listed == on_disk
    assert project["package-dir"]["sdeefs.launcher"] == "launcher"


def test_every_hypothesis_test_is_deterministic() -> None:
    if os.environ.get("SDEEFS_HYPOTHESIS", "ci") != "ci" or \
            os.environ.get("SDEEFS_DIFF_EXPLORE") == "1":
        pytest.skip("asked for a random search (tests/conftest.py)")
    from hypothesis.internal.detection import is_hypothesis_test

    found = {}
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        if "hypothesis" not in path.read_text():
            continue
        module = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
        for name, value in vars(module).items():
            if is_hypothesis_test(value):
                found[f"{path.name}::{name}"] = value._hypothesis_internal_use_settings
    assert len(found) >= 10, sorted(found)  # the fuzzers, the capture's, the differential
    for test, used in found.items():
        assert used.derandomize, (test, used)
        assert used.database is None, (test, used)
        assert used.max_examples >= 10, (test, used)


def test_ruff_and_mypy_are_clean() -> None:
    bin_dir = Path(sys.executable).parent
    for command in ([str(bin_dir / "ruff"), "check", "--no-cache", "."],
                    [str(bin_dir / "mypy"), "sdeefs", "launcher", "tests"]):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
