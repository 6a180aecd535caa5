"""The fuse engine's read path and the kernel's caches it asks for, through real mounts.

Reads: the mount's readahead is raised (``sdeefs.fs.mount.raise_readahead``) so that a
sequential read reaches the daemon as 1 MiB requests, and the daemon answers cached data
from one reused buffer (``Operations.read``): concurrent readers of different files must
each get their own bytes.

Listings: the kernel keeps what it read of a directory (FOPEN_CACHE_DIR, with the patched
pyfuse3) only while the daemon's own listing is the one it cached
(``CowFS.open_listing``): a listing through the mount never shows a removed name nor
misses a new one, whether the change came through the mount or from the host (then
within the cache timeout).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sdeefs.fs.cow import RACY_NS

from ..conftest import Layers, concurrently, requires_fuse

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

    def reader(name: str) -> None:
        with open(mnt / name, "rb") as f:
            assert f.read() == files[name]

    concurrently(reader, files)
    layers.umount()


TIMEOUT = 0.3  # --cache-timeout of the mounts below
SETTLED = RACY_NS / 1e9 + 0.2  # until a directory's stamp is trusted (cow.RACY_NS)


def listed(path: Path, times: int = 2) -> list[str]:
    """The names of ``path``, listed ``times`` times (the later ones from the kernel's cache
    where it keeps one), all the same."""
    seen = [sorted(os.listdir(path)) for _ in range(times)]
    assert all(names == seen[0] for names in seen)
    return seen[0]


def test_a_cached_listing_follows_changes_through_the_mount(layers: Layers) -> None:
    (layers.lower / "d").mkdir()
    (layers.lower / "d" / "a").write_text("a")
    (layers.lower / "d" / "b").write_text("b")
    mnt = layers.mount("fuse", "--cache-timeout", str(TIMEOUT))
    time.sleep(SETTLED)
    assert listed(mnt / "d") == ["a", "b"]
    (mnt / "d" / "c").write_text("c")
    assert listed(mnt / "d") == ["a", "b", "c"]
    (mnt / "d" / "a").unlink()
    assert listed(mnt / "d") == ["b", "c"]
    time.sleep(SETTLED)  # the upper directory settled: its listing is kept again
    assert listed(mnt / "d") == ["b", "c"]
    os.rename(mnt / "d" / "b", mnt / "d" / "b2")
    assert listed(mnt / "d") == ["b2", "c"]
    (mnt / "d" / "sub").mkdir()
    (mnt / "d" / "c").unlink()
    assert listed(mnt / "d") == ["b2", "sub"]
    os.rename(mnt / "d" / "b2", mnt / "b3")  # out of the directory
    assert listed(mnt / "d") == ["sub"]
    assert "b3" in listed(mnt)
    layers.umount()


def test_a_cached_listing_of_a_merged_directory_follows_the_host(layers: Layers) -> None:
    # A directory in both layers shows the upper's times, which a host change of the lower
    # leaves as they are: only the daemon can tell the kernel its copy is stale (keep_cache
    # kept across such a change fails here).
    (layers.lower / "d").mkdir()
    (layers.lower / "d" / "a").write_text("a")
    (layers.lower / "d" / "gone").write_text("gone")
    mnt = layers.mount("fuse", "--cache-timeout", str(TIMEOUT))
    (mnt / "d" / "mine").write_text("mine")  # copies d up: merged from now on
    time.sleep(SETTLED)
    assert listed(mnt / "d", 3) == ["a", "gone", "mine"]
    (layers.lower / "d" / "new").write_text("new")
    (layers.lower / "d" / "gone").unlink()
    time.sleep(2 * TIMEOUT)
    assert listed(mnt / "d") == ["a", "mine", "new"]
    time.sleep(SETTLED)
    assert listed(mnt / "d", 3) == ["a", "mine", "new"]
    (layers.lower / "d" / "a").unlink()
    (layers.lower / "d" / "a").mkdir()  # the same name, another entry
    time.sleep(2 * TIMEOUT)
    assert listed(mnt / "d") == ["a", "mine", "new"]
    assert (mnt / "d" / "a").is_dir()
    layers.umount()


def test_a_cached_listing_of_a_lower_directory_follows_the_host(layers: Layers) -> None:
    (layers.lower / "d").mkdir()
    (layers.lower / "d" / "a").write_text("a")
    mnt = layers.mount("fuse", "--cache-timeout", str(TIMEOUT))
    time.sleep(SETTLED)
    assert listed(mnt / "d", 3) == ["a"]
    (layers.lower / "d" / "b").write_text("b")
    (layers.lower / "d" / "a").unlink()
    time.sleep(2 * TIMEOUT)
    assert listed(mnt / "d") == ["b"]
    layers.umount()
