"""Logging to stderr, one line per event, at the configured level."""

from __future__ import annotations

import logging
import sys

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup(level: str) -> None:
    """Point the ``signald`` logger at stderr; idempotent, so it can be called again."""
    logger = logging.getLogger("signald")
    logger.setLevel(LEVELS[level])
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
