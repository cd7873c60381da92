"""REST routes, CORS, and the HTTP transport (keep-alive, malformed input, timeouts, limits).

Tests that take ``topology`` run twice: against one process, and against two cluster nodes
on a real Redis (tests/_topology.py), where what one node is asked must show the whole
cluster (a room created on one node is listed and joinable on the other, /health counts
every node's rooms and members). The tests that take ``server`` are about one process's
HTTP transport, which a cluster does not change: body and head limits, malformed or slow
requests, routing without state, the WebSocket upgrade's validation and its 101.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import h11
import pytest
import trio

from signald import Server

from ._clients import TIMEOUT, http_request, joined_pair, read_response
from ._topology import Topology

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z")


async def test_health(topology: Topology) -> None:
    for port in topology.ports:
        status, headers, body = await http_request(port, "GET", "/health")
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert set(body) == {"status", "rooms", "users", "timestamp"}
        assert body["status"] == "healthy" and body["rooms"] == 0 and body["users"] == 0
        assert TIMESTAMP.fullmatch(body["timestamp"])
    async with topology.connect(0) as a, topology.connect(1) as b, topology.connect(2), topology.connect(3) as d:
        await a.join("x", "a")
        await b.join("y", "b")
        await d.join("y", "d")
        for port in topology.ports:  # every node counts every node's rooms and members
            _, _, body = await http_request(port, "GET", "/health")
            assert (body["rooms"], body["users"]) == (2, 3)  # the third connection is in no room


async def test_create_list_and_get_rooms(topology: Topology) -> None:
    first, last = topology.port(0), topology.port(1)  # with two nodes: made on one, seen on the other
    status, headers, room = await http_request(first, "POST", "/api/rooms", {"name": "Daily standup"})
    assert status == 201
    assert headers["location"] == f"/api/rooms/{room['id']}"
    assert set(room) == {"id", "name", "participantCount", "maxParticipants", "createdAt"}
    assert room["name"] == "Daily standup" and room["participantCount"] == 0 and room["maxParticipants"] == 16
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,64}", room["id"])  # 96 random bits
    assert TIMESTAMP.fullmatch(room["createdAt"])
    _, _, small = await http_request(last, "POST", "/api/rooms", {"name": "1:1", "maxParticipants": 2})
    assert small["maxParticipants"] == 2
    for port in topology.ports:
        status, _, listing = await http_request(port, "GET", "/api/rooms")
        assert status == 200
        assert {r["id"]: (r["name"], r["maxParticipants"], r["participantCount"]) for r in listing["rooms"]} == {
            room["id"]: ("Daily standup", 16, 0),
            small["id"]: ("1:1", 2, 0),
        }
    async with topology.connect(0) as a, topology.connect(1) as b:
        await a.join(room["id"], "alice")
        await b.join(room["id"], "bob")
        for port in topology.ports:  # members of every node, in join order
            status, _, detail = await http_request(port, "GET", f"/api/rooms/{room['id']}")
            assert status == 200 and detail["participantCount"] == 2
            assert detail["createdAt"] == room["createdAt"] and detail["name"] == "Daily standup"
            joined_at = [p["joinedAt"] for p in detail["participants"]]
            assert detail["participants"] == [
                {"peerId": a.peer_id, "username": "alice", "joinedAt": joined_at[0]},
                {"peerId": b.peer_id, "username": "bob", "joinedAt": joined_at[1]},
            ]
            assert all(TIMESTAMP.fullmatch(at) for at in joined_at)
    # A POSTed room outlives its last member.
    for port in topology.ports:
        _, _, again = await http_request(port, "GET", f"/api/rooms/{room['id']}")
        assert again["participants"] == []


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid-json"),
        (b"", "invalid-json"),
        ([1, 2], "invalid-body"),
        ({}, "invalid-body"),
        ({"name": ""}, "invalid-body"),
        ({"name": "   "}, "invalid-body"),
        ({"name": 5}, "invalid-body"),
        ({"name": "x" * 101}, "invalid-body"),
        ({"name": "ok", "maxParticipants": 1}, "invalid-body"),
        ({"name": "ok", "maxParticipants": 17}, "invalid-body"),
        ({"name": "ok", "maxParticipants": "4"}, "invalid-body"),
        ({"name": "ok", "maxParticipants": True}, "invalid-body"),
    ],
)
async def test_create_room_rejects_bad_bodies(topology: Topology, body: Any, code: str) -> None:
    status, _, reply = await http_request(topology.port(0), "POST", "/api/rooms", body)
    assert status == 400
    assert reply["error"] == code and reply["message"]
    for port in topology.ports:
        _, _, listing = await http_request(port, "GET", "/api/rooms")
        assert listing["rooms"] == []


async def test_body_over_64k_is_413(server: Server) -> None:
    assert server.port
    status, _, reply = await http_request(server.port, "POST", "/api/rooms", b"{" + b" " * 70_000 + b"}")
    assert status == 413 and reply["error"] == "payload-too-large"


async def test_errors_the_transport_answers_carry_cors_headers(server_factory: Callable[..., Any]) -> None:
    """A browser page can read why its request failed, whatever failed it."""
    server = await server_factory(cors={"allowed_origins": ["https://app.example"]}, server={"request_timeout": 0.3})
    origin = [("Origin", "https://app.example")]
    status, headers, _ = await http_request(server.port, "POST", "/api/rooms", b"{" + b" " * 70_000 + b"}", origin)
    assert status == 413 and headers["access-control-allow-origin"] == "https://app.example"
    head = b"POST /api/rooms HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n"
    reply = await raw_exchange(server.port, head + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ") and b"access-control-allow-origin: https://app.example" in reply.lower()
    reply = await raw_exchange(server.port, head + b"Content-Length: 5\r\n\r\n{")  # and then nothing: 408
    assert reply.startswith(b"HTTP/1.1 408 ") and b"access-control-allow-origin: https://app.example" in reply.lower()
    status, headers, _ = await http_request(server.port, "GET", "/nope", headers=origin)
    assert status == 404 and headers["access-control-allow-origin"] == "https://app.example"


async def test_unknown_room_path_and_method(topology: Topology) -> None:
    port = topology.port(1)
    status, _, reply = await http_request(port, "GET", "/api/rooms/does-not-exist")
    assert (status, reply["error"]) == (404, "room-not-found")
    status, _, reply = await http_request(port, "GET", "/api/rooms/bad%20id")
    assert (status, reply["error"]) == (404, "room-not-found")
    status, _, reply = await http_request(port, "GET", "/nope")
    assert (status, reply["error"]) == (404, "not-found")
    status, headers, reply = await http_request(port, "DELETE", "/health")
    assert (status, reply["error"]) == (405, "method-not-allowed")
    assert headers["allow"] == "GET, OPTIONS"
    status, headers, _ = await http_request(port, "PUT", "/api/rooms", {})
    assert status == 405 and headers["allow"] == "GET, POST, OPTIONS"
    status, headers, reply = await http_request(port, "GET", "/ws")
    assert (status, reply["error"]) == (426, "upgrade-required")


async def test_query_strings_are_ignored_for_routing(server: Server) -> None:
    assert server.port
    status, _, _ = await http_request(server.port, "GET", "/health?probe=1")
    assert status == 200


async def test_cors(start_topology: Callable[..., Any]) -> None:
    """On every node, also for answers that come from Redis (a room listing, a created room)."""
    topology = await start_topology(cors={"allowed_origins": ["https://app.example"]})
    good = [("Origin", "https://app.example")]
    bad = [("Origin", "https://evil.example")]
    preflight = [*good, ("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "content-type")]
    for port in topology.ports:
        _, headers, _ = await http_request(port, "GET", "/api/rooms", headers=good)
        assert headers["access-control-allow-origin"] == "https://app.example"
        assert headers["vary"] == "Origin"
        _, headers, _ = await http_request(port, "GET", "/api/rooms", headers=bad)
        assert "access-control-allow-origin" not in headers
        status, headers, _ = await http_request(port, "POST", "/api/rooms", {"name": "x"}, headers=good)
        assert status == 201 and headers["access-control-allow-origin"] == "https://app.example"
        # Errors carry CORS headers too, so the browser app can read them.
        status, headers, _ = await http_request(port, "POST", "/api/rooms", b"nope", headers=good)
        assert status == 400 and headers["access-control-allow-origin"] == "https://app.example"
        status, headers, _ = await http_request(port, "GET", "/missing", headers=good)
        assert status == 404 and headers["access-control-allow-origin"] == "https://app.example"
        status, headers, _ = await http_request(port, "OPTIONS", "/api/rooms", headers=preflight)
        assert status == 204
        assert headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in headers["access-control-allow-methods"]
        assert "Content-Type" in headers["access-control-allow-headers"]
        status, headers, _ = await http_request(port, "OPTIONS", "/api/rooms", headers=bad)
        assert status == 403 and "access-control-allow-origin" not in headers


async def test_wildcard_cors_echoes_any_origin(topology: Topology) -> None:
    for port in topology.ports:
        _, headers, _ = await http_request(port, "GET", "/health", headers=[("Origin", "http://localhost:5173")])
        assert headers["access-control-allow-origin"] == "http://localhost:5173"


async def test_keep_alive_serves_several_requests_on_one_connection(topology: Topology) -> None:
    """Requests answered from Redis (cluster mode) too: /health and a room's details."""
    for port in topology.ports:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            for target in ("/health", "/api/rooms", "/api/rooms/none", "/health"):
                await stream.send_all(conn.send(h11.Request(method="GET", target=target, headers=[("Host", "x")])))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                with trio.fail_after(TIMEOUT):
                    status, _, body = await read_response(conn, stream)
                assert status == (404 if target == "/api/rooms/none" else 200)
                assert body.get("status", "healthy") == "healthy"
                conn.start_next_cycle()


