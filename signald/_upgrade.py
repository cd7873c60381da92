"""The WebSocket upgrade, decided in one place: every request for ``/ws`` is judged here.

h11 has parsed the request; this module says whether it becomes a WebSocket, and if not, which
documented JSON error refuses it (docs/protocol.md, "Handshake refusals", in this order):
503 ``shutting-down``, 403 ``origin-not-allowed``, 400 ``bad-upgrade`` (not a GET, no
``Upgrade: websocket``, no ``upgrade`` token in ``Connection``, a ``Sec-WebSocket-Key`` that is
not 16 bytes of base64), 426 ``bad-upgrade`` (``Sec-WebSocket-Version`` other than 13), then the
connection caps (429 ``too-many-connections``, 503 ``server-full``). A request for ``/ws`` with
no ``Upgrade`` header at all is answered 426 ``upgrade-required``, and a method other than GET
(or OPTIONS, a CORS preflight, which ``_rest`` answers) gets 405.

Pure: no I/O, no clock. The caller holds the connection count with no checkpoint between
``refusal`` and ``ConnectionCounter.hold``, so no other handshake can slip past the caps.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Mapping

from ._cors import CorsPolicy
from ._limits import ConnectionCounter, Refusal
from ._rest import HttpResponse, error_response

log = logging.getLogger("signald.http")

PATH = "/ws"
#: RFC 6455 section 1.3: appended to the client's key, hashed, and sent back as proof.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",")}


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False


def refusal(
    method: str,
    headers: Mapping[str, str],
    client: str,
    *,
    draining: bool,
    cors: CorsPolicy,
    connections: ConnectionCounter,
) -> HttpResponse | None:
    """Why this request for ``/ws`` may not become a WebSocket, as the response that says so.

    ``headers`` have lower-case names, repeats joined with ", "; ``client`` is the per-address
    key the connection caps count under.
    """
    origin = headers.get("origin")
    cors_headers = cors.headers(origin)
    if "upgrade" not in headers:
        if method != "GET":
            allow = [("Allow", "GET"), *cors_headers]
            return error_response(405, "method-not-allowed", f"{method:.20} is not allowed here; use GET", allow)
        return error_response(
            426,
            "upgrade-required",
            "/ws speaks WebSocket only",
            [("Upgrade", "websocket"), ("Connection", "Upgrade"), *cors_headers],
        )
    if draining:
        return error_response(503, "shutting-down", "the server is shutting down", cors_headers)
    if not cors.allows(origin):
        return error_response(403, "origin-not-allowed", f"origin {origin!s:.200} may not connect", cors_headers)
    problem = _handshake_problem(method, headers)
    if problem is not None:
        return error_response(400, "bad-upgrade", problem, cors_headers)
    if headers.get("sec-websocket-version") != "13":
        return error_response(
            426, "bad-upgrade", "Sec-WebSocket-Version must be 13", [("Sec-WebSocket-Version", "13"), *cors_headers]
        )
    if not _valid_key(headers.get("sec-websocket-key", "")):
        return error_response(400, "bad-upgrade", "Sec-WebSocket-Key must be 16 bytes in base64", cors_headers)
    capped = connections.refusal(client)
    if capped is Refusal.ADDRESS:
        log.info("%s: connection refused, %d open from this address", client, connections.count(client))
        return error_response(
            429,
            "too-many-connections",
            f"{connections.per_address_cap} connections from {client} are open already",
            cors_headers,
        )
    if capped is Refusal.SERVER:
        log.info("connection from %s refused, %d open in total", client, connections.total)
        return error_response(503, "server-full", "the server has as many connections as it takes", cors_headers)
    return None


def _handshake_problem(method: str, headers: Mapping[str, str]) -> str | None:
    if method != "GET":
        return "a WebSocket upgrade must be a GET"
    if "websocket" not in _tokens(headers.get("upgrade", "")):
        return "only the websocket upgrade is served on /ws"
    if "upgrade" not in _tokens(headers.get("connection", "")):
        return "Connection must include upgrade"
    return None


def accept_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The 101's headers for an upgrade ``refusal`` has let through."""
    digest = hashlib.sha1(headers["sec-websocket-key"].encode("ascii") + _GUID).digest()
    return [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", base64.b64encode(digest).decode("ascii")),
    ]
