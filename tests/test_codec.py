"""The WebSocket codec without sockets: bytes in, messages and closes out, frames back."""

from __future__ import annotations

import pytest

from signald._websocket import Binary, Closed, Codec, Pong, text_frame

from ._clients import frame

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def close_frame(code: int, reason: str = "") -> bytes:
    """A server close frame, as a client would parse it."""
    payload = code.to_bytes(2, "big") + reason.encode()
    return bytes((0x88, len(payload))) + payload


def test_whole_messages_come_out_in_order_however_the_bytes_are_cut() -> None:
    wire = frame(TEXT, b'{"a":1}') + frame(TEXT, "é".encode()) + frame(BINARY, b"\x00\x01")
    for cut in range(len(wire) + 1):
        codec = Codec(1024)
        events = codec.receive(wire[:cut]) + codec.receive(wire[cut:])
        assert events == ['{"a":1}', "é", Binary(b"\x00\x01")], cut


def test_fragments_are_joined_and_control_frames_between_them_answered() -> None:
    codec = Codec(1024)
    events = codec.receive(
        frame(TEXT, "h\xc3".encode("latin-1"), fin=False)  # "é" split across two fragments
        + frame(PING, b"p")
        + frame(CONTINUATION, b"\xa9!", fin=False)
        + frame(PONG, b"q")
        + frame(CONTINUATION, b"")
    )
    assert events == [Pong(b"q"), "hé!"]
    assert codec.pending() == bytes((0x8A, 1)) + b"p"  # the pong, unmasked
    assert codec.is_open


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (frame(TEXT, b"\xff"), 1007),
        (frame(TEXT, b"\xc3", fin=False) + frame(CONTINUATION, b"("), 1007),
        (frame(TEXT, b"ok \xff", fin=False), 1007),  # can never become valid: told before the message ends
        (frame(CLOSE, b"\x03\xe8\xff"), 1007),
        (frame(CONTINUATION, b"x"), 1002),
        (frame(TEXT, b"x", fin=False) + frame(TEXT, b"y"), 1002),
        (frame(TEXT, b"x", masked=False), 1002),
        (frame(TEXT, b"x", rsv=1), 1002),
        (frame(0x3, b""), 1002),
        (frame(PING, b"x" * 126), 1002),
        (frame(PING, b"x", fin=False), 1002),
        (frame(CLOSE, b"\x00"), 1002),
        (frame(TEXT, b"x" * 1025), 1009),
        (frame(TEXT, b"", length=2**40), 1009),  # refused from the header, nothing buffered
        (frame(TEXT, "é".encode() * 513), 1009),  # 513 characters, 1026 bytes
        (frame(TEXT, b"x" * 600, fin=False) + frame(CONTINUATION, b"x" * 600), 1009),
    ],
)
def test_a_broken_frame_fails_the_connection_with_the_rfc_code(wire: bytes, code: int) -> None:
    codec = Codec(1024)
    events = codec.receive(frame(TEXT, b"before") + wire)
    assert events[0] == "before"
    (closed,) = events[1:]
    assert isinstance(closed, Closed) and (closed.code, closed.by_peer) == (code, False)
    if code == 1009:
        assert closed.reason == "message larger than 1024 bytes"  # one check, one reason
    assert codec.pending() == close_frame(code, closed.reason)
    assert codec.eof_requested and not codec.is_open
    assert codec.receive(frame(TEXT, b"after")) == []  # everything after is discarded


def test_the_clients_close_is_echoed() -> None:
    codec = Codec(1024)
    assert codec.receive(frame(CLOSE, b"\x03\xe8bye")) == [Closed(1000, "bye", by_peer=True)]
    assert codec.pending() == close_frame(1000, "bye")
    assert not codec.is_open


def test_our_close_then_the_clients_answer() -> None:
    codec = Codec(1024)
    codec.close(1001, "server shutting down")
    assert codec.pending() == close_frame(1001, "server shutting down")
    codec.close(1000, "twice")  # ignored: one close frame per connection
    codec.ping(b"late")  # and no ping after it
    assert codec.pending() == b""
    assert codec.receive(frame(CLOSE, b"\x03\xe9")) == [Closed(1001, "", by_peer=True)]
    assert codec.pending() == b""  # nothing to echo: ours went first


def test_pings_we_send() -> None:
    codec = Codec(1024)
    codec.ping(b"7")
    assert codec.pending() == b"\x89\x017"


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_text_frames_have_the_shortest_length_encoding(size: int) -> None:
    data = text_frame(b"x" * size)
    header = data[: len(data) - size]
    assert data[0] == 0x81 and data[len(header) :] == b"x" * size
    if size < 126:
        assert header == bytes((0x81, size))
    elif size < 65536:
        assert header == b"\x81\x7e" + size.to_bytes(2, "big")
    else:
        assert header == b"\x81\x7f" + size.to_bytes(8, "big")
