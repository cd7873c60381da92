"""The load generator: many lean WebSocket clients in one asyncio (uvloop) process.

It has to stay far cheaper per message than the server it measures, so it skips every
library: the upgrade request and each client frame are built by hand (masked with a zero key,
as RFC 6455 allows), frames from the server are split by a tiny parser, and a relayed
candidate is recognised by its prefix without decoding its JSON. It speaks signald's
messages, or with ``--protocol peerjs`` PeerJS's. Each scenario prints one JSON object as the
last line on stdout: its figures, plus the generator's and the server's CPU over the measured
window (and in A and B the generator's longest stall), so a reader can see which of the two
was the bottleneck.

Only 127.0.0.1 is ever contacted; every phase is bounded in count and in time.

Run: ``python bench/loadgen.py SCENARIO --port P --server-pid PID [options]`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HOST = "127.0.0.1"


def join_timeout(clients: int) -> float:
    """How long ``clients`` joins may take before the phase is declared failed (bounds every wait).

    30 s plus 30 ms a join: a server starved by other tenants of a shared machine has been
    seen to join fewer than 100 clients a second.
    """
    return 30.0 + 0.03 * clients


CLK_TCK = os.sysconf("SC_CLK_TCK")

UPGRADE = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
#: The line scenario A prints on stdout once warmed up, before its window.
WARM = "warm"
#: How each protocol's relayed candidate starts, as its server sends it.
RELAY_PREFIX = {"signald": b'{"type":"ice-candidate"', "peerjs": b'{"type":"CANDIDATE"'}
#: Where the send timestamp sits in a candidate: ``ts`` and 20 digits of perf_counter_ns.
TS_MARK = b" ts"
TS_DIGITS = 20


def client_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One client frame: FIN, ``opcode``, masked with the all-zero key (payload unchanged)."""
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    elif size < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


def split_frames(buf: bytearray) -> list[tuple[int, bytes]]:
    """Remove every complete server frame from ``buf``: [(opcode, payload)], unmasked, unfragmented."""
    frames = []
    pos, end = 0, len(buf)
    while end - pos >= 2:
        size = buf[pos + 1] & 0x7F
        start = pos + 2
        if size == 126:
            if end - pos < 4:
                break
            size = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            start = pos + 4
        elif size == 127:
            if end - pos < 10:
                break
            size = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            start = pos + 10
        if end - start < size:
            break
        frames.append((buf[pos] & 0x0F, bytes(buf[start : start + size])))
        pos = start + size
    del buf[:pos]
    return frames


