"""Figures of the kernel engine's capture (issue 16), phase 1: not a test, not yet in bench/.

    sudo .venv/bin/python bench/capture_figures.py [WORKDIR]

* writer speed: 10,000 files of 300 B in 100 directories (python, one process), on
  kernel overlayfs over a layer image, without and with the capture running (each on
  its own image), interleaved, 3 rounds;
* capture lag: from the writer's end to the answer of a drain request, after 10,000
  and 100,000 files;
* the capture daemon's RSS after 100,000 files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from sdeefs.fs import capture, image

WRITER = r"""
import os, sys, time
root = sys.argv[1]; n = int(sys.argv[2]); d = 100
data = b"x" * 300
t = time.perf_counter()
for i in range(d):
    os.mkdir(f"{root}/d{i}")
for i in range(n):
    fd = os.open(f"{root}/d{i % d}/f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, data); os.close(fd)
print(f"{time.perf_counter() - t:.3f}")
"""


def setup(root: str, name: str) -> tuple[str, str, str]:
    base = os.path.join(root, name)
    lower, mnt, state = (os.path.join(base, x) for x in ("lower", "mnt", "state"))
    for d in (lower, mnt, state):
        os.makedirs(d)
    layer = os.path.join(base, "layer")
    image.create_image(os.path.join(base, "layer.img"), 8 << 30, bytes_per_inode=8192)
    image.mount_image(os.path.join(base, "layer.img"), layer)
    image.prepare_layer(layer, 0, 0)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={layer}/upper,workdir={layer}/work", mnt],
                   check=True)
    return layer, mnt, state


def write(mnt: str, sub: str, n: int) -> float:
    os.mkdir(os.path.join(mnt, sub))
    out = subprocess.run([sys.executable, "-c", WRITER, os.path.join(mnt, sub), str(n)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    root = tempfile.mkdtemp(prefix="capture-figures-", dir=sys.argv[1] if len(sys.argv) > 1
                            else "/var/tmp")
    mounts: list[str] = []
    proc = None
    try:
        _, mnt_a, _ = setup(root, "alone")
        mounts += [os.path.join(root, "alone", "mnt"), os.path.join(root, "alone", "layer")]
        layer_b, mnt_b, state_b = setup(root, "captured")
        mounts += [mnt_b, layer_b]
        proc = subprocess.Popen([sys.executable, "-m", "sdeefs.fs.capture", "--layer", layer_b,
                                 "--state", state_b, "--log", os.path.join(root, "log")])
        while True:
            try:
                capture.request(state_b, "status", timeout=5)
                break
            except OSError:
                time.sleep(0.05)
        print(f"capture RSS at start (empty upper): {rss_mib(proc.pid):.1f} MiB")
        print("writer, 10,000 files of 300 B (s):")
        for r in range(3):
            alone = write(mnt_a, f"r{r}", 10_000)
            t0 = time.perf_counter()
            captured = write(mnt_b, f"r{r}", 10_000)
            end = time.perf_counter()
            capture.drain(state_b)
            lag = time.perf_counter() - end
            print(f"  round {r + 1}: overlay alone {alone:.3f}  with capture {captured:.3f}"
                  f"  (ratio {alone / captured:.2f}x)  lag to drain {lag:.3f} s"
                  f"  (writer+capture {time.perf_counter() - t0:.3f} s)")
        print(f"capture RSS after 30,000 files: {rss_mib(proc.pid):.1f} MiB")
        t0 = time.perf_counter()
        took = write(mnt_b, "big", 100_000)
        end = time.perf_counter()
        capture.drain(state_b)
        lag = time.perf_counter() - end
        status = capture.request(state_b, "status")
        print(f"100,000 files: writer {took:.3f} s, lag to drain {lag:.3f} s, "
              f"capture RSS {rss_mib(proc.pid):.1f} MiB, model nodes {status['nodes']}, "
              f"events {status['events']}, records {status['records']}, "
              f"overflows {status['overflows']}")
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(600)
        print(f"clean stop (drain + checkpoint): {time.perf_counter() - t0:.3f} s, "
              f"checkpoint {os.path.getsize(os.path.join(state_b, 'capture', 'model')) >> 20}"
              " MiB")
        proc = None
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        for m in mounts:
            if image.mount_source(m) is not None:
                subprocess.run(["umount", m], check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
