"""One WebSocket connection's I/O: two tasks around the pure :class:`~signald._session.Session`.

* The reader (the connection's own task) reads up to 64 KiB, has the codec cut it into
  messages, hands every complete one to the session and carries out the room commands it
  issues, all before it reads again. Room commands never wait except on a full room channel
  (backpressure on a flooding sender), and never get lost to a cancellation.
* The writer takes the whole :class:`Outbox` at once and writes it with one ``send_all``, so a
  burst of relays to one client costs one system call, not one per frame.

Pings, the pong deadline, the idle timeout and the close-handshake bound are not tasks: the
session keeps them as one ``deadline``, and the reader's cancel scope carries it (one scope per
wake-up, not per read). An event from outside the reader (an outbox overflow, a shutdown)
cancels the scope so the reader acts on it at once.

Closing: the session decides, the writer sends the close frame after what it is writing, and
the reader waits for the client's close, or EOF, until ``limits.close_timeout``; then the socket
goes. Whatever happens, the member has left its room before any of that (see ``_session``).
"""

from __future__ import annotations

import contextlib
import logging
import socket

import trio

from ._auth import JoinTokens
from ._config import LimitsConfig
from ._hub import ResumeFailed, RoomHub
from ._metrics import Observer
from ._outbox import Close, Item, Outbox, Ping, Raw
from ._session import Join, Leave, LocalMember, Resume, Session, State, Suspend
from ._sockets import send_all
from ._websocket import Binary, Closed, Codec, Pong, text_frame

log = logging.getLogger("signald.session")

RECEIVE_SIZE = 64 * 1024
#: A read at least this large is part of a burst: the reader lets it reach the recipients'
#: writers before reading more (``BURST_YIELDS`` scheduler rounds: the room task applies the
#: relays in the first, the writers take them in the second and hand them to the kernel in
#: the third). Without it the reader runs a few reads ahead of the writers it feeds, and a
#: 1 MB burst piles up to 210-260 KB in a recipient's outbox although the recipient keeps up
#: (measured: a reader in another process; 130 KB with one round, 64-77 KB with three).
#: Small reads, the common case, pay nothing.
BURST_READ = 16 * 1024
BURST_YIELDS = 3

#: What ``TCP_NOTSENT_LOWAT`` becomes on a WebSocket: no limit below the kernel's own send buffer.
KERNEL_BUFFERS_ALL = 2**31 - 1


def _let_the_kernel_buffer(stream: trio.abc.Stream) -> None:
    """Undo trio's 16 KiB ``TCP_NOTSENT_LOWAT`` on this socket, so the outbox bound counts bytes
    the kernel would not take, not bytes it was never offered.

    With it, the kernel takes at most 16 KiB beyond what is in flight, so a client that pauses
    for a moment (its process descheduled) pushes a burst back into the outbox, and a 1 MB burst
    peaked at 130-460 KB there (test_backpressure's, 25 runs, a loaded machine) although the
    client read it all. Without it the peak was 64-74 KB, the writer's one batch, in 30 runs.
    A client that stops reading still fills the kernel's send buffer (autotuned, 4 MiB at most)
    and then the outbox, and is evicted.
    """
    transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(transport, trio.SocketStream) and hasattr(socket, "TCP_NOTSENT_LOWAT"):
        with contextlib.suppress(OSError):
            transport.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, KERNEL_BUFFERS_ALL)


