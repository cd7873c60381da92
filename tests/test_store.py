"""Durable rooms: POSTed rooms survive a restart; expiry removes them; a bad store refuses to start."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from signald._config import ConfigError, RoomsConfig
from signald._hub import RoomHub
from signald._room import Room
from signald._store import SqliteRoomStore, open_room_store

from ._clients import TIMEOUT, connect, http_request
from ._process import ROOT, run_signald
from .test_room import FakeMember


@attrs.define
class RecordingStore:
    changes: list[tuple[str, str]] = attrs.field(factory=list)

    def created(self, room: Room) -> None:
        self.changes.append(("created", room.id))

    def removed(self, room: Room) -> None:
        self.changes.append(("removed", room.id))


async def test_only_creating_and_removing_a_posted_room_reach_the_store(
    autojump_clock: trio.testing.MockClock,
) -> None:
    store = RecordingStore()
    async with trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(idle_ttl=60), nursery, store=store)
        room = hub.create("Standup")
        assert store.changes == [("created", room.id)]
        a, b = FakeMember("a", "A"), FakeMember("b", "B")
        task = await hub.join(room.id, a)
        assert task is not None and await hub.join(room.id, b) is task
        for _ in range(10):
            await task.relay("a", "b", '{"type":"ice-candidate"}', None)
        await task.leave(a)
        await task.leave(b)
        c = FakeMember("c", "C")
        adhoc = await hub.join("adhoc", c)  # a join-made room is not kept
        assert adhoc is not None
        await adhoc.leave(c)
        await trio.testing.wait_all_tasks_blocked()
        assert store.changes == [("created", room.id)]
        await trio.sleep(61)
        assert hub.get(room.id) is None
        assert store.changes == [("created", room.id), ("removed", room.id)]


async def test_rooms_saved_and_expired_in_sqlite(autojump_clock: trio.testing.MockClock, tmp_path: Path) -> None:
    path = str(tmp_path / "rooms.db")
    async with open_room_store(path) as store, trio.open_nursery() as nursery:
        assert store is not None and store.saved == []
        hub = RoomHub(RoomsConfig(idle_ttl=10), nursery, store=store)
        early = hub.create("Early", 4)
        await trio.sleep(6)
        late = hub.create("Late")
        await trio.sleep(5)  # "Early" has been idle for 11 s, "Late" for 5 s
        assert hub.get(early.id) is None and hub.get(late.id) is late
        nursery.cancel_scope.cancel()  # as on shutdown: live rooms stay saved
    # Leaving open_room_store has written everything queued.
    async with open_room_store(path) as store:
        assert store is not None
        assert [(r.id, r.name, r.max_participants, r.created_at) for r in store.saved] == [
            (late.id, "Late", 16, late.created_at)
        ]


async def test_restored_rooms_keep_id_name_and_creation_time_and_can_be_joined(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    path = str(tmp_path / "rooms.db")
    async with open_room_store(path) as store, trio.open_nursery() as nursery:
        hub = RoomHub(RoomsConfig(), nursery, store=store)
        made = hub.create("Retro", 8)
        nursery.cancel_scope.cancel()
    async with open_room_store(path) as store, trio.open_nursery() as nursery:
        assert store is not None
        hub = RoomHub(RoomsConfig(max_participants=6), nursery, store=store)
        [saved] = store.saved
        room = hub.restore(saved.id, saved.name, saved.max_participants, saved.created_at)
        assert (room.id, room.name, room.created_at, room.persistent) == (made.id, "Retro", made.created_at, True)
        assert room.max_participants == 6  # capped by today's rooms.max_participants
        assert await hub.join(made.id, FakeMember("a", "A")) is not None
        nursery.cancel_scope.cancel()


def test_in_memory_only_is_the_default() -> None:
    async def check() -> None:
        async with open_room_store("") as store:
            assert store is None

    trio.run(check)


def broken_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Store files that must be refused, with the words the refusal must contain."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all " * 100)
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    bad_row = tmp_path / "bad-row.db"
    SqliteRoomStore.open(str(bad_row))._db.close()
    with sqlite3.connect(bad_row) as db:
        db.execute("INSERT INTO rooms VALUES ('r1', 'Retro', 4, 'yesterday')")
    damaged = tmp_path / "damaged.db"
    with sqlite3.connect(damaged) as db:
        db.execute("CREATE TABLE rooms (id TEXT PRIMARY KEY, name TEXT, max_participants INT, created_at TEXT)")
        db.executemany(
            "INSERT INTO rooms VALUES (?, ?, 4, '2024-01-01T00:00:00+00:00')",
            [(f"r{i}", "x" * 500) for i in range(100)],
        )
    data = bytearray(damaged.read_bytes())
    data[4096 * 2 : 4096 * 3] = b"\xff" * 4096  # a page of the table's b-tree
    damaged.write_bytes(bytes(data))
    return {
        "junk": (junk, "file is not a database"),
        "newer": (newer, "written by a newer signald (schema 99"),
        "bad-row": (bad_row, "room 'r1' is unreadable"),
        "damaged": (damaged, "corrupt: Page 3"),
        "no-directory": (tmp_path / "missing" / "rooms.db", "cannot open"),
        "a-directory": (tmp_path, "cannot open"),
    }


@pytest.mark.parametrize("case", ["junk", "newer", "bad-row", "damaged", "no-directory", "a-directory"])
def test_a_bad_store_is_refused_and_left_alone(tmp_path: Path, case: str) -> None:
    path, words = broken_files(tmp_path)[case]
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(ConfigError) as info:
        SqliteRoomStore.open(str(path))
    assert info.value.key == "storage.path"
    assert str(info.value).startswith(f"storage.path: {path}: ")
    assert words in str(info.value) and "\n" not in str(info.value)
    if before is not None:
        assert path.read_bytes() == before  # nothing overwritten, nothing lost


def test_signald_with_a_corrupt_store_says_so_and_exits_1(tmp_path: Path) -> None:
    path, _ = broken_files(tmp_path)["junk"]
    result = subprocess.run(
        [sys.executable, "-m", "signald", "--port", "0", "--storage-path", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
    )
    assert result.returncode == 1
    assert result.stderr == f"signald: cannot start: storage.path: {path}: unusable: file is not a database\n"


async def list_rooms(port: int) -> list[dict[str, Any]]:
    status, _, body = await http_request(port, "GET", "/api/rooms")
    assert status == 200
    return sorted(body["rooms"], key=lambda room: room["createdAt"])


async def test_rooms_survive_a_restart(tmp_path: Path) -> None:
    config = tmp_path / "signald.toml"
    config.write_text(f'[server]\nport = 0\n[storage]\npath = "{tmp_path / "rooms.db"}"\n')
    async with run_signald("--config", str(config)) as daemon:
        port = await daemon.port()
        for name, size in [("Standup", None), ("Retro", 4), ("Ünïcode ✓", 2)]:
            body = {"name": name} if size is None else {"name": name, "maxParticipants": size}
            status, _, _ = await http_request(port, "POST", "/api/rooms", body)
            assert status == 201
        async with connect(port) as client:
            await client.join("adhoc", "ada")  # made by a join: not kept
            before = [room for room in await list_rooms(port) if room["id"] != "adhoc"]
        assert len(before) == 3
        assert await daemon.stop() == 0
    async with run_signald("--config", str(config)) as daemon:
        port = await daemon.port()
        assert await list_rooms(port) == before
        async with connect(port) as client:
            await client.join(before[1]["id"], "ada")
        assert await daemon.stop() == 0
