"""The daemon's lifecycle: listen, serve, drain.

One nursery holds the room tasks; inside it, a second nursery holds the listener and every
connection. Shutdown (``shutdown()``, called on SIGTERM/SIGINT) drains in this order:

1. Stop accepting: the listeners are closed before anything else. Under socket activation
   that closes only our descriptor; systemd keeps the listening socket open, so connections
   made from now on wait in its backlog for the next process instead of meeting this one
   (which would only refuse them). Without systemd, new connections are refused.
2. Let every HTTP exchange under way finish, answered with ``Connection: close``, including
   the first request of a connection accepted just before; keep-alive connections idling
   between requests are closed. Upgrades are refused meanwhile, and /health answers 503
   unless the socket came from systemd (whose port stays served).
3. Ask every WebSocket to close with 1001. In one process that ends its member's session
   (nobody else could take it over). In cluster mode the reason says the session may be
   resumed on another node, and its member is suspended, as for a lost connection.
4. Once every connection has ended, or ``server.shutdown_grace`` has passed, cancel what is
   left. Nothing in progress is cancelled before that.
5. In cluster mode, wait for the suspended members to be resumed on other nodes (each is
   handed over as it is claimed), until ``server.shutdown_grace`` has passed since step 3;
   then the rest leave, through Redis (``RoomHub.hand_over``).

The room store, when there is one, encloses both nurseries, so it is opened (and its rooms
restored) before anything listens and finishes writing after the last room task has stopped.
In cluster mode (``[cluster]``) the link to Redis takes the store's place, so that sessions
closing in the drain still leave their rooms in Redis. Nothing outlives ``serve``.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Mapping, Sequence

import trio

from . import _upgrade
from ._addresses import TrustedProxies
from ._auth import JoinTokens
from ._config import Config, ConfigError, reloaded, split_bind
from ._connection import Admission, Host, HttpConnection, Stream
from ._cors import CorsPolicy
from ._hub import RoomHub
from ._limits import BucketsByKey, ConnectionCounter
from ._logging import Throttled
from ._metrics import Metrics, Observer, State
from ._rest import HttpRequest, HttpResponse, RestApi, error_response, exposition_response
from ._sockets import accepted, listening_sockets, peer_of
from ._startup import tls_context
from ._store import open_room_store
from ._transport import WebSocket
from ._turn import IceServers
from ._websocket import CLOSE_GOING_AWAY

log = logging.getLogger("signald")

#: The 1001 close reasons of a drain: in one process the session ends; in a cluster another
#: node can take it over (docs/protocol.md names both).
SHUTTING_DOWN = "server shutting down"
SHUTTING_DOWN_RESUME = "server shutting down; resume on another node"

#: accept(2) failures that mean "out of file descriptors or memory for now", not a broken
#: listener (as in trio.serve_listeners): wait a moment and accept again.
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_SECONDS = 0.1
#: Refused upgrades logged at most this many at once, then this many per second: anyone can
#: cause them, as fast as they can send requests (``_logging.Throttled``).
REFUSALS_LOGGED_BURST = 10
REFUSALS_LOGGED_RATE = 0.2


class Server:
    """Create one, then ``await nursery.start(server.serve)``; ``shutdown()`` stops it.

    ``sockets`` are listening sockets to serve instead of binding ``server.host:port``
    (socket activation: systemd opened them and keeps them open across restarts).
    """

    def __init__(self, config: Config, sockets: Sequence[socket.socket] = ()) -> None:
        self.config = config
        self._inherited = list(sockets)
        self.draining = False
        self.port: int | None = None
        self._cors = CorsPolicy(config.cors.allowed_origins)
        self._websockets: set[WebSocket] = set()
        #: Every accepted connection, WebSockets included, until its handler returns.
        self._connections: set[HttpConnection] = set()
        self._stop = trio.Event()
        self._connections_gone = trio.Event()
        self.proxies = TrustedProxies(config.server.trusted_proxies)
        self.connections = ConnectionCounter(config.limits.max_connections, config.limits.max_connections_per_ip)
        self.room_creations = BucketsByKey(config.limits.room_create_rate, config.limits.room_create_burst)
        self.tokens = JoinTokens(config.auth.secret) if config.auth.secret else None
        self._metrics = Metrics(self._state) if config.metrics.enabled else None
        #: What every part of the server reports to: the metrics, or nobody (``metrics.enabled`` false).
        self.observer: Observer = self._metrics or Observer()
        #: The port of the ``metrics.bind`` listener, once serving.
        self.metrics_port: int | None = None
        self._refusals = Throttled(logging.getLogger("signald.http"), REFUSALS_LOGGED_RATE, REFUSALS_LOGGED_BURST)

    @property
    def hub(self) -> RoomHub:
        return self._hub

    # -- what a connection needs (``_connection.Host``)

    @property
    def request_timeout(self) -> float:
        return self.config.server.request_timeout

    def client_key(self, peer_host: str, forwarded_for: str | None) -> str:
        return self.proxies.client_key(peer_host, forwarded_for)

    async def respond(self, request: HttpRequest) -> HttpResponse:
        return await self._rest.handle(request)

    def cors_headers(self, origin: str | None) -> list[tuple[str, str]]:
        return self._cors.headers(origin)

    def admit(self, method: str, headers: Mapping[str, str], client: str) -> HttpResponse | Admission:
        refusal = _upgrade.refusal(
            method, headers, client, draining=self.draining, cors=self._cors, connections=self.connections
        )
        if refusal is not None:
            self._refused(refusal, headers.get("origin"), client)
            return refusal
        limits = self.config.limits  # an open WebSocket keeps the limits it began with

        def run(stream: Stream, sock: socket.socket | None, early: bytes, remote: str) -> Awaitable[None]:
            # Not a coroutine itself: one frame fewer kept for the life of the WebSocket.
            websocket = WebSocket(stream, early, self._hub, limits, remote, self.tokens, self.observer, sock)
            return self._serve_websocket(websocket)

        return Admission(self.connections.hold(client), run)

    def _refused(self, refusal: HttpResponse, origin: str | None, client: str) -> None:
        """Count and log a refused upgrade: a wrong ``cors.allowed_origins`` or a cap set too low
        shows only as browsers failing to connect, so the operator must be able to see why."""
        error = json.loads(refusal.body)  # every refusal is an error_response
        self.observer.refused(error["error"])
        level = logging.WARNING if error["error"] == "origin-not-allowed" else logging.INFO
        self._refusals.log(
            trio.current_time(),
            level,
            "%s: WebSocket upgrade refused (%d %s, origin %.200r): %s",
            client,
            refusal.status,
            error["error"],
            origin,
            error["message"],
        )

    async def _serve_websocket(self, websocket: WebSocket) -> None:
        self._websockets.add(websocket)
        if self.draining:
            websocket.close(CLOSE_GOING_AWAY, SHUTTING_DOWN)
        try:
            await websocket.run()
        finally:
            self._websockets.discard(websocket)

    def shutdown(self) -> None:
        self._stop.set()

    def reload(self, config: Config) -> list[str]:
        """Take over ``config``'s reloadable sections (SIGHUP); return changed keys that need a restart.

        No connection is touched: the new CORS origins and limits apply to every request and
        every WebSocket accepted from now on, while open WebSockets keep the limits they began with.
        """
        self.config, pending = reloaded(self.config, config)
        self._cors = CorsPolicy(self.config.cors.allowed_origins)
        limits = self.config.limits
        self.connections.total_cap = limits.max_connections
        self.connections.per_address_cap = limits.max_connections_per_ip
        self.room_creations.retune(limits.room_create_rate, limits.room_create_burst)
        self._rest = self._rest_api()
        return pending

    def _rest_api(self) -> RestApi:
        # /health speaks for the port. Under socket activation the port stays served while a
        # process drains (its successor takes the backlog), so what the draining process still
        # answers says "healthy"; only a port that is going away says "shutting-down".
        # With metrics.bind, /metrics is served on that listener only, never on the public port.
        metrics = self._metrics.render if self._metrics is not None and not self.config.metrics.bind else None
        return RestApi(
            self.config,
            self._hub,
            lambda: self.draining and not self._inherited,
            self.room_creations,
            metrics=metrics,
        )

    def _state(self) -> State:
        if not self.config.cluster.redis_url:
            return State(len(self._websockets), len(self._hub), self._hub.user_count)
        hub = self._hub
        return State(len(self._websockets), len(hub), hub.user_count, hub.problem is not None, hub.redis_queue_bytes)

    def status(self) -> str:
        """One line for ``systemctl status``."""
        counts = f"{len(self._hub)} rooms, {self._hub.user_count} users"
        return f"draining: {len(self._websockets)} WebSockets left, {counts}" if self.draining else counts

    def _listen(self) -> list[socket.socket]:
        if self._inherited:
            for sock in self._inherited:
                sock.setblocking(False)
            return self._inherited
        host, port = self.config.server.host, self.config.server.port
        try:
            return listening_sockets(host, port, reuse_port=self.config.server.reuse_port)
        except OSError as exc:
            raise ConfigError("server.port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    def _listen_for_metrics(self, bind: str) -> list[socket.socket]:
        host, port = split_bind(bind)
        try:
            return listening_sockets(host, port)
        except OSError as exc:
            raise ConfigError("metrics.bind", f"cannot listen on {bind}: {exc.strerror or exc}") from None

    def _opened(
        self, sock: socket.socket, address: object, tls: ssl.SSLContext | None, http_host: Host
    ) -> tuple[HttpConnection, str]:
        """A connection just accepted, counted as open from now on, and its "host:port"."""
        host, port = peer_of(address)
        remote = f"{host}:{port}"
        stream: Stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_side=True, https_compatible=True)
        # Under TLS the socket carries ciphertext: only the stream may write it.
        connection = HttpConnection(http_host, stream, host, remote, sock if tls is None else None)
        self._connections.add(connection)
        return connection, remote

    async def _handle(self, connection: HttpConnection, remote: str) -> None:
        try:
            await connection.run()
        except Exception:
            # A bug in one connection's code must not take the server down with it.
            log.exception("%s: connection failed", remote)
        finally:
            self._connections.discard(connection)
            if self.draining and not self._connections:
                self._connections_gone.set()

    async def _accept(
        self,
        listeners: Sequence[tuple[socket.socket, ssl.SSLContext | None, Host]],
        connections: trio.Nursery,
        *,
        task_status: trio.TaskStatus[trio.CancelScope],
    ) -> None:
        """Accept into ``connections`` until the scope handed to ``task_status`` is cancelled.

        The connections run in the caller's nursery, so cancelling the scope stops accepting
        and nothing else. Each listener's connections are served by its ``Host``: the server, or
        the ``metrics.bind`` endpoint.
        """
        with trio.CancelScope() as accepting:
            task_status.started(accepting)
            async with trio.open_nursery() as nursery:
                for listening, tls, http_host in listeners:
                    nursery.start_soon(self._accept_one, listening, tls, http_host, connections)

    async def _accept_one(
        self, listening: socket.socket, tls: ssl.SSLContext | None, http_host: Host, connections: trio.Nursery
    ) -> None:
        """Not trio.serve_listeners: a connection must count as open from the moment it is
        accepted, before its task first runs, or a drain that starts in between would find
        no connection, end at once, and cut the one whose task then starts. And connections
        come in batches (``_sockets.accepted``): a join storm pays one wake-up per batch.
        """
        while True:
            try:
                batch = await accepted(listening)
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("cannot accept a connection: %s; retrying in %.1f s", exc.strerror, ACCEPT_RETRY_SECONDS)
                await trio.sleep(ACCEPT_RETRY_SECONDS)
                continue
            for sock, address in batch:
                connections.start_soon(self._handle, *self._opened(sock, address, tls, http_host))

    async def serve(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until ``shutdown()``, then drain; ``task_status.started`` once accepting."""
        tls = tls_context(self.config.server)
        if self.config.cluster.redis_url:
            from ._cluster import open_cluster  # coredis is imported only in cluster mode

            async with open_cluster(self.config) as cluster_hub, trio.open_nursery() as rooms:
                await self._serve(cluster_hub(rooms, self.observer), rooms, tls, task_status)
                rooms.cancel_scope.cancel()
        else:
            async with open_room_store(self.config.storage.path) as store, trio.open_nursery() as rooms:
                ice = IceServers.from_config(self.config.ice)
                hub = RoomHub(self.config.rooms, rooms, store=store, ice=ice, observer=self.observer)
                for saved in store.saved if store is not None else ():
                    hub.restore(saved.id, saved.name, saved.max_participants, saved.created_at)
                await self._serve(hub, rooms, tls, task_status)
                rooms.cancel_scope.cancel()
        log.info("stopped")

    async def _serve(
        self, hub: RoomHub, rooms: trio.Nursery, tls: ssl.SSLContext | None, task_status: trio.TaskStatus[Server]
    ) -> None:
        """Listen and serve with ``hub`` until ``shutdown()``, then drain; ``rooms`` holds background tasks."""
        server_config = self.config.server
        self._hub = hub
        self._rest = self._rest_api()
        listeners = self._listen()
        self.port = listeners[0].getsockname()[1]
        served: list[tuple[socket.socket, ssl.SSLContext | None, Host]] = [(sock, tls, self) for sock in listeners]
        metrics_listeners: list[socket.socket] = []
        if self._metrics is not None:
            rooms.start_soon(self._metrics.watch_event_loop)
            if self.config.metrics.bind:
                metrics_listeners = self._listen_for_metrics(self.config.metrics.bind)
                self.metrics_port = metrics_listeners[0].getsockname()[1]
                endpoint = _MetricsEndpoint(self, self._metrics)
                served += [(sock, None, endpoint) for sock in metrics_listeners]
                log.info("metrics on %s", ", ".join(_address(sock) for sock in metrics_listeners))
        async with trio.open_nursery() as connections:
            accepting = await connections.start(self._accept, served, connections)
            log.info(
                "listening on %s%s%s",
                ", ".join(_address(sock) for sock in listeners),
                " with TLS" if tls else "",
                " (sockets from systemd)" if self._inherited else "",
            )
            task_status.started(self)
            await self._stop.wait()
            self.draining = True
            # Cancelling first means no accept is waiting when the sockets close (and no
            # connection is accepted after this). Closing drops only our descriptor of a
            # socket from systemd: it keeps listening.
            accepting.cancel()
            for sock in (*listeners, *metrics_listeners):
                trio.lowlevel.notify_closing(sock)
                sock.close()
            log.info(
                "shutting down: stopped accepting; closing %d WebSocket(s), finishing %d HTTP connection(s)",
                len(self._websockets),
                len(self._connections) - len(self._websockets),
            )
            for connection in list(self._connections):
                connection.close_if_idle()
            clustered = bool(self.config.cluster.redis_url)
            for websocket in list(self._websockets):
                if clustered:
                    websocket.close(CLOSE_GOING_AWAY, SHUTTING_DOWN_RESUME, keep_seat=True)
                else:
                    websocket.close(CLOSE_GOING_AWAY, SHUTTING_DOWN)
            if not self._connections:
                self._connections_gone.set()
            grace_ends = trio.current_time() + server_config.shutdown_grace
            with trio.move_on_at(grace_ends):
                await self._connections_gone.wait()
            if self._connections:
                log.warning("shutdown_grace passed: cutting %d connection(s)", len(self._connections))
            connections.cancel_scope.cancel()
        await hub.hand_over(grace_ends)


