"""The one place that moves blocking work off the trio loop (policy: docs/threading.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import attrs
import trio

T = TypeVar("T")


@attrs.define(eq=False)
class Offload:
    """Runs synchronous calls in worker threads, at most ``limiter.total_tokens`` at once.

    Writes are never abandoned on cancellation: a cancelled handler waits for
    its ``pwrite`` to finish, so the journal never misses a write that landed.
    """

    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(16))

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def run_abandoning(self, fn: Callable[..., T], *args: object) -> T:
        """As :meth:`run`, but a cancellation abandons the thread (it runs on until it
        returns or the process exits).  Only for work that is safe to stop anywhere and that
        somebody else finishes: removing a finished job's scratch (a daemon that stops does
        not wait for it; ``sdeefs end-spares`` or its next start removes the rest).  Never
        for a write."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter,
                                             abandon_on_cancel=True)
