"""A WebSocket member in a process of its own, for tests where the reader must not share the
server's scheduler (a reader in the same trio run could only read when the server lets it).

    python -m tests._reader_process PORT ROOM read COUNT   read COUNT offers as fast as it can
    python -m tests._reader_process PORT ROOM stall        read nothing until a line on stdin

It prints ``joined PEER_ID`` once in the room. ``read`` then prints ``ok COUNT`` if the offers
arrived complete and in order (their ``sdp`` starts with the sequence number), or ``bad ...``.
``stall`` (with a 4 KiB receive buffer) reads nothing until told, then reads to the close frame
and prints ``closed CODE``. Plain blocking sockets, and every wait bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import json
import socket
import sys

from tests._clients import TIMEOUT, UPGRADE_REQUEST, text_frame


class Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self, size: int) -> None:
        while len(self.buffer) < size:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buffer += chunk

    def _take(self, size: int) -> bytes:
        self._fill(size)
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            self._fill(len(self.buffer) + 1)
        end = self.buffer.index(b"\r\n\r\n") + 4
        return self._take(end)

    def frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame (server frames are never masked)."""
        first, second = self._take(2)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(self._take(2), "big")
        elif size == 127:
            size = int.from_bytes(self._take(8), "big")
        return first & 0x0F, self._take(size)

    def message(self) -> dict:
        opcode, payload = self.frame()
        while opcode != 0x1:
            if opcode == 0x8:
                raise ConnectionError(int.from_bytes(payload[:2], "big"))
            opcode, payload = self.frame()  # pings: the server does not need our pongs here
        return json.loads(payload)


def main(port: int, room: str, mode: str, count: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if mode == "stall":  # before connecting, so the window the server sees is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    reader = Reader(sock)
    sock.sendall(UPGRADE_REQUEST + text_frame({"type": "join-room", "roomId": room, "username": mode}))
    assert reader.head().startswith(b"HTTP/1.1 101 ")
    joined = reader.message()
    print("joined", joined["peerId"], flush=True)
    if mode == "read":
        for expected in range(count):
            while (message := reader.message()).get("type") == "user-joined":
                pass
            if message.get("type") != "webrtc-offer" or not message["sdp"].startswith(f"{expected:06d}"):
                print("bad", expected, str(message)[:100], flush=True)
                return
        print("ok", count, flush=True)
    else:
        sys.stdin.readline()
        try:
            while True:
                reader.message()
        except ConnectionError as closed:
            print("closed", closed.args[0], flush=True)
        except EOFError:
            print("closed without a close frame", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 0)
