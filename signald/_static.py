"""The demo client's files (``signald/static``), served by exact name from memory.

No URL path is ever joined onto a filesystem path: when the demo is enabled, every file in
the package's ``static`` folder is read once into a table keyed by its URL path, and a
request either names a key or gets 404. There is nothing to traverse, no symlink to follow,
and no disk access per request; the files are a few kilobytes.

Caching: the names are not content-hashed, so browsers must revalidate (``no-cache``) and
an ETag turns the revalidation into a bodiless 304. An upgraded signald is seen at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable

import attrs

#: The only kinds of file the demo ships; anything else in the folder is a packaging error.
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

#: The page loads nothing but its own files, and only talks to its own origin (REST and /ws:
#: CSP 3 lets 'self' match ws:/wss: on the same host). No inline script, no framing.
PAGE_POLICY = (
    "default-src 'self'; connect-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

Headers = list[tuple[str, str]]


@attrs.frozen
class Asset:
    body: bytes
    content_type: str
    etag: str

    def respond(self, if_none_match: str | None) -> tuple[int, Headers, bytes]:
        """(status, headers, body): 304 without a body if the client's copy is current."""
        headers = [
            ("Cache-Control", "no-cache"),
            ("ETag", self.etag),
            ("X-Content-Type-Options", "nosniff"),
        ]
        if self.content_type.startswith("text/html"):
            headers += [("Content-Security-Policy", PAGE_POLICY), ("Referrer-Policy", "no-referrer")]
        if if_none_match is not None and self._matches(if_none_match):
            return 304, headers, b""
        return 200, [("Content-Type", self.content_type), *headers], self.body

    def _matches(self, if_none_match: str) -> bool:
        """RFC 9110 13.1.2: a weak comparison against each listed tag, or ``*``."""
        tags = [tag.strip() for tag in if_none_match.split(",")]
        return "*" in tags or any(tag.removeprefix("W/") == self.etag for tag in tags)


def load_assets(folder: Traversable | None = None) -> Mapping[str, Asset]:
    """URL path -> Asset for every file in ``folder`` (the package's ``static``); ``/`` is index.html."""
    if folder is None:
        folder = resources.files(__package__) / "static"
    assets: dict[str, Asset] = {}
    for entry in folder.iterdir():
        if not entry.is_file():
            continue
        suffix = "." + entry.name.rpartition(".")[2]
        if suffix not in CONTENT_TYPES:
            raise ValueError(f"static/{entry.name}: no content type for {suffix!r} files")
        body = entry.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets["/" + entry.name] = Asset(body, CONTENT_TYPES[suffix], etag)
    assets["/"] = assets["/index.html"]
    return assets
