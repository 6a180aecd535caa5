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
