"""Metrics: every number signald exports to Prometheus, and the interface the daemon reports them through.

Rule 1: this is the only module that knows Prometheus. The session, the room tasks and the
server report what happened to an :class:`Observer` (a relay of some type, a join and how long
it took, an error code sent, an eviction, a close code); :class:`Observer` itself ignores it all,
and is what they get while ``metrics.enabled`` is false, so then each report costs one call of a
method that returns at once. :class:`Metrics` is the observer that counts.

Rule 2: what is a state, not an event (open connections, rooms, members), is read from its owner
when Prometheus scrapes, through the ``state`` callable, never kept up to date per event: the
relay path pays nothing for it, and the figure cannot drift from the truth.

Rule 3: an event costs an integer increment (and, for a time, a ``bisect``), no more. Counts are
plain ints and lists here, turned into prometheus-client's metric families only when scraped:
its own Counter and Histogram take a lock per increment (they are made for threads; signald runs
in one), which measured 10 to 30 times the cost of a plain increment on the relay path.

Rule 4: every label has a small fixed set of values (a relay type, an error code, a close code),
never a room id, a member id or an address: each label value is a time series Prometheus keeps.
Close codes a client chooses (1000-4999) are folded into "other" beyond the ones RFC 6455 names.

Names start with ``signald_``, are in base units (seconds, bytes) and counters end in ``_total``,
as Prometheus's naming guide asks; ``promtool check metrics`` holds the output to it (tests).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

import attrs
import prometheus_client
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import _messages as m
from ._version import __version__

#: Relay time inside the server, from the frame read off the sender's socket to the relayed frame
#: queued for the recipient: tens of microseconds when all is well, hence buckets from 50 us.
RELAY_BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: Join time: from the join handed to the room hub to the room's answer (seated or refused).
JOIN_BUCKETS = (100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: How late the event loop wakes a task up: anything past a few milliseconds delays every call.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Seconds between two measurements of the event-loop lag.
LAG_INTERVAL = 0.5

RELAY_TYPES = ("webrtc-offer", "webrtc-answer", "ice-candidate")
#: Close codes with a label of their own (RFC 6455 7.4.1; 1005: a close frame without a code); any
#: other is counted as "other".
CLOSE_CODES = (1000, 1001, 1002, 1003, 1005, 1007, 1008, 1009, 1011)
#: The label of a connection that ended without a close code (EOF, a reset, a close-handshake timeout).
NO_CLOSE_CODE = "none"


@attrs.frozen
class State:
    """What the server holds right now, read at scrape time."""

    connections: int
    rooms: int
    members: int
    #: Cluster mode only: whether this node cannot reach Redis (see ``/health``); None otherwise.
    cluster_degraded: bool | None = None
    #: Cluster mode only: bytes queued for Redis and not yet answered (``cluster.send_queue_bytes``).
    cluster_send_queue_bytes: int | None = None


class Observer:
    """Where the daemon reports what it did. This one ignores every report (metrics off).

    Times (``received_at``, ``started_at``) are ``trio.current_time()`` values the caller had at
    hand anyway; only the counting observer reads the clock again.
    """

    def relayed(self, message_type: str) -> None:
        """A member sent a relay (``webrtc-offer``, ``webrtc-answer``, ``ice-candidate``)."""

    def delivered(self, received_at: float) -> None:
        """The room handled a relay whose frame was read off the socket at ``received_at``."""

    def joined(self, started_at: float) -> None:
        """A member was seated; the join had been handed to the hub at ``started_at``."""

    def join_refused(self, started_at: float) -> None:
        """A join was answered with an error (the error is reported too, by code)."""

    def left(self, members: int) -> None:
        """``members`` left their rooms: leave-room, a disconnect, or an eviction."""

    def error_sent(self, code: str) -> None:
        """An ``error`` frame with ``code`` went to a client."""

    def evicted(self) -> None:
        """A connection was closed for not reading (its send queue overflowed)."""

    def closed(self, code: int | None) -> None:
        """A WebSocket ended, with this close code (None: without one)."""

    def refused(self, reason: str) -> None:
        """A WebSocket upgrade was refused, for ``reason`` (an error code such as ``origin-not-allowed``)."""


class _Histogram:
    """Observations counted into ``bounds`` (upper bounds, inclusive, as Prometheus's ``le``)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: over every bound (+Inf)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets, cumulative = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


class Metrics(Observer, Collector):
    """The observer that counts, in a registry of its own (so two servers in one process,
    as in the tests, do not share numbers); ``render`` is the body of GET /metrics."""

    def __init__(self, state: Callable[[], State]) -> None:
        self._state = state
        self._relays = dict.fromkeys(RELAY_TYPES, 0)
        self._relay_seconds = _Histogram(RELAY_BUCKETS)
        self._joins = 0
        self._join_seconds = _Histogram(JOIN_BUCKETS)
        self._leaves = 0
        self._errors = dict.fromkeys(m.ERROR_CODES, 0)
        self._evictions = 0
        self._closes: dict[int | None, int] = dict.fromkeys((*CLOSE_CODES, None), 0)
        self._other_closes = 0
        self._refusals: dict[str, int] = {}  # reasons are _upgrade's error codes: a handful
        self._lag = _Histogram(LAG_BUCKETS)
        self.registry = registry = prometheus_client.CollectorRegistry()
        registry.register(self)
        prometheus_client.ProcessCollector(namespace="signald", registry=registry)

    def relayed(self, message_type: str) -> None:
        self._relays[message_type] += 1

    def delivered(self, received_at: float) -> None:
        self._relay_seconds.observe(trio.current_time() - received_at)

    def joined(self, started_at: float) -> None:
        self._joins += 1
        self._join_seconds.observe(trio.current_time() - started_at)

    def join_refused(self, started_at: float) -> None:
        self._join_seconds.observe(trio.current_time() - started_at)

    def left(self, members: int) -> None:
        self._leaves += members

    def error_sent(self, code: str) -> None:
        self._errors[code] += 1

    def evicted(self) -> None:
        self._evictions += 1

    def closed(self, code: int | None) -> None:
        if code in self._closes:
            self._closes[code] += 1
        else:
            self._other_closes += 1

    def refused(self, reason: str) -> None:
        self._refusals[reason] = self._refusals.get(reason, 0) + 1

    def collect(self) -> Iterator[Metric]:
        """What a scrape shows (``Collector``): the counts so far, and the state right now."""
        state = self._state()
        yield GaugeMetricFamily("signald_connections", "Open WebSocket connections.", value=state.connections)
        yield GaugeMetricFamily("signald_rooms", "Live rooms.", value=state.rooms)
        yield GaugeMetricFamily("signald_members", "Members in all rooms.", value=state.members)
        if state.cluster_degraded is not None:
            yield GaugeMetricFamily(
                "signald_cluster_degraded",
                "1 while this node cannot reach Redis and serves its local rooms only (cluster mode).",
                value=int(state.cluster_degraded),
            )
        if state.cluster_send_queue_bytes is not None:
            yield GaugeMetricFamily(
                "signald_cluster_send_queue_bytes",
                "Bytes this node has queued for Redis and not yet had answered; at cluster.send_queue_bytes,"
                " relays to other nodes and joins are refused with cluster-unavailable (cluster mode).",
                value=state.cluster_send_queue_bytes,
            )
        build = GaugeMetricFamily("signald_build_info", "The running signald.", labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        yield _counter("signald_relays_total", "Relay messages received from members, by type.", "type", self._relays)
        yield self._relay_seconds.family(
            "signald_relay_duration_seconds",
            "Time from the read that brought a relay to its frame queued for the recipient.",
        )
        yield CounterMetricFamily("signald_joins_total", "Members seated in a room.", value=self._joins)
        yield self._join_seconds.family(
            "signald_join_duration_seconds", "Time from a join handed to the room hub to the room's answer."
        )
        yield CounterMetricFamily(
            "signald_leaves_total",
            "Members that left their room: leave-room, a disconnect, or an eviction.",
            value=self._leaves,
        )
        yield _counter("signald_errors_total", "Error messages sent to clients, by code.", "code", self._errors)
        yield CounterMetricFamily(
            "signald_evictions_total",
            "Connections closed (1008) because their send queue overflowed: the client was not reading.",
            value=self._evictions,
        )
        closes = {NO_CLOSE_CODE if code is None else str(code): n for code, n in self._closes.items()}
        closes["other"] = self._other_closes
        yield _counter("signald_websocket_closes_total", "WebSocket connections ended, by close code.", "code", closes)
        yield _counter(
            "signald_upgrades_refused_total",
            "WebSocket upgrades refused, by the error code of the refusal.",
            "reason",
            self._refusals,
        )
        yield self._lag.family(
            "signald_event_loop_lag_seconds", f"How much later than asked a task sleeping {LAG_INTERVAL:g} s wakes up."
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition (Prometheus text format) and its Content-Type."""
        return prometheus_client.generate_latest(self.registry), prometheus_client.CONTENT_TYPE_LATEST

    async def watch_event_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sleep ``LAG_INTERVAL`` again and again and record how late each wake-up comes.

        A late wake-up means some task ran long without a checkpoint (or the machine is starved
        of CPU): every WebSocket waits for it the same way.
        """
        task_status.started()
        while True:
            asked = trio.current_time() + LAG_INTERVAL
            await trio.sleep_until(asked)
            self._lag.observe(max(0.0, trio.current_time() - asked))


def _counter(name: str, documentation: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family
