"""Access control: join tokens (HS256 JWTs) for rooms, and API keys for mutating REST calls.

Both are off unless configured. signald never issues credentials: the application's own
server, which knows its users, mints a short-lived token per user and room with the shared
``auth.secret``, and signald only checks it. Every comparison with a secret is constant-time
(PyJWT compares signatures with ``hmac.compare_digest``; API keys are compared here the same
way), so response timing reveals nothing about how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

import jwt

#: The only algorithm accepted: a token cannot choose a weaker one ("none") for itself.
ALGORITHM = "HS256"
#: Claim naming every room.
ANY_ROOM = "*"


class JoinTokens:
    """Checks the ``token`` of a ``join-room`` against the room and username it asks for."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def problem(self, token: str | None, room_id: str, username: str) -> str | None:
        """Why this join is unauthorized, or None if the token allows it."""
        if token is None:
            return "this server requires a token to join a room"
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], options={"require": ["room"]}
            )
        except jwt.ExpiredSignatureError:
            return "token has expired"
        except jwt.InvalidSignatureError:
            return "token signature is invalid"
        except jwt.MissingRequiredClaimError:
            return "token has no 'room' claim"
        except jwt.InvalidTokenError as exc:
            return f"token is invalid ({type(exc).__name__})"
        room = claims["room"]
        if room != ANY_ROOM and room != room_id:
            return f"token is not valid for room {room_id}"
        subject = claims.get("sub")
        if subject is not None and subject != username:
            return "token is for another username"
        return None


def _digest(value: bytes) -> bytes:
    """Hash before comparing, so the comparison does not even reveal a key's length."""
    return hashlib.sha256(value).digest()


class ApiKeys:
    """``Authorization: Bearer <key>`` against ``auth.api_keys``; no keys means no check."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(key.encode()) for key in keys]

    def allows(self, authorization: str | None) -> bool:
        if not self._digests:
            return True
        scheme, _, credential = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return False
        # Header values arrive decoded as latin-1; encoding back gives the bytes that were sent.
        offered = _digest(credential.strip().encode("latin-1"))
        matched = False
        for digest in self._digests:  # no early exit: every key is compared every time
            matched |= hmac.compare_digest(offered, digest)
        return matched
