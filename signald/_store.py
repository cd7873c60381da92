"""Rooms created over REST, kept in SQLite so that a restart loses none of them.

Only creating and removing such a room touches the store; joins and relays never do, and
even those two never make a room task wait for the disk. The hub reports each change
synchronously into an ordered queue, and one writer task applies whatever has queued up in a
worker thread (sqlite3 blocks), one transaction per batch. When the server stops, the writer
finishes the queue before the file is closed, so a graceful restart loses nothing; a crash
can lose only the changes of its last moments.

Whatever can be wrong with the file (not a database, corrupt, written by a newer signald, not
writable) is found at start-up and refused with a ConfigError naming ``storage.path``, so a
bad store is never silently replaced by an empty one.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import attrs
import trio

from ._config import ConfigError
from ._room import Room

log = logging.getLogger("signald.store")

#: Kept in SQLite's ``user_version``; a file with a higher one was written by a newer signald.
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS rooms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    max_participants INTEGER NOT NULL,
    created_at TEXT NOT NULL  -- ISO 8601 with UTC offset
)
"""

_Statement = tuple[str, tuple[Any, ...]]


@attrs.frozen
class SavedRoom:
    id: str
    name: str
    max_participants: int
    created_at: datetime


class SqliteRoomStore:
    """The rooms table at ``path``; see the module docstring for when it is written."""

    def __init__(self, db: sqlite3.Connection, path: str, saved: list[SavedRoom]) -> None:
        self.path = path
        #: The rooms in the file when it was opened, oldest first.
        self.saved = saved
        self._db = db
        self._send, self._receive = trio.open_memory_channel[_Statement](math.inf)

    @classmethod
    def open(cls, path: str) -> SqliteRoomStore:
        """Open (or create) the file and read its rooms; blocking, so run it in a thread."""
        try:
            db = sqlite3.connect(path, check_same_thread=False)  # one writer task, one thread at a time
        except sqlite3.Error as exc:
            raise _refuse(
                path, f"cannot open ({exc}): does its directory exist, and may signald write there?"
            ) from None
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise _refuse(path, f"written by a newer signald (schema {version}, this one knows {SCHEMA_VERSION})")
            problems = [line for (row,) in db.execute("PRAGMA quick_check") for line in row.splitlines()]
            if problems != ["ok"]:
                raise _refuse(path, f"corrupt: {'; '.join(line for line in problems[:4] if '***' not in line)}")
            # Read everything before writing anything, so a file we refuse is left as it was.
            saved = []
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'rooms'").fetchone():
                rows = db.execute("SELECT id, name, max_participants, created_at FROM rooms ORDER BY created_at")
                saved = [_saved_room(path, *row) for row in rows]
            with db:  # a write at start-up, so an unwritable file is refused now, not at the first POST
                db.execute(SCHEMA)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            db.close()
            raise _refuse(path, f"unusable: {exc}") from None
        except ConfigError:
            db.close()
            raise
        return cls(db, path, saved)

    def created(self, room: Room) -> None:
        self._send.send_nowait(
            (
                "INSERT OR REPLACE INTO rooms VALUES (?, ?, ?, ?)",
                (room.id, room.name, room.max_participants, room.created_at.isoformat()),
            )
        )

    def removed(self, room: Room) -> None:
        self._send.send_nowait(("DELETE FROM rooms WHERE id = ?", (room.id,)))

    async def _write(self) -> None:
        """Apply queued changes in order until the queue is closed and empty."""
        async with self._receive:
            async for statement in self._receive:
                batch = [statement]
                while True:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await trio.to_thread.run_sync(self._apply, batch)

    def _apply(self, batch: list[_Statement]) -> None:
        try:
            with self._db:
                for sql, parameters in batch:
                    self._db.execute(sql, parameters)
        except sqlite3.Error as exc:
            log.error("room store %s: %d change(s) not saved: %s", self.path, len(batch), exc)


def _refuse(path: str, problem: str) -> ConfigError:
    return ConfigError("storage.path", f"{path}: {problem}")


def _saved_room(path: str, room_id: Any, name: Any, max_participants: Any, created_at: Any) -> SavedRoom:
    try:
        if not isinstance(room_id, str) or not isinstance(name, str) or not isinstance(max_participants, int):
            raise ValueError("wrong column types")
        return SavedRoom(room_id, name, max_participants, datetime.fromisoformat(created_at))
    except (TypeError, ValueError) as exc:
        raise _refuse(path, f"room {room_id!r} is unreadable: {exc}") from None


@asynccontextmanager
async def open_room_store(path: str) -> AsyncIterator[SqliteRoomStore | None]:
    """The store at ``path`` with its writer running, or None when rooms live in memory only.

    On exit the writer finishes every queued change before the file is closed.
    """
    if not path:
        yield None
        return
    store = await trio.to_thread.run_sync(SqliteRoomStore.open, path)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._write)
            try:
                yield store
            finally:
                store._send.close()
    finally:
        store._db.close()
