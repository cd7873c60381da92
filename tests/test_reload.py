"""SIGHUP: log level, CORS origins and limits change under live connections; a bad config changes nothing."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from trio_websocket import ConnectionClosed, ConnectionRejected

from signald._config import reloaded, structure

from ._clients import connect, http_request
from ._process import Daemon, NotifySocket, notify_socket, run_signald


def test_reloaded_takes_safe_sections_and_names_the_rest() -> None:
    running = structure({"server": {"port": 3000}, "rooms": {"max_participants": 4}})
    new = structure(
        {
            "server": {"port": 4000},
            "rooms": {"max_participants": 4},
            "cors": {"allowed_origins": ["https://b.example"]},
            "limits": {"max_message_bytes": 4096},
            "log": {"level": "debug", "format": "json"},
        }
    )
    merged, pending = reloaded(running, new)
    assert (merged.cors, merged.limits, merged.log) == (new.cors, new.limits, new.log)
    assert (merged.server, merged.rooms) == (running.server, running.rooms)
    assert pending == ["server.port"]
    assert reloaded(merged, merged) == (merged, [])


async def hangup(daemon: Daemon, listener: NotifySocket) -> None:
    """SIGHUP, then wait for systemd's view of it: RELOADING=1, then READY=1 when applied."""
    daemon.process.send_signal(signal.SIGHUP)
    assert "RELOADING" in await listener.receive()
    assert "READY" in await listener.wait_for("READY")


async def test_sighup_reloads_without_dropping_connections_and_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "signald.toml"
    config.write_text('[server]\nport = 0\n[cors]\nallowed_origins = ["https://a.example"]\n')
    async with (
        notify_socket(tmp_path) as listener,
        run_signald("--config", str(config), env={"NOTIFY_SOCKET": listener.address}) as daemon,
    ):
        await listener.wait_for("READY")
        port = await daemon.port()

        async def allowed_origin(origin: str) -> str | None:
            _, headers, _ = await http_request(port, "GET", "/api/rooms", headers=[("Origin", origin)])
            return headers.get("access-control-allow-origin")

        async with connect(port, origin="https://a.example") as a:
            await a.join("r", "a")
            assert await allowed_origin("https://b.example") is None

            config.write_text("[limits]\nmax_message_bytes = 10\n")
            await hangup(daemon, listener)
            await daemon.wait_for_log(
                rb"reload refused, keeping the running configuration: limits\.max_message_bytes: must be at least"
            )
            assert await allowed_origin("https://a.example") == "https://a.example"

            config.write_text(
                '[server]\nport = 1\n[cors]\nallowed_origins = ["https://b.example"]\n'
                '[limits]\nmax_message_bytes = 1024\nsend_queue_bytes = 4096\n[log]\nlevel = "debug"\n'
            )
            await hangup(daemon, listener)
            await daemon.wait_for_log(rb"configuration reloaded")
            assert b"server.port changed, which takes a restart" in daemon.log
            assert await allowed_origin("https://b.example") == "https://b.example"
            assert await allowed_origin("https://a.example") is None
            with pytest.raises(ConnectionRejected) as rejected:
                async with connect(port, origin="https://a.example"):
                    pass
            assert rejected.value.status_code == 403
            # The WebSocket from before both reloads is still there with the limits it began with;
            # new ones get the new limits.
            await a.send(type="ping", requestId="big", pad="x" * 2000)
            await a.expect("pong", requestId="big")
            async with connect(port, origin="https://b.example") as b:
                await b.send(type="ping", pad="x" * 2000)
                with pytest.raises(ConnectionClosed) as closed:
                    await b.recv()
                assert closed.value.reason.code == 1009
            # And debug logging is on.
            await daemon.wait_for_log(rb"GET /api/rooms -> 200")
        assert await daemon.stop() == 0
