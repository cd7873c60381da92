"""Room tasks and the hub, with trio's mock clock: lifetimes, ordering, no lost commands."""

from __future__ import annotations

import json

import trio
import trio.testing

from signald._config import RoomsConfig
from signald._hub import BATCH, RoomHub, RoomTask, _Leave

from .test_room import FakeMember


async def test_posted_room_expires_after_idle_ttl_and_occupants_reset_the_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(idle_ttl=3600), nursery)
        room = hub.create("Standup")
        await trio.sleep(3000)
        assert hub.get(room.id) is room
        member = FakeMember("a", "A")
        task = await hub.join(room.id, member)
        assert task is not None
        await trio.sleep(10_000)  # occupied rooms never expire
        assert hub.get(room.id) is room
        await task.leave("a")
        await trio.sleep(3000)
        assert hub.get(room.id) is room  # the idle clock restarted when it emptied
        await trio.sleep(700)
        assert hub.get(room.id) is None
        assert len(hub) == 0


async def test_a_short_visit_restarts_the_idle_clock(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(idle_ttl=3600), nursery)
        room = hub.create("Standup")
        await trio.sleep(3000)
        task = await hub.join(room.id, FakeMember("a", "A"))
        assert task is not None
        await trio.sleep(100)
        await task.leave("a")
        await trio.sleep(3000)  # 6100 s after creation, but only 3000 s idle
        assert hub.get(room.id) is room
        await trio.sleep(700)
        assert hub.get(room.id) is None


async def test_joined_room_vanishes_with_its_last_member() -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(), nursery)
        task = await hub.join("adhoc", FakeMember("a", "A"))
        assert task is not None and hub.get("adhoc") is not None
        assert not task.room.persistent
        await task.leave("a")
        await trio.testing.wait_all_tasks_blocked()
        assert hub.get("adhoc") is None


async def test_join_queued_behind_the_last_leave_keeps_the_room() -> None:
    """The room ends only after seeing its channel empty: a join already queued is served."""
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(), nursery)
        a, b = FakeMember("a", "A"), FakeMember("b", "B")
        task = await hub.join("r", a)
        assert task is not None
        # Queue the leave without a checkpoint, so the join lands right behind it.
        task._send.send_nowait(_Leave("a"))
        joined_b = await hub.join("r", b)
        assert joined_b is task
        assert list(task.room.seats) == ["b"]
        nursery.cancel_scope.cancel()


async def test_join_after_the_room_ended_creates_a_new_one() -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(), nursery)
        first = await hub.join("r", FakeMember("a", "A"))
        assert first is not None
        await first.leave("a")
        await trio.testing.wait_all_tasks_blocked()
        second = await hub.join("r", FakeMember("b", "B"))
        assert second is not None and second is not first
        nursery.cancel_scope.cancel()


async def _seated_pair(nursery: trio.Nursery, a: FakeMember, b: FakeMember) -> tuple[RoomHub, RoomTask]:
    """A hub whose room ``r`` holds ``a`` then ``b``, with every task settled."""
    hub = RoomHub(RoomsConfig(), nursery)
    task = await hub.join("r", a)
    assert task is not None and await hub.join("r", b) is task
    await trio.testing.wait_all_tasks_blocked()
    return hub, task


async def test_many_relays_are_applied_in_order_across_batches() -> None:
    async with trio.open_nursery() as nursery:
        a, b = FakeMember("a", "A"), FakeMember("b", "B")
        _, task = await _seated_pair(nursery, a, b)
        count = BATCH * 3 + 7
        for i in range(count):
            await task.relay("a", "b", json.dumps({"type": "webrtc-offer", "n": i}), None)
        await trio.testing.wait_all_tasks_blocked()
        assert [f["n"] for f in b.frames if f["type"] == "webrtc-offer"] == list(range(count))
        nursery.cancel_scope.cancel()


async def test_relay_behind_a_pending_command_keeps_the_channel_order() -> None:
    async with trio.open_nursery() as nursery:
        a, b = FakeMember("a", "A"), FakeMember("b", "B")
        _, task = await _seated_pair(nursery, a, b)
        task._send.send_nowait(_Leave("b"))  # handed to the room task, not applied yet
        await task.relay("a", "b", json.dumps({"type": "webrtc-offer"}), "q")
        await trio.testing.wait_all_tasks_blocked()
        assert b.types() == ["joined-room"]
        assert a.frames[-1] == {
            "type": "error",
            "code": "peer-not-found",
            "message": "peer b is not in room r",
            "requestId": "q",
        }
        nursery.cancel_scope.cancel()


async def test_relay_that_evicts_everyone_ends_the_room() -> None:
    async with trio.open_nursery() as nursery:
        a, b = FakeMember("a", "A", capacity=2), FakeMember("b", "B", capacity=1)
        hub, task = await _seated_pair(nursery, a, b)
        # a's peer-not-found overflows a; telling b that a left overflows b: nobody is left.
        await task.relay("a", "gone", json.dumps({"type": "webrtc-offer"}), None)
        await trio.testing.wait_all_tasks_blocked()
        assert not task.room.seats
        assert hub.get("r") is None
        nursery.cancel_scope.cancel()


async def test_auto_create_off_refuses_unknown_rooms() -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(auto_create=False), nursery)
        member = FakeMember("a", "A")
        assert await hub.join("missing", member, "rq") is None
        assert member.frames == [
            {"type": "error", "code": "room-not-found", "message": "room missing does not exist", "requestId": "rq"}
        ]
        nursery.cancel_scope.cancel()


async def test_user_count_and_listing() -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(), nursery)
        hub.create("empty")
        await hub.join("x", FakeMember("a", "A"))
        await hub.join("x", FakeMember("b", "B"))
        assert len(hub) == 2 and hub.user_count == 2
        assert {room.name for room in await hub.rooms()} == {"empty", "x"}
        assert await hub.counts() == (2, 2)
        x = await hub.room("x")
        assert x is not None and [member.peer_id for member in x.members] == ["a", "b"]
        assert await hub.room("nope") is None
        nursery.cancel_scope.cancel()
