"""What only a cluster has: nodes that die and a Redis that goes away, with real processes.

Each test runs a real redis-server and two signald processes (tests/_nodes.py), with
``cluster.node_timeout`` at 2 s so that every bound below stays short; the test of a Redis
that stops reading runs two nodes in the test's process instead (tests/_topology.py), with a
long ``node_timeout``, so that the queue fills before the link gives up. Waits are on what a
client or an operator can observe (frames, /health, /metrics, GET /api/rooms/:id), each bounded.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from ._clients import TIMEOUT, Client, connect, http_request
from ._nodes import NODE_TIMEOUT, Node, node_factory
from ._redis import RedisServer, poll_until, redis_server
from ._topology import serve
from .conftest import make_config

#: How long after its cause the cluster must be consistent again: node_timeout, plus a few
#: seconds for the sweep, the reconnection and a loaded shared machine.
SETTLE = NODE_TIMEOUT + 4


class Watcher:
    """A client whose every incoming frame is recorded by a background reader."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.frames: list[dict[str, Any]] = []
        self._arrived = trio.Event()

    async def read(self) -> None:
        while True:
            self.frames.append(json.loads(await self.client.ws.get_message()))  # unbounded: a background reader
            self._arrived.set()
            self._arrived = trio.Event()

    async def wait_for(self, check: Callable[[list[dict[str, Any]]], bool], what: str, within: float) -> None:
        with trio.move_on_after(within):
            while not check(self.frames):
                await self._arrived.wait()
            return
        raise AssertionError(f"not within {within:g} s: {what}; got {self.frames}")

    def members(self) -> set[str]:
        """The others in the room, as this client's frames tell it; and no duplicate joins."""
        known: set[str] = set()
        for frame in self.frames:
            if frame["type"] == "joined-room":
                known = {p["peerId"] for p in frame["participants"]}
            elif frame["type"] == "user-joined":
                assert frame["peerId"] not in known, f"duplicate user-joined: {frame}"
                known.add(frame["peerId"])
            elif frame["type"] == "user-left":
                known.discard(frame["peerId"])
        return known


@asynccontextmanager
async def watching(port: int, room: str, name: str) -> AsyncIterator[Watcher]:
    """A client of the node at ``port`` in ``room``, watched until the block ends."""
    async with connect(port) as client, trio.open_nursery() as nursery:
        joined = await client.join(room, name)
        watcher = Watcher(client)
        watcher.frames.append(joined)
        nursery.start_soon(watcher.read)
        yield watcher
        nursery.cancel_scope.cancel()


async def room_members(node: Node, room: str) -> list[str]:
    status, _, body = await http_request(node.port, "GET", f"/api/rooms/{room}")
    assert status in (200, 404), body
    return [p["peerId"] for p in body.get("participants", [])]


async def test_members_of_a_killed_node_leave_everywhere_within_node_timeout(tmp_path: Path) -> None:
    async with redis_server() as redis, node_factory(tmp_path, redis.url) as start:
        survivor, doomed = await start(2)
        async with watching(survivor.port, "r", "a") as a:
            with trio.CancelScope() as dead:
                async with connect(doomed.port) as b, connect(doomed.port) as c:
                    await b.join("r", "b")
                    await c.join("r", "c")
                    await a.wait_for(lambda _: a.members() == {b.peer_id, c.peer_id}, "b and c joined", TIMEOUT)
                    assert (await survivor.health())["users"] == 3
                    doomed.kill()
                    killed_at = trio.current_time()
                    await a.wait_for(lambda _: a.members() == set(), "user-left for b and c", SETTLE)
                    assert trio.current_time() - killed_at <= SETTLE
                    dead.cancel()  # their server is gone: no close handshake to wait for
            left = [f["peerId"] for f in a.frames if f["type"] == "user-left"]
            assert sorted(left) == sorted([b.peer_id, c.peer_id])
            health = await survivor.health()
            assert (health["status"], health["users"], health["rooms"]) == ("healthy", 1, 1)
            assert await room_members(survivor, "r") == [a.client.peer_id]


async def _expect_degraded(nodes: list[Node]) -> None:
    async def degraded() -> bool:
        statuses = [(await node.health())["status"] for node in nodes]
        return statuses == ["degraded"] * len(nodes)

    await poll_until(degraded, "every node reports degraded")
    for node in nodes:
        health = await node.health()
        assert "redis unreachable" in health["reason"]
        status, _, body = await http_request(node.port, "GET", "/metrics")
        assert status == 200 and b"\nsignald_cluster_degraded 1.0\n" in body


