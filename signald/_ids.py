"""Identifiers and timestamps: the two things every other module formats the same way."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime


def new_room_id() -> str:
    """96 random bits, URL-safe: fits the ``[A-Za-z0-9_-]{1,64}`` room id grammar."""
    return secrets.token_urlsafe(12)


def new_peer_id() -> str:
    """128 random bits: a peer id is a capability (it routes offers), so it must be unguessable."""
    return secrets.token_urlsafe(16)


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with exactly three fraction digits and a ``Z``, as the Node service sent."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
