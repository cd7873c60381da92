"""Identifiers and timestamps: the two things every other module formats the same way."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from ._messages import PEER_ID, ROOM_ID


def new_room_id() -> str:
    """96 random bits, URL-safe: fits the ``[A-Za-z0-9_-]{1,64}`` room id grammar."""
    return secrets.token_urlsafe(12)


def new_peer_id() -> str:
    """128 random bits: a peer id is a capability (it routes offers), so it must be unguessable."""
    return secrets.token_urlsafe(16)


def new_resume_token(room_id: str, peer_id: str) -> str:
    """A member's secret for resuming: where to find its seat, and 192 random bits.

    The room and peer id in it let whichever node receives it route it like a join (no
    token table to share); only the secret part proves anything, and only the room checks it.
    Clients treat the whole string as opaque.
    """
    return f"{room_id}.{peer_id}.{secrets.token_urlsafe(24)}"


def resume_token_seat(token: str) -> tuple[str, str] | None:
    """The (room id, peer id) a resume token names, or None if it is not shaped like one."""
    parts = token.split(".")
    if len(parts) != 3 or not (ROOM_ID.fullmatch(parts[0]) and PEER_ID.fullmatch(parts[1]) and parts[2]):
        return None
    return parts[0], parts[1]


def resume_token_digest(token: str) -> str:
    """What the cluster's Redis keeps of a resume token, to check one: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with exactly three fraction digits and a ``Z``, as the Node service sent."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
