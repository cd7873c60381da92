"""GET /metrics: off by default, on the main port or a listener of its own, numbers that match
the traffic exactly, and output, scrape config and alert rules that Prometheus's promtool accepts."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from signald import _messages as m
from signald._config import ConfigError, structure
from signald._metrics import LAG_INTERVAL, Metrics, State
from signald._server import REFUSALS_LOGGED_BURST

from ._clients import TIMEOUT, connect, http_request, text_frame
from .adversarial._harness import raw_websocket, refusal_code, upgrade_status

ROOT = Path(__file__).parent.parent
PROMETHEUS_DOCS = ROOT / "docs/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
#: Eviction needs a send queue small enough to overflow quickly (see tests/adversarial/test_floods.py).
EVICTABLE = {"max_message_bytes": 16384, "send_queue_bytes": 32768, "max_sdp_length": 16000}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> tuple[str, Samples]:
    status, headers, body = await http_request(port, "GET", "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=")
    return parse(body.decode())


def parse(text: str) -> tuple[str, Samples]:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def labelled(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The non-zero samples of ``name``, by the value of ``label``."""
    return {dict(labels)[label]: n for (sample, labels), n in samples.items() if sample == name and n}


async def settled(port: int, connections: int) -> Samples:
    """A scrape once ``signald_connections`` has come down to ``connections``: the server has
    finished with every socket the test closed (bounded: a bug fails instead of hanging)."""
    with trio.fail_after(TIMEOUT):
        while True:
            _, samples = await scrape(port)
            if value(samples, "signald_connections") == connections:
                return samples
            await trio.testing.wait_all_tasks_blocked(0.01)


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)


async def test_metrics_are_off_by_default(server_factory: Callable[..., Any]) -> None:
    for sections in ({}, {"metrics": {"bind": "127.0.0.1:0"}}):  # a bind alone turns nothing on
        server = await server_factory(**sections)
        assert server.port and server.metrics_port is None
        status, _, body = await http_request(server.port, "GET", "/metrics")
        assert (status, body["error"]) == (404, "not-found")


