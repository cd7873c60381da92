"""Cluster room tasks without Redis: a fake link stands in for ``_redis.RedisLink``.

What Redis decides arrives as events (``ClusterHub.dispatch``), exactly as the script
publishes them; these tests check what the members on this node see, and what the room task
asks the link to send, for each of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from signald._cluster import ClusterHub
from signald._config import Config, LimitsConfig, RoomsConfig
from signald._hub import CHANNEL_SIZE, ResumeFailed

from .test_room import NOW, FakeMember

HERE, THERE = "node-here", "node-there"
WHEN = NOW.isoformat()


@attrs.define
class FakeLink:
    """Records what the room tasks ask of Redis; answers ``call`` from ``replies``."""

    node: str = HERE
    available: bool = True
    problem: str | None = None
    replies: dict[str, Any] = attrs.field(factory=lambda: {"join": ["ok"], "leave": 1})
    calls: list[tuple[Any, ...]] = attrs.field(factory=list)
    submitted: list[tuple[Any, ...]] = attrs.field(factory=list)
    relayed: list[tuple[str | bytes, ...]] = attrs.field(factory=list)
    on_fail: list[Callable[[], None]] = attrs.field(factory=list)
    left_soon: list[tuple[str, str]] = attrs.field(factory=list)

    def attach(self, listener: Any) -> None:
        pass

    async def call(self, operation: str, room: str, *args: Any) -> Any:
        if not self.available:
            return None
        self.calls.append((operation, room, *args))
        return self.replies[operation]

    async def leave(self, room: str, peer_id: str) -> bool:
        return await self.call("leave", room, peer_id) is not None

    def submit(self, operation: str, room: str, *args: Any) -> bool:
        if self.available:
            self.submitted.append((operation, room, *args))
        return self.available

    def relay(self, node: str, room: str, sender_id: str, to: str, text: bytes, on_fail: Callable[[], None]) -> bool:
        if self.available:
            self.relayed.append((node, room, sender_id, to, text))
            self.on_fail.append(on_fail)
        return self.available

    def leave_soon(self, room: str, peer_id: str) -> None:
        self.left_soon.append((room, peer_id))


def join_event(peer: str, node: str, others: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """What the script publishes for ``peer`` joining room ``r`` on ``node``."""
    event: dict[str, Any] = {"r": "r", "k": "join", "p": peer, "u": peer.upper(), "n": node, "t": WHEN}
    if others is not None:  # this node's first member in the room: a snapshot of the others
        event["m"] = [[p, p.upper(), n, WHEN, i] for i, (p, n) in enumerate(others)]
        event["meta"] = ["Room", 4, WHEN, False]
    return event


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def joined(hub: ClusterHub, member: FakeMember, event: dict[str, Any], nursery: trio.Nursery) -> list[Any]:
    """Join ``member`` here; Redis answers "ok" and then publishes ``event``."""
    outcome: list[Any] = []

    async def join() -> None:
        outcome.append(await hub.join(event["r"], member, "rq"))

    nursery.start_soon(join)
    await settle()
    assert member.frames == [] and outcome == []  # admitted in Redis, not seated before its event
    await hub.dispatch(event)
    await settle()
    return outcome


def make_hub(nursery: trio.Nursery, link: FakeLink, config: Config | None = None) -> ClusterHub:
    return ClusterHub(config or Config(rooms=RoomsConfig()), nursery, link)  # type: ignore[arg-type]


async def test_join_is_seated_when_its_event_returns_and_lists_members_of_other_nodes() -> None:
    async with trio.open_nursery() as nursery:
        link = FakeLink()
        hub = make_hub(nursery, link)
        a = FakeMember("a", "A")
        [task] = await joined(hub, a, join_event("a", HERE, others=[("b", THERE)]), nursery)
        assert task is not None
        assert link.calls[0][:4] == ("join", "r", "a", "A")
        assert a.frames == [
            {
                "type": "joined-room",
                "roomId": "r",
                "peerId": "a",
                "username": "A",
                "participants": [{"peerId": "b", "username": "B"}],
                "resumeGrace": 0,  # no resume across nodes yet: the client knows not to try
                "requestId": "rq",
            }
        ]
        await hub.dispatch(join_event("c", THERE))
        await settle()
        assert a.frames[-1] == {"type": "user-joined", "roomId": "r", "peerId": "c", "username": "C"}
        assert [seat.member.peer_id for seat in task.room.seats.values()] == ["b", "a", "c"]
        assert hub.user_count == 1  # members of other nodes are mirrored here, not counted
        nursery.cancel_scope.cancel()


async def test_relays_to_another_node_are_published_and_to_this_node_are_not() -> None:
    async with trio.open_nursery() as nursery:
        link = FakeLink()
        hub = make_hub(nursery, link)
        a, d = FakeMember("a", "A"), FakeMember("d", "D")
        [task] = await joined(hub, a, join_event("a", HERE, others=[("b", THERE)]), nursery)
        await joined(hub, d, join_event("d", HERE), nursery)
        assert task is not None
        await task.relay("a", "b", b'{"type":"webrtc-offer","from":"a","sdp":"x"}', None, trio.current_time())
        await task.relay("a", "d", b'{"type":"webrtc-offer","from":"a","sdp":"y"}', None, trio.current_time())
        await settle()
        assert link.relayed == [(THERE, "r", "a", "b", b'{"type":"webrtc-offer","from":"a","sdp":"x"}')]
        assert d.frames[-1] == {"type": "webrtc-offer", "from": "a", "sdp": "y"}
        # A relay from another node is delivered here, and never published again.
        await hub.relay("r", "b", "a", b'{"type":"webrtc-answer"}')
        await settle()
        assert a.frames[-1] == {"type": "webrtc-answer"} and len(link.relayed) == 1
        # Redis gone: relays to other nodes are refused, and so is one lost in flight.
        link.on_fail[0]()
        assert a.frames[-1]["code"] == "cluster-unavailable"
        link.available = False
        await task.relay("a", "b", b"{}", "r2", trio.current_time())
        await task.relay("a", "d", b'{"type":"ice-candidate"}', None, trio.current_time())
        await settle()
        assert (a.frames[-1]["code"], a.frames[-1]["requestId"]) == ("cluster-unavailable", "r2")
        assert d.frames[-1] == {"type": "ice-candidate"}  # same node: unaffected
        nursery.cancel_scope.cancel()


async def test_sweep_of_a_member_held_here_is_ignored_and_of_a_remote_one_announced() -> None:
    async with trio.open_nursery() as nursery:
        hub = make_hub(nursery, FakeLink())
        a = FakeMember("a", "A")
        [task] = await joined(hub, a, join_event("a", HERE, others=[("b", THERE)]), nursery)
        assert task is not None
        await hub.dispatch({"r": "r", "k": "leave", "p": "a", "e": True})  # this node was thought dead
        await hub.dispatch({"r": "r", "k": "leave", "p": "b", "e": True})
        await settle()
        assert a.frames[-1] == {"type": "user-left", "roomId": "r", "peerId": "b", "username": "B"}
        assert list(task.room.seats) == ["a"]
        nursery.cancel_scope.cancel()


async def test_snapshot_adds_missing_members_and_prunes_only_when_asked() -> None:
    async with trio.open_nursery() as nursery:
        link = FakeLink()
        hub = make_hub(nursery, link)
        a = FakeMember("a", "A")
        [task] = await joined(hub, a, join_event("a", HERE, others=[("b", THERE), ("c", THERE)]), nursery)
        assert task is not None
        await hub.resync(prune=False)
        await settle()
        assert link.submitted[0][:2] == ("sync", "r")  # this node's members, to re-register
        snapshot = [["a", "A", HERE, WHEN, 1], ["b", "B", THERE, WHEN, 2], ["d", "D", THERE, WHEN, 3]]
        await hub.dispatch({"r": "r", "k": "sync", "m": snapshot, "prune": False, "meta": ["Room", 4, WHEN, False]})
        await settle()
        assert [f["peerId"] for f in a.frames if f["type"] == "user-joined"] == ["d"]
        assert sorted(task.room.seats) == ["a", "b", "c", "d"]  # c kept: its node may not have synced yet
        await hub.dispatch({"r": "r", "k": "sync", "m": snapshot, "prune": True, "meta": ["Room", 4, WHEN, False]})
        await settle()
        assert a.frames[-1] == {"type": "user-left", "roomId": "r", "peerId": "c", "username": "C"}
        nursery.cancel_scope.cancel()


async def test_refusals_and_a_lost_link_reach_the_member_and_leave_no_room_behind() -> None:
    async with trio.open_nursery() as nursery:
        link = FakeLink(replies={"join": ["room-full", "2"]})
        hub = make_hub(nursery, link)
        full = FakeMember("f", "F")
        assert await hub.join("r", full, 1) is None
        assert (full.frames[-1]["code"], full.frames[-1]["requestId"]) == ("room-full", 1)
        await settle()
        assert len(hub) == 0 and link.left_soon == []  # refused in Redis: nothing to undo
        link.replies["join"] = ["ok"]
        waiting = FakeMember("w", "W")
        outcome: list[Any] = []

        async def join() -> None:
            outcome.append(await hub.join("r", waiting, 2))

        nursery.start_soon(join)
        await settle()
        await hub.lost()  # the link failed before the join's event came back
        await settle()
        assert outcome == [None]
        assert (waiting.frames[-1]["code"], waiting.frames[-1]["requestId"]) == ("cluster-unavailable", 2)
        link.available = False
        refused = FakeMember("u", "U")
        assert await hub.join("r", refused) is None
        assert refused.frames[-1]["code"] == "cluster-unavailable"
        nursery.cancel_scope.cancel()


async def test_room_task_ends_with_its_last_member_here_and_leaves_go_through_redis() -> None:
    async with trio.open_nursery() as nursery:
        link = FakeLink()
        hub = make_hub(nursery, link)
        a = FakeMember("a", "A")
        [task] = await joined(hub, a, join_event("a", HERE, others=[("b", THERE)]), nursery)
        assert task is not None
        await task.leave(a)
        assert link.calls[-1][:3] == ("leave", "r", "a")
        await settle()
        assert len(hub) == 1  # still seated: the leave takes effect when Redis publishes it
        await hub.dispatch({"r": "r", "k": "leave", "p": "a"})
        await settle()
        assert len(hub) == 0  # b, on another node, keeps the room alive in Redis, not here
        nursery.cancel_scope.cancel()


async def test_a_leave_while_redis_is_away_is_applied_here_now_and_there_later() -> None:
    async with trio.open_nursery() as nursery:
        link = FakeLink()
        hub = make_hub(nursery, link)
        a, d = FakeMember("a", "A"), FakeMember("d", "D")
        [task] = await joined(hub, a, join_event("a", HERE), nursery)
        await joined(hub, d, join_event("d", HERE), nursery)
        assert task is not None
        link.available = False
        await task.leave(d)
        await settle()
        assert a.frames[-1] == {"type": "user-left", "roomId": "r", "peerId": "d", "username": "D"}
        assert link.left_soon == [("r", "d")]
        nursery.cancel_scope.cancel()


async def test_an_overflowing_member_stays_until_its_leave_comes_back_in_order() -> None:
    """Eviction is the connection's business here: the room waits for the numbered leave."""
    async with trio.open_nursery() as nursery:
        hub = make_hub(nursery, FakeLink())
        a, slow = FakeMember("a", "A"), FakeMember("s", "S", capacity=1)
        [task] = await joined(hub, slow, join_event("s", HERE, others=[("b", THERE)]), nursery)
        await joined(hub, a, join_event("a", HERE), nursery)  # slow's queue is full from here on
        assert task is not None
        await hub.dispatch(join_event("c", THERE))
        await settle()
        assert sorted(task.room.seats) == ["a", "b", "c", "s"]
        assert [f["peerId"] for f in a.frames if f["type"] == "user-joined"] == ["c"]  # no user-left for s yet
        await hub.dispatch({"r": "r", "k": "leave", "p": "s"})
        await settle()
        assert a.frames[-1] == {"type": "user-left", "roomId": "r", "peerId": "s", "username": "S"}
        nursery.cancel_scope.cancel()


