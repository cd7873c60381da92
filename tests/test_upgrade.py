"""The upgrade validator without sockets: every refusal, in the documented order."""

from __future__ import annotations

import json
from typing import Any

import pytest

from signald._cors import CorsPolicy
from signald._limits import ConnectionCounter
from signald._upgrade import accept_headers, refusal

GOOD = {
    "upgrade": "websocket",
    "connection": "Upgrade",
    "sec-websocket-version": "13",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
}
CORS = CorsPolicy(("https://app.example",))


def judge(method: str = "GET", *, draining: bool = False, total: int = 10, per_address: int = 10, **headers: Any):
    connections = ConnectionCounter(total, per_address)
    overrides = {key.replace("_", "-"): value for key, value in headers.items()}
    given = {key: value for key, value in {**GOOD, **overrides}.items() if value is not None}
    return refusal(method, given, "198.51.100.7", draining=draining, cors=CORS, connections=connections)


def error_of(response: Any) -> tuple[int, str]:
    return response.status, json.loads(response.body)["error"]


def test_a_valid_upgrade_is_admitted_in_any_letter_case_and_token_order() -> None:
    assert judge() is None
    assert judge(upgrade="WebSocket", connection="keep-alive, Upgrade") is None
    assert judge(origin="https://app.example") is None


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("POST", {"upgrade": None}, (405, "method-not-allowed")),
        ("GET", {"upgrade": None}, (426, "upgrade-required")),
        ("POST", {}, (400, "bad-upgrade")),
        ("GET", {"upgrade": "h2c"}, (400, "bad-upgrade")),
        ("GET", {"connection": "keep-alive"}, (400, "bad-upgrade")),
        ("GET", {"connection": None}, (400, "bad-upgrade")),
        ("GET", {"sec_websocket_version": "8"}, (426, "bad-upgrade")),
        ("GET", {"sec_websocket_version": None}, (426, "bad-upgrade")),
        ("GET", {"sec_websocket_key": None}, (400, "bad-upgrade")),
        ("GET", {"sec_websocket_key": "c2hvcnQ="}, (400, "bad-upgrade")),  # 5 bytes
        ("GET", {"sec_websocket_key": "dGhlIHNhbXBsZSBub25jZQ"}, (400, "bad-upgrade")),  # unpadded
        ("GET", {"sec_websocket_key": "ŧhe sample nonce ünïcode"}, (400, "bad-upgrade")),
        ("GET", {"origin": "https://evil.example"}, (403, "origin-not-allowed")),
    ],
)
def test_each_refusal(method: str, headers: dict[str, Any], expected: tuple[int, str]) -> None:
    response = judge(method, **headers)
    assert response is not None and error_of(response) == expected


def test_the_documented_order_draining_then_origin_then_the_handshake_then_the_caps() -> None:
    bad_everything = {"origin": "https://evil.example", "sec_websocket_version": "8"}
    assert error_of(judge(draining=True, total=0, **bad_everything)) == (503, "shutting-down")
    assert error_of(judge(total=0, **bad_everything)) == (403, "origin-not-allowed")
    assert error_of(judge(total=0, sec_websocket_version="8")) == (426, "bad-upgrade")
    assert error_of(judge(total=0)) == (503, "server-full")
    assert error_of(judge(per_address=0)) == (429, "too-many-connections")


def test_refusals_carry_cors_headers_and_the_version_refusal_names_13() -> None:
    response = judge(origin="https://app.example", sec_websocket_version="8")
    assert ("Sec-WebSocket-Version", "13") in response.headers
    assert ("Access-Control-Allow-Origin", "https://app.example") in response.headers


def test_the_accept_header_is_rfc_6455s_example() -> None:
    assert ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") in accept_headers(GOOD)
