"""Access control under attack: forged, expired and misdirected tokens; REST calls without keys."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from signald import Server

from .._clients import connect, http_request
from ._harness import ABUSER, honest_pair

SECRET = "an-app-server-secret-of-at-least-32-characters"
KEY = "api-key-0123456789abcdef"


def token(secret: str = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


@pytest.fixture
async def guarded(server_factory: Callable[..., Any]) -> Server:
    return await server_factory(auth={"secret": SECRET, "api_keys": [KEY]})


@pytest.mark.parametrize(
    ("join", "why"),
    [
        ({}, "requires a token"),
        ({"token": None}, "requires a token"),
        ({"token": token(room="target", exp=int(time.time()) - 5)}, "expired"),
        ({"token": token(secret="guessed-secret-guessed-secret-guessed", room="target")}, "signature"),
        ({"token": token(room="other-room")}, "not valid for room target"),
        ({"token": token(room="target", sub="mallory")}, "another username"),
        ({"token": token(sub="eve")}, "no 'room' claim"),
        ({"token": jwt.encode({"room": "*"}, None, algorithm="none")}, "invalid"),
        ({"token": token(room="target")[:-4] + "AAAA"}, "signature"),
        ({"token": "garbage"}, "invalid"),
    ],
    ids=["missing", "null", "expired", "forged", "wrong-room", "wrong-user", "no-room", "alg-none", "tampered", "junk"],
)
async def test_bad_tokens_are_unauthorized_and_join_nothing(guarded: Server, join: dict[str, Any], why: str) -> None:
    assert guarded.port
    good = token(room="honest")
    async with honest_pair(guarded, token=good) as pair, connect(guarded.port) as bad:
        await bad.send(type="join-room", roomId="target", username="eve", requestId="j", **join)
        reply = await bad.expect("error", code="unauthorized", requestId="j")
        assert why in reply["message"]
        await pair.exchange()
        assert guarded.hub.get("target") is None  # not even created
        # Still not in a room: a relay is refused as such.
        await bad.send(type="webrtc-offer", to=pair.alice.peer_id, sdp="x")
        await bad.expect("error", code="not-in-room")
        # Nor can a token for the honest room put an impostor next to them under another name.
        await bad.send(type="join-room", roomId="honest", username="eve", token=token(room="honest", sub="alice"))
        await bad.expect("error", code="unauthorized")


async def test_good_tokens_join(guarded: Server) -> None:
    assert guarded.port
    async with connect(guarded.port) as a, connect(guarded.port) as b:
        await a.join("call", "alice", token=token(room="call", sub="alice", exp=int(time.time()) + 60))
        await b.join("call", "bob", token=token(room="*"))
        await a.expect("user-joined", username="bob")


async def test_rest_needs_an_api_key_to_create(guarded: Server) -> None:
    assert guarded.port
    body = {"name": "standup"}
    for headers in ([], [("Authorization", "Bearer wrong-key-0123456789")], [("Authorization", KEY)]):
        status, response_headers, reply = await http_request(guarded.port, "POST", "/api/rooms", body, headers)
        assert (status, reply["error"]) == (401, "unauthorized")
        assert response_headers["www-authenticate"] == 'Bearer realm="signald"'
    _, _, listing = await http_request(guarded.port, "GET", "/api/rooms")
    assert listing["rooms"] == []
    status, _, room = await http_request(
        guarded.port, "POST", "/api/rooms", body, [("Authorization", f"Bearer {KEY}")], source=ABUSER
    )
    assert status == 201 and room["name"] == "standup"
    # Reading stays open, and so does /health; preflight needs no key (browsers send none).
    for path in ("/health", "/api/rooms", f"/api/rooms/{room['id']}"):
        status, _, _ = await http_request(guarded.port, "GET", path)
        assert status == 200, path
    preflight = [("Origin", "https://app.example"), ("Access-Control-Request-Method", "POST")]
    status, headers, _ = await http_request(guarded.port, "OPTIONS", "/api/rooms", headers=preflight)
    assert status == 204 and "Authorization" in headers["access-control-allow-headers"]
    # A 401 carries CORS headers, so a browser app can read why.
    status, headers, _ = await http_request(
        guarded.port, "POST", "/api/rooms", body, [("Origin", "https://app.example")]
    )
    assert status == 401 and headers["access-control-allow-origin"] == "https://app.example"
