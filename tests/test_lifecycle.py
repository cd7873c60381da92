"""Start-up, drain on shutdown, crash isolation, and the console script as a real process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from signald import Server
from signald._rest import RestApi

from ._clients import TIMEOUT, UPGRADE_REQUEST, connect, http_request, read_response, text_frame
from .conftest import make_config

ROOT = Path(__file__).parent.parent


async def test_shutdown_drains_within_grace() -> None:
    server = Server(make_config(server={"shutdown_grace": 2.0}, limits={"close_timeout": 5.0}))
    # Its own nursery, so the test can see serve() return.
    async with trio.open_nursery() as inner:
        await inner.start(server.serve)
        assert server.port
        port = server.port
        health_stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        async with connect(port) as a, connect(port) as b:
            await a.join("r", "a")
            await b.join("r", "b")
            # A peer that will never answer the close handshake.
            mute = await trio.open_tcp_stream("127.0.0.1", port)
            await mute.send_all(UPGRADE_REQUEST + text_frame({"type": "join-room", "roomId": "r", "username": "mute"}))
            await a.expect("user-joined")
            await a.expect("user-joined")
            started_at = trio.current_time()
            server.shutdown()
            for client in (a, b):
                with pytest.raises(ConnectionClosed) as info, trio.fail_after(TIMEOUT):
                    while True:
                        await client.ws.get_message()
                assert info.value.reason.code == 1001
            # A connection accepted before the drain still gets its first request answered:
            # /health says 503, so a load balancer looking at it stops sending.
            await health_stream.send_all(
                conn.send(h11.Request(method="GET", target="/health", headers=[("Host", "x")]))
            )
            await health_stream.send_all(conn.send(h11.EndOfMessage()))
            with trio.fail_after(TIMEOUT):
                status, headers, body = await read_response(conn, health_stream)
            assert status == 503 and body["status"] == "shutting-down"
            assert headers.get("connection") == "close"
        # Meanwhile nothing new is accepted (while the mute peer keeps the drain going): the
        # listener is closed, so without systemd holding the socket a connection is refused.
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
    # inner exits once serve() has returned: bounded by the grace, despite the mute peer.
    assert trio.current_time() - started_at < 2.0 + 1.0
    await mute.aclose()
    await health_stream.aclose()


def _post_room(name: str) -> tuple[bytes, bytes]:
    """A POST /api/rooms request cut in two: everything but the body's last byte, and that byte."""
    body = json.dumps({"name": name}).encode()
    head = b"POST /api/rooms HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    return head + body[:-1], body[-1:]


async def test_drain_finishes_the_request_under_way_and_closes_idle_keep_alive() -> None:
    server = Server(make_config(server={"shutdown_grace": 30.0, "request_timeout": 30.0}))
    # serve() must return by itself once both are done, long before the grace or the request timeout.
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as inner:
            await inner.start(server.serve)
            assert server.port
            idle = await trio.open_tcp_stream("127.0.0.1", server.port)
            idle_conn = h11.Connection(h11.CLIENT)
            await idle.send_all(idle_conn.send(h11.Request(method="GET", target="/api/rooms", headers=[("Host", "x")])))
            await idle.send_all(idle_conn.send(h11.EndOfMessage()))
            with trio.fail_after(TIMEOUT):
                status, headers, _ = await read_response(idle_conn, idle)
            assert status == 200 and "connection" not in headers  # kept alive
            busy = await trio.open_tcp_stream("127.0.0.1", server.port)
            first, rest = _post_room("standup")
            await busy.send_all(first)
            await trio.testing.wait_all_tasks_blocked()  # the server holds the half request
            server.shutdown()
            await trio.testing.wait_all_tasks_blocked()  # the drain has begun
            # The idle keep-alive connection is closed at once, without waiting for request_timeout.
            with trio.fail_after(TIMEOUT):
                assert await idle.receive_some(1024) == b""
            # The request under way is not cut: it completes and is answered in full.
            await busy.send_all(rest)
            with trio.fail_after(TIMEOUT):
                status, headers, body = await read_response(_sent(), busy)
            assert status == 201 and body["name"] == "standup"
            assert headers.get("connection") == "close"
            with trio.fail_after(TIMEOUT):
                assert await busy.receive_some(1024) == b""
    await idle.aclose()
    await busy.aclose()


async def test_every_listener_is_served_and_closed_by_the_drain() -> None:
    with socket.socket() as first, socket.socket() as second:
        for held in (first, second):
            held.bind(("127.0.0.1", 0))
            held.listen(16)
        server = Server(make_config(), [first.dup(), second.dup()])
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            for held in (first, second):
                status, _, _ = await http_request(held.getsockname()[1], "GET", "/health")
                assert status == 200
            server.shutdown()
        # serve() returned by itself: the drain stopped the accepting on both.


