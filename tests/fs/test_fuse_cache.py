"""The fuse engine's read path and the kernel's caches it asks for, through real mounts.

Reads: the mount's readahead is raised (``sdeefs.fs.mount.raise_readahead``) so that a
sequential read reaches the daemon as 1 MiB requests, and the daemon answers cached data
from one reused buffer (``Operations.read``): concurrent readers of different files must
each get their own bytes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..conftest import Layers, requires_fuse

pytestmark = requires_fuse


def bdi_readahead_kib(mnt: Path) -> int:
    st = os.stat(mnt)
    with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb") as f:
        return int(f.read())


def test_the_mount_reads_ahead_in_large_requests(layers: Layers) -> None:
    (layers.lower / "f").write_bytes(b"x")
    mnt = layers.mount("fuse")
    assert bdi_readahead_kib(mnt) >= 1024  # the kernel's requests: up to 1 MiB (max_pages)
    layers.umount()


def test_concurrent_first_reads_of_many_files_get_their_own_data(layers: Layers) -> None:
    # every read here is a first one (nothing in the view's page cache yet): all reach the
    # daemon, many at once, each answered from its one buffer
    files = {f"f{i}": os.urandom((3 << 20) + i * 4097) for i in range(12)}
    for name, data in files.items():
        (layers.lower / name).write_bytes(data)
    mnt = layers.mount("fuse")
    errors: list[BaseException] = []

    def reader(name: str) -> None:
        try:
            with open(mnt / name, "rb") as f:
                assert f.read() == files[name]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(name,)) for name in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    layers.umount()