def _address(sock: socket.socket) -> str:
    host, port, *_ = sock.getsockname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _MetricsEndpoint:
    """The ``Host`` of the ``metrics.bind`` listener: GET /metrics, and nothing else at all."""

    def __init__(self, server: Server, metrics: Metrics) -> None:
        self._server = server
        self._metrics = metrics

    @property
    def request_timeout(self) -> float:
        return self._server.request_timeout

    @property
    def draining(self) -> bool:
        return self._server.draining

    def client_key(self, peer_host: str, forwarded_for: str | None) -> str:
        return peer_host

    def cors_headers(self, origin: str | None) -> list[tuple[str, str]]:
        return []  # for Prometheus, not for pages in browsers

    async def respond(self, request: HttpRequest) -> HttpResponse:
        if request.path != "/metrics":
            return error_response(404, "not-found", f"no such path: {request.path[:200]}; this port serves /metrics")
        if request.method != "GET":
            return error_response(
                405, "method-not-allowed", f"{request.method} is not allowed here; use GET", [("Allow", "GET")]
            )
        return exposition_response(self._metrics.render)

    def admit(self, method: str, headers: Mapping[str, str], client: str) -> HttpResponse | Admission:
        return error_response(404, "not-found", "no WebSockets on this port: it serves /metrics")
