"""The wire protocol parser and encoders, without sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from signald import _messages as m
from signald._config import LimitsConfig


def parse(obj: Any) -> m.ClientMessage | m.ProtocolError:
    return m.parse(json.dumps(obj))


def test_join_room() -> None:
    assert parse({"type": "join-room", "roomId": "r-1_A", "username": "alice", "requestId": 7}) == m.JoinRoom(
        "r-1_A", "alice", 7
    )


def test_leave_and_ping() -> None:
    assert parse({"type": "leave-room"}) == m.LeaveRoom()
    assert parse({"type": "ping", "requestId": "x"}) == m.Ping("x")


@pytest.mark.parametrize("kind", ["webrtc-offer", "webrtc-answer"])
def test_sdp_relays(kind: str) -> None:
    assert parse({"type": kind, "to": "peer1", "sdp": "v=0", "extra": 1}) == m.Relay(kind, "peer1", "sdp", "v=0")


def test_candidate_keeps_exactly_the_known_keys() -> None:
    message = parse(
        {
            "type": "ice-candidate",
            "to": "p",
            "candidate": {"candidate": "candidate:1", "sdpMid": "0", "sdpMLineIndex": 0, "evil": "x"},
        }
    )
    assert isinstance(message, m.Relay)
    assert message.payload == {"candidate": "candidate:1", "sdpMid": "0", "sdpMLineIndex": 0}
    full = parse(
        {
            "type": "ice-candidate",
            "to": "p",
            "candidate": {"candidate": "c", "sdpMid": None, "sdpMLineIndex": None, "usernameFragment": "u"},
        }
    )
    assert isinstance(full, m.Relay)
    assert full.payload == {"candidate": "c", "sdpMid": None, "sdpMLineIndex": None, "usernameFragment": "u"}


def test_end_of_candidates_is_null() -> None:
    message = parse({"type": "ice-candidate", "to": "p", "candidate": None})
    assert message == m.Relay("ice-candidate", "p", "candidate", None)


def test_encode_relay_has_exactly_type_from_payload() -> None:
    relay = m.Relay("ice-candidate", "p", "candidate", None)
    assert json.loads(m.encode_relay(relay, "sender")) == {"type": "ice-candidate", "from": "sender", "candidate": None}


def test_invalid_json() -> None:
    assert parse_text("{nope").code == m.INVALID_JSON  # type: ignore[union-attr]
    assert parse_text("").code == m.INVALID_JSON  # type: ignore[union-attr]


def parse_text(text: str) -> Any:
    return m.parse(text)


@pytest.mark.parametrize("value", [[], 1, "s", None, True])
def test_non_object_is_invalid_message(value: Any) -> None:
    result = parse(value)
    assert isinstance(result, m.ProtocolError) and result.code == m.INVALID_MESSAGE


@pytest.mark.parametrize(
    ("obj", "mentions"),
    [
        ({}, "type"),
        ({"type": 5}, "type"),
        ({"type": None}, "type"),
        ({"type": "join-room", "username": "a"}, "roomId"),
        ({"type": "join-room", "roomId": "bad id", "username": "a"}, "roomId"),
        ({"type": "join-room", "roomId": "x" * 65, "username": "a"}, "roomId"),
        ({"type": "join-room", "roomId": "r", "username": ""}, "username"),
        ({"type": "join-room", "roomId": "r", "username": "   "}, "username"),
        ({"type": "join-room", "roomId": "r", "username": "u" * 65}, "username"),
        ({"type": "join-room", "roomId": "r", "username": 3}, "username"),
        ({"type": "webrtc-offer", "sdp": "x"}, "to"),
        ({"type": "webrtc-offer", "to": "p", "sdp": 1}, "sdp"),
        ({"type": "webrtc-answer", "to": "p"}, "sdp"),
        ({"type": "webrtc-offer", "to": "not a peer!", "sdp": "x"}, "to"),
        ({"type": "ice-candidate", "to": "p"}, "candidate"),
        ({"type": "ice-candidate", "to": "p", "candidate": "c"}, "candidate"),
        ({"type": "ice-candidate", "to": "p", "candidate": {"sdpMid": "0"}}, "candidate.candidate"),
        ({"type": "ice-candidate", "to": "p", "candidate": {"candidate": "c", "sdpMid": 1}}, "sdpMid"),
        ({"type": "ice-candidate", "to": "p", "candidate": {"candidate": "c", "sdpMLineIndex": "0"}}, "sdpMLineIndex"),
        ({"type": "ice-candidate", "to": "p", "candidate": {"candidate": "c", "sdpMLineIndex": True}}, "sdpMLineIndex"),
        ({"type": "ping", "requestId": True}, "requestId"),
        ({"type": "ping", "requestId": 1.5}, "requestId"),
        ({"type": "ping", "requestId": {}}, "requestId"),
        ({"type": "ping", "requestId": "r" * 129}, "requestId"),
        ({"type": "ping", "requestId": 2**60}, "requestId"),
    ],
)
def test_invalid_message_names_the_field(obj: dict[str, Any], mentions: str) -> None:
    result = parse(obj)
    assert isinstance(result, m.ProtocolError), result
    assert result.code == m.INVALID_MESSAGE
    assert mentions in result.message


def test_invalid_message_echoes_a_valid_request_id() -> None:
    result = parse({"type": "join-room", "requestId": "abc"})
    assert isinstance(result, m.ProtocolError) and result.request_id == "abc"
    bad_id = parse({"type": "join-room", "requestId": [1]})
    assert isinstance(bad_id, m.ProtocolError) and bad_id.request_id is None


def test_unknown_type_keeps_request_id() -> None:
    result = parse({"type": "dance", "requestId": 3})
    assert result == m.ProtocolError(m.UNKNOWN_TYPE, "unknown message type 'dance'", 3)


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    assert isinstance(m.parse("[" * 100_000 + "]" * 100_000), m.ProtocolError)


def nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return '{"type":"ping","x":' + opener * (depth - 1) + closer * (depth - 1) + "}"


@pytest.mark.parametrize(
    "text",
    [
        nested(33),
        nested(10_000),
        '{"type":"ping","x":' + '{"a":' * 40 + "1" + "}" * 40 + "}",
        # A staircase: no long run of openers until inner levels are peeled away.
        '{"type":"ping","x":' + "[" + "[],[" * 40 + "]" * 40 + "]}",
        # Mixed brackets, and brackets hidden among strings that contain brackets and quotes.
        '{"type":"ping","x":' + '[{"k":"]]\\"}","v":' * 20 + "0" + "}]" * 20 + "}",
    ],
)
def test_too_deep_is_refused_before_parsing(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_parse(_: str) -> None:
        raise AssertionError("the JSON parser ran on a frame that is too deep")

    monkeypatch.setattr(m.orjson, "loads", must_not_parse)
    result = m.parse(text)
    assert isinstance(result, m.ProtocolError)
    assert result.code == m.INVALID_MESSAGE and "nested deeper than 32" in result.message


@pytest.mark.parametrize(
    "text",
    [
        nested(32),
        '{"type":"ping","x":' + '{"a":' * 31 + "1" + "}" * 31 + "}",
        # Many brackets but shallow: wide rather than deep.
        '{"type":"ping","x":[' + ",".join(["[[]]"] * 500) + "]}",
        # Brackets inside strings do not nest anything.
        json.dumps({"type": "ping", "x": "[" * 1000, "y": "{" * 1000}),
        json.dumps({"type": "ping", "x": '\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[' * 3}),
    ],
)
def test_deep_enough_is_parsed(text: str) -> None:
    assert m.parse(text) == m.Ping()


def test_depth_limit_is_configurable() -> None:
    assert m.parse(nested(3), m.Bounds(depth=3)) == m.Ping()
    assert isinstance(m.parse(nested(4), m.Bounds(depth=3)), m.ProtocolError)


def test_unbalanced_brackets_are_left_to_the_json_parser() -> None:
    for text in ("]" * 100 + "[" * 10, "[" * 20 + "]" * 40, '{"type":"ping","x":"' + "[" * 100):
        result = m.parse(text)
        assert isinstance(result, m.ProtocolError) and result.code == m.INVALID_JSON, text


def test_shape_bounds() -> None:
    bounds = m.Bounds(username=5, sdp=10, candidate=8)
    relay = {"type": "webrtc-offer", "to": "p"}
    assert m.parse(json.dumps({**relay, "sdp": "x" * 10}), bounds) == m.Relay("webrtc-offer", "p", "sdp", "x" * 10)
    too_long = m.parse(json.dumps({**relay, "sdp": "x" * 11}), bounds)
    assert isinstance(too_long, m.ProtocolError) and "'sdp' must be at most 10" in too_long.message
    join = {"type": "join-room", "roomId": "r"}
    assert isinstance(m.parse(json.dumps({**join, "username": "abcde"}), bounds), m.JoinRoom)
    assert isinstance(m.parse(json.dumps({**join, "username": "abcdef"}), bounds), m.ProtocolError)
    for key in ("candidate", "sdpMid", "usernameFragment"):
        candidate = {"candidate": "c", key: "y" * 9}
        result = m.parse(json.dumps({"type": "ice-candidate", "to": "p", "candidate": candidate}), bounds)
        assert isinstance(result, m.ProtocolError) and f"{key}' must be at most 8" in result.message


@pytest.mark.parametrize("index", [-1, 65536, 2**40])
def test_mline_index_is_an_unsigned_short(index: int) -> None:
    candidate = {"candidate": "c", "sdpMLineIndex": index}
    result = parse({"type": "ice-candidate", "to": "p", "candidate": candidate})
    assert isinstance(result, m.ProtocolError) and "sdpMLineIndex" in result.message


def test_join_token_is_parsed_but_never_shown() -> None:
    join = parse({"type": "join-room", "roomId": "r", "username": "u", "token": "eyJ.secret.sig"})
    assert isinstance(join, m.JoinRoom) and join.token == "eyJ.secret.sig"
    assert "secret" not in repr(join)
    for bad in (5, ["t"], "t" * (m.MAX_TOKEN + 1)):
        result = parse({"type": "join-room", "roomId": "r", "username": "u", "token": bad})
        assert isinstance(result, m.ProtocolError) and "'token'" in result.message


def test_default_bounds_match_the_default_configuration() -> None:
    limits = LimitsConfig()
    assert (
        m.Bounds(limits.max_username_length, limits.max_sdp_length, limits.max_candidate_length, limits.max_json_depth)
        == m.DEFAULT_BOUNDS
    )


def test_encoders_give_the_utf8_bytes_of_the_wire() -> None:
    frame = m.encode_membership("user-joined", "r", "p", "zoë 🎉")
    assert isinstance(frame, bytes) and "zoë 🎉".encode() in frame  # len() is the size on the wire
    assert json.loads(frame)["username"] == "zoë 🎉"


@pytest.mark.parametrize(
    "text", ['{"type":"ping","x":NaN}', '{"type":"ping","x":1e999}', '{"type":"ping","x":"\\ud800"}']
)
def test_what_is_not_strict_json_is_invalid_json(text: str) -> None:
    result = m.parse(text)
    assert isinstance(result, m.ProtocolError) and result.code == m.INVALID_JSON


def test_encoded_shapes() -> None:
    assert json.loads(m.encode_error("room-full", "full", "q")) == {
        "type": "error",
        "code": "room-full",
        "message": "full",
        "requestId": "q",
    }
    assert "requestId" not in json.loads(m.encode_error("room-full", "full"))
    assert json.loads(m.encode_joined_room("r", "p", "u", [("a", "A")], 1)) == {
        "type": "joined-room",
        "roomId": "r",
        "peerId": "p",
        "username": "u",
        "participants": [{"peerId": "a", "username": "A"}],
        "resumeGrace": 0,
        "requestId": 1,
    }
    joined = json.loads(m.encode_joined_room("r", "p", "u", [], None, None, "r.p.secret", 30.0))
    assert (joined["resumeToken"], joined["resumeGrace"]) == ("r.p.secret", 30)
    assert json.loads(m.encode_joined_room("r", "p", "u", [], None, None, "r.p.secret", 2.5))["resumeGrace"] == 2.5
    assert json.loads(m.encode_resumed("r", "p", "u", [("a", "A")], 3, "r.p.new", 30.0, "q")) == {
        "type": "resumed",
        "roomId": "r",
        "peerId": "p",
        "username": "u",
        "participants": [{"peerId": "a", "username": "A"}],
        "missed": 3,
        "resumeToken": "r.p.new",
        "resumeGrace": 30,
        "requestId": "q",
    }
    assert json.loads(m.encode_pong()) == {"type": "pong"}


def test_resume() -> None:
    message = parse({"type": "resume", "token": "r.p.secret", "requestId": 4})
    assert message == m.Resume("r.p.secret", 4)
    assert "secret" not in repr(message)  # tokens never reach a log line


@pytest.mark.parametrize(
    ("token", "words"),
    [
        (None, "'token' must be a string"),
        (5, "must be a string"),
        ("", "must not be empty"),
        ("x" * 257, "at most 256"),
    ],
)
def test_resume_needs_a_token(token: Any, words: str) -> None:
    result = parse({"type": "resume", "token": token, "requestId": "k"})
    assert isinstance(result, m.ProtocolError) and result.code == m.INVALID_MESSAGE
    assert words in result.message and result.request_id == "k"