async def _outage(redis: RedisServer, nodes: list[Node], room: str) -> None:
    """Members on both nodes; Redis stops; what works, what is refused; Redis is back; consistent."""
    one, two = nodes
    async with (
        watching(one.port, room, "a") as a,
        watching(one.port, room, "a2") as a2,
        watching(two.port, room, "b") as b,
    ):
        everyone = {a.client.peer_id, a2.client.peer_id, b.client.peer_id}
        for watcher in (a, a2, b):
            await watcher.wait_for(
                lambda _, w=watcher: w.members() == everyone - {w.client.peer_id}, "all joined", TIMEOUT
            )
        await redis.stop()
        await _expect_degraded(nodes)
        # Relays between members of one node go on; to the other node, and joins, are refused.
        await a.client.send(type="webrtc-offer", to=a2.client.peer_id, sdp="same-node")
        await a2.wait_for(lambda f: any(x.get("sdp") == "same-node" for x in f), "same-node relay", TIMEOUT)
        await a.client.send(type="webrtc-offer", to=b.client.peer_id, sdp="cross", requestId="x")
        await a.wait_for(
            lambda f: any(x.get("code") == "cluster-unavailable" and x.get("requestId") == "x" for x in f),
            "cross-node relay refused",
            TIMEOUT,
        )
        async with connect(two.port) as late:
            await late.send(type="join-room", roomId=room, username="late", requestId="j")
            await late.expect("error", code="cluster-unavailable", requestId="j")
        status, _, body = await http_request(one.port, "GET", "/api/rooms")
        assert (status, body["error"]) == (503, "cluster-unavailable")
        # a2 leaves while Redis is away: its own node tells a at once, the other node later.
        await a2.client.send(type="leave-room")
        await a.wait_for(lambda _: a2.client.peer_id not in a.members(), "a2 left (same node)", TIMEOUT)
        await redis.start()
        back_at = trio.current_time()

        async def consistent() -> bool:
            expected = sorted([a.client.peer_id, b.client.peer_id])
            for node in nodes:
                if (await node.health())["status"] != "healthy":
                    return False
                if sorted(await room_members(node, room)) != expected:
                    return False
            return a.members() == {b.client.peer_id} and b.members() == {a.client.peer_id}

        await poll_until(consistent, "every member known everywhere, no ghosts", SETTLE)
        assert trio.current_time() - back_at <= SETTLE
        for node in nodes:
            status, _, body = await http_request(node.port, "GET", "/metrics")
            assert status == 200 and b"\nsignald_cluster_degraded 0.0\n" in body
        # Cross-node relays and joins work again, without restarting anything.
        await b.client.send(type="webrtc-answer", to=a.client.peer_id, sdp="after")
        await a.wait_for(lambda f: any(x.get("sdp") == "after" for x in f), "cross-node relay after", TIMEOUT)
        async with connect(two.port) as late:
            joined = await late.join(room, "late")
            assert sorted(p["peerId"] for p in joined["participants"]) == sorted([a.client.peer_id, b.client.peer_id])
            await a.wait_for(lambda _: late.peer_id in a.members(), "late announced", TIMEOUT)
            # members() also checks that nobody got a duplicate user-joined.
            await b.wait_for(lambda _: late.peer_id in b.members(), "late announced to b", TIMEOUT)


@pytest.mark.parametrize("persistent", [False, True], ids=["empty-restart", "aof"])
async def test_redis_outage_is_survived_and_the_cluster_heals(tmp_path: Path, persistent: bool) -> None:
    async with redis_server(persistent=persistent) as redis, node_factory(tmp_path, redis.url) as start:
        nodes = await start(2, metrics={"enabled": True})
        status, _, posted = await http_request(nodes[0].port, "POST", "/api/rooms", {"name": "Kept"})
        assert status == 201
        await _outage(redis, nodes, posted["id"])
        # The posted room: kept by the AOF; re-registered by its members after an empty restart.
        status, _, listing = await http_request(nodes[1].port, "GET", "/api/rooms")
        assert status == 200 and posted["id"] in [r["id"] for r in listing["rooms"]]
        assert all(node.process.returncode is None for node in nodes)  # nothing crashed