async def test_each_keep_alive_request_has_its_own_request_timeout(server_factory: Callable[..., Any]) -> None:
    """The HTTP phase's one deadline moves with each request: only a single slow request is cut off."""
    server = await server_factory(server={"request_timeout": 1.0})
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        for _ in range(3):  # 1.2 s in all, past one request_timeout; 0.6 s each, well within it
            await trio.sleep(0.6)  # the time a client takes between requests is what is tested
            await stream.send_all(conn.send(h11.Request(method="GET", target="/health", headers=[("Host", "x")])))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            with trio.fail_after(TIMEOUT):
                status, _, _ = await read_response(conn, stream)
            assert status == 200
            conn.start_next_cycle()


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, return everything the server says until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(TIMEOUT):
            while chunk := await stream.receive_some(65536):
                received += chunk
        return received


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # a TLS ClientHello
        b"HELLO\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 20_000,  # an endless head: 431
    ],
)
async def test_malformed_http_gets_400_and_close_and_disturbs_nobody(server: Server, garbage: bytes) -> None:
    assert server.port
    async with joined_pair(server.port, "calm") as (a, b):
        reply = await raw_exchange(server.port, garbage)
        assert re.match(rb"HTTP/1.1 4\d\d ", reply), reply[:100]
        await a.send(type="webrtc-offer", to=b.peer_id, sdp="fine")
        await b.expect("webrtc-offer", sdp="fine")
    status, _, _ = await http_request(server.port, "GET", "/health")
    assert status == 200