async def test_resume_is_refused_in_cluster_mode_and_a_lost_connection_leaves_through_redis() -> None:
    async with trio.open_nursery() as nursery:
        link = FakeLink()
        hub = make_hub(nursery, link)
        a = FakeMember("a", "A")
        [task] = await joined(hub, a, join_event("a", HERE), nursery)
        assert task is not None
        with pytest.raises(ResumeFailed, match="cluster"):
            await hub.resume("any-token", lambda peer_id, username: FakeMember(peer_id, username))
        await task.suspend(a, [], 1024)
        assert link.calls[-1][:3] == ("leave", "r", "a")
        nursery.cancel_scope.cancel()


@attrs.define
class LoggingMember:
    """A member whose frames go to a log shared with other members: who got what, in what order."""

    peer_id: str
    username: str
    deliveries: list[tuple[str, dict[str, Any]]]

    def deliver(self, text: bytes) -> bool:
        self.deliveries.append((self.peer_id, json.loads(text)))
        return True

    def superseded(self) -> list[bytes]:
        return []

    @property
    def frames(self) -> list[dict[str, Any]]:
        return [frame for who, frame in self.deliveries if who == self.peer_id]


def candidate(i: int) -> bytes:
    """A relay from b (on the other node), numbered, 100 bytes long."""
    return json.dumps({"type": "ice-candidate", "from": "b", "candidate": {"candidate": f"{i:056d}"}}).encode()


