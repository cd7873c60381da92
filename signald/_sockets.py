"""Plain TCP sockets, where trio's own calls cost a join more than it needs to pay.

Every successful trio socket operation ends in a trip through the scheduler (trio's
``cancel_shielded_checkpoint``), and on this machine that trip is the largest single cost of
a join (33k instructions under callgrind, more than the system call it follows). A join has half a
dozen such operations: the accept, the request's read, the 101, ``joined-room`` and a
``user-joined`` to each member already there. So, with plain sockets (not under TLS):

* connections are accepted in batches: one wait for the listening socket to be readable, then
  ``accept(2)`` until it would block (at most ``ACCEPT_BATCH``), with the peer's address from
  ``accept`` itself, instead of one scheduler trip and a ``getpeername(2)`` per connection;
* :func:`send_all` and :func:`receive_now` first try the kernel directly, and fall back to the
  trio stream (which waits, and raises trio's own errors) only when it would block, took part
  of the bytes, or failed. A failure is left for the trio call to meet and report, so callers
  see exactly the exceptions they always did.

The scheduler still runs between any two batches: the accept loop waits for readability each
time round, a writer that sent everything waits for its outbox to fill again (which only
another task can do), and only a connection's first read is tried directly, once.

The sockets here are stdlib sockets in non-blocking mode; each is wrapped once for trio
(``trio.socket.from_stdlib_socket``), and trio owns it from then on: closing the trio socket
closes this one.
"""

from __future__ import annotations

import errno
import socket

import trio

#: Connections accepted per wake-up of an accept loop, at most: enough to take a storm's
#: backlog in a few rounds, few enough that the connections' own tasks run in between.
ACCEPT_BATCH = 64
#: accept(2) failures that concern only the connection being accepted (it was reset, or its
#: route went away before we took it): skip it and accept the next (trio's own list).
_ACCEPT_SKIPPED_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "EPERM",
    )
    if hasattr(errno, name)
)


def listening_sockets(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """What ``trio.open_tcp_listeners`` makes, as stdlib sockets (non-blocking), so that
    :func:`accepted` can take connections from them in batches.

    ``reuse_port``: SO_REUSEPORT on every socket. With it, every signald on this machine
    listening on the same port gets its own accept queue and the kernel spreads new
    connections over them, so N processes use N cores without a proxy in front.
    """
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        unsupported: OSError | None = None
        for family, kind, proto, _, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                if exc.errno == errno.EAFNOSUPPORT:  # an address family this kernel lacks (IPv6)
                    unsupported = exc
                    continue
                raise
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        if not sockets and unsupported is not None:
            raise unsupported
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def accepted(listening: socket.socket) -> list[tuple[socket.socket, object]]:
    """The connections waiting on ``listening`` (at least one, at most ``ACCEPT_BATCH``), each
    non-blocking, with its peer's address; waits until one comes.

    Raises ``OSError`` for a failure of the listener itself (EMFILE and the like included);
    a connection that failed before we took it is skipped.
    """
    batch: list[tuple[socket.socket, object]] = []
    while not batch:
        await trio.lowlevel.wait_readable(listening)
        for _ in range(ACCEPT_BATCH):
            try:
                connection, address = listening.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _ACCEPT_SKIPPED_ERRNOS:
                    continue
                if batch:
                    break  # serve what was accepted; the failure comes back on the next call
                raise
            connection.setblocking(False)
            batch.append((connection, address))
    return batch


def peer_of(address: object) -> tuple[str, int]:
    """The host and port of an address ``accept`` returned (``("?", 0)`` if it has none)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return "?", 0


async def send_all(stream: trio.abc.SendStream, sock: socket.socket | None, data: bytes) -> None:
    """``stream.send_all(data)``; ``sock`` is the stream's plain socket, or None (TLS, a test's
    stream): the kernel is offered the bytes directly first, and the stream sends the rest."""
    sent = 0
    if sock is not None:
        try:  # noqa: SIM105 (contextlib.suppress costs a context manager per write)
            sent = sock.send(data)
        except OSError:
            pass  # would block, or failed: the stream's own send meets it and says so
        if sent == len(data):
            return
    await stream.send_all(memoryview(data)[sent:] if sent else data)


def receive_now(sock: socket.socket | None, size: int) -> bytes | None:
    """What the kernel holds for ``sock`` right now (``b""`` at EOF), or None if nothing is
    there yet, it failed, or there is no plain socket: then read through the stream."""
    if sock is None:
        return None
    try:
        return sock.recv(size)
    except OSError:
        return None
