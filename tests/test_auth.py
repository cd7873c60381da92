"""Join tokens (HS256 JWT) and API keys, as pure checks."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from signald._auth import ApiKeys, JoinTokens

SECRET = "test-secret-that-is-long-enough-for-hs256"


def mint(secret: str = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


@pytest.mark.parametrize(
    ("token", "room", "username", "problem"),
    [
        (mint(room="demo"), "demo", "alice", None),
        (mint(room="*"), "anything", "alice", None),
        (mint(room="demo", sub="alice", exp=int(time.time()) + 60), "demo", "alice", None),
        (None, "demo", "alice", "requires a token"),
        (mint(room="other"), "demo", "alice", "not valid for room demo"),
        (mint(room="demo", sub="bob"), "demo", "alice", "another username"),
        (mint(room="demo", exp=int(time.time()) - 60), "demo", "alice", "expired"),
        (mint(secret="forged-by-someone-who-guessed-a-secret", room="demo"), "demo", "alice", "signature"),
        (mint(sub="alice"), "demo", "alice", "no 'room' claim"),
        (mint(secret=SECRET * 2, room="demo", algorithm="HS512"), "demo", "alice", "invalid"),
        (mint(room="demo", nbf=int(time.time()) + 600), "demo", "alice", "invalid"),
        (mint(room="demo", sub=7), "demo", "alice", "invalid"),
        ("not.a.jwt", "demo", "alice", "invalid"),
        ("", "demo", "alice", "invalid"),
    ],
)
def test_join_tokens(token: str | None, room: str, username: str, problem: str | None) -> None:
    result = JoinTokens(SECRET).problem(token, room, username)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result


def test_unsigned_token_is_refused() -> None:
    """alg "none" would let anyone write their own claims."""
    unsigned = jwt.encode({"room": "*"}, None, algorithm="none")
    assert JoinTokens(SECRET).problem(unsigned, "demo", "alice") is not None


def test_api_keys() -> None:
    keys = ApiKeys(["first-key-0123456789", "second-key-0123456789"])
    assert keys.allows("Bearer first-key-0123456789")
    assert keys.allows("bearer   second-key-0123456789 ")
    for header in (
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic first-key-0123456789",
        "Bearer first-key-012345678",
        "Bearer first-key-0123456789x",
        "first-key-0123456789",
        "Bearer \xe9",
    ):
        assert not keys.allows(header), header


def test_no_api_keys_means_no_check() -> None:
    keys = ApiKeys([])
    assert keys.allows(None) and keys.allows("") and keys.allows("Basic anything")
