"""Floods: messages, connections, room creations, and a reader that never reads."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed
from wsproto.events import CloseConnection, TextMessage

from .._clients import TIMEOUT, connect, http_request, text_frame
from ..conftest import make_config
from ._harness import (
    ABUSER,
    assert_healthy,
    honest_pair,
    raw_websocket,
    refusal_code,
    upgrade_status,
    wait_until,
)

#: Small enough that a test reaches it in milliseconds, large enough for the honest pair.
RATE = {"message_rate": 2.0, "message_burst": 60, "rate_limit_close_after": 20}


async def test_message_flood_is_dropped_then_closed(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(limits=RATE)
    async with honest_pair(server) as pair, raw_websocket(server.port) as bad:
        # 200 pings in one write: 60 fit the burst, the next 20 are dropped, the 20th drop closes.
        await bad.send(b"".join(text_frame({"type": "ping", "requestId": i}) for i in range(200)))
        await pair.exchange()
        pongs, errors = 0, 0
        while isinstance(event := await bad.next_event(), TextMessage):
            message = json.loads(event.data)
            if message["type"] == "pong":
                pongs += 1
            else:
                assert message["code"] == "rate-limited" and "requestId" not in message, message
                errors += 1
        assert isinstance(event, CloseConnection) and event.code == 1008 and "rate limit" in event.reason
        # Replies queued when the close came are dropped with it, so count what is certain.
        assert 0 < pongs <= 61 and errors <= 20, (pongs, errors)
        await pair.exchange()


async def test_flood_under_the_close_threshold_only_drops(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(limits={**RATE, "message_rate": 50.0, "rate_limit_close_after": 1000})
    async with honest_pair(server) as pair, connect(server.port) as bad:
        for i in range(100):  # 60 in the burst, about 40 over it (a refill of 40 would take 0.8 s)
            await bad.send(type="ping", requestId=i)
        replies = [await bad.recv() for _ in range(100)]
        pongs = [r["requestId"] for r in replies if r["type"] == "pong"]
        dropped = [r for r in replies if r["type"] == "error"]
        assert dropped and all(r["code"] == "rate-limited" for r in dropped)
        assert pongs == sorted(pongs) and len(pongs) >= 60  # what was accepted kept its order
        await pair.exchange()
        # Once the bucket has refilled (50/s), the same connection is served again.
        with trio.fail_after(TIMEOUT):
            while True:
                await bad.send(type="ping", requestId="again")
                if (await bad.recv())["type"] == "pong":
                    break
                await trio.sleep(0.02)  # pacing, as a well-behaved client backs off


async def test_connection_flood_from_one_address(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(limits={"max_connections_per_ip": 10})
    async with honest_pair(server) as pair:
        streams = []
        try:
            for _ in range(10):
                status, stream = await upgrade_status(server.port, source=ABUSER)
                streams.append(stream)
                assert status == 101
            status, refused = await upgrade_status(server.port, source=ABUSER)
            assert status == 429
            assert await refusal_code(refused) == "too-many-connections"
            await pair.exchange()
            # Another address is not affected, the honest one included.
            async with connect(server.port) as other:
                await other.roundtrip_ping()
            assert server.connections.count(ABUSER) == 10
        finally:
            for stream in streams:
                await stream.aclose()
        await wait_until(lambda: server.connections.count(ABUSER) == 0)
        status, stream = await upgrade_status(server.port, source=ABUSER)
        assert status == 101  # closing its connections gave the address its room back
        await stream.aclose()


async def test_connection_cap_for_the_whole_server(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(limits={"max_connections": 5})
    async with honest_pair(server) as pair:  # 2 of the 5
        streams = []
        try:
            for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                status, stream = await upgrade_status(server.port, source=source)
                streams.append(stream)
                assert status == 101
            status, refused = await upgrade_status(server.port, source="127.0.0.5")
            assert status == 503
            assert await refusal_code(refused) == "server-full"
            await pair.exchange()
            status, _, _ = await http_request(server.port, "GET", "/health")
            assert status == 200  # plain HTTP is not a WebSocket: still served
        finally:
            for stream in streams:
                await stream.aclose()


async def test_forwarded_for_counts_only_from_trusted_proxies(server_factory: Callable[..., Any]) -> None:
    proxy = "127.0.0.3"
    server = await server_factory(server={"trusted_proxies": [proxy]}, limits={"max_connections_per_ip": 2})
    async with honest_pair(server) as pair:
        streams = []
        try:
            # Behind the trusted proxy, each forwarded client has its own count.
            for client, expected in (("198.51.100.1", 101), ("198.51.100.1", 101), ("198.51.100.1", 429)):
                status, stream = await upgrade_status(
                    server.port, source=proxy, headers=f"X-Forwarded-For: 10.9.9.9, {client}\r\n".encode()
                )
                streams.append(stream)
                assert status == expected
            status, stream = await upgrade_status(
                server.port, source=proxy, headers=b"X-Forwarded-For: 198.51.100.2\r\n"
            )
            streams.append(stream)
            assert status == 101
            # An untrusted client inventing a new address per connection still counts as itself.
            for i, expected in enumerate((101, 101, 429)):
                status, stream = await upgrade_status(
                    server.port, source=ABUSER, headers=f"X-Forwarded-For: 203.0.113.{i}\r\n".encode()
                )
                streams.append(stream)
                assert status == expected
            await pair.exchange()
        finally:
            for stream in streams:
                await stream.aclose()


async def test_room_creation_flood(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(limits={"room_create_rate": 0.01, "room_create_burst": 5})
    async with honest_pair(server) as pair:
        for _ in range(5):
            status, _, _ = await http_request(server.port, "POST", "/api/rooms", {"name": "spam"}, source=ABUSER)
            assert status == 201
        status, headers, body = await http_request(server.port, "POST", "/api/rooms", {"name": "spam"}, source=ABUSER)
        assert status == 429 and body["error"] == "rate-limited"
        assert 90 <= int(headers["retry-after"]) <= 100  # one room per 100 s
        await pair.exchange()
        status, _, _ = await http_request(server.port, "POST", "/api/rooms", {"name": "mine"})
        assert status == 201  # another address has its own budget
        _, _, listing = await http_request(server.port, "GET", "/api/rooms")
        assert len(listing["rooms"]) == 5 + 1 + 1  # the refused one was never created


async def test_room_creation_behind_a_trusted_proxy(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(
        server={"trusted_proxies": ["127.0.0.0/8"]}, limits={"room_create_rate": 0.01, "room_create_burst": 1}
    )
    for client, expected in (("198.51.100.1", 201), ("198.51.100.1", 429), ("198.51.100.2", 201)):
        status, _, _ = await http_request(
            server.port, "POST", "/api/rooms", {"name": "r"}, [("X-Forwarded-For", client)]
        )
        assert status == expected
    await assert_healthy(server.port)


async def test_max_rooms(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(rooms={"max_rooms": 3})
    async with honest_pair(server) as pair:  # room 1 of 3
        for _ in range(2):
            status, _, _ = await http_request(server.port, "POST", "/api/rooms", {"name": "r"}, source=ABUSER)
            assert status == 201
        status, _, body = await http_request(server.port, "POST", "/api/rooms", {"name": "r"}, source=ABUSER)
        assert (status, body["error"]) == (503, "too-many-rooms")
        async with connect(server.port) as bad:
            await bad.send(type="join-room", roomId="yet-another", username="x", requestId="j")
            await bad.expect("error", code="too-many-rooms", requestId="j")
            await pair.exchange()
            # Existing rooms can still be joined.
            _, _, listing = await http_request(server.port, "GET", "/api/rooms")
            some_room = next(room["id"] for room in listing["rooms"] if room["id"] != "honest")
            await bad.join(some_room, "x")
        assert len(server.hub) == 3


async def test_reader_that_never_reads_is_evicted(server_factory: Callable[..., Any]) -> None:
    limits = {"max_message_bytes": 16384, "send_queue_bytes": 32768, "max_sdp_length": 16000}
    server = await server_factory(limits=limits)
    sdp = "x" * 15_000
    async with (
        honest_pair(server) as pair,
        raw_websocket(server.port, rcvbuf=4096) as sink,
        connect(server.port) as feeder,
    ):
        await feeder.join("sink", "feeder")
        await sink.send(text_frame({"type": "join-room", "roomId": "sink", "username": "never-reads"}))
        joined = await feeder.expect("user-joined", username="never-reads")
        with trio.fail_after(TIMEOUT):
            for round_ in range(2000):  # bounded: kernel buffers fill long before this
                await feeder.send(type="webrtc-offer", to=joined["peerId"], sdp=sdp)
                await feeder.send(type="ping")
                reply = await feeder.recv()
                if reply["type"] == "user-left":
                    break
                assert reply["type"] == "pong"
                if round_ % 50 == 0:
                    await pair.exchange(1)  # the honest pair is served throughout
            else:
                raise AssertionError("the reader that never reads was never evicted")
        assert reply["peerId"] == joined["peerId"]
        await pair.exchange()
        # When it finally reads, it finds the 1008 close behind what had been sent.
        assert await sink.expect_close() == 1008


async def test_connection_that_never_joins_is_closed_when_idle(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(limits={"idle_timeout": 0.3})
    async with honest_pair(server) as pair:
        started = trio.current_time()  # before the connection: its idle clock starts once accepted
        async with connect(server.port) as loiterer:
            await loiterer.roundtrip_ping()  # activity outside a room does not count
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(TIMEOUT):
                await loiterer.ws.get_message()
            assert info.value.reason.code == 1000 and "not in a room" in (info.value.reason.reason or "")
            assert trio.current_time() - started >= 0.3
        await pair.exchange()  # members of a room are never idle, however long they wait


async def test_idle_clock_restarts_after_leaving(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(limits={"idle_timeout": 0.2})
    async with connect(server.port) as client:
        await client.join("r", "c")
        await trio.sleep(0.25)  # longer than the timeout, spent in a room: the time under test
        await client.roundtrip_ping()
        left_at = trio.current_time()
        await client.send(type="leave-room")
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(TIMEOUT):
            await client.ws.get_message()
        assert info.value.reason.code == 1000
        assert trio.current_time() - left_at >= 0.2


async def test_limits_follow_a_reload_and_budgets_carry_over(server_factory: Callable[..., Any]) -> None:
    tight = {"max_connections_per_ip": 1, "room_create_rate": 0.01, "room_create_burst": 1}
    server = await server_factory(limits=tight)
    status, first = await upgrade_status(server.port, source=ABUSER)
    assert status == 101
    status, refused = await upgrade_status(server.port, source=ABUSER)
    assert status == 429
    await refused.aclose()
    for expected in (201, 429):
        status, _, _ = await http_request(server.port, "POST", "/api/rooms", {"name": "r"}, source=ABUSER)
        assert status == expected
    assert server.reload(make_config(limits={**tight, "max_connections_per_ip": 2, "room_create_burst": 3})) == []
    status, second = await upgrade_status(server.port, source=ABUSER)
    assert status == 101  # the new cap counts the connection opened before the reload
    status, _, _ = await http_request(server.port, "POST", "/api/rooms", {"name": "r"}, source=ABUSER)
    assert status == 429  # a reload is no way to get a fresh budget
    for _ in range(3):
        status, _, _ = await http_request(server.port, "POST", "/api/rooms", {"name": "r"}, source="127.0.0.3")
        assert status == 201  # a new address gets the new burst
    for stream in (first, second):
        await stream.aclose()
