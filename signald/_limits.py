"""Abuse limits as pure bookkeeping: token buckets, and connection counts per client address.

Nothing here does I/O or reads a clock. Callers pass ``now`` (``trio.current_time()`` in a
session, a monotonic clock for REST), so every limit is tested with a fake clock, and the
decisions are the same whatever the socket layer looks like.

Per-address state lives here and only here: the open WebSockets per address (a count that
returns to zero, so the table holds only addresses with open connections) and the room-creation
buckets per address (pruned once full again, so an address that went quiet costs nothing).
"""

from __future__ import annotations

import enum
import math

import attrs


@attrs.define
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second; each event takes one.

    A bucket rather than a fixed window because a window lets a client send twice its limit
    across a window edge, and a bucket allows exactly the burst it advertises.
    """

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def _refill(self, now: float) -> None:
        if now > self.stamp:  # a clock that steps back refills nothing, and never drains
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst

    def take(self, now: float) -> bool:
        """Take a token if there is one."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds until a token will be there (0 if one is there now)."""
        self._refill(now)
        return max(0.0, (1 - self.tokens) / self.rate)


class Verdict(enum.Enum):
    ACCEPT = "accept"
    DROP = "drop"
    CLOSE = "close"


class MessageRate:
    """One connection's message rate: accept, drop (``rate-limited``), or close (1008).

    Dropping alone would let an abuser keep a connection busy forever at no cost to itself,
    so drops are counted, and ``close_after`` of them close the connection. The count is
    forgiven once the bucket has refilled completely: a client that overshot once and then
    slowed down is not punished for it later.
    """

    __slots__ = ("_bucket", "_close_after", "dropped")

    def __init__(self, rate: float, burst: int, close_after: int, now: float) -> None:
        self._bucket = TokenBucket.full(rate, burst, now)
        self._close_after = close_after
        self.dropped = 0

    def check(self, now: float) -> Verdict:
        if self.dropped and self._bucket.is_full(now):
            self.dropped = 0
        if self._bucket.take(now):
            return Verdict.ACCEPT
        self.dropped += 1
        if self._close_after and self.dropped >= self._close_after:
            return Verdict.CLOSE
        return Verdict.DROP


class BucketsByKey:
    """A token bucket per key (a client address), created full and forgotten once full again.

    A full bucket is indistinguishable from a missing one, so pruning full buckets loses
    nothing; it runs when the table has doubled since the last pruning, which keeps it
    amortised O(1) per call however many addresses come and go.
    """

    PRUNE_FLOOR = 1024

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: dict[str, TokenBucket] = {}
        self._prune_at = self.PRUNE_FLOOR

    def __len__(self) -> int:
        return len(self._buckets)

    def retune(self, rate: float, burst: int) -> None:
        """New rate and burst (a configuration reload), for known keys too: nobody starts afresh."""
        self._rate, self._burst = rate, burst
        for bucket in self._buckets.values():
            bucket.rate, bucket.burst = rate, burst
            bucket.tokens = min(bucket.tokens, burst)

    def take(self, key: str, now: float) -> float:
        """0.0 if ``key`` may go ahead now (a token is taken), else the seconds to wait."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._prune_at:
                self._prune(now)
            bucket = self._buckets[key] = TokenBucket.full(self._rate, self._burst, now)
        if bucket.take(now):
            return 0.0
        return bucket.wait(now)

    def _prune(self, now: float) -> None:
        self._buckets = {key: bucket for key, bucket in self._buckets.items() if not bucket.is_full(now)}
        self._prune_at = max(self.PRUNE_FLOOR, 2 * len(self._buckets))


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


class Refusal(enum.Enum):
    #: The client address has ``per_address`` connections open already (HTTP 429).
    ADDRESS = "address"
    #: The server has ``total`` connections open already (HTTP 503).
    SERVER = "server"


class ConnectionCounter:
    """Open WebSockets, in total and per client address, against their two caps.

    ``refusal`` and ``hold`` are synchronous and meant to be called with no checkpoint in
    between, so under trio no other handshake can slip past the check before the count moves.
    """

    def __init__(self, total: int, per_address: int) -> None:
        self.total_cap = total
        self.per_address_cap = per_address
        self.total = 0
        self._by_address: dict[str, int] = {}

    def count(self, address: str) -> int:
        return self._by_address.get(address, 0)

    def refusal(self, address: str) -> Refusal | None:
        if self._by_address.get(address, 0) >= self.per_address_cap:
            return Refusal.ADDRESS
        if self.total >= self.total_cap:
            return Refusal.SERVER
        return None

    def hold(self, address: str) -> _Held:
        """Count one connection from ``address`` for the duration of the block."""
        return _Held(self, address)

    def _add(self, address: str) -> None:
        self.total += 1
        self._by_address[address] = self._by_address.get(address, 0) + 1

    def _remove(self, address: str) -> None:
        self.total -= 1
        left = self._by_address[address] - 1
        if left:
            self._by_address[address] = left
        else:
            del self._by_address[address]


class _Held:
    """:meth:`ConnectionCounter.hold`'s block: a slotted object, not a generator, because every
    open WebSocket keeps one for its whole life (a ``@contextmanager``'s generator frame and
    wrapper cost ~450 bytes more per connection)."""

    __slots__ = ("_address", "_counter")

    def __init__(self, counter: ConnectionCounter, address: str) -> None:
        self._counter = counter
        self._address = address

    def __enter__(self) -> None:
        self._counter._add(self._address)

    def __exit__(self, *exc_info: object) -> None:
        self._counter._remove(self._address)
