"""systemd integration: sd_notify (READY, STATUS, WATCHDOG timing, STOPPING) and socket activation."""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from signald import _cli
from signald._config import ConfigError
from signald._systemd import STATUS_INTERVAL, Notifier, inherited_listeners, listen_fds, watchdog_interval

from ._clients import connect, http_request
from ._process import notify_socket, run_signald
from .conftest import make_config


@pytest.mark.parametrize("directory", [True, False], ids=["path", "abstract"])
async def test_notifier_reaches_path_and_abstract_sockets(tmp_path: Path, directory: bool) -> None:
    async with notify_socket(tmp_path if directory else None) as listener:
        notifier = Notifier(listener.address)
        assert notifier.enabled
        notifier.send("READY=1", "STATUS=0 rooms, 0 users")
        assert await listener.receive() == {"READY": "1", "STATUS": "0 rooms, 0 users"}
        notifier.close()


@pytest.mark.parametrize("address", [None, "", "vsock:2:1234"])
def test_notifier_without_systemd_does_nothing(address: str | None) -> None:
    notifier = Notifier(address)
    assert not notifier.enabled
    notifier.send("READY=1")
    notifier.close()


def test_notifier_survives_a_vanished_socket(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    notifier.send("WATCHDOG=1")
    assert "cannot notify systemd (WATCHDOG)" in caplog.text
    notifier.close()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "43"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(environ: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(environ, 42) == interval


def test_listen_fds_are_only_taken_when_meant_for_this_process() -> None:
    assert listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "2"}, 42) == range(3, 5)
    assert listen_fds({"LISTEN_PID": "41", "LISTEN_FDS": "2"}, 42) == range(0)
    assert listen_fds({"LISTEN_FDS": "2"}, 42) == range(0)
    assert listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, 42) == range(0)


def test_inherited_listeners_must_be_listening_tcp_sockets() -> None:
    with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        fd = os.dup(tcp.fileno())
        [adopted] = inherited_listeners(range(fd, fd + 1))
        with adopted:
            assert adopted.getsockname() == tcp.getsockname()
            assert not os.get_inheritable(fd)
        fd = os.dup(udp.fileno())
        with pytest.raises(ConfigError, match="not a listening TCP socket"):
            inherited_listeners(range(fd, fd + 1))
        os.close(fd)
    with open(os.devnull) as file, pytest.raises(ConfigError, match="not a socket"):
        inherited_listeners(range(file.fileno(), file.fileno() + 1))


async def test_watchdog_pings_at_half_of_watchdog_usec_from_the_main_loop(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    async with notify_socket(tmp_path) as listener, trio.open_nursery() as nursery:
        environ = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "10000000"}
        await nursery.start(_cli._run, make_config(), environ, make_config)
        ready = await listener.receive()
        assert ready == {"READY": "1", "STATUS": "0 rooms, 0 users"}
        ready_at = trio.current_time()
        pings = []
        for _ in range(3):
            message = await listener.receive()  # nothing changes, so no STATUS= between pings
            assert message == {"WATCHDOG": "1"}
            pings.append(trio.current_time() - ready_at)
        assert pings == pytest.approx([5.0, 10.0, 15.0])
        os.kill(os.getpid(), signal.SIGTERM)  # _run's signal receiver takes it
        assert (await listener.wait_for("STOPPING"))["STOPPING"] == "1"
    # _run returned by itself after draining: the nursery closed without a cancel.


async def test_status_follows_a_change_within_a_second_without_waiting_for_the_watchdog(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    async with notify_socket(tmp_path) as listener, trio.open_nursery() as nursery:
        environ = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "60000000"}
        server = await nursery.start(_cli._run, make_config(), environ, make_config)
        assert (await listener.receive())["STATUS"] == "0 rooms, 0 users"
        server.hub.create("standup")
        changed_at = trio.current_time()
        assert await listener.receive() == {"STATUS": "1 rooms, 0 users"}
        assert trio.current_time() - changed_at <= STATUS_INTERVAL <= 2.0
        os.kill(os.getpid(), signal.SIGTERM)
        await listener.wait_for("STOPPING")


def free_port() -> int:
    """A port nobody listens on now (the test hands it to a daemon at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_ready_means_accepting_and_status_counts_rooms_and_users() -> None:
    port = free_port()
    async with notify_socket(None) as listener:
        env = {"NOTIFY_SOCKET": listener.address}  # no watchdog: STATUS= does not depend on one
        async with run_signald("--port", str(port), env=env) as daemon:
            assert (await listener.receive())["READY"] == "1"
            # No retry: READY promises that the port accepts now.
            status, _, _ = await http_request(port, "GET", "/health")
            assert status == 200
            async with connect(port) as client:
                await client.join("standup", "ada")
                # Sent when the counts change (looked at every second), not with the watchdog pings.
                assert (await listener.wait_for("STATUS"))["STATUS"] == "1 rooms, 1 users"
                daemon.process.send_signal(signal.SIGTERM)
                stopping = await listener.wait_for("STOPPING")
                assert stopping["STOPPING"] == "1"
            assert await daemon.wait() == 0


SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


async def test_socket_activation_serves_the_inherited_socket(tmp_path: Path) -> None:
    assert SOCKET_ACTIVATE, "systemd-socket-activate is missing: install Debian's systemd package (scripts/test does)"
    port = free_port()
    config = tmp_path / "signald.toml"
    config.write_text("[server]\nport = 1\n")  # never bound: the socket comes from the activator
    async with notify_socket(tmp_path) as listener:
        activate = [SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "-E", f"NOTIFY_SOCKET={listener.address}"]
        async with run_signald("--config", str(config), prefix=activate) as daemon:
            await daemon.wait_for_log(rb"Listening on 127\.0\.0\.1:\d+")
            # The activator starts signald on this first connection, which waits in the backlog meanwhile.
            async with connect(port) as client:
                await client.join("r", "ada")
                assert (await listener.wait_for("READY"))["READY"] == "1"
                await daemon.wait_for_log(rb"listening on 127\.0\.0\.1:%d \(sockets from systemd\)" % port)
                daemon.process.send_signal(signal.SIGTERM)
                await listener.wait_for("STOPPING")
            assert await daemon.wait() == 0
