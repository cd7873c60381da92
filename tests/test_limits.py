"""Token buckets, message-rate verdicts and per-address connection counts, on a fake clock."""

from __future__ import annotations

import pytest

from signald._limits import BucketsByKey, ConnectionCounter, MessageRate, Refusal, TokenBucket, Verdict, retry_after


def test_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket.full(rate=10, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(0.0) == pytest.approx(0.1)
    assert not bucket.take(0.05)
    assert bucket.take(0.1)
    assert bucket.wait(0.1) == pytest.approx(0.1)
    # A long pause refills to the burst, never beyond it.
    assert bucket.is_full(100.0) and bucket.tokens == 3
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_ignores_a_clock_stepping_back() -> None:
    bucket = TokenBucket.full(rate=1, burst=1, now=50.0)
    assert bucket.take(50.0)
    assert not bucket.take(10.0)  # earlier than the last refill: no tokens appear or vanish
    assert bucket.take(51.0)


def test_message_rate_drops_then_closes_after_sustained_abuse() -> None:
    rate = MessageRate(rate=100, burst=5, close_after=3, now=0.0)
    verdicts = [rate.check(0.0) for _ in range(8)]
    assert verdicts == [Verdict.ACCEPT] * 5 + [Verdict.DROP, Verdict.DROP, Verdict.CLOSE]


def test_message_rate_forgives_a_client_that_slowed_down() -> None:
    rate = MessageRate(rate=100, burst=5, close_after=3, now=0.0)
    for _ in range(5):
        rate.check(0.0)
    assert [rate.check(0.0), rate.check(0.0)] == [Verdict.DROP, Verdict.DROP]
    assert rate.check(0.011) is Verdict.ACCEPT  # one token back: still counting (2 drops)
    assert rate.check(0.011) is Verdict.CLOSE  # not yet refilled: the third drop closes
    fresh = MessageRate(rate=100, burst=5, close_after=3, now=0.0)
    for _ in range(7):
        fresh.check(0.0)
    assert fresh.dropped == 2
    assert fresh.check(1.0) is Verdict.ACCEPT  # the bucket refilled completely: forgiven
    assert fresh.dropped == 0


def test_message_rate_without_close_only_drops() -> None:
    rate = MessageRate(rate=1, burst=1, close_after=0, now=0.0)
    assert rate.check(0.0) is Verdict.ACCEPT
    assert {rate.check(0.0) for _ in range(10_000)} == {Verdict.DROP}


def test_honest_burst_of_1000_with_defaults_is_never_limited() -> None:
    rate = MessageRate(rate=1000, burst=2000, close_after=1000, now=0.0)
    assert {rate.check(0.0) for _ in range(1000)} == {Verdict.ACCEPT}
    # Several hundred per second, sustained for a minute.
    assert {rate.check(i / 500) for i in range(30_000)} == {Verdict.ACCEPT}


def test_buckets_by_key_are_independent_and_say_how_long_to_wait() -> None:
    buckets = BucketsByKey(rate=0.5, burst=2)
    assert [buckets.take("a", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert buckets.take("a", 0.0) == pytest.approx(2.0)
    assert buckets.take("b", 0.0) == 0.0
    assert buckets.take("a", 1.0) == pytest.approx(1.0)
    assert buckets.take("a", 2.0) == 0.0
    assert retry_after(0.01) == "1" and retry_after(1.0) == "1" and retry_after(1.2) == "2"


def test_buckets_by_key_forget_full_buckets_so_memory_stays_bounded() -> None:
    buckets = BucketsByKey(rate=1, burst=1)
    for i in range(10 * BucketsByKey.PRUNE_FLOOR):
        assert buckets.take(f"10.0.{i // 256}.{i % 256}", float(i)) == 0.0
    # Each address is full again a second later, so the table never grows past twice the floor.
    assert len(buckets) <= 2 * BucketsByKey.PRUNE_FLOOR
    # A bucket still draining is kept: its address cannot reset its limit by waiting for a prune.
    busy = BucketsByKey(rate=0.001, burst=1)
    busy.take("abuser", 0.0)
    for i in range(3 * BucketsByKey.PRUNE_FLOOR):
        busy.take(f"other{i}", 0.0)
    assert busy.take("abuser", 1.0) > 0


def test_connection_counter_caps_per_address_and_in_total() -> None:
    counter = ConnectionCounter(total=3, per_address=2)
    with counter.hold("a"), counter.hold("a"):
        assert counter.refusal("a") is Refusal.ADDRESS
        assert counter.refusal("b") is None
        with counter.hold("b"):
            assert counter.total == 3
            assert counter.refusal("c") is Refusal.SERVER
            assert counter.refusal("a") is Refusal.ADDRESS
        assert counter.count("a") == 2 and counter.count("b") == 0
    assert counter.total == 0 and counter.count("a") == 0
    assert counter.refusal("a") is None


def test_connection_counter_releases_on_error() -> None:
    counter = ConnectionCounter(total=1, per_address=1)
    with pytest.raises(RuntimeError), counter.hold("a"):
        raise RuntimeError
    assert counter.refusal("a") is None and counter.total == 0