def candidate_message(to: str, timestamp: int = 0, protocol: str = "signald") -> bytes:
    """An ICE candidate of about 250 bytes, like a browser's srflx candidate.

    signald's is an ``ice-candidate`` addressed ``to`` a member; PeerJS's is what its client
    library sends: a ``CANDIDATE`` addressed by ``dst``, with the candidate in ``payload``.
    """
    candidate = (
        "candidate:842163049 1 udp 1677729535 198.51.100.23 54321 typ srflx "
        f"generation 0 ufrag Xy12{TS_MARK.decode()}{timestamp:0{TS_DIGITS}d}"
    )
    ice = {"candidate": candidate, "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "Xy12"}
    if protocol == "peerjs":
        message: dict[str, Any] = {
            "type": "CANDIDATE",
            "payload": {"candidate": ice, "type": "media", "connectionId": "mc_x7k2p9q4w1"},
            "dst": to,
        }
    else:
        message = {"type": "ice-candidate", "to": to, "candidate": ice}
    return json.dumps(message, separators=(",", ":")).encode()


def timestamp_of(payload: bytes) -> int:
    at = payload.rindex(TS_MARK) + len(TS_MARK)
    return int(payload[at : at + TS_DIGITS])


class Client(asyncio.Protocol):
    """One WebSocket client; ``on_relay`` sees the relayed candidates of each read, together.

    With ``--protocol peerjs`` it is a PeerJS client instead: it connects with its own id
    (PeerJS has no rooms: two ids are a pair), and the server's ``OPEN`` stands for
    ``joined-room``.
    """

    ids = 0  # PeerJS ids handed out so far in this process

    def __init__(self, on_relay: Callable[[Client, list[bytes]], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.peer_id = ""
        self.relay_prefix = RELAY_PREFIX[ARGS.protocol]
        if ARGS.protocol == "peerjs":
            Client.ids += 1
            self.peer_id = f"bench{Client.ids}"
            self.path = f"/peerjs?key=peerjs&id={self.peer_id}&token=t{Client.ids}"
        else:
            self.path = "/ws"
        self.joined: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_relay = on_relay
        self.partner: Client | None = None
        self.frame = b""
        #: Sent once the upgrade is answered, as a browser would (trio-websocket's own server
        #: leaves bytes that arrive with the handshake unread until more come).
        self.first = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(UPGRADE.format(path=self.path).encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if not self.joined.done():
            self.joined.set_exception(ConnectionError("connection lost before joined-room"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.buf.startswith(b"HTTP/1.1 101"):
                self.joined.set_exception(ConnectionError(bytes(self.buf[:200]).decode("latin-1")))
                self.close()
                return
            self.upgraded = True
            del self.buf[: end + 4]
            self.send(self.first)
        relays = []
        for opcode, payload in split_frames(self.buf):
            if opcode == 0x1:
                if payload.startswith(self.relay_prefix) and self.on_relay is not None:
                    relays.append(payload)
                else:
                    self.on_control(json.loads(payload))
            elif opcode == 0x9:  # ping: answer, or signald's keep-alive drops idle clients
                self.send(client_frame(payload, 0xA))
            elif opcode == 0x8:
                self.close()
        if relays and self.on_relay is not None:
            self.on_relay(self, relays)

    def on_control(self, message: dict[str, Any]) -> None:
        if message.get("type") == "joined-room" and not self.joined.done():
            self.peer_id = message["peerId"]
            self.joined.set_result(message)
        elif message.get("type") == "OPEN" and not self.joined.done():
            self.joined.set_result(message)
        elif message.get("type") in ("error", "ERROR", "ID-TAKEN"):
            print(f"loadgen: server error {message}", file=sys.stderr)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def join_on_upgrade(self, room_id: str, username: str) -> None:
        if ARGS.protocol == "peerjs":
            return  # connecting is joining: the server answers with OPEN
        message = {"type": "join-room", "roomId": room_id, "username": username}
        self.first = client_frame(json.dumps(message).encode())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def connect_and_join(
    room_id: str, on_relay: Callable[[Client, list[bytes]], None] | None = None
) -> tuple[Client, float]:
    """Connect, upgrade, join ``room_id``; the client and its connect-to-joined time."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    client = Client(on_relay)
    client.join_on_upgrade(room_id, "bench")
    await loop.create_connection(lambda: client, HOST, ARGS.port)
    await client.joined
    return client, time.perf_counter() - started


async def join_all(rooms: list[str], concurrency: int, on_relay: Any = None) -> tuple[list[Client], list[float]]:
    """One client per entry of ``rooms``, joined in order, at most ``concurrency`` connecting at once."""
    gate = asyncio.Semaphore(concurrency)

    async def one(room_id: str) -> tuple[Client, float]:
        async with gate:
            return await connect_and_join(room_id, on_relay)

    async def in_order() -> list[tuple[Client, float]]:
        # Seat by position: every room's first member, then every second one, and so on, so
        # in a pair the first member is seated before its partner arrives.
        position: dict[str, int] = {}
        waves: dict[int, list[int]] = {}
        for index, room_id in enumerate(rooms):
            position[room_id] = position.get(room_id, -1) + 1
            waves.setdefault(position[room_id], []).append(index)
        results: list[tuple[Client, float] | None] = [None] * len(rooms)
        for indices in waves.values():
            for index, result in zip(indices, await asyncio.gather(*(one(rooms[i]) for i in indices)), strict=True):
                results[index] = result
        return [r for r in results if r is not None]

    pairs = await asyncio.wait_for(in_order(), join_timeout(len(rooms)))
    return [c for c, _ in pairs], [t for _, t in pairs]


async def longest_stall(seconds: float, tick: float = 0.01) -> float:
    """Sleep ``seconds`` in ``tick`` steps; the longest any step overran, in ms.

    A long stall means this process got no CPU (other tenants of a shared machine): frames
    stayed unread, so the window's figures undercount what the server did.
    """
    loop = asyncio.get_running_loop()
    worst, end = 0.0, loop.time() + seconds
    while (now := loop.time()) < end:
        await asyncio.sleep(tick)
        worst = max(worst, loop.time() - now - tick)
    return 1000 * worst


class CpuMeter:
    """CPU seconds of the server process (from /proc) and of this process, over a window."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.start = self._read()

    def _read(self) -> tuple[float, float, float]:
        with open(f"/proc/{self.server_pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        server = (int(fields[11]) + int(fields[12])) / CLK_TCK
        own = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), server, own.ru_utime + own.ru_stime

    def stop(self) -> dict[str, float]:
        wall0, server0, own0 = self.start
        wall1, server1, own1 = self._read()
        wall = wall1 - wall0
        return {
            "wall_s": wall,
            "server_cpu_s": server1 - server0,
            "server_cpu_pct": 100 * (server1 - server0) / wall,
            "gen_cpu_pct": 100 * (own1 - own0) / wall,
        }


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def close_all(clients: list[Client]) -> None:
    for client in clients:
        client.close()


async def join_pairs(pairs: int, on_relay: Callable[[Client, list[bytes]], None]) -> list[Client]:
    rooms = [f"p{i}" for i in range(pairs) for _ in range(2)]
    clients, _ = await join_all(rooms, ARGS.concurrency, on_relay)
    for first, second in zip(clients[::2], clients[1::2], strict=True):
        first.partner, second.partner = second, first
    for client in clients:
        assert client.partner is not None
        client.frame = client_frame(candidate_message(client.partner.peer_id, 0, ARGS.protocol))
    return clients


async def throughput() -> dict[str, Any]:
    """A: every client keeps ``window`` candidates in flight to its partner."""
    received = 0
    running = True

    def on_relay(client: Client, payloads: list[bytes]) -> None:
        nonlocal received
        received += len(payloads)
        sender = client.partner
        if running and sender is not None:
            # As many delivered, so many more its sender may put in flight: in one write.
            sender.send(sender.frame * len(payloads))

    clients = await join_pairs(ARGS.pairs, on_relay)
    for client in clients:
        client.send(client.frame * ARGS.window)
    await asyncio.sleep(ARGS.warmup)
    print(WARM, flush=True)  # bench.py's profiler starts sampling here, whatever the joins took
    before, meter = received, CpuMeter(ARGS.server_pid)
    stall = await longest_stall(ARGS.duration)
    count, cpu = received - before, meter.stop()
    running = False
    close_all(clients)
    return {
        "msgs_per_s": count / cpu["wall_s"],
        "msgs_per_cpu_s": count / cpu["server_cpu_s"] if cpu["server_cpu_s"] else 0.0,
        "gen_stall_ms": stall,
        **cpu,
    }


async def latency() -> dict[str, Any]:
    """B: ``rate`` candidates a second in total, spread round-robin over the clients."""
    samples: list[int] = []
    recording = False

    def on_relay(client: Client, payloads: list[bytes]) -> None:
        if recording:
            now = time.perf_counter_ns()
            samples.extend(now - timestamp_of(payload) for payload in payloads)

    clients = await join_pairs(ARGS.pairs, on_relay)
    templates = [c.partner.peer_id if c.partner else "" for c in clients]
    loop = asyncio.get_running_loop()
    sent = 0
    started = time.perf_counter()
    meter: CpuMeter | None = None
    finished = loop.create_future()
    end = started + ARGS.warmup + ARGS.duration

    def tick() -> None:
        nonlocal sent, recording, meter
        now = time.perf_counter()
        if meter is None and now >= started + ARGS.warmup:
            recording, meter = True, CpuMeter(ARGS.server_pid)
        if now >= end:
            finished.set_result(meter.stop() if meter else {})
            return
        due = int((now - started) * ARGS.rate)
        while sent < due:
            i = sent % len(clients)
            clients[i].send(client_frame(candidate_message(templates[i], time.perf_counter_ns(), ARGS.protocol)))
            sent += 1
        loop.call_later(0.001, tick)

    tick()
    stall = asyncio.ensure_future(longest_stall(ARGS.warmup + ARGS.duration))
    cpu = await asyncio.wait_for(finished, ARGS.warmup + ARGS.duration + 10)
    recording = False
    await asyncio.sleep(0.2)  # let the last frames in flight arrive (they are not counted)
    close_all(clients)
    samples.sort()
    if not samples:
        raise RuntimeError("no relays arrived")

    def pct(p: float) -> float:
        return samples[min(len(samples) - 1, int(p / 100 * len(samples)))] / 1e6

    return {
        "samples": len(samples),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "p999_ms": pct(99.9),
        "achieved_msgs_per_s": len(samples) / cpu["wall_s"],
        "gen_stall_ms": await stall,
        **cpu,
    }


async def memory() -> dict[str, Any]:
    """C: ``clients`` idle clients joined in rooms of ``room_size``; server RSS per connection."""
    await asyncio.sleep(0.5)
    before = rss_kib(ARGS.server_pid)
    rooms = [f"m{i // ARGS.room_size}" for i in range(ARGS.clients)]
    clients, _ = await join_all(rooms, ARGS.concurrency)
    await asyncio.sleep(ARGS.settle)
    after = rss_kib(ARGS.server_pid)
    close_all(clients)
    return {"kib_per_conn": (after - before) / len(clients), "rss_before_kib": before, "rss_after_kib": after}


async def join_storm() -> dict[str, Any]:
    """D: ``clients`` clients connect and join rooms of ``room_size``, ``concurrency`` at a time."""
    rooms = [f"s{i // ARGS.room_size}" for i in range(ARGS.clients)]
    gate = asyncio.Semaphore(ARGS.concurrency)

    async def one(room_id: str) -> tuple[Client, float]:
        async with gate:
            return await connect_and_join(room_id)

    meter = CpuMeter(ARGS.server_pid)
    results = await asyncio.wait_for(asyncio.gather(*(one(r) for r in rooms)), join_timeout(len(rooms)))
    cpu = meter.stop()
    close_all([c for c, _ in results])
    times = sorted(t for _, t in results)
    return {
        "joins_per_s": len(times) / cpu["wall_s"],
        "joins_per_cpu_s": len(times) / cpu["server_cpu_s"] if cpu["server_cpu_s"] else 0.0,
        "p50_join_ms": 1000 * statistics.median(times),
        "p99_join_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))],
        **cpu,
    }


SCENARIOS = {"throughput": throughput, "latency": latency, "memory": memory, "join-storm": join_storm}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="signald load generator (127.0.0.1 only)")
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument(
        "--protocol", choices=sorted(RELAY_PREFIX), default="signald", help="signald's messages, or PeerJS's"
    )
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--window", type=int, default=8, help="candidates each client keeps in flight")
    parser.add_argument("--rate", type=float, default=2000.0, help="latency: messages per second in total")
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--room-size", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=200, help="clients connecting at once")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=1.0, help="memory: seconds before reading RSS")
    return parser.parse_args(argv)


def main() -> None:
    global ARGS
    ARGS = parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, just with less headroom
        run = asyncio.run
    else:
        run = uvloop.run
    result = run(SCENARIOS[ARGS.scenario]())
    print(json.dumps(result))


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
