"""systemd glue without libsystemd: readiness and watchdog notifications, inherited sockets.

Both protocols are small enough to speak directly. sd_notify(3) is one datagram of
``KEY=value`` lines sent to the Unix socket named by ``$NOTIFY_SOCKET`` (a path, or an
abstract name written with a leading ``@``). sd_listen_fds(3) hands over already-listening
sockets as file descriptors 3, 4, ... when ``$LISTEN_PID`` is this process, which is how
``signald.socket`` keeps the port open (new connections wait in the kernel backlog) while
the service restarts.

Without those variables everything here does nothing, so the same code runs in a terminal,
under a test and in a unit.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

import trio

from ._config import ConfigError

log = logging.getLogger("signald")

#: The first file descriptor systemd passes (after stdin, stdout, stderr).
SD_LISTEN_FDS_START = 3
#: Seconds between looks at the counts for STATUS=, so ``systemctl status`` follows a change
#: within about this long. A look counts the members of every room (microseconds per room).
STATUS_INTERVAL = 1.0


class Notifier:
    """Sends sd_notify(3) messages to ``$NOTIFY_SOCKET``; a silent no-op without one."""

    def __init__(self, address: str | None) -> None:
        self._address: str | None = None
        self._socket: socket.socket | None = None
        if address and address[0] in "/@":  # other schemes (vsock) are not for services like us
            self._address = "\0" + address[1:] if address[0] == "@" else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # Never block the event loop: systemd drains this socket, and a lost STATUS= is harmless.
            self._socket.setblocking(False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *assignments: str) -> None:
        """Send ``KEY=value`` assignments (``"READY=1"``, ``"STATUS=..."``) as one message."""
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            log.warning("cannot notify systemd (%s): %s", ", ".join(a.split("=")[0] for a in assignments), exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC``, or None if not expected.

    Half, as sd_watchdog_enabled(3) advises, so that one late wake-up does not get us killed.
    """
    if environ.get("WATCHDOG_PID", str(pid)) != str(pid):
        return None  # meant for another process (we were started by a wrapper)
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


async def watchdog(notifier: Notifier, interval: float | None) -> None:
    """Every ``interval`` seconds send ``WATCHDOG=1``; runs forever (or returns if not expected).

    This is a task in the main trio loop on purpose: if the loop wedges (a blocking call, a
    busy loop), the pings stop and systemd restarts the service.
    """
    if not notifier.enabled or interval is None:
        return
    while True:
        await trio.sleep(interval)
        notifier.send("WATCHDOG=1")


async def follow_status(notifier: Notifier, status: Callable[[], str], sent: str) -> None:
    """Send ``STATUS=`` each time ``status()`` differs from what was last sent (``sent``).

    It looks every ``STATUS_INTERVAL`` seconds rather than on every join and leave: a busy
    room would otherwise send a datagram per join, and systemd needs no more than a glance.
    """
    if not notifier.enabled:
        return
    while True:
        await trio.sleep(STATUS_INTERVAL)
        current = status()
        if current != sent:
            notifier.send(f"STATUS={current}")
            sent = current


def listen_fds(environ: Mapping[str, str], pid: int) -> range:
    """The file descriptors systemd passed to this process (sd_listen_fds(3)); empty if none."""
    if environ.get("LISTEN_PID") != str(pid):
        return range(0)  # not for us: a parent's variables leaked into our environment
    try:
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return range(0)
    return range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(count, 0))


def inherited_listeners(fds: range) -> list[socket.socket]:
    """Adopt the passed descriptors; each must be a listening TCP socket.

    Anything else (a datagram or Unix socket, a file) means the socket unit does not match
    what signald serves, which is an operator error worth refusing to start over.
    """
    sockets = []
    for fd in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise ConfigError("LISTEN_FDS", f"file descriptor {fd} is not a socket: {exc.strerror}") from None
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6) or not listening:
            sock.detach()
            raise ConfigError(
                "LISTEN_FDS",
                f"file descriptor {fd} is not a listening TCP socket: use ListenStream= with a port in signald.socket",
            )
        os.set_inheritable(fd, False)  # systemd leaves them inheritable; our children need not see them
        sockets.append(sock)
    return sockets
