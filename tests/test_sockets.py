"""Plain sockets (``_sockets``): batched accepts, and direct writes and reads that fall back to
the trio stream, with trio's own exceptions, whenever the kernel does not simply take or give."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
import trio
import trio.testing

from signald._sockets import ACCEPT_BATCH, accepted, listening_sockets, peer_of, receive_now, send_all


def _listener() -> socket.socket:
    [sock] = listening_sockets("127.0.0.1", 0)
    return sock


async def _pair() -> tuple[socket.socket, trio.SocketStream, socket.socket]:
    """(server side as a plain socket, the same wrapped for trio, the client's blocking socket)."""
    listening = _listener()
    client = socket.create_connection(listening.getsockname())
    [(server, address)] = await accepted(listening)
    listening.close()
    assert peer_of(address) == client.getsockname()
    return server, trio.SocketStream(trio.socket.from_stdlib_socket(server)), client


async def test_a_storm_of_connections_is_accepted_in_batches_with_their_addresses() -> None:
    listening = _listener()
    clients = [socket.create_connection(listening.getsockname()) for _ in range(ACCEPT_BATCH + 6)]
    with trio.fail_after(5):
        first = await accepted(listening)
        second = await accepted(listening)
    assert len(first) == ACCEPT_BATCH and len(second) == 6  # all that waited, a batch at a time
    assert [peer_of(address) for _, address in first + second] == [c.getsockname() for c in clients]
    assert all(not sock.getblocking() for sock, _ in first + second)
    for sock, _ in first + second:
        sock.close()
    for client in clients:
        client.close()
    listening.close()


async def test_accept_waits_for_a_connection() -> None:
    listening = _listener()
    async with trio.open_nursery() as nursery:
        got: list[int] = []

        async def accept() -> None:
            got.append(len(await accepted(listening)))

        nursery.start_soon(accept)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        client = socket.create_connection(listening.getsockname())
    assert got == [1]
    client.close()
    listening.close()


def test_a_port_in_use_is_refused_with_the_os_error() -> None:
    listening = _listener()
    with pytest.raises(OSError):
        listening_sockets("127.0.0.1", listening.getsockname()[1])
    listening.close()


async def test_what_the_kernel_does_not_take_at_once_goes_through_the_stream() -> None:
    """More than the socket buffers hold: part goes directly, the rest waits in the stream's
    ``send_all`` until the client reads, and the client gets every byte in order."""
    server, stream, client = await _pair()
    data = bytes(range(256)) * (64 * 1024)  # 16 MiB, far past any send buffer
    received = bytearray()

    def read_all() -> None:
        while len(received) < len(data):
            received.extend(client.recv(1 << 20))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, read_all)
            await send_all(stream, server, data)
    assert received == data
    client.close()
    await stream.aclose()


async def test_a_send_to_a_reset_connection_raises_trios_broken_resource_error() -> None:
    server, stream, client = await _pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # an RST, not a FIN
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(server)  # the reset has arrived: the socket has an error
    with pytest.raises(trio.BrokenResourceError):
        await send_all(stream, server, b"x" * 1024)
    await stream.aclose()


async def test_a_send_on_a_closed_stream_raises_trios_closed_resource_error() -> None:
    server, stream, client = await _pair()
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await send_all(stream, server, b"late")
    client.close()


async def test_without_a_plain_socket_the_stream_does_everything() -> None:
    left, right = trio.testing.memory_stream_pair()
    await send_all(left, None, b"hello")
    assert await right.receive_some(100) == b"hello"
    assert receive_now(None, 100) is None


async def test_receive_now_gives_what_is_there_nothing_when_empty_and_eof_at_the_end() -> None:
    server, stream, client = await _pair()
    assert receive_now(server, 100) is None  # nothing sent yet: the caller waits on the stream
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(server)
    assert receive_now(server, 100) == b"GET / HTTP/1.1\r\n\r\n"
    client.shutdown(socket.SHUT_WR)
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(server)
    assert receive_now(server, 100) == b""
    client.close()
    await stream.aclose()


class _Flaky(socket.socket):
    """A listening socket whose next accepts fail with the given errnos first."""

    failures: list[int]

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            raise OSError(self.failures.pop(0), "injected")
        return super().accept()


def _flaky(failures: list[int]) -> _Flaky:
    sock = _Flaky(socket.AF_INET, socket.SOCK_STREAM)
    sock.failures = failures
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.setblocking(False)
    return sock


async def test_a_connection_that_failed_before_it_was_taken_is_skipped() -> None:
    listening = _flaky([errno.ECONNABORTED])
    client = socket.create_connection(listening.getsockname())
    with trio.fail_after(5):
        [(sock, address)] = await accepted(listening)
    assert peer_of(address) == client.getsockname()
    for s in (sock, client, listening):
        s.close()


async def test_a_failure_of_the_listener_itself_is_raised_for_the_server_to_handle() -> None:
    """EMFILE and its kind: the server logs it and retries later (``_server``)."""
    listening = _flaky([errno.EMFILE])
    client = socket.create_connection(listening.getsockname())
    with trio.fail_after(5), pytest.raises(OSError) as raised:
        await accepted(listening)
    assert raised.value.errno == errno.EMFILE
    with trio.fail_after(5):
        [(sock, _)] = await accepted(listening)  # the connection still waits, and is taken next time
    for s in (sock, client, listening):
        s.close()
