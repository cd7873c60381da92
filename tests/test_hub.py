"""Room tasks and the hub, with trio's mock clock: lifetimes, ordering, no lost commands."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from signald._config import RoomsConfig
from signald._hub import BATCH, ResumeFailed, RoomHub, RoomTask, _Leave
from signald._metrics import Observer

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
        await task.leave(member)
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
        member = FakeMember("a", "A")
        task = await hub.join(room.id, member)
        assert task is not None
        await trio.sleep(100)
        await task.leave(member)
        await trio.sleep(3000)  # 6100 s after creation, but only 3000 s idle
        assert hub.get(room.id) is room
        await trio.sleep(700)
        assert hub.get(room.id) is None


async def test_joined_room_vanishes_with_its_last_member() -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(), nursery)
        member = FakeMember("a", "A")
        task = await hub.join("adhoc", member)
        assert task is not None and hub.get("adhoc") is not None
        assert not task.room.persistent
        await task.leave(member)
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
        task._send.send_nowait(_Leave(a))
        joined_b = await hub.join("r", b)
        assert joined_b is task
        assert list(task.room.seats) == ["b"]
        nursery.cancel_scope.cancel()


async def test_join_after_the_room_ended_creates_a_new_one() -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(), nursery)
        a = FakeMember("a", "A")
        first = await hub.join("r", a)
        assert first is not None
        await first.leave(a)
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
            await task.relay("a", "b", json.dumps({"type": "webrtc-offer", "n": i}), None, trio.current_time())
        await trio.testing.wait_all_tasks_blocked()
        assert [f["n"] for f in b.frames if f["type"] == "webrtc-offer"] == list(range(count))
        nursery.cancel_scope.cancel()


async def test_relay_behind_a_pending_command_keeps_the_channel_order() -> None:
    async with trio.open_nursery() as nursery:
        a, b = FakeMember("a", "A"), FakeMember("b", "B")
        _, task = await _seated_pair(nursery, a, b)
        task._send.send_nowait(_Leave(b))  # handed to the room task, not applied yet
        await task.relay("a", "b", json.dumps({"type": "webrtc-offer"}), "q", trio.current_time())
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
        await task.relay("a", "gone", json.dumps({"type": "webrtc-offer"}), None, trio.current_time())
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


# -- lost connections: the grace timer and resume ------------------------------------------

LIMIT = 1_000_000


async def test_a_lost_member_keeps_its_seat_for_the_grace_then_leaves_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = FakeMember("a", "A"), FakeMember("b", "B")
        hub, task = await _seated_pair(nursery, a, b)
        assert hub.config.resume_grace == 30
        await task.suspend(a, [], LIMIT)
        await trio.sleep(29.9)
        assert "a" in task.room.seats and b.types() == ["joined-room"]
        assert hub.user_count == 2
        await trio.sleep(0.2)
        assert "a" not in task.room.seats
        await trio.sleep(3600)
        assert b.types() == ["joined-room", "user-left"]
        nursery.cancel_scope.cancel()


async def test_a_room_held_only_by_a_lost_member_lives_until_its_grace_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(resume_grace=5), nursery)
        a = FakeMember("a", "A")
        task = await hub.join("adhoc", a)
        assert task is not None
        await task.suspend(a, [], LIMIT)
        await trio.sleep(4.9)
        assert hub.get("adhoc") is task.room
        await trio.sleep(0.2)
        assert hub.get("adhoc") is None


async def test_a_posted_room_counts_its_idle_time_from_when_the_grace_ended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(idle_ttl=100, resume_grace=50), nursery)
        room = hub.create("Standup")
        a = FakeMember("a", "A")
        task = await hub.join(room.id, a)
        assert task is not None
        await trio.sleep(200)
        await task.suspend(a, [], LIMIT)
        await trio.sleep(149)  # 50 s of grace, then 99 s idle
        assert hub.get(room.id) is room
        await trio.sleep(2)
        assert hub.get(room.id) is None


def token_of(member: FakeMember) -> str:
    token = member.frames[0]["resumeToken"] if member.frames[0]["type"] == "joined-room" else None
    assert isinstance(token, str)
    return token


async def test_resume_through_the_hub_rotates_the_token_and_says_why_old_ones_fail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        a, b = FakeMember("a", "A"), FakeMember("b", "B")
        hub, task = await _seated_pair(nursery, a, b)
        first = token_of(a)
        assert first != token_of(b) and len(first.split(".")[2]) == 32  # 192 random bits
        await task.suspend(a, [], LIMIT)
        await task.relay("b", "a", json.dumps({"type": "webrtc-offer", "n": 1}), None, trio.current_time())
        resumed_task, a2 = await hub.resume(first, FakeMember, "rq")
        assert resumed_task is task and isinstance(a2, FakeMember)
        assert a2.types() == ["resumed", "webrtc-offer"]
        assert a2.frames[0]["missed"] == 1 and a2.frames[0]["requestId"] == "rq"
        second = a2.frames[0]["resumeToken"]
        assert second != first
        with pytest.raises(ResumeFailed, match="used already"):
            await hub.resume(first, FakeMember)
        for bad in ("", "nonsense", f"x{first}", first[:-1], "r.a.guess", f"nope.a.{first.split('.')[2]}"):
            with pytest.raises(ResumeFailed, match="unknown resume token"):
                await hub.resume(bad, FakeMember)
        await task.suspend(a2, [], LIMIT)
        await trio.sleep(31)
        with pytest.raises(ResumeFailed, match=r"away longer than rooms\.resume_grace"):
            await hub.resume(second, FakeMember)
        assert b.types() == ["joined-room", "user-left"]  # the only thing b saw of it all
        await task.leave(b)
        await trio.testing.wait_all_tasks_blocked()
        assert hub.get("r") is None
        with pytest.raises(ResumeFailed, match="the member left the room"):
            await hub.resume(token_of(b), FakeMember)  # the room is gone, the reason is not


async def test_no_grace_turns_resume_off() -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(resume_grace=0), nursery)
        a, b = FakeMember("a", "A"), FakeMember("b", "B")
        task = await hub.join("r", a)
        assert task is not None and await hub.join("r", b) is task
        assert "resumeToken" not in a.frames[0] and a.frames[0]["resumeGrace"] == 0
        await task.suspend(a, [], LIMIT)
        await trio.testing.wait_all_tasks_blocked()
        assert b.types() == ["joined-room", "user-left"]
        with pytest.raises(ResumeFailed, match="turned off"):
            await hub.resume("r.a.whatever", FakeMember)
        nursery.cancel_scope.cancel()


async def test_why_a_token_failed_is_remembered_within_a_bound() -> None:
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(), nursery, retired_tokens=3)
        tokens = []
        for n in range(4):
            member = FakeMember(f"m{n}", "M")
            task = await hub.join("r", member)
            assert task is not None
            tokens.append(token_of(member))
            await task.leave(member)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ResumeFailed, match="unknown resume token"):
            await hub.resume(tokens[0], FakeMember)  # forgotten: only the last three are remembered
        for token in tokens[1:]:
            with pytest.raises(ResumeFailed, match="the member left the room"):
                await hub.resume(token, FakeMember)


class Recorder(Observer):
    """An observer that writes down what the hub and its room tasks report."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, object]] = []

    def delivered(self, received_at: float) -> None:
        self.reports.append(("delivered", received_at))

    def joined(self, started_at: float) -> None:
        self.reports.append(("joined", None))

    def join_refused(self, started_at: float) -> None:
        self.reports.append(("join_refused", None))

    def left(self, members: int) -> None:
        self.reports.append(("left", members))

    def error_sent(self, code: str) -> None:
        self.reports.append(("error_sent", code))