async def test_a_node_started_before_redis_serves_once_redis_is_up(tmp_path: Path) -> None:
    async with redis_server() as redis:
        await redis.stop()
        async with node_factory(tmp_path, redis.url) as start:
            [node] = await start(1, healthy=False)
            assert (await node.health())["status"] == "degraded"
            await redis.start()
            await node.wait_until_healthy()
            async with connect(node.port) as a:
                await a.join("r", "a")


async def test_a_stalled_node_is_swept_then_registers_its_members_again(tmp_path: Path) -> None:
    """A node frozen past node_timeout looks dead; when it wakes, its members come back."""
    async with redis_server() as redis, node_factory(tmp_path, redis.url) as start:
        one, two = await start(2)
        async with watching(one.port, "r", "a") as a, watching(two.port, "r", "b") as b:
            await a.wait_for(lambda _: a.members() == {b.client.peer_id}, "b joined", TIMEOUT)
            two.process.send_signal(signal.SIGSTOP)
            try:
                await a.wait_for(lambda _: a.members() == set(), "b swept with its stalled node", SETTLE)
            finally:
                two.process.send_signal(signal.SIGCONT)
            await a.wait_for(lambda _: a.members() == {b.client.peer_id}, "b registered again", SETTLE)
            assert b.members() == {a.client.peer_id}  # b never heard it had left
            await b.client.send(type="webrtc-offer", to=a.client.peer_id, sdp="still here")
            await a.wait_for(lambda f: any(x.get("sdp") == "still here" for x in f), "relay from b", TIMEOUT)
            assert sorted(await room_members(one, "r")) == sorted([a.client.peer_id, b.client.peer_id])


async def test_a_node_stopped_with_sigterm_hands_its_members_over_to_another(tmp_path: Path) -> None:
    """A rolling restart: the drained member resumes on the other node, and nobody notices."""
    async with redis_server() as redis, node_factory(tmp_path, redis.url) as start:
        one, two = await start(2)
        async with watching(one.port, "r", "a") as a, connect(two.port) as b:
            joined = await b.join("r", "b")
            await a.wait_for(lambda _: a.members() == {b.peer_id}, "b joined", TIMEOUT)
            await a.client.send(type="webrtc-offer", to=b.peer_id, sdp="before")
            await b.expect("webrtc-offer", sdp="before")
            two.process.terminate()
            with trio.fail_after(TIMEOUT), pytest.raises(ConnectionClosed) as closed:
                await b.ws.get_message()
            assert (closed.value.reason.code, closed.value.reason.reason) == (
                1001,
                "server shutting down; resume on another node",
            )
            await a.client.send(type="webrtc-offer", to=b.peer_id, sdp="while away")
            async with connect(one.port) as b2:
                await b2.send(type="resume", token=joined["resumeToken"])
                await b2.expect("resumed", peerId=b.peer_id)
                await b2.expect("webrtc-offer", sdp="while away")
                await b2.send(type="webrtc-answer", to=a.client.peer_id, sdp="after")
                await a.wait_for(lambda f: any(x.get("sdp") == "after" for x in f), "b's answer", TIMEOUT)
                with trio.fail_after(TIMEOUT):
                    await two.process.wait()  # it stopped once b was handed over, not at shutdown_grace
                assert [f["type"] for f in a.frames].count("user-left") == 0
                assert a.members() == {b.peer_id}


async def test_a_node_stopped_with_sigterm_lets_its_members_leave_when_nobody_resumes(tmp_path: Path) -> None:
    """The drain's leaves go through Redis, once server.shutdown_grace is over, no waiting for
    node_timeout; and the rooms live in Redis, not in any node."""
    async with redis_server() as redis, node_factory(tmp_path, redis.url) as start:
        one, two = await start(2, server={"shutdown_grace": 0.5})
        async with watching(one.port, "r", "a") as a:
            with trio.CancelScope() as gone:
                async with connect(two.port) as b:
                    await b.join("r", "b")
                    await a.wait_for(lambda _: a.members() == {b.peer_id}, "b joined", TIMEOUT)
                    two.process.terminate()
                    await a.wait_for(lambda _: a.members() == set(), "b left with the drain", NODE_TIMEOUT + 0.5)
                    gone.cancel()
            assert (await one.health())["users"] == 1
            assert "is gone" not in one.log  # b left in the drain, not in a sweep for a dead node
        # Redis is the room store: a posted room outlives every node that ever listed it.
        status, _, posted = await http_request(one.port, "POST", "/api/rooms", {"name": "Kept"})
        assert status == 201
        one.process.terminate()
        [fresh] = await start(1)
        status, _, listing = await http_request(fresh.port, "GET", "/api/rooms")
        assert [r["id"] for r in listing["rooms"]] == [posted["id"]]
        async with connect(fresh.port) as c:
            await c.join(posted["id"], "c")


