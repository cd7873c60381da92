"""The per-connection send queue: byte accounting, overflow, batching."""

from __future__ import annotations

import trio
import trio.testing

from signald._outbox import Outbox


async def test_take_returns_everything_queued_in_order() -> None:
    box = Outbox(100, lambda: None)
    assert box.push("ab") and box.push("cde")
    assert box.unsent_bytes == 5
    assert await box.take() == ["ab", "cde"]
    box.written(2)
    box.written(3)
    assert box.unsent_bytes == 0


async def test_take_waits_for_a_push() -> None:
    box = Outbox(100, lambda: None)
    got: list[list[str]] = []

    async def taker() -> None:
        got.append(await box.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(taker)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        box.push("x")
    assert got == [["x"]]


async def test_overflow_counts_unwritten_batch_and_reports_once() -> None:
    overflows: list[int] = []
    box = Outbox(10, lambda: overflows.append(1))
    assert box.push("12345")
    assert await box.take() == ["12345"]  # taken but not yet written: still unsent
    assert box.push("123")
    assert not box.push("123")  # 5 + 3 + 3 > 10
    assert overflows == [1]
    assert box.closed
    assert not box.push("1")
    assert overflows == [1]
    assert await box.take() == []


async def test_close_wakes_a_waiting_taker() -> None:
    box = Outbox(10, lambda: None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.take)
        await trio.testing.wait_all_tasks_blocked()
        box.close()


async def test_close_hands_back_what_the_writer_never_took() -> None:
    box = Outbox(100, lambda: None)
    box.push("a")
    assert await box.take() == ["a"]
    box.push("b")
    box.push("c")
    assert box.close() == ["b", "c"]  # a resumed connection gets these
    assert box.close() == [] and not box.push("d")
    assert await box.take() == []
