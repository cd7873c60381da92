"""The per-connection send queue: byte accounting, overflow, batching."""

from __future__ import annotations

import trio
import trio.testing

from signald._outbox import Close, Item, Outbox, Ping, Raw


async def test_take_returns_everything_queued_in_order() -> None:
    box = Outbox(100, lambda: None)
    assert box.push(b"ab") and box.push(b"cde")
    assert box.unsent_bytes == 5
    assert await box.take() == [b"ab", b"cde"]
    box.written(2)
    box.written(3)
    assert box.unsent_bytes == 0


async def test_take_waits_for_a_push() -> None:
    box = Outbox(100, lambda: None)
    got: list[list[Item]] = []

    async def taker() -> None:
        got.append(await box.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        box.push(b"x")
    assert got == [[b"x"]]


async def test_overflow_counts_unwritten_batch_drops_the_queue_and_reports_once() -> None:
    overflows: list[int] = []
    box = Outbox(10, lambda: overflows.append(1))
    assert box.push(b"12345")
    assert await box.take() == [b"12345"]  # taken but not yet written: still unsent
    box.control(Raw(b"pong"))
    assert box.push(b"123")
    assert not box.push(b"123")  # 5 + 3 + 3 > 10
    assert overflows == [1]
    assert box.closed
    assert not box.push(b"1")
    assert overflows == [1]
    box.finish(Close(1008, "overflow"))  # what the session does when told
    assert await box.take() == [Close(1008, "overflow")]  # the queue was dropped, pong included
    assert await box.take() == []


async def test_control_frames_keep_their_place_and_are_not_counted() -> None:
    box = Outbox(4, lambda: None)
    assert box.push(b"ab")
    box.control(Ping(b"1"))
    box.control(Raw(b"\x8a\x00"))
    assert box.push(b"cd")
    assert box.unsent_bytes == 4
    assert await box.take() == [b"ab", Ping(b"1"), Raw(b"\x8a\x00"), b"cd"]


async def test_finish_sends_what_is_queued_then_the_last_frame_then_nothing() -> None:
    box = Outbox(100, lambda: None)
    box.push(b"reply")
    box.finish(Close(1001, "bye"))
    box.finish(Close(1000, "second"))  # the first close wins
    assert not box.push(b"late")
    box.control(Ping(b"late"))
    assert await box.take() == [b"reply", Close(1001, "bye")]
    assert await box.take() == []


async def test_finish_wakes_a_waiting_taker() -> None:
    box = Outbox(10, lambda: None)
    got: list[list[Item]] = []

    async def taker() -> None:
        got.append(await box.take())

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(taker)
            await trio.testing.wait_all_tasks_blocked()
            box.finish()
    assert got == [[]]


async def test_take_text_hands_back_what_the_writer_never_took() -> None:
    box = Outbox(100, lambda: None)
    box.push(b"a")
    assert await box.take() == [b"a"]
    box.push(b"bc")
    box.control(Ping(b"1"))
    box.push(b"d")
    assert box.take_text() == [b"bc", b"d"]  # a resumed connection gets these instead
    assert box.unsent_bytes == 1  # "a" is still being written
    assert box.take_text() == []
    assert await box.take() == [Ping(b"1")]  # control frames stay for this connection
