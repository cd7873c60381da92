"""A real coturn on 127.0.0.1, in the use-auth-secret mode signald mints credentials for.

Debian's ``coturn`` package (``scripts/install-test-packages``, run by ``scripts/test``) provides
``turnserver``. It runs with ``-n`` (no configuration file, so nothing in /etc matters), on a
free port, relaying only on loopback, and is stopped when the test ends. It is ready once it
answers a STUN binding request.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

from ._clients import TIMEOUT, free_port

TURNSERVER = "/usr/bin/turnserver"
#: STUN binding requests sent while waiting for coturn to listen; each waits this long for an answer.
PROBES = 50
PROBE_SECONDS = 0.2


@attrs.frozen
class Coturn:
    port: int
    #: Its log, with every allocation and refusal (``-v``); complete once coturn has stopped.
    log: Path

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"


def stun_answers(port: int) -> bool:
    """Whether a STUN server answers a binding request on 127.0.0.1:``port`` (RFC 8489)."""
    transaction = os.urandom(12)
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + transaction
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(PROBE_SECONDS)
        sock.sendto(request, ("127.0.0.1", port))
        try:
            answer = sock.recv(2048)
        except (TimeoutError, ConnectionRefusedError):
            return False
    return answer[:2] == b"\x01\x01" and answer[8:20] == transaction


@contextmanager
def run_coturn(secret: str, log_dir: Path) -> Iterator[Coturn]:
    assert shutil.which(TURNSERVER), f"{TURNSERVER} is missing: scripts/test installs Debian's coturn (as root)"
    port = free_port()
    log_file = log_dir / "turnserver.log"
    args = [
        TURNSERVER,
        "-n",  # no configuration file: only these flags
        "--listening-ip=127.0.0.1",
        f"--listening-port={port}",
        "--relay-ip=127.0.0.1",
        "--allow-loopback-peers",  # both relays, and so both "peers", are on 127.0.0.1
        "--use-auth-secret",
        f"--static-auth-secret={secret}",
        "--realm=signald.test",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "-v",  # log each session's allocation or refusal, with its username
        "--no-stdout-log",
        "--simple-log",
        f"--log-file={log_file}",
        f"--pidfile={log_dir / 'turnserver.pid'}",
        "--db",
        str(log_dir / "turndb"),
    ]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(PROBES):
            if stun_answers(port):
                break
            assert process.poll() is None, f"turnserver exited: {process.stderr.read().decode(errors='replace')}"
        else:
            raise AssertionError(f"turnserver did not answer STUN on port {port} within {PROBES * PROBE_SECONDS} s")
        yield Coturn(port, log_file)
    finally:
        process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()
