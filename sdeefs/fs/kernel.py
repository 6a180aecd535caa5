"""The ``kernel`` engine's parts outside the view: the layer image and the supervised capture.

An environment of the kernel engine writes its upper with kernel overlayfs (no
sdeefs process in the write path).  What it needs besides the overlay mount:

* the layer (:func:`open_layer`): the image (``sdeefs.fs.image``) made if missing,
  mounted (``e2fsck -p`` first after an unclean stop), ``upper/`` and ``work/`` in it;
* the capture (``sdeefs.fs.capture``), under a **supervisor** (:func:`start_capture`):
  a small detached process that forks the capture and forks it again whenever it
  dies (kill -9, a crash) after ``RESTART_DELAY``; a restarted capture reconciles
  with a full scan of the upper against its model, so the journal converges to the
  upper whatever it missed.  The capture is not in the I/O path: while none runs, the
  user's sessions go on; only barriers wait (see ``expected`` below).  The supervisor
  holds ``STATE/capture/supervisor`` (flock, its pid inside): one per state directory.
  A capture that finds another one holding the state (an orphan whose supervisor was
  killed) exits BUSY; the supervisor tries again every ``RESTART_DELAY`` until it
  can take over, so the orphan keeps journaling meanwhile.
* ``STATE/capture/expected`` (an empty file): a capture must answer for this
  journal to be complete.  Written before the overlay is mounted, removed only after
  a clean stop (:func:`stop_capture`: SIGTERM to the supervisor, which passes it on;
  the capture drains the queue, commits, checkpoints and exits 0, then the
  supervisor exits; a capture that did not exit cleanly leaves ``unclean`` and
  ``expected`` stays, until the next start).  The login replicad's head query
  (``sdeefs.replication.origin``) drains the capture first; when none answers and the
  capture is expected, it fails (the barrier asks again) rather than answer a head that
  may lack what the user did.

Stop order (``launcher/env.py``): the environment's processes first (nothing writes
the upper any more), then :func:`stop_capture` (a supervisor that is gone is started
again first, so that what no capture saw is scanned), then :func:`close_layer`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import sys
import time

from .. import control
from ..errors import ExitCode, QuietError
from ..statedir import StateDir
from . import daemon, image

log = logging.getLogger(__name__)

RESTART_DELAY = 0.5  # seconds between a capture's death and its restart
START_TIMEOUT = 60.0  # seconds a first start may take before its control socket answers


def supervisor_lock(state: str) -> str:
    return os.path.join(StateDir(state).capture, "supervisor")


def expected_path(state: str) -> str:
    return os.path.join(StateDir(state).capture, "expected")


def unclean_path(state: str) -> str:
    """Left by a supervisor whose capture did not exit cleanly when stopped."""
    return os.path.join(StateDir(state).capture, "unclean")


def capture_expected(state: str) -> bool:
    """Must a capture answer for this journal (an environment of the kernel engine)?"""
    return os.path.exists(expected_path(state))


def supervisor_pid(state: str) -> int | None:
    return daemon.lock_holder(supervisor_lock(state))


def capture_pid(state: str) -> int | None:
    return daemon.lock_holder(os.path.join(StateDir(state).capture, "lock"))


def capture_answers(state: str, timeout: float = 5.0) -> bool:
    from .capture import request

    try:
        request(state, "status", timeout)
    except (QuietError, control.ControlError):
        return False
    return True


# -- the layer ---------------------------------------------------------------------------------


def open_layer(image_path: str, layer: str, size: int, uid: int, gid: int) -> tuple[str, str]:
    """The user's layer mounted at ``layer`` (the image made if missing); (upper, work)."""
    try:
        if not os.path.exists(image_path):
            log.info("making the layer image %s (%d bytes, sparse)", image_path, size)
            image.create_image(image_path, size)
        image.mount_image(image_path, layer)
    except image.ImageError as exc:
        raise QuietError(str(exc), ExitCode.FAILURE) from None
    return image.prepare_layer(layer, uid, gid)


def close_layer(image_path: str, layer: str) -> bool:
    """Unmount the layer if nothing uses it (False: it stays mounted, see unmount_image)."""
    if not os.path.exists(image_path):
        return True
    return image.unmount_image(layer, image_path)


# -- the supervised capture ----------------------------------------------------------------


