"""The WebSocket codec: bytes in, messages out, frames back, for one open server connection.

This is the only module that knows which WebSocket library parses frames, so swapping it means
rewriting this file alone. It is sans-IO: it never touches a socket or a clock. The connection
is born OPEN: h11 has answered the upgrade already (see ``_upgrade``), and the bytes h11 read
past the request head are simply the first ``receive``.

It is built on websockets' sans-IO ``Protocol`` (C-accelerated unmasking; it answers pings and
echoes a peer's close by itself). What the library leaves to its I/O layer is done here:
joining fragments into messages, and decoding text as UTF-8, across fragments as they arrive.

The codec closes as RFC 6455 says, and every failure is reported as a :class:`Closed` event:
1002 for a frame that breaks the protocol, 1007 for text that is not UTF-8, 1009 for a message
over ``max_message_bytes`` (counted in bytes across fragments, refused as soon as a frame
header says so, never buffered up to it). After a failure or a close, further bytes are
discarded. Outgoing frames are never masked (a server's are not).
"""

from __future__ import annotations

import codecs
import logging

import attrs
from websockets.frames import Opcode
from websockets.protocol import SEND_EOF, Protocol, Side, State

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009

#: websockets logs each frame at DEBUG and each closed connection at INFO on this logger;
#: frames carry SDPs, which signald never logs, so only its warnings and errors are let through.
_LIBRARY_LOG = logging.getLogger("signald.websocket.codec")
_LIBRARY_LOG.setLevel(logging.WARNING)

_TEXT, _BINARY, _CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONT
_PONG, _CLOSE = Opcode.PONG, Opcode.CLOSE


@attrs.frozen
class Binary:
    """A whole binary message (signald refuses them, politely)."""

    data: bytes


@attrs.frozen
class Pong:
    payload: bytes


@attrs.frozen
class Closed:
    """The WebSocket is closing: the peer sent a close frame, or the codec failed the connection.

    ``by_peer`` tells which. Either way, the reply (the echo, or our close frame) is in
    :meth:`Codec.pending` already.
    """

    code: int
    reason: str
    by_peer: bool


#: ``receive`` yields whole text messages as ``str``: the common case pays for no wrapper.
Event = str | Binary | Pong | Closed


class _Protocol(Protocol):
    """websockets' protocol with signald's one reason for 1009."""

    too_big_reason = ""

    def fail(self, code: int, reason: str = "") -> None:
        super().fail(code, self.too_big_reason if code == CLOSE_TOO_BIG else reason)


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame carrying ``payload`` (UTF-8 JSON).

    Written here instead of through the library: it is the hot path of every relay, and a
    server frame is a header and the payload, nothing else.
    """
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return b"\x81\x7e" + size.to_bytes(2, "big") + payload
    return b"\x81\x7f" + size.to_bytes(8, "big") + payload


class Codec:
    #: Slotted: one per connection, thousands of them idle.
    __slots__ = (
        "_decoder",
        "_failure_told",
        "_parts",
        "_protocol",
        "_text",
        "eof_requested",
    )

    def __init__(self, max_message_bytes: int) -> None:
        self._protocol = _Protocol(Side.SERVER, state=State.OPEN, max_size=max_message_bytes, logger=_LIBRARY_LOG)
        self._protocol.debug = False
        self._protocol.too_big_reason = f"message larger than {max_message_bytes} bytes"
        #: The fragments of a message in progress; its UTF-8 decoder when it is text.
        self._parts: list[bytes] = []
        self._decoder: codecs.BufferedIncrementalDecoder | None = None
        self._text = False
        self._failure_told = False
        #: The library asks for the TCP connection to be half-closed once its bytes are sent.
        self.eof_requested = False

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the socket; the complete messages and control events in them, in order."""
        protocol = self._protocol
        protocol.receive_data(data)
        events: list[Event] = []
        for frame in protocol.events_received():
            opcode = frame.opcode
            if opcode is _TEXT and frame.fin:
                try:
                    events.append(frame.data.decode())
                except UnicodeDecodeError as exc:
                    events.append(self._fail_utf8(exc))
                    break
            elif opcode is _TEXT or opcode is _BINARY or opcode is _CONT:
                event = self._fragment(opcode, frame.data, frame.fin)
                if event is not None:
                    events.append(event)
                    if isinstance(event, Closed):
                        break
            elif opcode is _PONG:
                events.append(Pong(bytes(frame.data)))
            elif opcode is _CLOSE:
                close = protocol.close_rcvd
                assert close is not None
                events.append(Closed(int(close.code), close.reason, by_peer=True))
        if protocol.parser_exc is not None and not self._failure_told:
            # The library failed the connection (1002, 1009, or 1007 in a close reason).
            self._failure_told = True
            if not (events and isinstance(events[-1], Closed)):
                sent = protocol.close_sent
                assert sent is not None
                events.append(Closed(int(sent.code), sent.reason, by_peer=False))
        return events

    def _fragment(self, opcode: Opcode, data: bytes, fin: bool) -> Event | None:
        if opcode is not _CONT:  # the library has checked no message was in progress
            self._text = opcode is _TEXT
            self._decoder = codecs.getincrementaldecoder("utf-8")() if self._text else None
            self._parts = []
        if self._text:
            assert self._decoder is not None
            try:
                self._parts.append(self._decoder.decode(data, final=fin))  # type: ignore[arg-type]
            except UnicodeDecodeError as exc:
                return self._fail_utf8(exc)
        else:
            self._parts.append(data)
        if not fin:
            return None
        parts, self._parts, self._decoder = self._parts, [], None
        if self._text:
            return "".join(parts)  # type: ignore[arg-type]
        return Binary(b"".join(parts))

    def _fail_utf8(self, exc: UnicodeDecodeError) -> Closed:
        reason = f"text is not UTF-8: {exc.reason}"
        self._protocol.fail(CLOSE_INVALID_DATA, reason)
        self._failure_told = True
        return Closed(CLOSE_INVALID_DATA, reason, by_peer=False)

    def ping(self, payload: bytes) -> None:
        if self._protocol.state is State.OPEN:
            self._protocol.send_ping(payload)

    def close(self, code: int, reason: str) -> None:
        """Start the close handshake (once; later calls are ignored)."""
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(code, reason)

    @property
    def is_open(self) -> bool:
        """No close frame has been sent or received yet."""
        return self._protocol.state is State.OPEN

    def pending(self) -> bytes:
        """Bytes the codec wants sent, of its own accord (pongs, a close echo, a failure's close)."""
        writes = self._protocol.data_to_send()
        if not writes:
            return b""
        if SEND_EOF in writes:
            self.eof_requested = True
        return b"".join(writes)
