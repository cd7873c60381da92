"""The node's link to Redis: what makes several signald processes one server.

Design rules:

1. **Redis decides membership.** One Lua script (``SCRIPT``) checks a room's capacity and
   the cluster's room count, changes the room's members and publishes the change to every
   node holding members of that room, in one atomic step. So all nodes learn every room's
   membership changes in one order, and ``maxParticipants`` / ``rooms.max_rooms`` hold
   whatever joins race on different nodes.
2. **One ordered stream each way.** All this node sends that must keep its order
   (membership scripts, relays to members on other nodes) goes through one queue and one
   writer task, pipelined; so a relay sent before a leave arrives before it. All it receives
   arrives on its own pub/sub channel, in the order Redis executed it; so a member's
   ``user-joined`` always precedes its first relay, on every node.
3. **Mirrors, reset by snapshots.** A node keeps, per room it has members in, a mirror of
   the room's other members. Whenever it could have missed something (its first member in a
   room, a reconnection) the script sends it a snapshot through that same stream.
4. **A failure tears the connected state down whole.** Any Redis error ends every task of
   the connection; whoever waits on Redis is told "unavailable" (the ``None`` of ``call``),
   and the link reconnects. Connected again, it first renews its lease, then every room
   re-registers its members (``sync``: adds what Redis lacks, removes this node's members
   Redis has but the node does not), and after ``node_timeout`` once more with pruning, so
   remote members that vanished with an empty Redis leave too.
5. **Dead nodes.** Each node renews a lease every ``node_timeout / 3``; every node sweeps
   for nodes whose lease has expired and removes their members (the script re-checks the
   lease, so a node that came back is never swept).
6. **A slow Redis costs bounded memory.** What is queued for Redis and not yet answered is
   bounded by ``cluster.send_queue_bytes`` (an empty queue takes any one item: a relay of the
   largest message, with its ids, may be a little over the smallest bound that config allows,
   and refusing it there would refuse it forever). The first item that does not fit makes the queue
   *full*, and until Redis answers the batch in flight, Redis counts as unavailable for
   everything that would be queued (not only for items too big for what is left, so a small
   join does not slip in to wait behind a stalled Redis): a relay to another node is refused
   (``cluster-unavailable`` to its sender), a join or a room creation is told "unavailable",
   exactly as in an outage, while relays between members of this node go on (they never
   enter the queue). A leave refused so is kept, as in an outage, and queued again once a
   batch has been answered. A resume is refused as a join is; a handover (or a node's mark to
   itself) refused so fails the resume, as if lost with the link. A barrier (``flushed``)
   holds no bytes and is always taken, to wait behind the rest. The queue is counted in
   bytes, not items: a relay's frame can be 64 KiB or 100 bytes, and memory is what the bound
   is for.
7. **Redis routes relays to other nodes.** A relay to a member of another node goes to
   Redis without a node: one script per writer batch (``ROUTE``) looks up each addressee's
   node in its room's members and publishes there, still one ``PUBLISH`` per node per batch.
   A member can move between nodes (a resume elsewhere: ``claim``), and Redis runs the claim
   and the routing one after the other, so each relay lands at the node that holds the
   member at that point of Redis' order, and a sender never needs to hear of the move first.
   (A mirror's node would be stale for as long as the move takes to reach the sender.)
8. **A resume token is checked in Redis, never stored there.** A member's entry holds the
   SHA-256 digest of its current token (set at join, replaced by each resume), so any node
   can check a token and no secret is kept where every node can read it. The digest of 192
   random bits cannot be steered, so comparing digests needs no constant-time compare.
   When a member leaves, the script keeps why its session ended (``{room}:ended:<peer>``,
   an hour) so a claim that finds no seat can say which, on whatever node it runs.

Room keys share the ``{room}`` hash tag. The script also touches global keys (the room index,
the user count, the node registry, and in ``claim`` the member's former node's keys), and
``ROUTE`` reads the members of each room it routes for without declaring them, so on a Redis
Cluster those would move to a step of their own; one Redis (with a replica, if wanted) is
what this is built and tested for.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

import anyio
import attrs
import coredis
import trio
from coredis import PureToken
from coredis.exceptions import ConnectionError as RedisConnectionError

from ._config import ClusterConfig, RoomsConfig
from ._hub import ClusterUnavailable, MemberInfo, RoomInfo

log = logging.getLogger("signald.cluster")

PREFIX = "signald:"
ROOM_INDEX = PREFIX + "rooms"  # sorted set: room id -> expiry (ms since the epoch) or +inf if occupied
USER_COUNT = PREFIX + "users"
NODES = PREFIX + "nodes"  # every node that has registered and not been swept
#: Failures that mean "Redis is not there": the link reconnects and nothing else breaks.
LINK_ERRORS = (
    RedisConnectionError,  # BusyLoadingError too: Redis still reading its AOF
    OSError,
    TimeoutError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
)
#: Seconds between reconnection attempts while Redis is away.
RETRY = 0.5
#: Queued items sent per pipeline: one round trip each, and a bound on a batch's latency.
BATCH = 512
#: Rooms whose idle time has passed that one sweep removes (the next sweep does more).
EXPIRE_BATCH = 100


def channel(node: str) -> str:
    return f"{PREFIX}node:{node}"


def room_keys(room: str) -> list[str]:
    tag = f"{PREFIX}{{{room}}}"
    return [f"{tag}:meta", f"{tag}:members", f"{tag}:nodes"]


def node_keys(node: str) -> list[str]:
    return [f"{PREFIX}node:{node}:rooms", f"{PREFIX}node:{node}:lease"]


SCRIPT = """
-- KEYS: 1 room meta, 2 room members, 3 room nodes, 4 room index, 5 user count,
--       6 rooms of node ARGV[3], 7 lease of node ARGV[3], 8 set of nodes
-- ARGV: 1 operation, 2 room id, 3 node id, then per operation (see below).
local meta, members, room_nodes, index, users, node_rooms, lease, all_nodes =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local op, room, node = ARGV[1], ARGV[2], ARGV[3]
local CHANNEL = 'signald:node:'