async def test_slow_request_head_is_cut_off(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(server={"request_timeout": 0.3})
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
        received = b""
        with trio.fail_after(TIMEOUT):
            while chunk := await stream.receive_some(65536):
                received += chunk
        assert received.startswith(b"HTTP/1.1 408 ")


async def test_idle_keep_alive_connection_is_closed(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(server={"request_timeout": 0.3})
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        with trio.fail_after(TIMEOUT):
            assert await stream.receive_some(100) == b""  # closed without a word


async def test_websocket_upgrade_needs_a_valid_handshake(server: Server) -> None:
    assert server.port
    head = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    reply = await raw_exchange(server.port, head + b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: a2V5\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 426 ") and b"sec-websocket-version: 13" in reply.lower()
    reply = await raw_exchange(server.port, head + b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")


KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, "method-not-allowed"),
        (
            b"POST /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" + KEY + b"\r\n",
            400,
            "bad-upgrade",
        ),
        (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n" + KEY + b"\r\n", 400, "bad-upgrade"),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive\r\n" + KEY + b"\r\n",
            400,
            "bad-upgrade",
        ),
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n\r\n",
            400,
            "bad-upgrade",
        ),  # 5 bytes, not 16
        (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: not base64 at all!!!!!!\r\nSec-WebSocket-Version: 13\r\n\r\n",
            400,
            "bad-upgrade",
        ),
    ],
    ids=["post-no-upgrade", "post-upgrade", "not-websocket", "no-connection-upgrade", "short-key", "garbled-key"],
)
async def test_every_refused_upgrade_gets_the_documented_json_error(
    server: Server, request_bytes: bytes, status: int, code: str
) -> None:
    """RFC 6455's checks, one validator, one error shape; the connection slot is free at once."""
    assert server.port
    reply = await raw_exchange(server.port, request_bytes)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:80]
    assert b'"error":"%s"' % code.encode() in reply
    assert server.connections.total == 0


async def test_the_101_proves_the_key_as_rfc_6455_says(server: Server) -> None:
    assert server.port
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        await stream.send_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n" + KEY + b"\r\n"
        )
        head = b""
        with trio.fail_after(TIMEOUT):
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
    assert head.startswith(b"HTTP/1.1 101 ")
    fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)
    accept = {name.lower(): value for name, value in fields.items()}[b"sec-websocket-accept"]
    assert accept == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 section 1.3's own example
