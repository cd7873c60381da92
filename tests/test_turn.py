"""TURN credentials for members: minting (pure, with a fixed clock), config, and the wire messages.

That coturn accepts these credentials, and refuses those minted with another secret, is proven
with a real coturn in test_aiortc.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from signald import _messages as m
from signald._config import ConfigError, structure
from signald._turn import IceServers, turn_credential, turn_username

from ._clients import connect, http_request

SECRET = "north-wind-0123456789"
PEER = "N8yHf2sKq5WzUo1GvJ6iLg"
STUN = {"urls": ["stun:stun.example.com:3478"]}
TURN_URLS = ["turn:turn.example.com:3478", "turns:turn.example.com:5349"]


def test_credential_is_base64_hmac_sha1_of_the_username() -> None:
    # printf '%s' 1700003600:N8yHf2sKq5WzUo1GvJ6iLg | openssl dgst -sha1 -hmac north-wind-0123456789 -binary | base64
    assert turn_credential(SECRET, f"1700003600:{PEER}") == "k35h4ptRlpS1t9FKU1eG0IwWFfA="


def test_username_is_expiry_colon_peer_id() -> None:
    assert turn_username(PEER, 1_700_000_000.9, 3600) == f"1700003600:{PEER}"


def test_member_gets_static_servers_then_its_own_turn_entry() -> None:
    config = structure({"ice": {"servers": [STUN], "turn_urls": TURN_URLS, "turn_secret": SECRET}})
    ice = IceServers.from_config(config.ice, clock=lambda: 1_700_000_000.0)
    assert ice.mints
    assert ice.for_member(PEER) == [
        STUN,
        {"urls": TURN_URLS, "username": f"1700003600:{PEER}", "credential": "k35h4ptRlpS1t9FKU1eG0IwWFfA="},
    ]
    assert ice.public() == [STUN]  # what GET /api/ice-servers shows: no credentials


def test_credentials_follow_the_clock_and_ttl() -> None:
    now = [1_700_000_000.0]
    config = structure({"ice": {"turn_urls": TURN_URLS[:1], "turn_secret": SECRET, "turn_ttl": 60}})
    ice = IceServers.from_config(config.ice, clock=lambda: now[0])
    first = ice.for_member(PEER)[0]
    now[0] += 30
    later = ice.for_member(PEER)[0]
    assert (first["username"], later["username"]) == (f"1700000060:{PEER}", f"1700000090:{PEER}")
    assert later["credential"] == turn_credential(SECRET, later["username"]) != first["credential"]
    assert ice.for_member("other")[0]["username"] == "1700000090:other"


def test_without_a_secret_members_get_the_static_list() -> None:
    ice = IceServers.from_config(structure({"ice": {"servers": [STUN]}}).ice)
    assert not ice.mints
    assert ice.for_member(PEER) == ice.public() == [STUN]


def test_secret_stays_out_of_repr() -> None:
    config = structure({"ice": {"turn_urls": TURN_URLS, "turn_secret": SECRET}})
    assert SECRET not in repr(config) and SECRET not in repr(IceServers.from_config(config.ice))


@pytest.mark.parametrize(
    ("ice", "key", "words"),
    [
        ({"turn_urls": ["stun:stun.example.com"], "turn_secret": SECRET}, "ice.turn_urls", "not a TURN URL"),
        ({"turn_urls": "turn:t.example.com", "turn_secret": SECRET}, "ice.turn_urls", "list of strings"),
        ({"turn_secret": SECRET}, "ice.turn_urls", "required when ice.turn_secret is set"),
        ({"turn_urls": TURN_URLS}, "ice.turn_secret", "required when ice.turn_urls is set"),
        ({"turn_urls": TURN_URLS, "turn_secret": "short"}, "ice.turn_secret", "at least 16"),
        ({"turn_urls": TURN_URLS, "turn_secret": SECRET, "turn_ttl": 10}, "ice.turn_ttl", "at least 60"),
        ({"turn_urls": TURN_URLS, "turn_secret": SECRET, "turn_ttl": 60.5}, "ice.turn_ttl", "integer"),
    ],
)
def test_bad_turn_settings_name_their_key(ice: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        structure({"ice": ice})
    assert info.value.key == key and words in str(info.value)
    assert SECRET not in str(info.value)


def test_get_ice_servers_parses_and_encodes() -> None:
    assert m.parse(json.dumps({"type": "get-ice-servers", "requestId": 4})) == m.GetIceServers(4)
    assert json.loads(m.encode_ice_servers([STUN], "r")) == {
        "type": "ice-servers",
        "iceServers": [STUN],
        "requestId": "r",
    }
    assert json.loads(m.encode_ice_servers([])) == {"type": "ice-servers", "iceServers": []}


TURN_CONFIG = {"servers": [STUN], "turn_urls": TURN_URLS, "turn_secret": SECRET, "turn_ttl": 600}


def check_turn_entry(servers: list[dict[str, Any]], peer_id: str) -> None:
    assert servers[0] == STUN
    turn = servers[1]
    assert turn["urls"] == TURN_URLS
    expiry, _, who = turn["username"].partition(":")
    assert who == peer_id and abs(int(expiry) - (time.time() + 600)) < 60  # ice.turn_ttl from now
    assert turn["credential"] == turn_credential(SECRET, turn["username"])


async def test_members_get_turn_credentials_in_joined_room_and_on_request(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(ice=TURN_CONFIG)
    async with connect(server.port) as a, connect(server.port) as b:
        joined = await a.join("turn", "ada")
        assert a.peer_id
        check_turn_entry(joined["iceServers"], a.peer_id)
        await b.join("turn", "bob")
        user_joined = await a.expect("user-joined")
        assert "iceServers" not in user_joined  # nobody sees another member's credentials
        await a.send(type="get-ice-servers", requestId="fresh")
        fresh = await a.expect("ice-servers", requestId="fresh")
        check_turn_entry(fresh["iceServers"], a.peer_id)
        expiry = int(joined["iceServers"][1]["username"].split(":")[0])
        assert int(fresh["iceServers"][1]["username"].split(":")[0]) >= expiry
    status, _, body = await http_request(server.port, "GET", "/api/ice-servers")
    assert (status, body) == (200, {"iceServers": [STUN]})  # the public route never carries credentials


async def test_a_resumed_member_gets_fresh_credentials_of_its_own(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(ice=TURN_CONFIG)
    async with connect(server.port) as a, connect(server.port) as a_again:
        joined = await a.join("turn", "ada")
        await a_again.send(type="resume", token=joined["resumeToken"])  # takes over: a is closed with 4001
        resumed = await a_again.expect("resumed", peerId=a.peer_id)
        assert a.peer_id
        check_turn_entry(resumed["iceServers"], a.peer_id)


async def test_get_ice_servers_outside_a_room_is_not_in_room(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(ice=TURN_CONFIG)
    async with connect(server.port) as client:
        await client.send(type="get-ice-servers", requestId=1)
        await client.expect("error", code="not-in-room", requestId=1)
        await client.join("r", "ada")
        await client.send(type="leave-room")
        await client.send(type="get-ice-servers")
        await client.expect("error", code="not-in-room")


async def test_without_a_turn_secret_joined_room_is_unchanged(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(ice={"servers": [STUN]})
    async with connect(server.port) as client:
        joined = await client.join("r", "ada")
        assert set(joined) == {"type", "roomId", "peerId", "username", "participants", "resumeToken", "resumeGrace"}
        await client.send(type="get-ice-servers")
        await client.expect("ice-servers", iceServers=[STUN])
