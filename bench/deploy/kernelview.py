"""The default (``kernel``) engine's login view for the deploy benchmarks.

What a login of the kernel engine has, made with the launcher's own calls
(``launcher/view.py``'s ``start_login``, ``launcher/env.py``'s stop): the user's layer
image made and mounted (``sdeefs.fs.kernel.open_layer``: ``ROOT/USER/layer.img`` at
``ROOT/USER/layer``), the supervised capture started on it
(``kernel.start_capture``: fanotify, journaling into ``ROOT/USER/state``), and kernel
overlayfs mounted with the layer's ``upper/`` (userxattr, as ``launcher/enter/start.c``
mounts it).  The lower is an empty directory: the data set is written into the view
(``rsync -a --inplace``), so every file is the user's; what lies below does not change
what the journal holds.

The barrier (:meth:`KernelView.barrier`) is the capture's drain: every change made
before it is in the journal, committed.  :meth:`KernelView.close` stops the capture
cleanly (drained, checkpointed), unmounts the overlay and the layer (stop order of
``launcher/env.py``).

:func:`histogram` counts a journal's records by type (what a cold stream ships).
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
from pathlib import Path

from sdeefs.fs import capture, image, kernel
from sdeefs.journal import JournalTail
from sdeefs.statedir import UserDirs

LAYER_SIZE = 16 << 30  # sparse; the 2G data set with room to spare


class KernelView:
    """A kernel-engine login view of ``user`` under ``root`` (``ROOT/USER``), at ``mnt``."""

    def __init__(self, root: Path, user: str, mnt: Path) -> None:
        self.dirs = UserDirs.of(str(root), user)
        self.mnt = mnt
        self.lower = root / f".{user}-lower"

    @property
    def state(self) -> str:
        return self.dirs.state.path

    def open(self) -> None:
        for path in (Path(self.dirs.path), Path(self.state), self.lower, self.mnt):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dirs.path, 0o700)
        if not os.path.exists(self.dirs.image):
            image.create_image(self.dirs.image, LAYER_SIZE)
        upper, work = kernel.open_layer(self.dirs.image, self.dirs.layer, LAYER_SIZE, 0, 0)
        kernel.start_capture(self.dirs.layer, self.state,
                             os.path.join(self.dirs.path, "capture.log"))
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={self.lower},upperdir={upper},workdir={work},userxattr",
                        str(self.mnt)], check=True)

    def barrier(self, timeout: float = 600.0) -> int:
        """The journal head holding every change made before the call (the capture's drain)."""
        return capture.drain(self.state, timeout)

    def close(self) -> None:
        """Stop order of ``launcher/env.py``: the view, the capture (drained), the layer."""
        if os.path.ismount(self.mnt):
            subprocess.run(["umount", str(self.mnt)], check=True)
        if kernel.supervisor_pid(self.state) is not None or \
                kernel.capture_pid(self.state) is not None:
            kernel.stop_capture(self.state)
        kernel.close_layer(self.dirs.image, self.dirs.layer)

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dirs.path, ignore_errors=True)
        shutil.rmtree(self.lower, ignore_errors=True)


def histogram(state: str) -> dict[str, int]:
    """Records of the journal in ``state`` by type, and the data bytes of Write/Extent/Create."""
    counts: collections.Counter[str] = collections.Counter()
    data = 0
    tail = JournalTail(os.path.join(state, "journal"), 1)
    try:
        while True:
            entries = tail.poll(16 << 20)
            if not entries:
                break
            for entry in entries:
                record = entry.record
                counts[type(record).__name__] += 1
                data += int(getattr(record, "length", 0) or 0) \
                    + len(getattr(record, "data", b"") or b"")
    finally:
        tail.close()
    return {**dict(sorted(counts.items())), "data_bytes": data}
