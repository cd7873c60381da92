"""Bad frames and bad messages: each gets its documented answer, and nobody else notices."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from wsproto.events import Pong

from signald import Server

from .._clients import connect, frame
from ._harness import honest_pair, raw_websocket, wait_until

TEXT, BINARY, CONTINUATION, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9
PEER = "N8yHf2sKq5WzUo1GvJ6iLg"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{oops", "invalid-json"),
        ('{"type": "ping"', "invalid-json"),
        ("", "invalid-json"),
        ("NaN-ish garbage \x00\x01", "invalid-json"),
        ('{"type": "ping", "x": 1e999999}', "invalid-json"),  # overflows a double: not JSON a peer could use
        ("1" * 5000, "invalid-json"),  # an integer too long for Python's int parser
        ("[1, 2]", "invalid-message"),
        ("42", "invalid-message"),
        ('"join-room"', "invalid-message"),
        ("null", "invalid-message"),
        ("true", "invalid-message"),
    ],
)
async def test_malformed_and_non_object_json(server: Server, text: str, code: str | None) -> None:
    async with honest_pair(server) as pair, connect(server.port) as bad:
        await bad.ws.send_message(text)
        reply = await bad.recv()
        if code is None:
            assert reply == {"type": "pong"}
        else:
            assert reply["type"] == "error" and reply["code"] == code, reply
        await pair.exchange()
        await bad.roundtrip_ping()  # the connection stays open after any error


def wrong_types() -> list[dict[str, Any]]:
    """One message per field per wrong kind of value (a value of another JSON type)."""
    candidate = {"candidate": "candidate:1 1 udp 1 192.0.2.1 9 typ host", "sdpMid": "0", "sdpMLineIndex": 0}
    valid: list[dict[str, Any]] = [
        {"type": "join-room", "roomId": "r", "username": "u", "token": "t", "requestId": 1},
        {"type": "webrtc-offer", "to": PEER, "sdp": "v=0", "requestId": 1},
        {"type": "ice-candidate", "to": PEER, "candidate": candidate, "requestId": 1},
    ]
    #: Types each field accepts besides its own: null where the protocol allows it.
    also_allowed: dict[str, tuple[type, ...]] = {
        "requestId": (str, type(None)),
        "token": (type(None),),
        "candidate": (type(None),),
        "sdpMid": (type(None),),
        "sdpMLineIndex": (type(None),),
    }
    wrong: list[Any] = [None, True, 1, 1.5, "s", [], {}, [1], {"a": 1}]

    def variants(message: dict[str, Any]) -> list[tuple[str, Any]]:
        return [
            (key, bad)
            for key, value in message.items()
            for bad in wrong
            if type(bad) is not type(value) and not isinstance(bad, also_allowed.get(key, ()))
        ]

    cases = [{**message, key: bad} for message in valid for key, bad in variants(message)]
    relay = valid[2]
    cases += [{**relay, "candidate": {**candidate, key: bad}} for key, bad in variants(candidate)]
    return cases


async def test_wrong_types_for_every_field(server: Server) -> None:
    cases = wrong_types()
    assert len(cases) > 80
    async with honest_pair(server) as pair, connect(server.port) as bad:
        for index, message in enumerate(cases):
            await bad.send(**message)
            reply = await bad.recv()
            assert reply["type"] == "error", (message, reply)
            # Not in a room: a well-typed relay gets not-in-room, so a type error must win first.
            assert reply["code"] in ("invalid-message", "unknown-type"), (message, reply)
            if index % 40 == 0:
                await pair.exchange(1)
        await bad.roundtrip_ping()


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"type": "join-room", "roomId": "r", "username": "u" * 60_000}, "invalid-message"),
        ({"type": "join-room", "roomId": "r" * 60_000, "username": "u"}, "invalid-message"),
        ({"type": "join-room", "roomId": "r", "username": "u", "token": "t" * 60_000}, "invalid-message"),
        # Not a huge string: a 60,000-character SDP fits the default max_message_bytes, so it is
        # relayed (here: refused only because the sender is in no room).
        ({"type": "webrtc-offer", "to": PEER, "sdp": "v" * 60_000}, "not-in-room"),
        ({"type": "webrtc-offer", "to": "p" * 60_000, "sdp": "v=0"}, "invalid-message"),
        ({"type": "ice-candidate", "to": PEER, "candidate": {"candidate": "c" * 60_000}}, "invalid-message"),
        (
            {"type": "ice-candidate", "to": PEER, "candidate": {"candidate": "", "sdpMid": "m" * 60_000}},
            "invalid-message",
        ),
        ({"type": "ping", "requestId": "q" * 60_000}, "invalid-message"),
        ({"type": "t" * 60_000}, "unknown-type"),
        ({"type": "ping", "padding": "x" * 60_000}, None),  # unknown fields are ignored, whatever their size
    ],
)
async def test_huge_strings(server: Server, message: dict[str, Any], code: str | None) -> None:
    async with honest_pair(server) as pair, connect(server.port) as bad:
        await bad.send(**message)
        await pair.exchange()
        raw = await bad.ws.get_message()
        assert len(raw) < 300, "an error must not echo a huge value back (amplification)"
        reply = json.loads(raw)
        if code is None:
            assert reply == {"type": "pong"}
        else:
            assert reply["type"] == "error" and reply["code"] == code, reply
        await bad.roundtrip_ping()


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"ping","x":' + "[" * 30_000 + "]" * 30_000 + "}",
        '{"type":"ping","x":' + '{"a":' * 10_000 + "0" + "}" * 10_000 + "}",
        '{"type":"ice-candidate","to":"' + PEER + '","candidate":{"candidate":"c","x":' + "[" * 40 + "]" * 40 + "}}",
        "[" * 65_000,
    ],
)
async def test_deep_nesting(server: Server, text: str) -> None:
    async with honest_pair(server) as pair, connect(server.port) as bad:
        await bad.ws.send_message(text)
        reply = await bad.recv()
        assert reply["code"] == "invalid-message" and "nested deeper than 32" in reply["message"], reply
        await pair.exchange()
        await bad.roundtrip_ping()


async def test_binary_frames_and_unknown_types(server: Server) -> None:
    async with honest_pair(server) as pair, connect(server.port) as bad:
        for payload in (b"\x00\x01binary", b'{"type":"ping"}', b"\xff" * 10_000):
            await bad.ws.send_message(payload)
            reply = await bad.recv()
            assert reply["code"] == "invalid-message" and "binary" in reply["message"]
        for kind in ("teleport", "JOIN-ROOM", "", "joined-room", "user-left", "error", "pong"):
            await bad.send(type=kind, requestId=kind)
            assert await bad.expect("error", code="unknown-type", requestId=kind)
        await pair.exchange()
        await bad.roundtrip_ping()


#: RFC 6455 close codes: the server fails a connection that breaks the WebSocket protocol with a
#: close frame that says why, then closes the TCP connection.
PROTOCOL_ERROR, INVALID_DATA, TOO_BIG = 1002, 1007, 1009


@pytest.mark.parametrize(
    ("frames", "close_code"),
    [
        # Text that is not UTF-8: in one frame, across continuation frames, in a close reason.
        ([frame(TEXT, b'{"type":"ping","x":"\xff\xfe"}')], INVALID_DATA),
        ([frame(TEXT, b"\xc3", fin=False), frame(CONTINUATION, b"(")], INVALID_DATA),
        ([frame(TEXT, b'{"x":"\xed\xa0', fin=False), frame(CONTINUATION, b'\x80"}')], INVALID_DATA),  # a surrogate
        ([frame(TEXT, b'{"x":"\xc3', fin=False), frame(CONTINUATION, b'"}', fin=False)], INVALID_DATA),  # told early
        ([frame(CLOSE, b"\x03\xe8\xff")], INVALID_DATA),
        # A continuation with nothing to continue; a new message while one is unfinished.
        ([frame(CONTINUATION, b'{"type":"ping"}')], PROTOCOL_ERROR),
        ([frame(TEXT, b'{"type":', fin=False), frame(TEXT, b'"ping"}')], PROTOCOL_ERROR),
        # A fragmented control frame; a control frame over 125 bytes; a one-byte close payload.
        ([frame(PING, b"x", fin=False)], PROTOCOL_ERROR),
        ([frame(PING, b"x" * 126)], PROTOCOL_ERROR),
        ([frame(CLOSE, b"\x00")], PROTOCOL_ERROR),
        # A close code no endpoint may send.
        ([frame(CLOSE, b"\x03\xed")], PROTOCOL_ERROR),
        # Unmasked client frame, reserved bits, reserved opcodes.
        ([frame(TEXT, b'{"type":"ping"}', masked=False)], PROTOCOL_ERROR),
        ([frame(TEXT, b'{"type":"ping"}', rsv=0b100)], PROTOCOL_ERROR),
        ([frame(0x3, b"")], PROTOCOL_ERROR),
        ([frame(0xB, b"")], PROTOCOL_ERROR),
        # A 64-bit length with the top bit set is past any limit (and not a length at all).
        ([frame(TEXT, b"", length=2**63)], TOO_BIG),
        # Too big: one frame, a frame claiming 1 TiB (refused once past the limit, not
        # buffered up to it), or many small fragments adding up.
        ([frame(TEXT, b"x" * 2000)], TOO_BIG),
        ([frame(TEXT, b"x" * 2048, length=2**40)], TOO_BIG),
        ([frame(TEXT, b"x" * 100, fin=False)] + [frame(CONTINUATION, b"x" * 100, fin=False)] * 30, TOO_BIG),
        # Counted in bytes: 600 two-byte characters are 1200 bytes, over the 1024 allowed.
        ([frame(TEXT, '{"x":"{}"}'.replace("{}", "é" * 600).encode())], TOO_BIG),
    ],
)
async def test_broken_framing_and_oversize_frames_close(
    server_factory: Callable[..., Any], frames: list[bytes], close_code: int
) -> None:
    server = await server_factory(limits={"max_message_bytes": 1024, "send_queue_bytes": 4096})
    async with honest_pair(server) as pair, raw_websocket(server.port) as bad:
        await bad.send(frames[0])
        await pair.exchange()  # while the abuser is mid-attack
        await bad.send(b"".join(frames[1:]))
        assert await bad.expect_close() == close_code
        await pair.exchange()
        await bad.aclose()  # as a client does once it has the close (the server waits that long at most)
        await wait_until(lambda: server.connections.total == 2)  # the abuser's connection is gone


async def test_fragmented_messages_are_reassembled(server: Server) -> None:
    async with honest_pair(server) as pair, raw_websocket(server.port) as client:
        pieces = [b'{"type":', b'"ping",', b'"requestId":"frag"}']
        await client.send(
            frame(TEXT, pieces[0], fin=False)
            + frame(PING, b"between")  # control frames may come between fragments
            + frame(CONTINUATION, pieces[1], fin=False)
            + frame(CONTINUATION, pieces[2])
        )
        assert await client.next_event() == Pong(b"between")
        assert await client.recv() == {"type": "pong", "requestId": "frag"}
        await pair.exchange()