def start_capture(layer: str, state: str, log_path: str, wait: bool = True) -> None:
    """Make sure a supervised capture runs for ``layer``; mark it expected.

    ``wait``: return once the capture answers on its control socket (its start's
    full scan may still run; a drain waits for it).  Raises QuietError if it cannot
    start (its one line; the log has more).
    """
    os.makedirs(StateDir(state).capture, mode=0o700, exist_ok=True)
    with open(expected_path(state), "ab"):
        pass
    with contextlib.suppress(FileNotFoundError):
        os.unlink(unclean_path(state))
    if supervisor_pid(state) is None:
        daemon.fork(log_path, lambda ready_fd: _supervise(layer, state, ready_fd))()
    if wait:
        deadline = time.monotonic() + START_TIMEOUT
        while not capture_answers(state):
            if supervisor_pid(state) is None:
                raise QuietError(f"the capture of {layer} could not start (see {log_path})",
                                 ExitCode.FAILURE)
            if time.monotonic() > deadline:
                raise QuietError(f"the capture of {layer} did not answer within "
                                 f"{START_TIMEOUT:.0f} s (see {log_path})", ExitCode.FAILURE)
            time.sleep(0.05)


def stop_capture(state: str, timeout: float = 600.0) -> None:
    """Stop the capture cleanly (drained, checkpointed) and forget that it is expected.

    QuietError (UNMOUNT) if it does not exit within ``timeout``: ``expected`` stays, so
    no head is answered from a journal that may lack something.
    """
    deadline = time.monotonic() + timeout
    signalled: set[int] = set()
    while True:
        # The supervisor passes SIGTERM on to its capture; a capture without one (its
        # supervisor was killed) is told directly.
        pid = supervisor_pid(state)
        if pid is None:
            pid = capture_pid(state)
        if pid is None:
            break
        if pid not in signalled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            signalled.add(pid)
        if time.monotonic() > deadline:
            raise QuietError(f"the capture of {state} did not stop within {timeout:.0f} s",
                             ExitCode.UNMOUNT)
        time.sleep(0.02)
    if os.path.exists(unclean_path(state)):
        raise QuietError(f"the capture of {state} stopped before it drained: the next start "
                         "scans the layer", ExitCode.UNMOUNT)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(expected_path(state))


def _supervise(layer: str, state: str, ready_fd: int) -> int:
    """The supervisor (a detached process): fork the capture, again whenever it dies."""
    lock_fd = os.open(supervisor_lock(state), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        daemon.report(ready_fd, "ok")  # another supervisor took over meanwhile
        return 0
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    stopping = False
    child = 0

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    daemon.report(ready_fd, "ok")
    restarts = 0
    while not stopping:
        child = os.fork()
        if child == 0:
            os.close(lock_fd)
            _run_capture(layer, state)
        if stopping:  # SIGTERM came between the fork and the assignment: not passed on
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        try:
            _, status = os.waitpid(child, 0)
        except ChildProcessError:
            status = 0
        child = 0
        code = os.waitstatus_to_exitcode(status)
        if stopping and code == 0:
            break
        if stopping:  # stopped before it could drain: the journal may lack something
            log.warning("capture: stopped uncleanly (%d); it stays expected", code)
            with open(unclean_path(state), "ab"):
                pass
        if code == ExitCode.BUSY:  # an orphaned capture still holds the state: wait for it
            log.info("capture: another capture holds %s; trying again", state)
        elif code == ExitCode.USAGE:
            log.error("capture: %s cannot be captured (exit %d); giving up", layer, code)
            return code
        else:
            restarts += 1
            log.warning("capture: exited with %d; restarting it (restart %d)", code, restarts)
        time.sleep(RESTART_DELAY)
    log.info("capture: stopped")
    return 0


def _run_capture(layer: str, state: str) -> None:
    """In the supervisor's child: run the capture until it exits (never returns)."""
    from . import capture

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    code = 1
    try:
        capture.main(["--layer", layer, "--state", state])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        log.exception("capture failed")
    finally:
        with contextlib.suppress(OSError):
            sys.stderr.flush()
        os._exit(code)


def ensure_capture(layer: str, state: str, log_path: str) -> bool:
    """Supervision from outside (a login, sdeefs-launchd): start the supervisor again if it is
    gone while the capture is expected.  True if it had to."""
    if not capture_expected(state) or supervisor_pid(state) is not None:
        return False
    log.warning("the capture supervisor of %s is gone; starting it again", state)
    try:
        start_capture(layer, state, log_path, wait=False)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return False
    return True