async def test_a_room_that_cannot_keep_up_delays_no_other_room() -> None:
    """The link's one reader hands every room its commands without waiting for any room."""
    async with trio.open_nursery() as nursery:
        hub = make_hub(nursery, FakeLink())
        deliveries: list[tuple[str, dict[str, Any]]] = []
        busy, calm = LoggingMember("x", "X", deliveries), LoggingMember("y", "Y", deliveries)
        await joined(hub, busy, join_event("x", HERE, others=[("b", THERE)]), nursery)
        await joined(hub, calm, {**join_event("y", HERE, others=[("b", THERE)]), "r": "calm"}, nursery)
        deliveries.clear()
        flood = 5 * CHANNEL_SIZE  # far more than the busy room's channel holds
        for i in range(flood):  # as the reader gets them: all at once, no checkpoint in between
            await hub.relay("r", "b", "x", candidate(i))
        await hub.relay("calm", "b", "y", b'{"type":"webrtc-offer","from":"b","sdp":"calm"}')
        await settle()
        to_busy = [frame["candidate"]["candidate"] for who, frame in deliveries if who == "x"]
        assert to_busy == [f"{i:056d}" for i in range(flood)]  # all of them, in order: the backlog held them
        [calm_at] = [n for n, (who, _) in enumerate(deliveries) if who == "y"]
        assert calm_at < CHANNEL_SIZE, "the calm room's relay waited for the busy room's backlog"
        nursery.cancel_scope.cancel()


