"""The REST API: from a parsed request to a response.

Transport concerns (h11, timeouts, body size caps, keep-alive) live in ``_connection``;
this module only decides what each route answers. Handlers are async because in cluster
mode the hub answers about rooms from Redis (see ``_cluster``); alone, it answers at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import attrs

from ._auth import ApiKeys
from ._config import Config
from ._cors import CorsPolicy
from ._hub import ClusterUnavailable, RoomHub, RoomInfo, TooManyRooms
from ._ids import format_timestamp, utc_now
from ._limits import BucketsByKey, retry_after
from ._messages import CLUSTER_UNAVAILABLE, RATE_LIMITED, ROOM_ID, TOO_MANY_ROOMS, UNAUTHORIZED
from ._static import load_assets

MAX_ROOM_NAME = 100
#: Request bodies larger than this get 413 (enforced while reading, in ``_connection``).
MAX_BODY_BYTES = 64 * 1024
#: Methods that change state: with ``auth.api_keys`` set, they need a key.
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@attrs.frozen
class HttpRequest:
    method: str
    target: str
    #: Lower-case header names; repeated headers joined with ", ".
    headers: Mapping[str, str] = attrs.field(factory=dict)
    body: bytes = b""
    #: The client's per-address key (see ``_addresses``), for per-address limits.
    client: str = ""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@attrs.frozen
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


def json_response(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return HttpResponse(
        status,
        [("Content-Type", "application/json"), ("Cache-Control", "no-store"), *(headers or [])],
        body,
    )


def error_response(status: int, code: str, message: str, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    return json_response(status, {"error": code, "message": message}, headers)


def room_json(room: RoomInfo, *, with_participants: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": room.id,
        "name": room.name,
        "participantCount": room.participant_count,
        "maxParticipants": room.max_participants,
        "createdAt": format_timestamp(room.created_at),
    }
    if with_participants:
        body["participants"] = [
            {"peerId": member.peer_id, "username": member.username, "joinedAt": format_timestamp(member.joined_at)}
            for member in room.members
        ]
    return body


class RestApi:
    """Routes: GET /health, GET/POST /api/rooms, GET /api/rooms/<id>, GET /api/ice-servers,
    the demo's files when ``demo.enabled``, GET /metrics when given ``metrics`` (the exposition
    and its Content-Type), plus CORS preflight. (``/ws`` is ``_upgrade``'s.)"""

    def __init__(
        self,
        config: Config,
        hub: RoomHub,
        is_draining: Callable[[], bool],
        room_creations: BucketsByKey,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
        metrics: Callable[[], tuple[bytes, str]] | None = None,
    ) -> None:
        self._config = config
        self._cors = CorsPolicy(config.cors.allowed_origins)
        self._hub = hub
        self._is_draining = is_draining
        self._clock = clock
        #: Only the static servers: TURN credentials go to room members, never to a public URL.
        self._ice_servers = {"iceServers": hub.ice.public()}
        self._assets = load_assets() if config.demo.enabled else {}
        self._monotonic = monotonic
        self._api_keys = ApiKeys(config.auth.api_keys)
        self._room_creations = room_creations
        self._metrics = metrics

    def _route(self, path: str) -> tuple[tuple[str, ...], Callable[[HttpRequest], Awaitable[HttpResponse]]] | None:
        """The methods a path allows and the handler for them, or None if no such path."""
        if path == "/health":
            return ("GET",), self._health
        if path == "/api/rooms":
            return ("GET", "POST"), self._rooms
        if path.startswith("/api/rooms/"):
            room_id = path.removeprefix("/api/rooms/")
            return ("GET",), lambda request: self._room(room_id)
        if path == "/api/ice-servers":
            return ("GET",), self._ice
        if path == "/metrics" and self._metrics is not None:
            return ("GET",), self._exposition
        asset = self._assets.get(path)
        if asset is not None:

            async def serve_asset(request: HttpRequest) -> HttpResponse:
                return HttpResponse(*asset.respond(request.headers.get("if-none-match")))

            return ("GET",), serve_asset
        return None

    async def handle(self, request: HttpRequest) -> HttpResponse:
        origin = request.headers.get("origin")
        cors = self._cors.headers(origin)
        route = self._route(request.path)
        if route is None:
            return error_response(404, "not-found", f"no such path: {request.path[:200]}", cors)
        methods, handler = route
        if request.method == "OPTIONS":
            return self._preflight(origin, methods)
        if request.method not in methods:
            allow = ", ".join((*methods, "OPTIONS"))
            return error_response(
                405,
                "method-not-allowed",
                f"{request.method} is not allowed here; use {allow}",
                [("Allow", allow), *cors],
            )
        if request.method in MUTATING and not self._api_keys.allows(request.headers.get("authorization")):
            return error_response(
                401,
                UNAUTHORIZED,
                "this call needs an API key: Authorization: Bearer <key>",
                [("WWW-Authenticate", 'Bearer realm="signald"'), *cors],
            )
        try:
            response = await handler(request)
        except ClusterUnavailable as exc:
            response = error_response(503, CLUSTER_UNAVAILABLE, str(exc))
        return attrs.evolve(response, headers=[*response.headers, *cors])

    def _preflight(self, origin: str | None, methods: tuple[str, ...]) -> HttpResponse:
        allow = (*methods, "OPTIONS")
        if origin is None:
            return HttpResponse(204, [("Allow", ", ".join(allow))])
        if not self._cors.allows(origin):
            return error_response(
                403, "origin-not-allowed", f"origin {origin[:200]} is not allowed", self._cors.headers(origin)
            )
        return HttpResponse(204, self._cors.preflight_headers(origin, allow))

    async def _ice(self, request: HttpRequest) -> HttpResponse:
        return json_response(200, self._ice_servers)

    async def _health(self, request: HttpRequest) -> HttpResponse:
        draining = self._is_draining()
        problem = self._hub.problem
        try:
            rooms, users = await self._hub.counts()
        except ClusterUnavailable:
            rooms, users = len(self._hub), self._hub.user_count  # what this node holds
        body: dict[str, Any] = {
            "status": "shutting-down" if draining else "degraded" if problem else "healthy",
            "rooms": rooms,
            "users": users,
            "timestamp": format_timestamp(self._clock()),
        }
        if problem:
            body["reason"] = problem
        return json_response(503 if draining else 200, body)

    async def _rooms(self, request: HttpRequest) -> HttpResponse:
        if request.method == "GET":
            return json_response(200, {"rooms": [room_json(room) for room in await self._hub.rooms()]})
        wait = self._room_creations.take(request.client, self._monotonic())
        if wait:
            limits = self._config.limits
            return error_response(
                429,
                RATE_LIMITED,
                f"too many rooms created from {request.client}: {limits.room_create_rate:g}/s, "
                f"burst {limits.room_create_burst}",
                [("Retry-After", retry_after(wait))],
            )
        try:
            body = json.loads(request.body)
        except (ValueError, RecursionError):
            return error_response(400, "invalid-json", "request body is not valid JSON")
        problem = self._check_new_room(body)
        if problem is not None:
            return error_response(400, "invalid-body", problem)
        try:
            room = await self._hub.create_room(body["name"], body.get("maxParticipants"))
        except TooManyRooms as exc:
            return error_response(503, TOO_MANY_ROOMS, str(exc))
        return json_response(201, room_json(room), [("Location", f"/api/rooms/{room.id}")])

    def _check_new_room(self, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "body must be a JSON object"
        name = body.get("name")
        if not isinstance(name, str) or not name.strip():
            return "'name' is required: a non-empty string"
        if len(name) > MAX_ROOM_NAME:
            return f"'name' must be at most {MAX_ROOM_NAME} characters"
        limit = self._config.rooms.max_participants
        count = body.get("maxParticipants")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= limit):
            return f"'maxParticipants' must be an integer from 2 to {limit}"
        return None

    async def _room(self, room_id: str) -> HttpResponse:
        room = await self._hub.room(room_id) if ROOM_ID.fullmatch(room_id) else None
        if room is None:
            return error_response(404, "room-not-found", f"room {room_id[:64]} does not exist")
        return json_response(200, room_json(room, with_participants=True))

    async def _exposition(self, request: HttpRequest) -> HttpResponse:
        assert self._metrics is not None
        return exposition_response(self._metrics)


def exposition_response(render: Callable[[], tuple[bytes, str]]) -> HttpResponse:
    """GET /metrics: what ``render`` gives, the exposition and its Content-Type."""
    body, content_type = render()
    return HttpResponse(200, [("Content-Type", content_type), ("Cache-Control", "no-store")], body)
