"""Logging to stderr, one line per event, in the shape whoever reads stderr wants.

* A terminal gets ``time LEVEL logger: message``.
* The journal stamps each line itself, so when systemd says stderr *is* the journal
  (``$JOURNAL_STREAM`` names stderr's device and inode) lines carry no time of their own but
  a ``<N>`` syslog priority prefix (sd-daemon(3)); journald turns it into the entry's
  priority, so ``journalctl -p warning -u signald`` works.
* ``log.format = "json"``: one JSON object per line for log shippers; a traceback stays
  inside its object instead of spilling over lines a shipper would read as separate events.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TextIO

from ._config import LogConfig
from ._ids import format_timestamp
from ._limits import TokenBucket

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
#: syslog priorities, as journald reads them from a ``<N>`` line prefix.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def writes_to_journal(environ: Mapping[str, str], stream: TextIO) -> bool:
    """Whether ``stream`` is the journal connection systemd set up (not merely inherited by a child)."""
    try:
        device, inode = (int(part) for part in environ.get("JOURNAL_STREAM", "").split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, io.UnsupportedOperation):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


class Formatter(logging.Formatter):
    def __init__(self, *, json_lines: bool, journal: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._json = json_lines
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        if self._json:
            entry: dict[str, str] = {}
            if not self._journal:
                entry["time"] = format_timestamp(datetime.fromtimestamp(record.created, UTC))
            entry.update(level=record.levelname.lower(), logger=record.name, message=record.getMessage())
            if record.exc_info:
                entry["exception"] = self.formatException(record.exc_info)
            text = json.dumps(entry)
        elif self._journal:
            text = f"{record.name}: {record.getMessage()}"
            if record.exc_info:
                text += "\n" + self.formatException(record.exc_info)
        else:
            text = super().format(record)
        if not self._journal:
            return text
        # Every line, so a traceback's lines keep the priority of the event they belong to.
        prefix = f"<{PRIORITIES.get(record.levelno, 6)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def setup(config: LogConfig, environ: Mapping[str, str], stream: TextIO | None = None) -> None:
    """Point the ``signald`` logger at stderr; call it again to apply a new configuration (SIGHUP)."""
    stream = stream if stream is not None else sys.stderr
    logger = logging.getLogger("signald")
    logger.setLevel(LEVELS[config.level])
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(stream))
    handler = logger.handlers[0]
    if isinstance(handler, logging.StreamHandler):
        handler.setStream(stream)
    handler.setFormatter(Formatter(json_lines=config.format == "json", journal=writes_to_journal(environ, stream)))


class Throttled:
    """Lines of one kind that a client can cause at will (a refused upgrade), at most ``burst`` at
    once and ``rate`` per second after that, so a flood of them cannot fill the journal.

    The lines held back are counted, and the next line that goes out says how many there were:
    the operator learns that the flood happened without reading every line of it.
    """

    def __init__(self, logger: logging.Logger, rate: float, burst: int) -> None:
        self._logger = logger
        self._rate, self._burst = rate, burst
        #: Filled at the first line, whose ``now`` is the first the clock gives us.
        self._bucket: TokenBucket | None = None
        self.held_back = 0

    def log(self, now: float, level: int, message: str, *args: object) -> None:
        if not self._logger.isEnabledFor(level):
            return
        if self._bucket is None:
            self._bucket = TokenBucket.full(self._rate, self._burst, now)
        if not self._bucket.take(now):
            self.held_back += 1
            return
        if self.held_back:
            message += " (and %d more like it not logged)"
            args = (*args, self.held_back)
            self.held_back = 0
        self._logger.log(level, message, *args)