def _sent() -> h11.Connection:
    """A client h11 connection that has sent a request, to read the response to one sent by hand."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    return conn


async def test_under_socket_activation_connections_made_during_the_drain_wait_for_the_next_process() -> None:
    # `held` stands in for systemd: it keeps the listening socket while the processes change.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(16)
        port = held.getsockname()[1]
        old = Server(make_config(cors={"allowed_origins": ["https://old.example"]}), [held.dup()])
        new = Server(make_config(cors={"allowed_origins": ["https://new.example"]}), [held.dup()])
        async with trio.open_nursery() as nursery:
            await nursery.start(old.serve)
            busy = await trio.open_tcp_stream("127.0.0.1", port)
            first, rest = _post_room("standup")
            await busy.send_all(first)
            probe = await trio.open_tcp_stream("127.0.0.1", port)
            await probe.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the head's last line to come
            await trio.testing.wait_all_tasks_blocked()
            old.shutdown()
            await trio.testing.wait_all_tasks_blocked()  # draining, held up by the half request
            # Accepted by the kernel into the backlog, not by the draining process.
            late = await trio.open_tcp_stream("127.0.0.1", port)
            await late.send_all(b"GET /api/rooms HTTP/1.1\r\nHost: x\r\nOrigin: https://new.example\r\n\r\n")
            # The port is not going away, so the draining process's last /health says so.
            await probe.send_all(b"\r\n")
            with trio.fail_after(TIMEOUT):
                status, _, body = await read_response(_sent(), probe)
            assert status == 200 and body["status"] == "healthy"
            await busy.send_all(rest)
            with trio.fail_after(TIMEOUT):
                status, _, _ = await read_response(_sent(), busy)
            assert status == 201
        # The old process has gone; its successor takes the same socket and answers.
        async with trio.open_nursery() as nursery:
            await nursery.start(new.serve)
            with trio.fail_after(TIMEOUT):
                status, headers, body = await read_response(_sent(), late)
            assert status == 200 and body == {"rooms": []}
            assert headers["access-control-allow-origin"] == "https://new.example"
            new.shutdown()
        for stream in (busy, probe, late):
            await stream.aclose()


async def test_crash_in_one_connection_does_not_take_the_server_down(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.port
    original = RestApi.handle

    async def explode_on_boom(self: RestApi, request: Any) -> Any:
        if request.path == "/boom":
            raise RuntimeError("bug in a handler")
        return await original(self, request)

    monkeypatch.setattr(RestApi, "handle", explode_on_boom)
    async with connect(server.port) as a:
        await a.join("r", "a")
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(TIMEOUT):
                while await stream.receive_some(1024):
                    pass
        await a.roundtrip_ping()
    status, _, _ = await http_request(server.port, "GET", "/health")
    assert status == 200


def signald(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signald", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def test_version() -> None:
    result = signald("--version")
    assert result.returncode == 0 and re.fullmatch(r"signald \d+\.\d+\.\d+\n", result.stdout)


def test_check_config_accepts_the_example() -> None:
    result = signald("--check-config", "--config", "signald.toml")
    assert result.returncode == 0, result.stderr


def test_check_config_refuses_with_the_key_on_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_message_bytes = 10\n")
    result = signald("--check-config", "--config", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "limits.max_message_bytes" in lines[0]


def test_bad_environment_refuses_to_start() -> None:
    result = signald("--check-config", env={"PORT": "eighty"})
    assert result.returncode == 2 and "PORT" in result.stderr


def test_start_up_with_a_bad_config_exits_2_without_listening(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nprot = 3000\n")
    result = signald("--config", str(bad))
    assert result.returncode == 2 and "server.prot: unknown key" in result.stderr


async def test_console_script_serves_and_drains_on_sigterm(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "signald"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "signald"]
    config = tmp_path / "signald.toml"
    config.write_text('[server]\nport = 0\nshutdown_grace = 5\n[log]\nlevel = "info"\n')
    process = await trio.lowlevel.open_process([*command, "--config", str(config)], stderr=subprocess.PIPE, cwd=ROOT)
    assert process.stderr is not None
    log = b""
    try:
        with trio.fail_after(TIMEOUT):
            while not (match := re.search(rb"listening on 127\.0\.0\.1:(\d+)", log)):
                chunk = await process.stderr.receive_some(4096)
                assert chunk, log
                log += chunk
        port = int(match.group(1))
        async with connect(port) as client:
            await client.join("r", "a")
            process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(TIMEOUT):
                while True:
                    await client.ws.get_message()
            assert info.value.reason.code == 1001
        with trio.fail_after(TIMEOUT):
            while chunk := await process.stderr.receive_some(4096):
                log += chunk
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert b"SIGTERM" in log and b"stopped" in log


def test_a_taken_port_is_one_clear_line_and_exit_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = signald("--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    assert result.stderr.startswith("signald: cannot start: server.port: cannot listen on 127.0.0.1:")
    assert "Traceback" not in result.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_reuse_port_lets_two_servers_share_a_port_and_one_stop() -> None:
    port = _free_port()
    config = make_config(server={"port": port, "reuse_port": True})
    first, second = Server(config), Server(config)
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as inner:
            await inner.start(first.serve)
            await outer.start(second.serve)  # would be "address in use" without SO_REUSEPORT
            assert first.port == second.port == port
            first.shutdown()
        # The first has stopped; every new connection now lands on the second.
        for _ in range(5):
            status, _, body = await http_request(port, "GET", "/health")
            assert status == 200 and body["status"] == "healthy"
        second.shutdown()
