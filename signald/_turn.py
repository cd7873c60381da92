"""ICE servers for room members: the static ``ice.servers`` plus short-lived TURN credentials.

TURN relays cost bandwidth, so a TURN server wants to know who may use it; a password handed to
every visitor of a public URL, forever, is no control at all. coturn's ``use-auth-secret``
scheme (the "TURN REST API" draft, which every TURN server and service also accepts) needs no
shared database: signald and the TURN server share one secret, and signald mints each member a
username ``"<expiry>:<peerId>"`` with the password ``base64(HMAC-SHA1(secret, username))``. The
TURN server recomputes the HMAC, and refuses a username whose expiry (Unix seconds) has passed.

Credentials go only to room members (in ``joined-room`` and in answer to ``get-ice-servers``),
never to ``GET /api/ice-servers``, so only someone who got into a room can use the relay, for
``ice.turn_ttl`` seconds. Pure: the clock is passed in, nothing here does I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import attrs

from ._config import IceConfig, IceServer


def turn_credential(secret: str, username: str) -> str:
    """The password coturn expects for ``username`` under ``static-auth-secret = secret``."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def turn_username(peer_id: str, now: float, ttl: int) -> str:
    """``"<expiry>:<peerId>"``: coturn reads the part before the colon as the expiry time."""
    return f"{int(now) + ttl}:{peer_id}"


def ice_server_json(server: IceServer) -> dict[str, Any]:
    """An ``RTCIceServer`` dictionary: exactly what ``new RTCPeerConnection`` expects."""
    body: dict[str, Any] = {"urls": list(server.urls)}
    if server.username is not None:
        body["username"] = server.username
    if server.credential is not None:
        body["credential"] = server.credential
    return body


@attrs.frozen
class IceServers:
    """The ``iceServers`` list, for the public route and for each member.

    ``turn_urls``, ``turn_secret`` and ``turn_ttl`` come from ``[ice]``; without a secret there
    is nothing to mint and every member gets the static list.
    """

    static: tuple[dict[str, Any], ...] = ()
    turn_urls: tuple[str, ...] = ()
    turn_secret: str = attrs.field(default="", repr=False)
    turn_ttl: int = 3600
    #: Unix time in seconds: the TURN server compares the expiry with its own wall clock.
    clock: Callable[[], float] = time.time

    @classmethod
    def from_config(cls, ice: IceConfig, clock: Callable[[], float] = time.time) -> IceServers:
        return cls(tuple(ice_server_json(s) for s in ice.servers), ice.turn_urls, ice.turn_secret, ice.turn_ttl, clock)

    @property
    def mints(self) -> bool:
        """Whether members get TURN credentials of their own (then ``joined-room`` carries them)."""
        return bool(self.turn_secret)

    def public(self) -> list[dict[str, Any]]:
        """What anyone may see (``GET /api/ice-servers``): the static servers only."""
        return list(self.static)

    def for_member(self, peer_id: str) -> list[dict[str, Any]]:
        """The static servers plus, with a secret, a TURN entry valid for ``turn_ttl`` from now.

        The one place a member's ``iceServers`` is built: ``joined-room``, ``ice-servers`` (and
        any later message that hands a member its servers) all call this.
        """
        servers = list(self.static)
        if self.mints:
            username = turn_username(peer_id, self.clock(), self.turn_ttl)
            credential = turn_credential(self.turn_secret, username)
            servers.append({"urls": list(self.turn_urls), "username": username, "credential": credential})
        return servers
