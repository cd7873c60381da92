"""Which browser origins may use signald, and the CORS headers that say so.

One policy serves both doors: REST responses (CORS headers, preflight) and the WebSocket
handshake (which browsers do not preflight, so the server must check ``Origin`` itself).
"""

from __future__ import annotations

import attrs

ALLOWED_HEADERS = "Content-Type, Authorization"
MAX_AGE_SECONDS = "600"


@attrs.frozen
class CorsPolicy:
    allowed_origins: tuple[str, ...]

    def allows(self, origin: str | None) -> bool:
        """No ``Origin`` means a non-browser client, which CORS does not concern."""
        return origin is None or "*" in self.allowed_origins or origin in self.allowed_origins

    def headers(self, origin: str | None) -> list[tuple[str, str]]:
        """Headers for an ordinary (non-preflight) response to a request from ``origin``."""
        if origin is None:
            return []
        if self.allows(origin):
            return [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
        return [("Vary", "Origin")]

    def preflight_headers(self, origin: str, methods: tuple[str, ...]) -> list[tuple[str, str]]:
        return [
            *self.headers(origin),
            ("Access-Control-Allow-Methods", ", ".join(methods)),
            ("Access-Control-Allow-Headers", ALLOWED_HEADERS),
            ("Access-Control-Max-Age", MAX_AGE_SECONDS),
        ]
