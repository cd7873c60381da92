"""A connection's outbound queue, bounded in bytes, that never makes its producer wait.

Room tasks and the connection's own session push into it and move on; the connection's one
writer task takes everything queued at once and writes it with one ``send_all``. Nothing else
writes to the socket, so frames leave in the order they were decided, control frames included,
and no lock exists.

The bound is what keeps one slow reader from stalling its room: when the bytes not yet handed to
the transport pass the limit, the queue refuses the frame, drops what it held, and reports the
overflow so the connection can be evicted (close code 1008) instead of growing without bound.
What it counts: text queued here plus the batch the writer is writing. Bytes the kernel has
accepted are not counted (trio sets ``TCP_NOTSENT_LOWAT``, so the kernel holds little unsent
data per socket beyond what is in flight to the client).

Two kinds of item: ``bytes``, a text frame's payload (UTF-8 JSON), the only kind the bound
counts; and a :class:`Control`: a ping or a close the writer has the codec encode, or
:class:`Raw` frames the codec encoded by itself (pongs, the echo of a close). ``finish`` ends
the queue: one last item goes out after what is queued, and the writer stops.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio


@attrs.frozen
class Ping:
    payload: bytes


@attrs.frozen
class Close:
    code: int
    reason: str


@attrs.frozen
class Raw:
    data: bytes


Control = Ping | Close | Raw
Item = bytes | Control


class Outbox:
    #: Slotted: one per connection, thousands of them idle.
    __slots__ = (
        "_finished",
        "_items",
        "_limit",
        "_on_overflow",
        "_unsent",
        "_waiter",
        "closed",
    )

    def __init__(self, limit_bytes: int, on_overflow: Callable[[], None]) -> None:
        self._limit = limit_bytes
        self._on_overflow = on_overflow
        #: A list, not a deque: only ever appended to and taken whole, and an idle
        #: connection's empty list is ~560 bytes smaller than an empty deque.
        self._items: list[Item] = []
        #: Text bytes pushed and not yet reported written: queued frames plus the writer's batch.
        self._unsent = 0
        #: The writer's task while it waits in ``take``: woken directly, with no Event per wake-up.
        self._waiter: trio.lowlevel.Task | None = None
        #: No more text is taken (closed, overflowed, or finishing).
        self.closed = False
        #: ``finish`` was called: the writer stops once it has written what is queued.
        self._finished = False

    @property
    def unsent_bytes(self) -> int:
        return self._unsent

    def push(self, frame: bytes) -> bool:
        """Queue a text frame's payload. False once closed or overflowed: the member must go."""
        if self.closed:
            return False
        size = len(frame)
        if self._unsent + size > self._limit:
            self.closed = True
            self._items.clear()
            self._on_overflow()
            return False
        self._items.append(frame)
        self._unsent += size
        self._wake()
        return True

    def control(self, item: Control) -> None:
        """Queue a control frame, in order with the text; not counted, never refused while open."""
        if not self._finished:
            self._items.append(item)
            self._wake()

    def finish(self, last: Control | None = None) -> None:
        """Take no more text, queue ``last`` (a close frame) after what is queued, and end there.

        What is queued still goes out first (replies the client is owed); after an overflow
        nothing is, since the overflow dropped it.
        """
        if self._finished:
            return
        self.closed = self._finished = True
        if last is not None:
            self._items.append(last)
        self._wake()

    def take_text(self) -> list[bytes]:
        """Take back the text frames queued and not yet taken by the writer; control frames stay.

        For a member whose connection is lost: the room keeps these for it, and a resumed
        connection gets them instead of this one.
        """
        text = [item for item in self._items if type(item) is bytes]
        if text:
            self._items = [item for item in self._items if type(item) is not bytes]
            self._unsent -= sum(len(item) for item in text)
        return text

    async def take(self) -> list[Item]:
        """Every queued item, in order, waiting for one if needed; ``[]`` once finished and empty.

        The writer takes the whole queue at once, so a burst costs one wake-up, not one per frame.
        """
        while not self._items:
            if self._finished:
                return []
            self._waiter = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort)
        batch, self._items = self._items, []
        return batch

    def _wake(self) -> None:
        if self._waiter is not None:
            trio.lowlevel.reschedule(self._waiter)
            self._waiter = None

    def _abort(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self._waiter = None
        return trio.lowlevel.Abort.SUCCEEDED

    def written(self, size: int) -> None:
        """The writer reports ``size`` text bytes handed to the transport."""
        self._unsent -= size