async def test_a_full_backlog_drops_relays_tells_their_sender_and_keeps_membership_events() -> None:
    limits = LimitsConfig(max_message_bytes=1024, send_queue_bytes=1024)  # the backlog's bound too
    async with trio.open_nursery() as nursery:
        link = FakeLink()
        hub = make_hub(nursery, link, Config(rooms=RoomsConfig(), limits=limits))
        x = FakeMember("x", "X", capacity=100_000)
        await joined(hub, x, join_event("x", HERE, others=[("b", THERE)]), nursery)
        x.frames.clear()
        # One handed to the waiting room task, a channel full, then 1024 bytes of backlog.
        fits = 1 + CHANNEL_SIZE + 1024 // len(candidate(0))
        for i in range(fits + 5):
            await hub.relay("r", "b", "x", candidate(i))
        await hub.dispatch(join_event("c", THERE))  # never dropped, whatever the backlog holds
        await hub.relay("r", "b", "x", candidate(-1))  # dropped too: the backlog is still full
        await settle()
        assert [f["candidate"]["candidate"] for f in x.frames[:-1]] == [f"{i:056d}" for i in range(fits)]
        assert x.frames[-1] == {"type": "user-joined", "roomId": "r", "peerId": "c", "username": "C"}
        # b's node is told, once, as a relay from x to b: b gets cluster-unavailable.
        [(node, room, sender, to, refusal)] = link.relayed
        assert (node, room, sender, to) == (THERE, "r", "x", "b")
        assert json.loads(refusal)["code"] == "cluster-unavailable"
        # The backlog is empty again: relays go through.
        await hub.relay("r", "b", "x", candidate(fits))
        await settle()
        assert x.frames[-1]["candidate"]["candidate"] == f"{fits:056d}"
        nursery.cancel_scope.cancel()
