"""Shared fixtures: real sdeefs mounts that always come down, even when a test fails."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import attrs
import hypothesis
import pytest

from sdeefs import mountinfo
from sdeefs.fs.daemon import daemon_pid

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]

# Hypothesis: every property test draws the same examples on every run and machine (a
# green CI run stays green; a failure reproduces as it was drawn), with no example
# database (nothing written into the checkout).  A test's own @settings keep their
# max_examples; every setting they do not name comes from the loaded profile.
# SDEEFS_HYPOTHESIS=explore searches afresh each run instead (random examples, shrinking,
# failures remembered in the default database, .hypothesis/: ignored by git).
# (tests/fs/test_differential.py has its own switch for the same: SDEEFS_DIFF_EXPLORE=1.)
hypothesis.settings.register_profile("ci", derandomize=True, database=None,
                                     print_blob=True)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile(os.environ.get("SDEEFS_HYPOTHESIS", "ci"))


def install_runtime() -> None:
    """Install the runtime the way an admin does (scripts/install.sh), into a directory of
    this checkout's own, before any test module is imported: the tests run the installed
    commands (``$SDEEFS_TEST_BIN``, tests/launcher/launcher_site.py), which every test user
    can execute wherever the checkout lives (a 0700 home).  An unchanged tree is not
    installed again (under a second)."""
    if os.geteuid() != 0 or os.environ.get("SDEEFS_TEST_BIN"):
        return
    import hashlib

    prefix = Path("/var/tmp/sdeefs-test") / hashlib.sha256(bytes(REPO)).hexdigest()[:12]
    result = subprocess.run(
        [str(REPO / "scripts" / "install.sh"), "--prefix", str(prefix / "opt"),
         "--bin-dir", str(prefix / "bin"), "--sbin-dir", str(prefix / "sbin"),
         "--no-system-files"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/install.sh failed:\n{result.stderr[-3000:]}")
    os.chmod(prefix.parent, 0o755)
    os.environ["SDEEFS_TEST_BIN"] = str(prefix / "opt" / "bin")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_unexpected_warnings(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test on any WARNING or ERROR logged in this process that it did not expect.

    A test that provokes one on purpose says so: ``@pytest.mark.expect_log("sdeefs.journal")``
    allows records of that logger (and its children).  Daemons run as subprocesses log to
    their own files, which their tests read.
    """
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
    allowed = tuple(name for marker in request.node.iter_markers("expect_log")
                    for name in marker.args)
    unexpected = [r for r in handler.records
                  if not any(r.name == a or r.name.startswith(a + ".") for a in allowed)]
    if unexpected:
        pytest.fail("unexpected log records:\n" + "\n".join(
            f"  {r.levelname} {r.name}: {r.getMessage()}" for r in unexpected[:20]),
            pytrace=False)


def fuse_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "real mounts need root (the daemon serves every uid)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    return None


requires_fuse = pytest.mark.skipif(fuse_skip_reason() is not None,
                                   reason=fuse_skip_reason() or "")


def sdeefs(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the sdeefs command line as a user would."""
    result = subprocess.run([sys.executable, "-m", "sdeefs", *args], capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"sdeefs {' '.join(args)} failed ({result.returncode}): "
                             f"{result.stderr.strip()}")
    return result


def wait_for_socket(proc: subprocess.Popen[bytes], path: Path, log: Path,
                    timeout: float = 10.0) -> None:
    """Wait until the daemon ``proc`` made its socket ``path``; fail with the end of its
    ``log`` if it exits first or takes longer than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{path.name}: the daemon did not start: "
                                 f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.02)


def concurrently(work: Callable[[T], None], args: Iterable[T]) -> None:
    """``work(arg)`` for every arg, each in its own thread, all at once; the first error any
    raised is raised here once all have ended."""
    errors: list[BaseException] = []

    def run(arg: T) -> None:
        try:
            work(arg)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(arg,)) for arg in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def mounted(path: Path) -> bool:
    return mountinfo.at(path) is not None


@attrs.define
class Layers:
    """A lower, an upper, a state dir and a mountpoint under one tmp dir."""

    root: Path
    lower: Path
    upper: Path
    state: Path
    mnt: Path
    active: list[tuple[Path, Path]] = attrs.field(factory=list)

    def mount(self, engine: str = "fuse", *extra: str, mnt: Path | None = None,
              upper: Path | None = None, state: Path | None = None) -> Path:
        mnt = mnt or self.mnt
        state = state or self.state
        self.active.append((mnt, state))
        sdeefs("mount", "--engine", engine, "--lower", str(self.lower), "--upper",
               str(upper or self.upper), "--state", str(state), *extra, str(mnt))
        return mnt

    def umount(self, mnt: Path | None = None) -> None:
        mnt = mnt or self.mnt
        sdeefs("umount", str(mnt))
        self.active = [(m, s) for m, s in self.active if m != mnt]

    def cleanup(self) -> None:
        """Last resort after a failed test: lazy unmounts, then kill our own daemons by pid."""
        for mnt, state in self.active:
            if mounted(mnt):
                with contextlib.suppress(Exception):
                    sdeefs("umount", str(mnt), check=False, timeout=20)
            for path in (mnt, state / "mnt"):
                if mounted(path):
                    subprocess.run(["umount", "-l", str(path)], capture_output=True)
            pid = daemon_pid(str(state))
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while daemon_pid(str(state)) is not None and time.monotonic() < deadline:
                    time.sleep(0.05)
        self.active.clear()


def make_layers(root: Path) -> Layers:
    layers = Layers(root, root / "lower", root / "upper", root / "state", root / "mnt")
    for path in (layers.lower, layers.upper, layers.mnt):
        path.mkdir(parents=True)
    return layers


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[Layers]:
    result = make_layers(tmp_path)
    try:
        yield result
    finally:
        result.cleanup()


# The launcher tests' site fixture (tests/launcher/launcher_site.py), available to every module;
# it runs the installed commands, so the runtime is installed first.
install_runtime()
from .launcher.launcher_site import site  # noqa: E402, F401