local function send(to, event) redis.call('PUBLISH', CHANNEL .. to, cjson.encode(event)) end
local function send_all(event)
  local text = cjson.encode(event)
  for _, n in ipairs(redis.call('HKEYS', room_nodes)) do redis.call('PUBLISH', CHANNEL .. n, text) end
end
-- A member's entry (the value in the members hash, by peer id): {node, username, joined at,
-- order, digest of its resume token ('' when resume is off)}.
-- Members as {peer, username, node, joined at, order}, in join order.
local function members_in_order()
  local list, raw = {}, redis.call('HGETALL', members)
  for i = 1, #raw, 2 do
    local v = cjson.decode(raw[i + 1])
    list[#list + 1] = {raw[i], v[2], v[1], v[3], v[4]}
  end
  table.sort(list, function(a, b) return a[5] < b[5] end)
  return list
end
local function room_meta()
  local m = redis.call('HMGET', meta, 'name', 'max', 'created', 'persistent')
  return {m[1], tonumber(m[2]), m[3], m[4] == '1'}
end
-- A membership event to every node of the room. ``snapshot`` (the members this node must
-- know, or false) goes with it to this node alone, when this is its first member in the room.
local function announce(event, snapshot)
  local text = cjson.encode(event)
  for _, n in ipairs(redis.call('HKEYS', room_nodes)) do
    if n == node and snapshot then
      event.m = snapshot
      event.meta = room_meta()
      send(n, event)
    else
      redis.call('PUBLISH', CHANNEL .. n, text)
    end
  end
end
local function add(peer, username, joined_at, digest)
  local order = redis.call('HINCRBY', meta, 'seq', 1)
  redis.call('HSET', members, peer, cjson.encode({node, username, joined_at, order, digest}))
  redis.call('INCR', users)
  redis.call('ZADD', index, '+inf', room)
  redis.call('SADD', node_rooms, room)
  return redis.call('HINCRBY', room_nodes, node, 1) == 1
end
-- Why a member's session ended (a code of _cluster.ENDINGS: 'left', 'expired', ...), kept an hour by
-- peer, so that a late resume on any node hears which (rule 8); after that, it is unknown.
local ENDED_MS = 3600000
local function ended(peer) return string.sub(meta, 1, #meta - 4) .. 'ended:' .. peer end
-- evicted: removed because its node's lease lapsed (a node that is alive after all keeps it).
local function remove(peer, evicted, why)
  send_all({r = room, k = 'leave', p = peer, e = evicted})
  redis.call('SET', ended(peer), why or 'left', 'PX', ENDED_MS)
  redis.call('HDEL', members, peer)
  redis.call('DECR', users)
  if redis.call('HINCRBY', room_nodes, node, -1) <= 0 then
    redis.call('HDEL', room_nodes, node)
    redis.call('SREM', node_rooms, room)
  end
end
-- An emptied room: a posted one starts its idle time, one made by a join is gone.
local function settle(now, idle)
  if redis.call('HLEN', members) == 0 then
    if redis.call('HGET', meta, 'persistent') == '1' then
      redis.call('ZADD', index, tonumber(now) + tonumber(idle), room)
    else
      redis.call('DEL', meta, members, room_nodes)
      redis.call('ZREM', index, room)
    end
  end
end

if op == 'join' then
  -- 4 peer, 5 username, 6 joined at, 7 auto-create '1'/'0', 8 default capacity, 9 max rooms,
  -- 10 digest of the member's resume token
  if redis.call('EXISTS', meta) == 0 then
    if ARGV[7] ~= '1' then return {'room-not-found'} end
    if redis.call('ZCARD', index) >= tonumber(ARGV[9]) then return {'too-many-rooms'} end
    redis.call('HSET', meta, 'name', room, 'max', ARGV[8], 'created', ARGV[6], 'persistent', '0', 'seq', 0)
  end
  local max = tonumber(redis.call('HGET', meta, 'max'))
  if redis.call('HLEN', members) >= max then return {'room-full', tostring(max)} end
  local others = members_in_order()
  local first = add(ARGV[4], ARGV[5], ARGV[6], ARGV[10])
  announce({r = room, k = 'join', p = ARGV[4], u = ARGV[5], n = node, t = ARGV[6]}, first and others)
  return {'ok'}
elseif op == 'leave' then
  -- 4 peer, 5 now (ms), 6 idle ttl (ms), 7 why its session ended
  local value = redis.call('HGET', members, ARGV[4])
  if not value or cjson.decode(value)[1] ~= node then return 0 end
  remove(ARGV[4], false, ARGV[7])
  settle(ARGV[5], ARGV[6])
  return 1
elseif op == 'evict' then
  -- node ARGV[3] is dead, unless its lease is back. 4 now (ms), 5 idle ttl (ms)
  if redis.call('EXISTS', lease) == 1 then return 0 end
  local count = 0
  for _, m in ipairs(members_in_order()) do
    if m[3] == node then
      remove(m[1], true, 'dead')
      count = count + 1
    end
  end
  redis.call('SREM', node_rooms, room)
  settle(ARGV[4], ARGV[5])
  return count
elseif op == 'forget' then
  -- the dead node ARGV[3] has been evicted from all its rooms
  if redis.call('EXISTS', lease) == 1 then return 0 end
  redis.call('DEL', node_rooms)
  redis.call('SREM', all_nodes, node)
  return 1
elseif op == 'sync' then
  -- 4 this node's members of the room, JSON [[peer, username, joined at, digest], ...], 5 prune '1'/'0',
  -- 6 name, 7 capacity, 8 created at, 9 persistent '1'/'0' (to recreate a room Redis lost)
  if redis.call('EXISTS', meta) == 0 then
    redis.call('HSET', meta, 'name', ARGV[6], 'max', ARGV[7], 'created', ARGV[8], 'persistent', ARGV[9], 'seq', 0)
  end
  local held, here = cjson.decode(ARGV[4]), {}
  for _, m in ipairs(held) do here[m[1]] = true end
  for _, m in ipairs(members_in_order()) do
    if m[3] == node and not here[m[1]] then remove(m[1], false, 'left') end
  end
  for _, m in ipairs(held) do
    local value = redis.call('HGET', members, m[1])
    if not value then
      add(m[1], m[2], m[3], m[4])
      send_all({r = room, k = 'join', p = m[1], u = m[2], n = node, t = m[3]})
    else
      local v = cjson.decode(value)
      if v[1] == node and v[5] ~= m[4] then  -- a resume here while Redis was away: its token now
        v[5] = m[4]
        redis.call('HSET', members, m[1], cjson.encode(v))
      end
    end
  end
  send(node, {r = room, k = 'sync', m = members_in_order(), meta = room_meta(), prune = ARGV[5] == '1'})
  return 1
elseif op == 'claim' then
  -- 4 peer, 5 digest of the token presented, 6 digest of the token that replaces it.
  -- The member moves to node ARGV[3] (or stays, if it is there): from now on Redis routes its
  -- relays here. Its former node hears 'moved' and hands over what it kept for it.
  local value = redis.call('HGET', members, ARGV[4])
  if not value then return {'gone', redis.call('GET', ended(ARGV[4]))} end
  local v = cjson.decode(value)
  if v[5] ~= ARGV[5] then return {'used'} end
  local from = v[1]
  if from ~= node and redis.call('EXISTS', CHANNEL .. from .. ':lease') == 0 then return {'dead'} end
  v[1], v[5] = node, ARGV[6]
  redis.call('HSET', members, ARGV[4], cjson.encode(v))
  local event = {r = room, k = 'moved', p = ARGV[4], u = v[2], t = v[3], n = node, f = from}
  if from == node then
    send(node, event)
    return {'ok'}
  end
  if redis.call('HINCRBY', room_nodes, from, -1) <= 0 then
    redis.call('HDEL', room_nodes, from)
    redis.call('SREM', CHANNEL .. from .. ':rooms', room)
    send(from, event)  -- no longer a node of the room, but it must hand over
  end
  redis.call('SADD', node_rooms, room)
  local first = redis.call('HINCRBY', room_nodes, node, 1) == 1
  announce(event, first and members_in_order())
  return {'ok'}
elseif op == 'create' then
  -- 4 name, 5 capacity, 6 created at, 7 max rooms, 8 expiry (ms)
  if redis.call('EXISTS', meta) == 1 then return {'exists'} end
  if redis.call('ZCARD', index) >= tonumber(ARGV[7]) then return {'too-many-rooms'} end
  redis.call('HSET', meta, 'name', ARGV[4], 'max', ARGV[5], 'created', ARGV[6], 'persistent', '1', 'seq', 0)
  redis.call('ZADD', index, ARGV[8], room)
  return {'ok'}
elseif op == 'expire' then
  -- 4 now (ms): remove the room if it is still empty and its idle time has passed
  local score = tonumber(redis.call('ZSCORE', index, room))
  if score and score <= tonumber(ARGV[4]) and redis.call('HLEN', members) == 0 then
    redis.call('DEL', meta, members, room_nodes)
    redis.call('ZREM', index, room)
    return 1
  end
  return 0
end
return redis.error_reply('unknown operation ' .. op)
"""

ROUTE = r"""
-- A writer batch's relays, by addressee. ARGV: room, addressee, its lines; room, addressee,
-- its lines; ... (each addressee once; its lines in order, joined by newlines). They go to the
-- node that holds the addressee now, one PUBLISH per node; relays to a member no longer in
-- its room are dropped (as its node would drop them).
local CHANNEL = 'signald:node:'
local lines, nodes = {}, {}
for i = 1, #ARGV, 3 do
  local value = redis.call('HGET', 'signald:{' .. ARGV[i] .. '}:members', ARGV[i + 1])
  local node = value and string.match(value, '^%["([^"]*)"')  -- node ids need no escapes
  if node then
    local batch = lines[node]
    if not batch then
      batch = {}
      lines[node] = batch
      nodes[#nodes + 1] = node
    end
    batch[#batch + 1] = ARGV[i + 2]
  end
end
for _, node in ipairs(nodes) do redis.call('PUBLISH', CHANNEL .. node, table.concat(lines[node], '\n')) end
return #nodes
"""


class Listener(Protocol):
    """What the link tells the cluster hub (``_cluster.ClusterHub``)."""

    async def dispatch(self, event: dict[str, Any]) -> None:
        """A membership event from this node's channel, in the order Redis published it."""

    async def relay(self, room: str, sender_id: str, to: str, text: bytes) -> None:
        """A relay from a member on another node to ``to``, a member here."""

    async def resync(self, prune: bool) -> None:
        """Connected (again): every room should re-register its members."""

    async def lost(self) -> None:
        """The connection failed: whatever waits on Redis will not hear back."""


@attrs.define(eq=False)
class _Item:
    """One queued Redis command: a script call, a relay, a message to one node, or a barrier."""

    args: tuple[Any, ...]
    #: What it counts against ``cluster.send_queue_bytes``: the bytes it sends.
    size: int
    done: trio.Event | None = None
    result: Any = None
    on_fail: Callable[[], None] | None = None

    def fail(self) -> None:
        self.result = None
        if self.done is not None:
            self.done.set()
        if self.on_fail is not None:
            self.on_fail()


def _ms() -> int:
    return int(time.time() * 1000)


class RedisLink:
    """The node's connection to Redis, kept up by ``run``; see the module docstring."""

    def __init__(
        self, config: ClusterConfig, rooms: RoomsConfig, node: str, tls: ssl.SSLContext | None = None
    ) -> None:
        self.node = node
        self._url = config.redis_url
        #: For a rediss:// URL (``_startup.redis_tls_context``).
        self._tls = tls
        self._timeout = config.node_timeout
        self._rooms = rooms
        self._listener: Listener | None = None
        self._attached = trio.Event()
        self._client: coredis.Redis[str] | None = None
        self._sha = ""
        self._route_sha = ""
        # Unbounded in items, bounded in bytes by ``_enqueue``: see rule 6.
        self._send, self._receive = trio.open_memory_channel[_Item](math.inf)
        self._in_flight: list[_Item] = []
        self._queue_limit = config.send_queue_bytes
        #: Bytes of the items queued or in flight (sent, reply not yet read).
        self.queued_bytes = 0
        #: The queue refused an item: it refuses every item until Redis answers a batch.
        self._full = False
        #: Leaves that could not reach Redis (or found the queue full): sent when it is back (or has room).
        self._orphans: dict[tuple[str, str], str] = {}
        self.available = False
        #: Connected since the last loss: the listener must hear of the next one.
        self._up = False
        #: Set when the server stops: a connection torn down now is no news.
        self.closing = False
        #: Why the link is down, for /health and logs (None while connected).
        self.problem: str | None = "not connected to redis yet"

    def attach(self, listener: Listener) -> None:
        self._listener = listener
        self._attached.set()

    # -- what rooms and sessions call ------------------------------------------------

    def _keys(self, room: str, node: str) -> list[str]:
        return [*room_keys(room), ROOM_INDEX, USER_COUNT, *node_keys(node), NODES]

    def _script(self, operation: str, room: str, *args: Any, node: str | None = None) -> _Item:
        node = node or self.node
        keys, argv = self._keys(room, node), [operation, room, node, *map(str, args)]
        return _Item(("script", keys, argv), sum(map(len, keys)) + sum(map(len, argv)))

    def _enqueue(self, item: _Item) -> bool:
        """Queue ``item`` for the writer; False if Redis is away or the queue is full (rule 6)."""
        if not self.available:
            return False
        # A barrier (``flushed``, no bytes) costs no memory and is meant to wait behind the rest.
        if item.size and (self._full or (self.queued_bytes and self.queued_bytes + item.size > self._queue_limit)):
            self._full = True  # cleared when a batch is answered: there is one in flight
            return False
        self.queued_bytes += item.size
        self._send.send_nowait(item)
        return True

    async def call(self, operation: str, room: str, *args: Any) -> Any:
        """Run a script operation in this node's order; its reply, or None if Redis is unavailable."""
        item = self._script(operation, room, *args)
        item.done = trio.Event()
        if not self._enqueue(item):
            return None
        await item.done.wait()
        return item.result

    def submit(self, operation: str, room: str, *args: Any, on_fail: Callable[[], None] | None = None) -> bool:
        """Queue a script operation whose reply nobody waits for; False if Redis is unavailable."""
        item = self._script(operation, room, *args)
        item.on_fail = on_fail
        return self._enqueue(item)

    def relay(self, room: str, sender_id: str, to: str, text: bytes, on_fail: Callable[[], None]) -> bool:
        """Send a relay to the node that holds ``to`` (Redis knows which: rule 7), in this
        node's order; False now if Redis is away, ``on_fail`` if lost.

        On the wire a relay is one line, ``room TAB sender TAB to TAB frame``: ids never hold a
        tab and a frame (JSON, which escapes every control character) never holds a raw tab or
        newline, so the receiver splits it without parsing JSON; relays queued together for one
        node travel in one message.
        """
        line = b"\t".join((room.encode(), sender_id.encode(), to.encode(), text))
        return self._enqueue(_Item(("relay", room, to, line), len(line), on_fail=on_fail))

    def tell(self, node: str, event: dict[str, Any]) -> bool:
        """Publish ``event`` to ``node``'s channel, in this node's order (after every relay
        queued before it); False if Redis is unavailable (away, or the queue full: rule 6). Its
        listener gets it as it gets the script's."""
        text = json.dumps(event)
        return self._enqueue(_Item(("publish", channel(node), text), len(text)))

    async def flushed(self) -> None:
        """Wait until everything queued before has reached Redis (or failed to)."""
        done = trio.Event()
        if self._enqueue(_Item(("ping",), 0, done)):  # no bytes: a full queue takes it too
            await done.wait()

    async def leave(self, room: str, peer_id: str, why: str = "left") -> bool:
        """``peer_id`` leaves ``room`` in Redis (whose event removes it from the room task);
        ``why`` its session ended, for a late resume (the script's ``ended``)."""
        return await self.call("leave", room, peer_id, _ms(), self._idle_ms(), why) is not None

    def leave_soon(self, room: str, peer_id: str, why: str = "left") -> None:
        """Make sure ``peer_id`` leaves ``room`` in Redis, now or once Redis is back (or the queue has room)."""

        def orphan() -> None:
            self._orphans.setdefault((room, peer_id), why)

        if not self.submit("leave", room, peer_id, _ms(), self._idle_ms(), why, on_fail=orphan):
            orphan()

    def _send_orphans(self) -> None:
        orphans, self._orphans = sorted(self._orphans.items()), {}
        for (room, peer_id), why in orphans:
            self.leave_soon(room, peer_id, why)

    def _idle_ms(self) -> int:
        return int(self._rooms.idle_ttl * 1000)

    # -- what REST and /health read --------------------------------------------------

    def _reader(self) -> coredis.Redis[str]:
        if not self.available or self._client is None:
            raise ClusterUnavailable(f"the cluster is unavailable: {self.problem}")
        return self._client

    async def _read(self, what: Callable[[coredis.Redis[str]], Any]) -> Any:
        client = self._reader()
        try:
            with trio.fail_after(self._timeout / 3):
                return await what(client)
        except (*LINK_ERRORS, trio.TooSlowError, RuntimeError) as exc:  # RuntimeError: the pool just closed
            raise ClusterUnavailable(f"the cluster is unavailable: {exc or type(exc).__name__}") from None

    async def counts(self) -> tuple[int, int]:
        async def read(client: coredis.Redis[str]) -> tuple[int, int]:
            async with client.pipeline(transaction=False) as pipe:
                rooms, users = pipe.zcard(ROOM_INDEX), pipe.get(USER_COUNT)
            return int(await rooms), int(await users or 0)

        return await self._read(read)

    async def rooms(self) -> list[RoomInfo]:
        async def read(client: coredis.Redis[str]) -> list[RoomInfo]:
            ids = list(await client.zrange(ROOM_INDEX, 0, -1))
            async with client.pipeline(transaction=False) as pipe:
                replies = [(pipe.hgetall(room_keys(r)[0]), pipe.hlen(room_keys(r)[1])) for r in ids]
            found = []
            for room_id, (meta, count) in zip(ids, replies, strict=True):
                info = _room_info(room_id, await meta, int(await count))
                if info is not None:
                    found.append(info)
            return found

        return await self._read(read)

    async def room(self, room_id: str) -> RoomInfo | None:
        async def read(client: coredis.Redis[str]) -> RoomInfo | None:
            meta_key, members_key, _ = room_keys(room_id)
            async with client.pipeline(transaction=False) as pipe:
                meta, raw = pipe.hgetall(meta_key), pipe.hgetall(members_key)
            # Each value is [node, username, joined at, join order, token digest]; the key is the peer id.
            entries = sorted(
                ([*json.loads(value)[:4], peer] for peer, value in (await raw).items()), key=lambda e: e[3]
            )
            members = tuple(
                MemberInfo(peer, username, datetime.fromisoformat(at)) for _, username, at, _, peer in entries
            )
            info = _room_info(room_id, await meta, len(members))
            return attrs.evolve(info, members=members) if info is not None else None

        return await self._read(read)

    async def create(self, room_id: str, name: str, max_participants: int, created_at: str) -> str:
        """Script ``create``: "ok", "exists" or "too-many-rooms"."""
        expiry = _ms() + self._idle_ms()
        result = await self.call("create", room_id, name, max_participants, created_at, self._rooms.max_rooms, expiry)
        if result is None:
            raise ClusterUnavailable(f"the cluster is unavailable: {self.problem}")
        return str(result[0])

    # -- the connection's lifecycle --------------------------------------------------

    async def run(self) -> None:
        """Stay connected to Redis, reconnecting after any failure, until cancelled."""
        await self._attached.wait()
        try:
            while True:
                try:
                    await self._connected()
                except* LINK_ERRORS as group:
                    problem = f"redis unreachable: {_first_message(group)}"
                    if not self.closing and (self._up or self.problem != problem):
                        log.warning("cluster: %s; retrying every %g s", problem, RETRY)
                    self.problem = problem
                if self._lose():
                    assert self._listener is not None
                    await self._listener.lost()
                await trio.sleep(RETRY)
        finally:
            self._lose()  # cancelled (the server stops): nobody may wait for Redis forever

    def _lose(self) -> bool:
        """Fail whatever waits on Redis; whether the link had been up."""
        was_up, self._up, self.available, self._client = self._up, False, False, None
        for item in self._in_flight:
            item.fail()
        self._in_flight = []
        while True:
            try:
                self._receive.receive_nowait().fail()
            except trio.WouldBlock:
                break
        self.queued_bytes, self._full = 0, False
        return was_up

    def _connect(self) -> coredis.Redis[str]:
        timeout = self._timeout / 3
        tls: dict[str, Any] = {"ssl_context": self._tls} if self._tls is not None else {}
        return coredis.Redis.from_url(
            self._url,
            decode_responses=True,
            connect_timeout=timeout,
            stream_timeout=timeout,
            retry_policy=coredis.retry.NoRetryPolicy(),
            **tls,
        )

    async def _connected(self) -> None:
        assert self._listener is not None
        async with self._connect() as client:
            try:
                await self._serve_connection(client)
            finally:
                # Before the pool closes under a reader; the cause is filled in by ``run``.
                self._client, self.available = None, False
                self.problem = self.problem or "redis connection lost"

    async def _serve_connection(self, client: coredis.Redis[str]) -> None:
        assert self._listener is not None
        self._sha = await client.script_load(SCRIPT)
        self._route_sha = await client.script_load(ROUTE)
        # Subscribed before anything is registered, so nothing published to us is missed.
        async with client.pubsub(
            channels=[channel(self.node)],
            retry_policy=None,
            ignore_subscribe_messages=True,
            max_idle_seconds=self._timeout / 3,
        ) as subscription:
            await self._renew(client)
            self._client, self.available, self.problem, self._up = client, True, None, True
            log.info("cluster: node %s connected to redis", self.node)
            self._send_orphans()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, client)
                nursery.start_soon(self._keep_lease, client)
                nursery.start_soon(self._sweep, client)
                await self._listener.resync(prune=False)
                nursery.start_soon(self._prune_later)
                async for message in subscription:
                    if message["type"] == "message":
                        await self._receive_message(message["data"])
                raise RedisConnectionError("subscription ended")

    async def _receive_message(self, data: str) -> None:
        assert self._listener is not None
        if data.startswith("{"):  # from the script: a membership event or snapshot
            await self._listener.dispatch(json.loads(data))
            return
        for line in data.split("\n"):
            room, sender_id, to, text = line.split("\t", 3)
            await self._listener.relay(room, sender_id, to, text.encode())

    async def _write(self, client: coredis.Redis[str]) -> None:
        """The one writer: queued items, in order, a pipelined batch per round trip."""
        while True:
            batch = [await self._receive.receive()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._receive.receive_nowait())
                except trio.WouldBlock:
                    break
            self._in_flight = batch
            async with client.pipeline(transaction=False) as pipe:
                scripts = []
                # Relays between two other items go out in one ``ROUTE``, grouped by addressee
                # here and by node there, a message per node: the order that matters (a
                # sender's relays to one member, then its leave) is kept.
                relays: dict[tuple[str, str], list[bytes]] = {}
                for item in batch:
                    kind = item.args[0]
                    if kind == "relay":
                        _, room, to, line = item.args
                        lines = relays.get((room, to))
                        if lines is None:
                            relays[room, to] = [line]
                        else:
                            lines.append(line)
                        continue
                    self._flush(pipe, relays)
                    if kind == "script":
                        scripts.append((item, pipe.evalsha(self._sha, keys=item.args[1], args=item.args[2])))
                    elif kind == "publish":
                        pipe.publish(item.args[1], item.args[2])
                    else:
                        scripts.append((item, pipe.ping()))  # a barrier: ``flushed``
                self._flush(pipe, relays)
            for item, reply in scripts:
                item.result = await reply
                if item.done is not None:
                    item.done.set()
            self._in_flight = []
            self.queued_bytes -= sum(item.size for item in batch)
            self._full = False
            if self._orphans:  # leaves the full queue refused: there is room for them now
                self._send_orphans()

    def _flush(self, pipe: Any, relays: dict[tuple[str, str], list[bytes]]) -> None:
        if relays:
            args: list[str | bytes] = []
            for (room, to), lines in relays.items():
                args += (room, to, lines[0] if len(lines) == 1 else b"\n".join(lines))
            pipe.evalsha(self._route_sha, keys=[], args=args)
            relays.clear()

    async def _renew(self, client: coredis.Redis[str]) -> bool:
        """Renew the lease; False if it had lapsed (Redis restarted, or we were swept)."""
        _, lease = node_keys(self.node)
        async with client.pipeline(transaction=False) as pipe:
            previous = pipe.set(lease, "1", px=int(self._timeout * 1000), get=True)
            pipe.sadd(NODES, [self.node])
        return await previous is not None

    async def _keep_lease(self, client: coredis.Redis[str]) -> None:
        assert self._listener is not None
        while True:
            await trio.sleep(self._timeout / 3)
            if not await self._renew(client):
                log.warning("cluster: node %s's lease had lapsed; registering its members again", self.node)
                await self._listener.resync(prune=False)

    async def _prune_later(self) -> None:
        """After ``node_timeout``, every live node has re-registered: what is missing is gone."""
        assert self._listener is not None
        await trio.sleep(self._timeout)
        await self._listener.resync(prune=True)

    async def _sweep(self, client: coredis.Redis[str]) -> None:
        """Remove the members of dead nodes, and posted rooms idle past ``rooms.idle_ttl``.

        The first sweep waits ``node_timeout``: nodes reconnecting along with this one get
        to renew their leases before anyone judges them.
        """
        await trio.sleep(self._timeout)
        while True:
            for node in sorted(set(await client.smembers(NODES)) - {self.node}):
                rooms_key, lease = node_keys(node)
                if await client.exists([lease]):
                    continue
                for room in sorted(await client.smembers(rooms_key)):
                    evicted = await client.evalsha(
                        self._sha, keys=self._keys(room, node), args=["evict", room, node, _ms(), self._idle_ms()]
                    )
                    if evicted:
                        log.warning("cluster: node %s is gone; %s of its members left room %s", node, evicted, room)
                await client.evalsha(self._sha, keys=self._keys("", node), args=["forget", "", node])
            expired = await client.zrange(
                ROOM_INDEX, "-inf", _ms(), sortby=PureToken.BYSCORE, offset=0, count=EXPIRE_BATCH
            )
            for room in expired:
                if await client.evalsha(self._sha, keys=self._keys(room, self.node), args=["expire", room, "", _ms()]):
                    log.info("room %s: removed (idle)", room)
            await trio.sleep(self._timeout / 3)


def _room_info(room_id: str, meta: dict[str, str], count: int) -> RoomInfo | None:
    if "max" not in meta:
        return None  # removed between the index and the read
    return RoomInfo(room_id, meta["name"], int(meta["max"]), datetime.fromisoformat(meta["created"]), count)


def _first_message(group: BaseExceptionGroup[Any]) -> str:
    leaves: Sequence[BaseException] = group.exceptions
    while leaves and isinstance(leaves[0], BaseExceptionGroup):
        leaves = leaves[0].exceptions
    first = leaves[0] if leaves else group
    text = str(first) or type(first).__name__
    cause = first.__cause__  # coredis wraps why it could not connect (a refused certificate, say)
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return text
