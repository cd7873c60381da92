"""One TCP connection: h11 parses every request; WebSocket upgrades go to trio-websocket.

The upgrade hand-off is the delicate part. h11 has already consumed the request head (and
maybe bytes after it) from the stream, but ``trio_websocket.wrap_server_stream`` insists on
parsing the handshake itself. So we rebuild the request head from h11's event (raw header
names and values are kept), put h11's ``trailing_data`` after it, and give trio-websocket a
:class:`ReplayStream` whose first reads return those bytes before the socket's.

Every read of a request is bounded by ``server.request_timeout`` (slowloris), every body by
``MAX_BODY_BYTES``, and any failure here is confined to this connection. A request with both
``Content-Length`` and ``Transfer-Encoding`` is refused outright: a proxy in front of us might
frame its body by the other header, and the bytes it disagrees about would be a smuggled request.
Each WebSocket counts against the connection caps, by client address, from its handshake on.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import h11
import trio
import trio_websocket

from ._rest import MAX_BODY_BYTES, HttpRequest, HttpResponse, error_response
from ._session import Session

if TYPE_CHECKING:
    from ._server import Server

log = logging.getLogger("signald.http")

MAX_HEAD_BYTES = 16 * 1024
RECEIVE_SIZE = 64 * 1024
#: Frames trio-websocket may buffer between its reader task and ours. More than 1, so a
#: moment of backpressure does not also stall its pong and close handling.
WS_MESSAGE_QUEUE = 16
#: After refusing a request we half-close and read (and discard) what the client still sends,
#: this long and this much at most: closing with its bytes unread would make the kernel send a
#: reset, which can destroy our refusal before the client has read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024


class ReplayStream(trio.abc.HalfCloseableStream):
    """A stream that first replays bytes h11 already consumed, then reads ``stream``.

    ``head`` (the rebuilt request head) is returned at once. Everything after it, starting
    with ``early`` (bytes the client sent after its head, such as a pipelined first frame),
    is held back until :meth:`release`, that is until the handshake has been accepted: bytes
    wsproto receives while still negotiating stay buffered in its handshake parser, and
    trio-websocket would not look at them again until the client happened to send more.
    """

    def __init__(self, head: bytes, early: bytes, stream: trio.abc.HalfCloseableStream) -> None:
        self._head = head
        self._early = early
        self._released = trio.Event()
        self._stream = stream
        #: Head replayed, released, early bytes replayed: reads now go straight to the socket.
        self._live = False

    def release(self) -> None:
        self._released.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._live:  # the common case, once per read: no extra checkpoint on top of the socket's
            return await self._stream.receive_some(max_bytes)
        if self._head:
            chunk, self._head = _split(self._head, max_bytes)
            await trio.lowlevel.checkpoint()
            return chunk
        await self._released.wait()
        if self._early:
            chunk, self._early = _split(self._early, max_bytes)
            return chunk
        self._live = True
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def _split(data: bytes, size: int | None) -> tuple[bytes, bytes]:
    return (data, b"") if size is None else (data[:size], data[size:])


class _BodyTooLarge(Exception):
    pass


def _raw_head(request: h11.Request) -> bytes:
    lines = [request.method + b" " + request.target + b" HTTP/1.1"]
    lines.extend(name + b": " + value for name, value in request.headers.raw_items())
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _header_map(request: h11.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in request.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


class HttpConnection:
    def __init__(self, server: Server, stream: trio.SocketStream, peer_host: str, remote: str) -> None:
        self._server = server
        self._stream = stream
        self._peer_host = peer_host
        #: "host:port", for log lines.
        self._remote = remote
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    async def _send(self, event: h11.Event) -> None:
        data = self._conn.send(event)
        if data:
            await self._stream.send_all(data)

    async def _respond(self, response: HttpResponse, *, close: bool = False) -> None:
        # RFC 9110 8.6: no Content-Length on a 204, and on a 304 only the full body's size.
        length = [] if response.status in (204, 304) else [("Content-Length", str(len(response.body)))]
        headers = [*length, *response.headers]
        if close or self._server.draining:
            headers.append(("Connection", "close"))
        with trio.move_on_after(self._server.config.server.request_timeout):
            await self._send(h11.Response(status_code=response.status, headers=headers))
            if response.body:
                await self._send(h11.Data(data=response.body))
            await self._send(h11.EndOfMessage())

    async def _read_request(self) -> tuple[h11.Request, bytes] | None:
        """The next whole request, or None if the client closed between requests."""
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                if self._conn.they_are_waiting_for_100_continue:
                    await self._send(h11.InformationalResponse(status_code=100, headers=[]))
                self._conn.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
            elif isinstance(event, h11.Request):
                request = event
                names = {name for name, _ in event.headers}
                if b"content-length" in names and b"transfer-encoding" in names:
                    raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding", 400)
                for name, value in event.headers:  # h11 has checked it is all digits
                    if name == b"content-length" and int(value) > MAX_BODY_BYTES:
                        raise _BodyTooLarge
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def run(self) -> None:
        timeout = self._server.config.server.request_timeout
        try:
            while True:
                with trio.move_on_after(timeout) as scope:
                    try:
                        received = await self._read_request()
                    except h11.RemoteProtocolError as exc:
                        log.info("%s: bad HTTP request: %s", self._remote, exc)
                        await self._respond_if_possible(
                            error_response(exc.error_status_hint, "bad-request", f"malformed HTTP request: {exc}")
                        )
                        return
                    except _BodyTooLarge:
                        await self._respond_if_possible(
                            error_response(413, "payload-too-large", f"request body over {MAX_BODY_BYTES} bytes")
                        )
                        return
                if scope.cancelled_caught:
                    if self._conn.their_state is h11.SEND_BODY or (
                        self._conn.their_state is h11.IDLE and self._conn.trailing_data[0]
                    ):
                        await self._respond_if_possible(error_response(408, "request-timeout", "request took too long"))
                    return
                if received is None:
                    return
                request, body = received
                if self._conn.their_state is h11.MIGHT_SWITCH_PROTOCOL and request.target.split(b"?")[0] == b"/ws":
                    await self._upgrade(request)
                    return
                headers = _header_map(request)
                response = await self._server.rest.handle(
                    HttpRequest(
                        request.method.decode("ascii"),
                        request.target.decode("latin-1"),
                        headers,
                        body,
                        self._client(headers),
                    )
                )
                log.debug(
                    "%s: %s %s -> %d",
                    self._remote,
                    request.method.decode(),
                    request.target.decode("latin-1"),
                    response.status,
                )
                await self._respond(response)
                if self._conn.our_state is h11.MUST_CLOSE or self._server.draining:
                    return
                self._conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-exchange
        finally:
            with trio.move_on_after(0):
                await self._stream.aclose()

    async def _respond_if_possible(self, response: HttpResponse) -> None:
        if self._conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                await self._respond(response, close=True)
            await self._linger()

    async def _linger(self) -> None:
        with trio.move_on_after(LINGER_SECONDS):
            await self._stream.send_eof()
            drained = 0
            while drained < LINGER_BYTES and (chunk := await self._stream.receive_some(RECEIVE_SIZE)):
                drained += len(chunk)

    def _client(self, headers: dict[str, str]) -> str:
        """The per-address key of the client: the peer, or whom a trusted proxy forwarded."""
        return self._server.proxies.client_key(self._peer_host, headers.get("x-forwarded-for"))

    async def _upgrade(self, request: h11.Request) -> None:
        headers = _header_map(request)
        client = self._client(headers)
        refusal = self._server.check_upgrade(headers, client)
        if refusal is not None:
            await self._respond(refusal, close=True)
            return
        with self._server.connections.hold(client):  # no checkpoint since the check: no race
            await self._websocket(request)

    async def _websocket(self, request: h11.Request) -> None:
        replay = ReplayStream(_raw_head(request), self._conn.trailing_data[0], self._stream)
        limits = self._server.config.limits
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(self._server.config.server.request_timeout) as handshake:
                ws_request = await trio_websocket.wrap_server_stream(
                    nursery,
                    replay,
                    message_queue_size=WS_MESSAGE_QUEUE,
                    max_message_size=limits.max_message_bytes,
                )
                ws = await ws_request.accept()
                replay.release()
            if handshake.cancelled_caught:
                log.info("%s: WebSocket handshake timed out", self._remote)
                nursery.cancel_scope.cancel()
                return
            session = Session(ws, self._server.hub, limits, self._remote, self._server.tokens)
            with self._server.track(session):
                await session.run()
            nursery.cancel_scope.cancel()
