"""nginx and Caddy on 127.0.0.1, configured from the README's own snippets; run by test_proxies.py.

Each snippet is taken from README.md's ``nginx`` or ``caddyfile`` code block, as an operator would
copy it, and changed only where a test must: its public address and port become 127.0.0.1 and a
free port, signald's port 3000 becomes the test server's, and (nginx) the certificate paths point
at a test certificate. Every replaced string must occur exactly once, so a snippet edited out of
shape fails here instead of being silently tested in another form. Around each snippet, the test
supplies only what a distribution's main configuration would (nginx's ``http {}`` and paths,
Caddy's global options with the admin API off), and the server runs in the foreground, with its
logs on stderr, until the test ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ._clients import TIMEOUT

README = Path(__file__).parent.parent / "README.md"
NGINX = "/usr/sbin/nginx"
CADDY = "/usr/bin/caddy"


def readme_snippet(language: str) -> str:
    """The one code block of ``language`` in README.md."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"README.md should have exactly one {language} block, has {len(blocks)}"
    return blocks[0]


def adapt(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert text.count(old) == 1, f"{old!r} should occur once in the snippet:\n{text}"
        text = text.replace(old, new)
    return text


def nginx_config(directory: Path, port: int, upstream: int, cert: Path, key: Path) -> Path:
    site = adapt(
        readme_snippet("nginx"),
        {
            "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
            "127.0.0.1:3000;": f"127.0.0.1:{upstream};",
            "/etc/letsencrypt/live/meet.example.com/fullchain.pem": str(cert),
            "/etc/letsencrypt/live/meet.example.com/privkey.pem": str(key),
        },
    )
    (directory / "signald.conf").write_text(site)
    temp = "\n".join(
        f"    {kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = directory / "nginx.conf"
    main.write_text(
        f"""{"user root;" if os.geteuid() == 0 else ""}
daemon off;
worker_processes 1;
pid {directory / "nginx.pid"};
error_log stderr notice;
events {{ worker_connections 512; }}
http {{
    access_log off;
{temp}
    include {directory / "signald.conf"};
}}
"""
    )
    return main


def caddy_config(directory: Path, port: int, upstream: int) -> Path:
    site = adapt(
        readme_snippet("caddyfile"),
        {"meet.example.com {": f"http://127.0.0.1:{port} {{", "127.0.0.1:3000 {": f"127.0.0.1:{upstream} {{"},
    )
    path = directory / "Caddyfile"
    path.write_text("{\n    admin off\n}\n\n" + site)
    return path


class Proxy:
    def __init__(self, process: trio.Process) -> None:
        assert process.stderr is not None
        self.process = process
        self._stderr = process.stderr
        self.log = b""

    async def wait_for_log(self, text: bytes) -> None:
        with trio.fail_after(TIMEOUT):
            while text not in self.log:
                chunk = await self._stderr.receive_some(65536)
                assert chunk, f"exited before logging {text!r}: {self.log.decode(errors='replace')}"
                self.log += chunk


@asynccontextmanager
async def run_proxy(command: list[str], ready: bytes, env: dict[str, str] | None = None) -> AsyncIterator[Proxy]:
    """``command`` in the foreground until the test ends; ready once it logs ``ready``."""
    assert await trio.Path(command[0]).is_file(), (
        f"{command[0]} is missing: scripts/test installs it (apt-get, as root)"
    )
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    proxy = Proxy(process)
    try:
        await proxy.wait_for_log(ready)
        yield proxy
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)  # nginx: fast shutdown; Caddy: graceful stop
            with trio.move_on_after(TIMEOUT):
                await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


@asynccontextmanager
async def nginx(directory: Path, port: int, upstream: int, cert: Path, key: Path) -> AsyncIterator[Proxy]:
    config = nginx_config(directory, port, upstream, cert, key)
    command = [NGINX, "-e", "stderr", "-p", str(directory), "-c", str(config)]
    async with run_proxy(command, b"start worker process") as proxy:
        yield proxy


@asynccontextmanager
async def caddy(directory: Path, port: int, upstream: int) -> AsyncIterator[Proxy]:
    config = caddy_config(directory, port, upstream)
    # Caddy keeps state under $HOME / $XDG_*: a directory of the test's, not the machine's.
    home = {"HOME": str(directory), "XDG_DATA_HOME": str(directory / "data"), "XDG_CONFIG_HOME": str(directory)}
    command = [CADDY, "run", "--adapter", "caddyfile", "--config", str(config)]
    async with run_proxy(command, b"serving initial configuration", {**os.environ, **home}) as proxy:
        yield proxy
