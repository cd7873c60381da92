"""Clients for scripts/check-systemd-boot, run inside the booted machine (standard library only).

    traffic PORT STOP OUT   back-to-back requests, one connection each, until the file STOP
                            exists; then a JSON summary to OUT (ok, refused, failed, ...).
                            OUT.started appears once the first request has succeeded. They
                            alternate GET /api/rooms and GET /health; each must be 200
    mute PORT STOP OUT      keeps a WebSocket open that never answers the close handshake (it
                            reads and discards); when the server cuts it, opens the next one
    member PORT STOP        joins room "standup" as "ada" (STOP.joined appears once the server
                            has said so) and stays until STOP exists

Every wait is bounded: a request gets REQUEST_TIMEOUT seconds, which covers a restart's drain
plus the next process's start-up while the connection waits in the socket's backlog.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys
import time

REQUEST_TIMEOUT = 30.0
#: Bound on the loops, far above what a run needs.
MAX_REQUESTS = 1_000_000
MAX_SECONDS = 900.0
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def text_frame(message: dict[str, str]) -> bytes:
    """A masked client text frame (payload under 126 bytes)."""
    payload = json.dumps(message).encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one Content-Length response; raises if it is cut short."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} bytes of the head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {len(body)} of {length} body bytes")
        body += chunk
    return status, body


def traffic(port: int, stop: str, out: str) -> None:
    summary = {"ok": 0, "refused": 0, "failed": 0, "errors": [], "slowest": 0.0}
    deadline = time.monotonic() + MAX_SECONDS
    for n in range(MAX_REQUESTS):
        if os.path.exists(stop) or time.monotonic() > deadline:
            break
        target = "/health" if n % 2 else "/api/rooms"
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as sock:
                sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                status, body = read_response(sock)
            if status != 200 or ("rooms" if target == "/api/rooms" else "status") not in json.loads(body):
                raise ValueError(f"{target}: status {status}: {body[:200]!r}")
            summary["ok"] += 1
            if summary["ok"] == 1:
                open(f"{out}.started", "w").close()
        except ConnectionRefusedError:
            summary["refused"] += 1
        except (OSError, ValueError) as exc:
            summary["failed"] += 1
            summary["errors"].append(f"{type(exc).__name__}: {exc}")
        summary["slowest"] = max(summary["slowest"], time.monotonic() - started)
    with open(out, "w") as file:
        json.dump(summary, file)


def websocket(port: int, frames: bytes) -> socket.socket:
    """An open WebSocket (101 read), having sent ``frames`` right after the handshake."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT)
    sock.sendall(UPGRADE + frames)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: what follows the head is WebSocket frames
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.decode("latin-1").splitlines()[0])
    return sock


def mute(port: int, stop: str, out: str) -> None:
    """Never sends a close frame back; each server it meets has to cut the connection itself."""
    opened = cut = 0
    deadline = time.monotonic() + MAX_SECONDS
    join = text_frame({"type": "join-room", "roomId": "mute", "username": "mute"})
    while not os.path.exists(stop) and time.monotonic() < deadline:
        try:
            sock = websocket(port, join)
        except OSError:
            time.sleep(0.1)  # the next process is starting: try again (bounded by the deadline)
            continue
        opened += 1
        sock.settimeout(0.5)
        with sock:
            while not os.path.exists(stop) and time.monotonic() < deadline:
                try:
                    if not sock.recv(65536):
                        cut += 1
                        break
                except TimeoutError:
                    continue
                except OSError:
                    cut += 1
                    break
    with open(out, "w") as file:
        json.dump({"opened": opened, "cut": cut}, file)


def member(port: int, stop: str) -> None:
    sock = websocket(port, text_frame({"type": "join-room", "roomId": "standup", "username": "ada"}))
    deadline = time.monotonic() + MAX_SECONDS
    with sock:
        received = b""
        while b"joined-room" not in received:  # the reply is one small unmasked frame
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before joined-room")
            received += chunk
        open(f"{stop}.joined", "w").close()
        while not os.path.exists(stop) and time.monotonic() < deadline:
            time.sleep(0.1)


if __name__ == "__main__":
    mode, port, *files = sys.argv[1:]
    {"traffic": traffic, "mute": mute, "member": member}[mode](int(port), *files)
