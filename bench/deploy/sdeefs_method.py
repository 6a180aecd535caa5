"""sdeefs in the deploy benchmark: the user's changes stream from the journal to a replica.

The login side is what a login node runs: the user's upper behind the journaling
passthrough (``sdeefs mount --passthrough-upper``) and ``sdeefs-replicad --origin``
in the login namespace; the compute side is ``sdeefs-replicad --replica-dir`` in the
compute namespace, its replica on the harness's compute disk (``dest``).

Before each timed deploy the *user* brings the upper to ``src`` (untimed: that is the
user installing or editing, not deploying): ``rsync --inplace --no-whole-file`` into
the mounted upper, so an edit writes the changed blocks, as an editor or pip would.
The timed part is what a job start costs, the SLURM prolog's ``follow --wait``: ask the
login node for its head and wait until the replica holds it.

* ``sdeefs`` (pre-streamed): the replica follows the user all along (a warm replica,
  or the allocation's nodes following from submission), so while the user works the
  changes are already travelling; job start pays what is left plus one round trip.
* ``sdeefs-cold``: the node starts following only at job start and receives the whole
  history then (the worst case: no pre-streaming at all).

* ``sdeefs-cold-kernel``: ``sdeefs-cold`` from the default engine's login view: the
  user's changes go into kernel overlayfs on their layer image with the capture running
  (``bench/deploy/kernelview.py``: the launcher's own calls), whose journal holds Create
  and Extent records (data read from the layer at send time); the head query drains the
  capture, as a login's barrier does.

* ``sdeefs-cold-base``: ``sdeefs-cold`` run by another release of sdeefs, for a before/after
  comparison in one run (interleaved with the others, under the same load): set
  ``SDEEFS_DEPLOY_BASELINE`` to a source tree of that release (``git archive`` of the
  commit; its C extension copied in); its mount and both daemons import sdeefs from there
  (``PYTHONPATH``).  Without the variable the method is not offered.

Bytes sent: what the replica received (frames: headers, records, data, MACs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.deploy.harness import (
    DeployFailed,
    DeployMethod,
    Measurement,
    Net,
    Spawned,
    pin_process,
    settle,
)
from bench.deploy.kernelview import KernelView
from sdeefs.fs import kernel
from sdeefs.replication.daemon import control_request

USER = "benchuser"
PORT = 7078
VENV_BIN = Path(sys.executable).parent


class SdeefsMethod:
    def __init__(self, prestream: bool, baseline: str = "", kernel: bool = False) -> None:
        self.prestream = prestream
        self._stale_replica = False  # a cold method's last copy, to go before the clock
        self.baseline = baseline
        self.kernel = kernel
        # every method's daemons stay up: a port each
        self.port = PORT + 3 if kernel else PORT if prestream else PORT + 1 if not baseline \
            else PORT + 2
        self.name = "sdeefs-cold-kernel" if kernel else "sdeefs" if prestream \
            else "sdeefs-cold" if not baseline else "sdeefs-cold-base"
        self.env = {**os.environ, "PYTHONPATH": baseline} if baseline else None
        self._view: KernelView | None = None
        self.description = (
            ("the default engine's login view (kernel overlayfs on the layer image, the "
             "capture running: Create/Extent records)" if kernel
             else "journaling passthrough mount")
            + " + `sdeefs-replicad --origin` (login ns) → "
            "`sdeefs-replicad --replica-dir` (compute ns); timed: the prolog's `follow "
            "--wait` after the user changed the upper (rsync --inplace into the mount, "
            "untimed); " + ("replica following all along (pre-streamed)" if prestream
                            else "replica starts following at job start (cold)")
            + (f"; sdeefs imported from {baseline} (another release)" if baseline else ""))
        self.dest = ""
        self._net: Net | None = None
        self._work = Path()
        self._origin: Spawned | None = None
        self._replica: Spawned | None = None
        self._src = ""

    # -- paths -----------------------------------------------------------------------------

    @property
    def _login(self) -> Path:
        return self._work / "login"

    @property
    def _mnt(self) -> Path:
        return self._login / "mnt"

    def _control(self, side: str) -> str:
        return str(self._work / f"{side}.sock")

    # -- setup -----------------------------------------------------------------------------

    def setup(self, net: Net, workdir: str) -> None:
        self._net = net
        self._work = Path(workdir)
        self._work.mkdir(parents=True, exist_ok=True)
        self._key = self._work / "key"
        self._key.write_text(os.urandom(32).hex())
        os.chmod(self._key, 0o600)
        # The login node's disk: beside the data sets, not the compute disk.
        self._login_root = Path(f"/var/tmp/sdeefs-bench-login-{os.getpid()}-{self.name}")
        self.dest = str(self._work / "replicas" / USER / "upper")

    def _daemon(self, side: str) -> Spawned:
        assert self._net is not None
        common = [VENV_BIN / "sdeefs-replicad", "--key-file", self._key, "--node", side,
                  "--control", self._control(side)]
        if side == "login":
            argv = [*common, "--origin", self._login_root,
                    "--listen", f"{self._net.login_addr}:{self.port}"]
        else:
            argv = [*common, "--replica-dir", self._work / "replicas",
                    "--upstream", f"{self._net.login_addr}:{self.port}"]
        Path(self._control(side)).unlink(missing_ok=True)
        proc = self._net.spawn(side, argv, label=f"sdeefs-replicad {side}",  # type: ignore[arg-type]
                               log_file=self._work / f"{side}.log", env=self.env)
        deadline = time.monotonic() + 10
        while not os.path.exists(self._control(side)):
            if not proc.alive() or time.monotonic() > deadline:
                tail = (self._work / f"{side}.log").read_text()[-3000:]
                raise DeployFailed(f"sdeefs-replicad {side} did not start: "
                                   + tail.replace("\n", " | "))
            time.sleep(0.02)
        return proc

    def _stop(self, which: str) -> None:
        proc = getattr(self, f"_{which}")
        if proc is not None:
            proc.stop()
            setattr(self, f"_{which}", None)

    def _reset(self) -> None:
        """A new user history: empty upper, empty journal, replica and daemons restarted."""
        self._stop("replica")
        self._stop("origin")
        self._close_view()
        if os.path.ismount(self._mnt):
            subprocess.run([VENV_BIN / "sdeefs", "umount", self._mnt], check=True, env=self.env)
        shutil.rmtree(self._login_root, ignore_errors=True)
        if self.prestream:  # its replica follows from here on: a new one now
            shutil.rmtree(self._work / "replicas", ignore_errors=True)
        else:  # the old copy goes right before the clock (deploy)
            self._stale_replica = True
        if self.kernel:
            self._view = KernelView(self._login_root, USER, self._mnt)
            self._view.open()
            if self._net is not None and self._net.login_cpus:  # the login node's own
                for pid in (kernel.supervisor_pid(self._view.state),
                            kernel.capture_pid(self._view.state)):
                    if pid is not None:
                        pin_process(pid, self._net.login_cpus)
            self._origin = self._daemon("login")
            return
        upper = self._login_root / USER / "upper"
        state = self._login_root / USER / "state"
        for path in (upper, state / "work", self._mnt):
            path.mkdir(parents=True, exist_ok=True)
        subprocess.run([VENV_BIN / "sdeefs", "mount", "--passthrough-upper", "--upper", upper,
                        "--state", state, "--no-writeback-cache", self._mnt], check=True,
                       env=self.env)
        self._origin = self._daemon("login")
        if self.prestream:
            self._replica = self._daemon("compute")
            control_request(self._control("compute"), {"op": "follow", "user": USER})

    # -- deploying -------------------------------------------------------------------------

    def deploy(self, src: str, scenario: str) -> Measurement:
        if scenario == "full" or src != self._src:
            self._reset()
            self._src = src
        # The user changes the environment (untimed): only changed blocks are written.
        into = f"{self._mnt}/" if self.kernel else f"{self._mnt}/upper/"
        result = subprocess.run(["rsync", "-a", "--inplace", "--no-whole-file", "--delete",
                                 f"{src}/", into], capture_output=True, text=True)
        if result.returncode != 0:
            raise DeployFailed(f"rsync into the mounted upper: {result.stderr.strip()[-300:]}")
        if self._replica is None:
            if self._stale_replica:
                # The last deploy's copy is removed right before the clock, as tar's
                # receiver empties its destination right before its own: both then write
                # into page cache just freed.  Removed before the user's rsync instead,
                # that memory went to the rsync, and on this VM memory free for seconds
                # has been handed back to the host (free page reporting), so the first
                # write into it faults on the host, inside the copy (bench/RESULTS.md,
                # branch applyext4): a 2G copy cost the replica up to 2.6 s instead of 0.7.
                shutil.rmtree(self._work / "replicas", ignore_errors=True)
                self._stale_replica = False
            self._replica = self._daemon("compute")
        before = self._received()
        settle()
        start = time.perf_counter()
        reply = control_request(self._control("compute"),
                                {"op": "follow", "user": USER, "wait": True, "timeout": 600})
        seconds = time.perf_counter() - start
        sent = self._received() - before
        if not self.prestream:  # between jobs the node keeps its copy but does not follow
            control_request(self._control("compute"), {"op": "unfollow", "user": USER})
        return Measurement(seconds, sent, 0, f"barrier seq {reply.get('barrier')}")

    def _received(self) -> int:
        status = control_request(self._control("compute"), {"op": "status"})
        replicas = status.get("replicas", {})
        info = replicas.get(USER) if isinstance(replicas, dict) else None
        return int(info["bytes_received"]) if info else 0

    def _close_view(self) -> None:
        if self._view is not None:
            self._view.remove()
            self._view = None

    def teardown(self) -> None:
        self._stop("replica")
        self._stop("origin")
        self._close_view()
        if os.path.ismount(self._mnt):
            subprocess.run([VENV_BIN / "sdeefs", "umount", self._mnt], check=False,
                           env=self.env)
        shutil.rmtree(self._login_root, ignore_errors=True)


METHODS: list[DeployMethod] = [SdeefsMethod(prestream=True), SdeefsMethod(prestream=False),
                               SdeefsMethod(prestream=False, kernel=True)]
if os.environ.get("SDEEFS_DEPLOY_BASELINE"):
    METHODS.append(SdeefsMethod(prestream=False, baseline=os.environ["SDEEFS_DEPLOY_BASELINE"]))
