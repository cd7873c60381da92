"""One TCP connection: h11 parses every request; an accepted upgrade becomes a WebSocket.

Every request for ``/ws`` goes to the host's ``admit`` (``_upgrade`` decides); a refusal is an
ordinary h11 response, an acceptance is h11's ``101`` with ``Sec-WebSocket-Accept``. h11 then
hands over the bytes it read past the request head (``trailing_data``, maybe a pipelined first
frame), and they are the first input of the WebSocket's codec: the handshake is parsed once.

Every read of a request is bounded by ``server.request_timeout`` (slowloris), every body by
``MAX_BODY_BYTES``, and any failure here is confined to this connection. A request with both
``Content-Length`` and ``Transfer-Encoding`` is refused outright: a proxy in front of us might
frame its body by the other header, and the bytes it disagrees about would be a smuggled request.
Each WebSocket counts against the connection caps, by client address, from its handshake on.
A drain (the host's ``draining``) answers the request under way with ``Connection: close`` and
ends a keep-alive connection idling between requests (:meth:`HttpConnection.close_if_idle`).

The connection knows the server only through :class:`Host`, the six things it needs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from typing import Protocol

import attrs
import h11
import trio

from ._rest import MAX_BODY_BYTES, HttpRequest, HttpResponse, error_response
from ._sockets import receive_now, send_all
from ._upgrade import PATH, accept_headers

log = logging.getLogger("signald.http")

MAX_HEAD_BYTES = 16 * 1024
RECEIVE_SIZE = 64 * 1024
#: After refusing a request we half-close and read (and discard) what the client still sends,
#: this long and this much at most: closing with its bytes unread would make the kernel send a
#: reset, which can destroy our refusal before the client has read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024

Stream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


@attrs.frozen
class Admission:
    """An upgrade the host accepted: ``hold`` counts the connection against the caps while
    entered; ``run(stream, sock, early, remote)`` serves the WebSocket once the 101 is out
    (``sock``: the stream's plain socket, see ``_sockets``)."""

    hold: AbstractContextManager[None]
    run: Callable[[Stream, socket.socket | None, bytes, str], Awaitable[None]]


class Host(Protocol):
    """What a connection needs from the server (``Server`` is one)."""

    @property
    def request_timeout(self) -> float: ...

    @property
    def draining(self) -> bool: ...

    def client_key(self, peer_host: str, forwarded_for: str | None) -> str:
        """The per-address key of a client: the peer, or whom a trusted proxy forwarded."""
        ...

    async def respond(self, request: HttpRequest) -> HttpResponse:
        """The REST API's answer."""
        ...

    def cors_headers(self, origin: str | None) -> list[tuple[str, str]]:
        """The CORS headers of a response to a request from ``origin``."""
        ...

    def admit(self, method: str, headers: Mapping[str, str], client: str) -> HttpResponse | Admission:
        """A request for /ws: its refusal, or its admission (taken with no checkpoint in between)."""
        ...


class _BodyTooLarge(Exception):
    pass


def _header_map(request: h11.Request) -> tuple[dict[str, str], str | None]:
    """The request's headers by lower-case name, repeats joined with ", ", and its first ``Origin``.

    One pass over h11's headers: each step of iterating them is a Python call, paid per request.
    """
    headers: dict[str, str] = {}
    origin: str | None = None
    for name, value in request.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        if key in headers:
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text
            if key == "origin":
                origin = text
    return headers, origin


class HttpConnection:
    #: Slotted: one per connection, thousands of them idle.
    __slots__ = (
        "_answered",
        "_conn",
        "_host",
        "_idle",
        "_origin",
        "_peer_host",
        "_remote",
        "_sock",
        "_stream",
    )

    def __init__(
        self, host: Host, stream: Stream, peer_host: str, remote: str, sock: socket.socket | None = None
    ) -> None:
        self._host = host
        self._stream = stream
        #: The stream's plain socket (None under TLS): sends and the first read try it directly.
        self._sock = sock
        self._peer_host = peer_host
        #: "host:port", for log lines.
        self._remote = remote
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        #: The ``Origin`` of the request being read, for the CORS headers of an error about it.
        self._origin: str | None = None
        #: Whether a response has been sent, so that the wait for the next request is keep-alive idling.
        self._answered = False
        #: Set while idling between keep-alive requests with nothing received: what a drain cancels.
        self._idle: trio.CancelScope | None = None

    def close_if_idle(self) -> None:
        """Drain: end the connection now if it idles between keep-alive requests.

        A request under way is served to the end (with ``Connection: close``), and so is the
        first request of a connection accepted before the drain: its client has connected and
        is sending it. Only an idle keep-alive connection is closed, which a client may always
        expect (RFC 9112 9.3.1, 9.6) and retries on a new connection.
        """
        if self._idle is not None:
            self._idle.cancel()

    async def _send(self, event: h11.Event) -> None:
        data = self._conn.send(event)
        if data:
            await send_all(self._stream, self._sock, data)

    async def _respond(self, response: HttpResponse, *, close: bool = False) -> None:
        """Send ``response``; the caller bounds it (the HTTP phase's deadline, or its own)."""
        # RFC 9110 8.6: no Content-Length on a 204, and on a 304 only the full body's size.
        length = [] if response.status in (204, 304) else [("Content-Length", str(len(response.body)))]
        headers = [*length, *response.headers]
        if close or self._host.draining:
            headers.append(("Connection", "close"))
        conn = self._conn
        chunks = [conn.send(h11.Response(status_code=response.status, headers=headers))]
        if response.body:
            chunks.append(conn.send(h11.Data(data=response.body)))
        chunks.append(conn.send(h11.EndOfMessage()))
        await send_all(self._stream, self._sock, b"".join(c for c in chunks if c))  # one write, not three

    async def _read_request(self) -> tuple[h11.Request, dict[str, str], bytes] | None:
        """The next whole request, its headers (see ``_header_map``), its body; None if the client
        closed between requests."""
        request: h11.Request | None = None
        headers: dict[str, str] = {}
        body = bytearray()
        while True:
            event = self._conn.next_event()
            if event is h11.NEED_DATA:
                if self._conn.they_are_waiting_for_100_continue:
                    await self._send(h11.InformationalResponse(status_code=100, headers=[]))
                if self._answered and request is None and not self._conn.trailing_data[0]:
                    data = b""  # unless a byte comes before the drain: closed between requests
                    with trio.CancelScope() as self._idle:
                        if self._host.draining:
                            self._idle.cancel()
                        data = await self._stream.receive_some(RECEIVE_SIZE)
                    self._idle = None
                    if not data:
                        return None
                    self._conn.receive_data(data)
                else:
                    # The first request is usually in the kernel by the time this task runs.
                    data = receive_now(self._sock, RECEIVE_SIZE) if not self._answered else None
                    if data is None:
                        data = await self._stream.receive_some(RECEIVE_SIZE)
                    self._conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
                headers, self._origin = _header_map(event)
                length = headers.get("content-length")  # h11 has checked it is one number, all digits
                if length is not None and "transfer-encoding" in headers:
                    raise h11.RemoteProtocolError("both Content-Length and Transfer-Encoding", 400)
                if length is not None and int(length) > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    raise _BodyTooLarge
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, headers, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def run(self) -> None:
        held: AbstractContextManager[None] | None = None
        try:
            # The whole HTTP phase, every request of the connection and the 101, runs in this one
            # cancel scope, its deadline moved between requests and before each REST response: a
            # scope costs more than moving a deadline, and a join storm pays for every one opened.
            with trio.CancelScope(deadline=trio.current_time() + self._host.request_timeout) as phase:
                upgrade = await self._serve_http(phase)
                if upgrade is not None:
                    admission, accept = upgrade
                    held = admission.hold
                    held.__enter__()  # with no checkpoint since the check: no race
                    # Within the request's own deadline: a request and its 101 take request_timeout at most.
                    await self._send(h11.InformationalResponse(status_code=101, headers=accept))
            if phase.cancelled_caught:
                if held is not None:
                    log.info("%s: WebSocket handshake timed out", self._remote)
                elif self._conn.their_state is h11.SEND_BODY or (
                    self._conn.their_state is h11.IDLE and self._conn.trailing_data[0]
                ):
                    await self._respond_if_possible(
                        error_response(408, "request-timeout", "request took too long", self._cors())
                    )
                return
            if upgrade is not None:
                early, _ = self._conn.trailing_data
                # Every coroutine frame in this chain lives as long as the WebSocket, and idle
                # connections are counted in thousands: what the handshake needed goes now.
                del upgrade, accept, phase
                # h11 is done with this connection: its state and buffers need not live as long as the WebSocket.
                del self._conn
                websocket = admission.run(self._stream, self._sock, early, self._remote)
                del admission  # and its closure: the WebSocket's coroutine holds what it needs
                await websocket
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-exchange
        finally:
            if held is not None:
                held.__exit__(None, None, None)
            if type(self._stream) is trio.SocketStream:
                self._stream.socket.close()  # what ``aclose`` does, without its checkpoint: nothing waits on it
            else:
                with trio.move_on_after(0):
                    await self._stream.aclose()

    async def _serve_http(self, phase: trio.CancelScope) -> tuple[Admission, list[tuple[str, str]]] | None:
        """Requests until the connection should close (None), or an admitted upgrade.

        Runs in ``phase``, the HTTP phase's cancel scope: each read of a request and each
        response may take ``request_timeout``, the REST API's own work as long as it takes.
        A refusal or a 101 is sent within the deadline of the request it answers.
        """
        timeout = self._host.request_timeout
        while True:  # the first request's deadline is the scope's own
            try:
                received = await self._read_request()
            except h11.RemoteProtocolError as exc:
                log.info("%s: bad HTTP request: %s", self._remote, exc)
                await self._respond_if_possible(
                    error_response(exc.error_status_hint, "bad-request", f"malformed HTTP request: {exc}", self._cors())
                )
                return None
            except _BodyTooLarge:
                await self._respond_if_possible(
                    error_response(413, "payload-too-large", f"request body over {MAX_BODY_BYTES} bytes", self._cors())
                )
                return None
            if received is None:
                return None
            request, headers, body = received
            method = request.method.decode("ascii")
            target = request.target.decode("latin-1")
            if target.split("?", 1)[0] == PATH:
                admission = self._host.admit(method, headers, self._client(headers))
                if isinstance(admission, HttpResponse):
                    await self._respond(admission, close=True)
                    return None
                return admission, accept_headers(headers)
            phase.deadline = math.inf
            response = await self._host.respond(HttpRequest(method, target, headers, body, self._client(headers)))
            log.debug(
                "%s: %s %s -> %d",
                self._remote,
                request.method.decode(),
                request.target.decode("latin-1"),
                response.status,
            )
            phase.deadline = trio.current_time() + timeout
            await self._respond(response)
            self._answered = True
            if self._conn.our_state is h11.MUST_CLOSE or self._host.draining:
                return None
            self._conn.start_next_cycle()
            self._origin = None
            phase.deadline = trio.current_time() + timeout

    async def _respond_if_possible(self, response: HttpResponse) -> None:
        """An error's response, then the linger; bounded by themselves (they also follow a timeout)."""
        if self._conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with trio.move_on_after(self._host.request_timeout), contextlib.suppress(h11.LocalProtocolError):
                await self._respond(response, close=True)
            await self._linger()

    async def _linger(self) -> None:
        with trio.move_on_after(LINGER_SECONDS):
            await self._stream.send_eof()
            drained = 0
            while drained < LINGER_BYTES and (chunk := await self._stream.receive_some(RECEIVE_SIZE)):
                drained += len(chunk)

    def _cors(self) -> list[tuple[str, str]]:
        """An error the connection answers itself carries the CORS headers any route would."""
        return self._host.cors_headers(self._origin)

    def _client(self, headers: dict[str, str]) -> str:
        """The per-address key of the client: the peer, or whom a trusted proxy forwarded."""
        return self._host.client_key(self._peer_host, headers.get("x-forwarded-for"))