async def test_counts_match_the_traffic_exactly(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(metrics={"enabled": True}, rooms={"max_participants": 2}, limits=EVICTABLE)
    assert server.port
    port = server.port
    async with connect(port) as a, connect(port) as b, connect(port) as c:
        await a.join("r", "a")
        await b.join("r", "b")
        await a.expect("user-joined", peerId=b.peer_id)
        _, samples = await scrape(port)
        assert value(samples, "signald_connections") == 3
        assert (value(samples, "signald_rooms"), value(samples, "signald_members")) == (1, 2)

        await a.send(type="webrtc-offer", to=b.peer_id, sdp="o")
        await b.expect("webrtc-offer", sdp="o")
        await b.send(type="webrtc-answer", to=a.peer_id, sdp="a")
        await a.expect("webrtc-answer", sdp="a")
        for n in range(3):
            await a.send(type="ice-candidate", to=b.peer_id, candidate={"candidate": f"c{n}"})
            await b.expect("ice-candidate")
        await a.send(type="webrtc-offer", to="nobody", sdp="o")
        await a.expect("error", code="peer-not-found")
        await c.send(type="ice-candidate", to=a.peer_id, candidate={"candidate": "c"})
        await c.expect("error", code="not-in-room")
        await c.ws.send_message("{")
        await c.expect("error", code="invalid-json")
        await c.send(type="join-room", roomId="r", username="c")
        await c.expect("error", code="room-full")
        await b.send(type="leave-room")
        await a.expect("user-left", peerId=b.peer_id)

        # A member that never reads, fed until it is evicted.
        async with raw_websocket(port, rcvbuf=4096) as sink, connect(port) as feeder:
            await feeder.join("sink", "feeder")
            await sink.send(text_frame({"type": "join-room", "roomId": "sink", "username": "never-reads"}))
            joined = await feeder.expect("user-joined", username="never-reads")
            flood = 0
            with trio.fail_after(TIMEOUT):
                for _ in range(2000):  # bounded: kernel buffers fill long before this
                    await feeder.send(type="webrtc-offer", to=joined["peerId"], sdp="x" * 15_000)
                    # To itself, through the room: arrives after whatever that offer caused.
                    await feeder.send(type="webrtc-offer", to=feeder.peer_id, sdp="sync")
                    flood += 1
                    reply = await feeder.recv()
                    if reply["type"] == "user-left":
                        await feeder.expect("webrtc-offer", sdp="sync")
                        break
                    assert reply["sdp"] == "sync"
                else:
                    raise AssertionError("the member that never reads was never evicted")
            assert await sink.expect_close() == 1008

    samples = await settled(port, 0)
    assert (value(samples, "signald_rooms"), value(samples, "signald_members")) == (0, 0)
    relays = labelled(samples, "signald_relays_total", "type")
    assert relays == {"webrtc-offer": 2 + 2 * flood, "webrtc-answer": 1, "ice-candidate": 3}
    assert value(samples, "signald_relay_duration_seconds_count") == sum(relays.values())  # all reached their room
    # a, b, feeder and the member that never reads; c's join was refused (room-full).
    assert value(samples, "signald_joins_total") == 4
    assert value(samples, "signald_join_duration_seconds_count") == 5
    # b's leave-room, the eviction, and a and the feeder disconnecting.
    assert value(samples, "signald_leaves_total") == 4
    assert value(samples, "signald_evictions_total") == 1
    errors = labelled(samples, "signald_errors_total", "code")
    assert errors == {"peer-not-found": 1, "not-in-room": 1, "invalid-json": 1, "room-full": 1}
    # a, b, c and the feeder closed; the member that never read was evicted.
    assert labelled(samples, "signald_websocket_closes_total", "code") == {"1000": 4, "1008": 1}


async def test_a_scrape_passes_promtool_check_metrics(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(metrics={"enabled": True})
    assert server.port
    async with connect(server.port) as a, connect(server.port) as b:
        await a.join("r", "a")
        await b.join("r", "b")
        await a.send(type="webrtc-offer", to=b.peer_id, sdp="o")
        await b.expect("webrtc-offer")
        await b.send(type="nonsense")
        await b.expect("error", code="unknown-type")
    text, _ = await scrape(server.port)
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr
    for name in ("signald_relay_duration_seconds_bucket", "signald_event_loop_lag_seconds_count"):
        assert name in text


async def test_no_label_carries_a_room_or_member_id(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(metrics={"enabled": True})
    assert server.port
    async with connect(server.port) as a, connect(server.port) as b:
        await a.join("room-with-a-name", "alice")
        await b.join("room-with-a-name", "bob")
        await a.send(type="webrtc-offer", to=b.peer_id, sdp="o")
        await b.expect("webrtc-offer")
        text, samples = await scrape(server.port)
    for needle in ("room-with-a-name", "alice", "bob", a.peer_id, b.peer_id):
        assert needle and needle not in text
    assert all(name.startswith("signald_") for name, _ in samples)


def test_metrics_bind_must_be_host_and_port() -> None:
    for bind in ("9464", "127.0.0.1", "127.0.0.1:99999", "::1:9464", "[nope]:9464", "a b:9464"):
        with pytest.raises(ConfigError) as info:
            structure({"metrics": {"enabled": True, "bind": bind}})
        assert info.value.key == "metrics.bind", bind
    for bind in ("127.0.0.1:9464", "[::1]:9464", "localhost:9464"):
        assert structure({"metrics": {"enabled": True, "bind": bind}}).metrics.bind == bind


def test_alert_rules_pass_promtool_and_fire_when_they_should(tmp_path: Path) -> None:
    checked = promtool("check", "rules", str(PROMETHEUS_DOCS / "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 4 rules found" in checked.stdout
    shutil.copy(PROMETHEUS_DOCS / "alerts.yml", tmp_path)
    shutil.copy(Path(__file__).parent / "prometheus/alerts_test.yml", tmp_path)
    tested = promtool("test", "rules", str(tmp_path / "alerts_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_scrape_config_passes_promtool(tmp_path: Path) -> None:
    config = (PROMETHEUS_DOCS / "prometheus.yml").read_text()
    assert "/etc/prometheus/signald-alerts.yml" in config
    # The rule file where the comment says to install it; here, the one in docs/.
    local = tmp_path / "prometheus.yml"
    local.write_text(config.replace("/etc/prometheus/signald-alerts.yml", str(PROMETHEUS_DOCS / "alerts.yml")))
    checked = promtool("check", "config", str(local))
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_metrics_bind_is_a_listener_of_its_own(server_factory: Callable[..., Any]) -> None:
    server = await server_factory(metrics={"enabled": True, "bind": "127.0.0.1:0"})
    assert server.port and server.metrics_port and server.metrics_port != server.port
    status, _, body = await http_request(server.port, "GET", "/metrics")
    assert (status, body["error"]) == (404, "not-found")  # not on the public port
    _, samples = await scrape(server.metrics_port)
    assert value(samples, "signald_connections") == 0
    # Nothing else is served there: not the REST API, not WebSockets.
    for method, path, expected in (("GET", "/health", 404), ("GET", "/api/rooms", 404), ("POST", "/metrics", 405)):
        status, _, body = await http_request(server.metrics_port, method, path, b"" if method == "POST" else None)
        assert status == expected, (method, path, body)
    status, stream = await upgrade_status(server.metrics_port)
    async with stream:
        assert status == 404
    status, _, body = await http_request(server.port, "GET", "/health")
    assert status == 200


async def test_refused_upgrades_are_counted_and_logged_with_reason_and_origin(
    server_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    server = await server_factory(
        metrics={"enabled": True},
        cors={"allowed_origins": ["https://meet.example.com"]},
        limits={"max_connections_per_ip": 1},
    )
    assert server.port
    caplog.set_level(logging.INFO, logger="signald")
    status, stream = await upgrade_status(server.port, headers=b"Origin: https://evil.example\r\n")
    async with stream:
        assert (status, await refusal_code(stream)) == (403, "origin-not-allowed")
    (line,) = [r for r in caplog.records if "upgrade refused" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert "origin-not-allowed" in line.getMessage() and "'https://evil.example'" in line.getMessage()
    caplog.clear()
    async with connect(server.port, origin="https://meet.example.com"):
        status, stream = await upgrade_status(server.port, headers=b"Origin: https://meet.example.com\r\n")
        async with stream:
            assert (status, await refusal_code(stream)) == (429, "too-many-connections")
    (line,) = [r for r in caplog.records if "upgrade refused" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert "too-many-connections" in line.getMessage() and "'https://meet.example.com'" in line.getMessage()
    # A flood is counted in full but logged only up to the burst (and what refills meanwhile).
    caplog.clear()
    flood = 3 * REFUSALS_LOGGED_BURST
    for _ in range(flood):
        status, stream = await upgrade_status(server.port, headers=b"Origin: https://evil.example\r\n")
        async with stream:
            assert status == 403
    logged = [r for r in caplog.records if "upgrade refused" in r.getMessage()]
    assert 1 <= len(logged) < REFUSALS_LOGGED_BURST + 5
    _, samples = await scrape(server.port)
    assert labelled(samples, "signald_upgrades_refused_total", "reason") == {
        "origin-not-allowed": 1 + flood,
        "too-many-connections": 1,
    }


def test_every_error_code_in_the_protocol_is_counted() -> None:
    """An error code the metrics did not know once crashed the connection that was sent it."""
    codes = {
        value
        for name, value in vars(m).items()  # every constant of _messages spelt like an error code
        if name.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z]+(-[a-z]+)*", value)
    }
    assert {m.UNAUTHORIZED, m.RESUME_FAILED, m.CLUSTER_UNAVAILABLE} <= codes
    metrics = Metrics(lambda: State(0, 0, 0))
    for code in codes:
        metrics.error_sent(code)
    _, samples = parse(metrics.render()[0].decode())
    assert labelled(samples, "signald_errors_total", "code") == dict.fromkeys(codes, 1)


def test_the_cluster_gauges_are_exported_in_cluster_mode_only() -> None:
    single = parse(Metrics(lambda: State(0, 0, 0)).render()[0].decode())[1]
    assert not [name for name, _ in single if name.startswith("signald_cluster_")]
    for degraded, queued in ((False, 0), (True, 4096)):
        samples = parse(Metrics(lambda d=degraded, q=queued: State(0, 0, 0, d, q)).render()[0].decode())[1]
        assert value(samples, "signald_cluster_degraded") == int(degraded)
        assert value(samples, "signald_cluster_send_queue_bytes") == queued


def test_close_codes_outside_rfc_6455_share_one_label() -> None:
    metrics = Metrics(lambda: State(0, 0, 0))
    for code in (1000, 4000, 4999, 3001, None, 1005):
        metrics.closed(code)
    _, samples = parse(metrics.render()[0].decode())
    assert labelled(samples, "signald_websocket_closes_total", "code") == {"1000": 1, "other": 3, "none": 1, "1005": 1}


async def test_event_loop_lag_is_how_late_a_sleep_wakes_up(nursery: trio.Nursery) -> None:
    metrics = Metrics(lambda: State(0, 0, 0))
    await nursery.start(metrics.watch_event_loop)
    # A task that hogs the loop (the very thing measured): the watcher wakes up 0.2 s late.
    time.sleep(LAG_INTERVAL + 0.2)  # noqa: ASYNC251
    with trio.fail_after(TIMEOUT):
        while True:
            await trio.testing.wait_all_tasks_blocked(0.01)
            _, samples = parse(metrics.render()[0].decode())
            if value(samples, "signald_event_loop_lag_seconds_count"):
                break
    assert value(samples, "signald_event_loop_lag_seconds_sum") >= 0.2
    late = value(samples, "signald_event_loop_lag_seconds_count") - value(
        samples, "signald_event_loop_lag_seconds_bucket", le="0.1"
    )
    assert late >= 1  # that wake-up is in a bucket above 100 ms


async def test_relay_times_land_in_buckets_from_50_microseconds(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics(lambda: State(0, 0, 0))
    now = trio.current_time()
    for seconds in (0.00004, 0.00004, 0.0003, 0.003, 2.0):
        metrics.delivered(now - seconds)
    _, samples = parse(metrics.render()[0].decode())
    buckets = labelled(samples, "signald_relay_duration_seconds_bucket", "le")
    assert min(buckets, key=float) == "5e-05"
    assert (buckets["5e-05"], buckets["0.0005"], buckets["0.005"], buckets["1.0"], buckets["+Inf"]) == (2, 3, 4, 4, 5)
    assert value(samples, "signald_relay_duration_seconds_count") == 5
    assert value(samples, "signald_relay_duration_seconds_sum") == pytest.approx(2.00338)