async def test_concurrent_joins_on_three_processes_keep_capacity_and_one_order(tmp_path: Path) -> None:
    async with redis_server() as redis, node_factory(tmp_path, redis.url) as start:
        nodes = await start(3)
        five = {"name": "Five", "maxParticipants": 5}
        status, _, room = await http_request(nodes[0].port, "POST", "/api/rooms", five)
        assert status == 201
        replies: list[dict[str, Any]] = []
        seated: list[Watcher] = []
        all_answered = trio.Event()

        async def join(i: int) -> None:
            async with connect(nodes[i % 3].port) as client:
                await client.send(type="join-room", roomId=room["id"], username=f"u{i}")
                reply = await client.recv()
                replies.append(reply)
                if len(replies) == 12:
                    all_answered.set()
                if reply["type"] == "joined-room":
                    client.peer_id = reply["peerId"]
                    watcher = Watcher(client)
                    watcher.frames.append(reply)
                    seated.append(watcher)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(watcher.read)
                        with trio.fail_after(TIMEOUT):
                            await all_answered.wait()
                            everyone = {w.client.peer_id for w in seated}
                            await watcher.wait_for(
                                lambda _: watcher.members() | {client.peer_id} == everyone, "all seated", TIMEOUT
                            )
                        nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(join, i)
        assert sorted(r["type"] if r["type"] == "joined-room" else r["code"] for r in replies) == (
            ["joined-room"] * 5 + ["room-full"] * 7
        )
        # One order for all: each member's joined-room list plus the user-joined it saw after,
        # is the same sequence, cut at its own place.
        orders = []
        for watcher in seated:
            joined = watcher.frames[0]
            later = [f["peerId"] for f in watcher.frames[1:] if f["type"] == "user-joined"]
            orders.append([p["peerId"] for p in joined["participants"]] + [joined["peerId"], *later])
        assert all(order == orders[0] for order in orders), orders


def errors_sent(metrics: bytes, code: str) -> float:
    prefix = f'signald_errors_total{{code="{code}"}} '
    return sum(float(line.split()[-1]) for line in metrics.decode().splitlines() if line.startswith(prefix))


def queued_bytes(metrics: bytes) -> float:
    [line] = [line for line in metrics.decode().splitlines() if line.startswith("signald_cluster_send_queue_bytes ")]
    return float(line.split()[1])


