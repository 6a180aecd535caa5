"""A cold stream of the default engine right after an install, and once drained first.

Usage (as root)::

    .venv/bin/python bench/deploy/coldinstall.py [--size 1G] [--runs 3] [--baseline TREE]
        [--work DIR] [--port N] [--modes install,drained]

Each run makes a new kernel-engine login view (``bench/deploy/kernelview.py``: the layer
image, the capture running, kernel overlayfs), starts ``sdeefs-replicad --origin`` on it
and a fresh ``--replica-dir`` (``coldcpu.py``'s journaled ext4 image), and copies the
data set in (``rsync -a --inplace``, untimed, then ``sync``), as ``bench/deploy``'s
``sdeefs-cold-kernel`` does.  Then, by mode:

* ``install``: the prolog's ``follow --wait`` at once (timed): what a job submitted right
  after ``make install`` returned pays; its head query drains the capture first, so the
  time holds whatever the capture had not journaled of the copy yet;
* ``drained``: the capture's barrier first (``capture.drain``, timed on its own), then
  the ``follow --wait`` (timed): the stream alone, of a journal that is complete.

Reported per run: the wall time of the drain (``drained``) and of the follow, the CPU
seconds (``/proc/PID/stat``) of the origin, the replica and the capture over the timed
part, the capture's CPU during the copy, and whether the replica equals the upper
(``diff -r``).  ``--baseline TREE`` alternates every run with another release (its
source tree, with its C extensions built): the view, the capture and both daemons then
import sdeefs from it (each run is this script in a child with ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[2]
if "--one" not in sys.argv:  # the parent: this tree; a child: PYTHONPATH's first
    sys.path.insert(0, str(HERE))
else:
    sys.path.append(str(HERE))

from bench.deploy import coldcpu  # noqa: E402
from bench.deploy.kernelview import KernelView  # noqa: E402
from sdeefs.fs import capture, kernel  # noqa: E402
from sdeefs.replication.daemon import control_request  # noqa: E402

USER = "benchuser"
DATA = Path("/var/tmp/sdeefs-deploy-data")


def one(size: str, mode: str, work: Path, port: int) -> dict[str, object]:
    """One run in this process's release (sdeefs as imported)."""
    coldcpu.WORK = work
    base = work / "install"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    root = base / "login"
    view = KernelView(root, USER, base / "mnt")
    replicas = work / "compute" / "replicas"
    shutil.rmtree(replicas, ignore_errors=True)
    key = base / "key"
    key.write_text(os.urandom(32).hex())
    os.chmod(key, 0o600)
    env = dict(os.environ)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    view.open()
    try:
        for side in ("login", "compute"):
            control = base / f"{side}.sock"
            argv = [sys.executable, "-c", "import sys; from sdeefs.replication.daemon import "
                    "main; sys.exit(main())", "--key-file", str(key), "--node", side,
                    "--control", str(control)]
            argv += ["--origin", str(root), "--listen", f"127.0.0.1:{port}"] \
                if side == "login" else \
                ["--replica-dir", str(replicas), "--upstream", f"127.0.0.1:{port}"]
            procs[side] = coldcpu.spawn(argv, env, base / f"{side}.log")
            coldcpu.wait_socket(control, procs[side])
        capture_pid = kernel.capture_pid(view.state)
        assert capture_pid is not None
        copy0 = coldcpu.cpu_seconds(capture_pid)
        subprocess.run(["rsync", "-a", "--inplace", "--no-whole-file",
                        f"{DATA / size / 'tree'}/", f"{view.mnt}/"], check=True)
        os.sync()
        pids = {"origin": procs["login"].pid, "replica": procs["compute"].pid,
                "capture": capture_pid}
        cpu0 = {name: coldcpu.cpu_seconds(pid) for name, pid in pids.items()}
        copy_cpu = cpu0["capture"] - copy0
        drain = 0.0
        start = time.perf_counter()
        if mode == "drained":
            capture.drain(view.state, 600)
            drain = time.perf_counter() - start
        follow0 = time.perf_counter()
        reply = control_request(str(base / "compute.sock"),
                                {"op": "follow", "user": USER, "wait": True, "timeout": 900})
        end = time.perf_counter()
        cpu = {name: coldcpu.cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    finally:
        for proc in procs.values():
            coldcpu.stop(proc)
    check = subprocess.run(["diff", "-rq", "--no-dereference", view.dirs.live()[0],
                            str(replicas / USER / "upper")], capture_output=True, text=True)
    view.remove()
    return {"mode": mode, "drain": round(drain, 2), "follow": round(end - follow0, 2),
            "wall": round(end - start, 2),
            **{f"{name}_cpu": round(value, 2) for name, value in cpu.items()},
            "capture_copy_cpu": round(copy_cpu, 2), "barrier": reply.get("barrier"),
            "identical": check.returncode == 0 and not check.stdout,
            "load": round(os.getloadavg()[0], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", default="")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/sdeefs-coldinstall"))
    parser.add_argument("--port", type=int, default=7392)
    parser.add_argument("--modes", default="install,drained")
    parser.add_argument("--one", choices=("install", "drained"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.size, args.one, args.work, args.port)), flush=True)
        return 0
    coldcpu.WORK = args.work
    coldcpu.compute_fs()
    releases = [("new", str(HERE))] + ([("base", args.baseline)] if args.baseline else [])
    try:
        for run in range(args.runs):
            for mode in args.modes.split(","):
                order = releases if run % 2 == 0 else releases[::-1]
                for label, tree in order:
                    out = subprocess.run(
                        [sys.executable, str(Path(__file__).resolve()), "--one", mode,
                         "--size", args.size, "--work", str(args.work), "--port",
                         str(args.port)], env={**os.environ, "PYTHONPATH": tree}, cwd="/",
                        check=True, capture_output=True, text=True).stdout
                    result = json.loads(out.strip().splitlines()[-1])
                    print(json.dumps({"release": label, "size": args.size, "run": run,
                                      **result}), flush=True)
    finally:
        subprocess.run(["umount", str(args.work / "compute")], check=False)
        (args.work / "compute.img").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