class WebSocket:
    """A session on an upgraded stream; ``early`` is what the client sent after its request head."""

    #: Slotted: one per connection, thousands of them idle.
    __slots__ = (
        "_codec",
        "_early",
        "_hub",
        "_limits",
        "_observer",
        "_peer_close_code",
        "_scope",
        "_sock",
        "_stream",
        "outbox",
        "remote",
        "session",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        early: bytes,
        hub: RoomHub,
        limits: LimitsConfig,
        remote: str,
        tokens: JoinTokens | None = None,
        observer: Observer | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self._stream = stream
        #: The stream's plain socket, if it has one: the writer offers the kernel each batch
        #: directly first (``_sockets.send_all``).
        self._sock = sock
        self._observer = observer or Observer()
        #: The code of the client's close frame, when it closed first.
        self._peer_close_code: int | None = None
        _let_the_kernel_buffer(stream)
        self._early = early
        self._hub = hub
        self._limits = limits
        self._codec = Codec(limits.max_message_bytes)
        self.outbox = Outbox(limits.send_queue_bytes, self._overflowed)
        self.session = Session(
            limits,
            self.outbox,
            trio.current_time(),
            remote,
            tokens,
            ice=hub.ice,
            on_superseded=self._superseded,
            observer=self._observer,
        )
        self.remote = remote
        #: The reader's current cancel scope: cancelled to make it look at the session now.
        self._scope: trio.CancelScope | None = None

    def close(self, code: int, reason: str, *, keep_seat: bool = False) -> None:
        """Close from outside the connection (shutdown); ``keep_seat``: suspend its member, for a
        resume elsewhere, instead of ending its session."""
        self.session.close(code, reason, trio.current_time(), keep_seat=keep_seat)
        self._wake()

    def _overflowed(self) -> None:
        self.session.overflowed(trio.current_time())
        self._wake()

    def _superseded(self) -> list[bytes]:
        """Called by the room task that handed this session's seat to a resuming connection."""
        unsent = self.session.superseded(trio.current_time())
        self._wake()
        return unsent

    def _wake(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def run(self) -> None:
        log.info("%s: connected", self.remote)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                await self._reader()
                # What is queued (a close frame, an echo) may take until the close bound, if any is
                # left: the nursery waits that long for its writer, then cancels it.
                self.outbox.finish()
                nursery.cancel_scope.deadline = min(
                    self.session.close_by, trio.current_time() + self._limits.close_timeout
                )
        finally:
            # Cancelled from outside (shutdown's grace ran out) or broken: the member still leaves.
            self.session.socket_closed(trio.current_time())
            if self.session.commands:
                with trio.CancelScope(shield=True):
                    await self._carry_out()
            code = self.session.close_code
            self._observer.closed(code if code is not None else self._peer_close_code)
            log.info("%s: disconnected", self.remote)

    async def _reader(self) -> None:
        session = self.session
        early, self._early = self._early, b""
        while not session.done:
            with trio.CancelScope(deadline=session.deadline) as scope:
                self._scope = scope
                try:
                    if early:
                        early, data = b"", early
                        await self._received(data)
                    while not session.done:
                        if scope.deadline != session.deadline:
                            scope.deadline = session.deadline
                        data = await self._stream.receive_some(RECEIVE_SIZE)
                        if not data:
                            session.socket_closed(trio.current_time())
                            break
                        await self._received(data)
                        if len(data) >= BURST_READ:
                            for _ in range(BURST_YIELDS):
                                await trio.lowlevel.checkpoint()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    session.socket_closed(trio.current_time())
            self._scope = None
            session.timer(trio.current_time())
            await self._carry_out()

    async def _received(self, data: bytes) -> None:
        session, codec = self.session, self._codec
        now = trio.current_time()
        events = codec.receive(data)
        reply = codec.pending()  # pongs; and the echo of a close, or the close of a failure
        if reply and codec.is_open:
            self.outbox.control(Raw(reply))  # pongs go first: a late pong is what times a client out
            reply = b""
        for event in events:
            if type(event) is str:
                session.text(event, now)
            elif isinstance(event, Closed):
                if event.by_peer:
                    self._peer_close_code = event.code
                    session.peer_closed(event.code, now)
                else:
                    session.failed(event.code, event.reason, now)
            elif isinstance(event, Pong):
                session.pong(event.payload, now)
            elif isinstance(event, Binary):
                session.binary(now)
            if session.commands:
                await self._carry_out()
        if session.state is not State.OPEN:
            self.outbox.finish(Raw(reply) if reply else None)

    async def _carry_out(self) -> None:
        """The session's room commands, in order; none of them is lost to a cancellation."""
        session = self.session
        while session.commands:
            commands, session.commands = session.commands, []
            for command in commands:
                if isinstance(command, Join):
                    # Not cancellable (``RoomHub.join``): the room task always answers, and an
                    # abandoned join would seat a member nobody knows of.
                    room = await self._hub.join(command.room_id, command.member, command.request_id)
                    if room is None:
                        session.join_refused(trio.current_time())
                    else:
                        session.joined(room, trio.current_time())
                elif isinstance(command, Resume):
                    # Shielded like a join: a room that has handed the seat over must find its session.
                    with trio.CancelScope(shield=True):
                        try:
                            room, member = await self._hub.resume(command.token, session.member_for, command.request_id)
                        except ResumeFailed as failed:
                            session.resume_failed(str(failed), command.request_id, trio.current_time())
                        else:
                            assert isinstance(member, LocalMember)
                            session.resumed(room, member, trio.current_time())
                elif isinstance(command, Leave):
                    with trio.CancelScope(shield=True):
                        await command.room.leave(command.member)
                elif isinstance(command, Suspend):
                    with trio.CancelScope(shield=True):
                        await command.room.suspend(command.member, command.unsent, command.max_bytes)
                else:
                    await command.room.relay(
                        command.sender_id, command.to, command.text, command.request_id, command.received_at
                    )

    async def _writer(self) -> None:
        outbox, stream, sock = self.outbox, self._stream, self._sock
        try:
            while batch := await outbox.take():
                data, text_bytes = self._encode(batch)
                del batch  # nothing of a written batch stays alive while the writer waits for the next
                await send_all(stream, sock, data)
                del data
                outbox.written(text_bytes)
            if self._codec.eof_requested and isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()  # a failed connection: the client sees our close, then EOF
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.session.socket_closed(trio.current_time())
            self._wake()

    def _encode(self, batch: list[Item]) -> tuple[bytes, int]:
        """The bytes of a batch of frames, and how many of them the outbox counted."""
        codec = self._codec
        chunks: list[bytes] = []
        text_bytes = 0
        for item in batch:
            if type(item) is bytes:
                chunks.append(text_frame(item))
                text_bytes += len(item)
            elif isinstance(item, Raw):
                chunks.append(item.data)
            elif isinstance(item, Ping):
                codec.ping(item.payload)
                chunks.append(codec.pending())
            elif isinstance(item, Close):
                codec.close(item.code, item.reason)
                chunks.append(codec.pending())
        return (b"".join(chunks) if len(chunks) > 1 else chunks[0]), text_bytes