async def test_the_hub_reports_joins_refusals_relays_and_every_way_of_leaving() -> None:
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(max_participants=2, max_rooms=1), nursery, observer=recorder)
        a, b = FakeMember("a", "A", capacity=3), FakeMember("b", "B", capacity=100)
        task = await hub.join("r", a)
        assert task is not None and await hub.join("r", b) is not None
        assert await hub.join("r", FakeMember("c", "C")) is None  # full
        assert await hub.join("other", FakeMember("d", "D")) is None  # max_rooms
        await task.relay("b", "a", "{}", None, 12.5)
        await task.relay("b", "nobody", "{}", None, 13.0)
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.reports == [
            ("joined", None),
            ("joined", None),
            ("error_sent", "room-full"),
            ("join_refused", None),
            ("error_sent", "too-many-rooms"),
            ("join_refused", None),
            ("delivered", 12.5),
            ("delivered", 13.0),
            ("error_sent", "peer-not-found"),
        ]
        recorder.reports.clear()
        await task.relay("b", "a", "{}", None, 14.0)  # a fourth frame for a, which holds three: evicted
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.reports == [("delivered", 14.0), ("left", 1)]
        recorder.reports.clear()
        await task.leave(b)
        await task.leave(b)  # not there any more: nobody left
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.reports == [("left", 1)]
        nursery.cancel_scope.cancel()


async def test_a_join_cancelled_while_the_room_decides_still_gets_its_answer() -> None:
    """A join happens for both sides or for neither: cancelling the joiner while the room task
    has the join queued neither loses the answer nor seats a member the joiner never hears of."""
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(), nursery)
        member = FakeMember("a", "A")
        outcome: list[object] = []

        async def joiner() -> None:
            with trio.CancelScope() as scope:
                scope.cancel()  # already cancelled when the join starts waiting for the room
                outcome.append(await hub.join("r", member))
                outcome.append("still running after the join")
                await trio.lowlevel.checkpoint()  # the cancellation lands here, after the answer
                outcome.append("not reached")

        await joiner()
        assert outcome[1:] == ["still running after the join"]
        task = outcome[0]
        assert isinstance(task, RoomTask)
        assert [frame["type"] for frame in member.frames] == ["joined-room"]
        room = hub.get("r")
        assert room is not None and list(room.seats) == ["a"]
        nursery.cancel_scope.cancel()
