"""A connection's outbound queue, bounded in bytes, that never makes its producer wait.

Room tasks push into it and move on; a per-connection writer task drains it to the socket.
This is what keeps one slow reader from stalling its room: when the bytes not yet written
pass the limit, the queue refuses the frame, drops what it held, and reports the overflow so
the connection can be evicted (close code 1008) instead of growing without bound.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class Outbox:
    def __init__(self, limit_bytes: int, on_overflow: Callable[[], None]) -> None:
        self._limit = limit_bytes
        self._on_overflow = on_overflow
        #: A list, not a deque: only ever appended to and taken whole, and an idle
        #: connection's empty list is ~560 bytes smaller than an empty deque.
        self._frames: list[str] = []
        #: Bytes pushed and not yet reported written: queued frames plus the writer's batch.
        self._unsent = 0
        self._wakeup = trio.Event()
        self.closed = False

    @property
    def unsent_bytes(self) -> int:
        return self._unsent

    def push(self, text: str) -> bool:
        """Queue a frame (ASCII JSON, so ``len`` is bytes). False once closed or overflowed."""
        if self.closed:
            return False
        size = len(text)
        if self._unsent + size > self._limit:
            self.close()
            self._on_overflow()
            return False
        self._frames.append(text)
        self._unsent += size
        self._wakeup.set()
        return True

    def close(self) -> list[str]:
        """Refuse further frames and hand back the queued ones; wakes the writer so it can finish.

        The frames returned were never taken by the writer: a resumed connection gets them.
        """
        self.closed = True
        queued, self._frames = self._frames, []
        self._wakeup.set()
        return queued

    async def take(self) -> list[str]:
        """Every queued frame, in order, waiting for one if needed; ``[]`` once closed.

        The writer takes the whole queue at once so a burst costs one wake-up, not one per frame.
        """
        while not self._frames and not self.closed:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
        if self.closed:
            return []
        batch, self._frames = self._frames, []
        return batch

    def written(self, size: int) -> None:
        """The writer reports ``size`` bytes handed to the transport."""
        self._unsent -= size
