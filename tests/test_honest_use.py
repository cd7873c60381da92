"""With the default limits, honest heavy use never meets a limit.

The issue's yardsticks: a burst of 1,000 messages sent as fast as possible while reading the
replies; one address creating 100 rooms over REST within a minute; many connections from one
address (a benchmark, or a NAT with hundreds of users). 5,000 connections are measured outside
the suite; here a few hundred stand for them, and the defaults are checked to allow 5,000.
"""

from __future__ import annotations

from contextlib import ExitStack

import trio

from signald import Server
from signald._config import LimitsConfig
from signald._limits import ConnectionCounter

from ._clients import connect, http_request, joined_pair


async def test_burst_of_1000_while_reading_replies(server: Server) -> None:
    assert server.port
    async with joined_pair(server.port, "burst") as (a, b):
        received: list[dict[str, object]] = []

        async def read_all() -> None:
            while len(received) < 1000:
                received.append(await b.recv())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            for i in range(1000):
                await a.send(type="webrtc-offer", to=b.peer_id, sdp=f"{i}")
        assert [m["sdp"] for m in received] == [str(i) for i in range(1000)]
        assert all(m["type"] == "webrtc-offer" for m in received)
        # And the sender itself got no error for any of them.
        assert await a.messages_before_pong() == []


async def test_one_address_creates_100_rooms_in_a_burst(server: Server) -> None:
    assert server.port
    for i in range(100):
        status, _, _ = await http_request(server.port, "POST", "/api/rooms", {"name": f"room {i}"})
        assert status == 201, i


async def test_hundreds_of_connections_from_one_address(server: Server) -> None:
    """A NAT's worth of users on one address, each joining a room and relaying."""
    assert server.port
    async with trio.open_nursery() as nursery:
        ready = trio.Semaphore(0)
        done = trio.Event()

        async def user(n: int) -> None:
            async with connect(server.port) as client:
                await client.join(f"nat-{n // 2}", f"user {n}")
                before_pong = await client.messages_before_pong()
                assert all(message["type"] == "user-joined" for message in before_pong), before_pong
                ready.release()
                await done.wait()

        for n in range(300):
            nursery.start_soon(user, n)
        for _ in range(300):
            await ready.acquire()
        assert server.connections.count("127.0.0.1") == 300
        assert server.hub.user_count == 300
        done.set()


def test_default_caps_admit_5000_connections_from_one_address() -> None:
    limits = LimitsConfig()
    counter = ConnectionCounter(limits.max_connections, limits.max_connections_per_ip)
    with ExitStack() as stack:
        for _ in range(5000):
            assert counter.refusal("192.0.2.1") is None
            stack.enter_context(counter.hold("192.0.2.1"))
        assert counter.total == 5000