async def test_a_redis_that_stops_reading_fills_a_bounded_queue_then_relays_are_refused() -> None:
    """Past ``cluster.send_queue_bytes`` queued for Redis, what needs Redis is refused, as in an outage.

    Redis is SIGSTOPped: connected, reading nothing. ``node_timeout`` is long (the link would
    give up after a third of it), so what the test sees is the bound, not a lost connection.
    """
    bound = 16384
    sections = {
        "cluster": {"node_timeout": 60, "send_queue_bytes": bound},
        "limits": {"max_message_bytes": 4096},
        "metrics": {"enabled": True},
    }
    sdp = "v=0 " + "x" * 3000
    async with redis_server() as redis, trio.open_nursery() as nursery:
        configs = [make_config(**{**sections, "cluster": {**sections["cluster"], "redis_url": redis.url}})] * 2
        topology = await serve(nursery, configs)
        one, two = topology.ports
        async with connect(one) as a, connect(one) as a2, connect(two) as b:
            await a.join("r", "a")
            await a2.join("r", "a2")
            await b.join("r", "b")
            await a.expect("user-joined", peerId=a2.peer_id)
            await a.expect("user-joined", peerId=b.peer_id)
            await a2.expect("user-joined", peerId=b.peer_id)
            redis.pause()
            try:
                refused: list[int] = []
                sent = 0
                while not refused:  # ~16 KiB / 3 KB: refused within a handful of relays
                    assert sent < 100, "the queue to a stalled Redis never filled"
                    await a.send(type="webrtc-offer", to=b.peer_id, sdp=f"{sent} {sdp}", requestId=sent)
                    sent += 1
                    for message in await a.messages_before_pong():
                        assert (message["type"], message["code"]) == ("error", "cluster-unavailable"), message
                        refused.append(message["requestId"])
                status, _, metrics = await http_request(one, "GET", "/metrics")
                assert status == 200 and bound - 4096 < queued_bytes(metrics) <= bound
                assert errors_sent(metrics, "cluster-unavailable") == len(refused)
                # Relays between members of one node never wait for Redis.
                await a.send(type="webrtc-offer", to=a2.peer_id, sdp="same node")
                await a2.expect("webrtc-offer", **{"from": a.peer_id, "sdp": "same node"})
                # A join is refused too, as while Redis is unreachable.
                async with connect(one) as late:
                    await late.send(type="join-room", roomId="r", username="late", requestId="j")
                    await late.expect("error", code="cluster-unavailable", requestId="j")
            finally:
                redis.resume()
            # What was queued arrives, in order; what was refused never does.
            refused += [m["requestId"] for m in await a.messages_before_pong()]
            accepted = [i for i in range(sent) if i not in refused]
            assert accepted and accepted == list(range(len(accepted)))  # the queue filled, then all refused
            for i in accepted:
                offer = await b.expect("webrtc-offer")
                assert offer["sdp"].split()[0] == str(i)

            async def drained() -> bool:
                return queued_bytes((await http_request(one, "GET", "/metrics"))[2]) == 0

            await poll_until(drained, "the queue to Redis is empty again")
            await a.send(type="webrtc-offer", to=b.peer_id, sdp="after")
            await b.expect("webrtc-offer", sdp="after")
            await connect_and_join(one, "r", "late")
        nursery.cancel_scope.cancel()


async def test_the_smallest_queue_to_redis_still_carries_the_largest_message() -> None:
    """``cluster.send_queue_bytes`` may equal ``limits.max_message_bytes``: such a relay still crosses."""
    sections: dict[str, Any] = {"limits": {"max_message_bytes": 1024}}
    async with redis_server() as redis, trio.open_nursery() as nursery:
        cluster = {"redis_url": redis.url, "node_timeout": 2, "send_queue_bytes": 1024}
        topology = await serve(nursery, [make_config(**sections, cluster=cluster)] * 2)
        one, two = topology.ports
        async with connect(one) as a, connect(two) as b:
            await a.join("r", "a")
            await b.join("r", "b")
            await a.expect("user-joined", peerId=b.peer_id)
            head = json.dumps({"type": "webrtc-offer", "to": b.peer_id, "sdp": ""})
            sdp = "x" * (1024 - len(head))  # the message is exactly max_message_bytes long
            for _ in range(3):
                await a.send(type="webrtc-offer", to=b.peer_id, sdp=sdp)
                assert (await b.expect("webrtc-offer"))["sdp"] == sdp
        nursery.cancel_scope.cancel()


async def connect_and_join(port: int, room: str, name: str) -> None:
    async with connect(port) as client:
        await client.join(room, name)


async def test_a_resume_whose_former_node_was_killed_fails_and_the_member_leaves(tmp_path: Path) -> None:
    """kill -9 takes what was kept with it: a resume elsewhere gets resume-failed (bounded by
    node_timeout), never a hang, and the member leaves everywhere."""
    async with redis_server() as redis, node_factory(tmp_path, redis.url) as start:
        one, two = await start(2)
        async with watching(one.port, "r", "a") as a:
            async with connect(two.port) as b:
                joined = await b.join("r", "b")
                await a.wait_for(lambda _: a.members() == {b.peer_id}, "b joined", TIMEOUT)
                two.kill()
            async with connect(one.port) as b2:
                with trio.fail_after(SETTLE):
                    await b2.send(type="resume", token=joined["resumeToken"])
                    failed = await b2.expect("error", code="resume-failed")
                assert "gone" in failed["message"] or "in time" in failed["message"], failed
                await a.wait_for(lambda _: a.members() == set(), "b left", SETTLE)
                await b2.join("r", "b again")  # the connection stays usable
                await a.wait_for(lambda _: len(a.members()) == 1, "b again joined", TIMEOUT)
            user_lefts = [f for f in a.frames if f["type"] == "user-left" and f["peerId"] == joined["peerId"]]
            assert len(user_lefts) == 1, a.frames
