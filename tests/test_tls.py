"""TLS on the one port: an HTTPS handshake and request, a WSS join and relay, certificates from trustme."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
import trustme

from signald import Server
from signald._config import ConfigError, structure

from ._clients import TIMEOUT, connect, read_response
from ._process import ROOT
from .conftest import make_config


@attrs.frozen
class Pki:
    ca: Path
    cert: Path
    key: Path
    client: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    directory = tmp_path_factory.mktemp("pki")
    ca_file, cert, key = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    for blob in issued.cert_chain_pems:
        with open(cert, "ab") as f:
            f.write(blob.bytes())
    issued.private_key_pem.write_to_path(str(key))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Pki(ca_file, cert, key, client)


async def start_tls_server(server_factory: Callable[..., Any], pki: Pki) -> Any:
    return await server_factory(server={"tls_cert": str(pki.cert), "tls_key": str(pki.key)})


async def test_https_handshake_and_request(server_factory: Callable[..., Any], pki: Pki) -> None:
    server = await start_tls_server(server_factory, pki)
    browser_like = ssl.create_default_context(cafile=str(pki.ca))
    browser_like.set_alpn_protocols(["h2", "http/1.1"])  # signald must pick the one it speaks
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", server.port, ssl_context=browser_like)
        async with stream:
            await stream.do_handshake()
            assert stream.selected_alpn_protocol() == "http/1.1"
            assert stream.version() in ("TLSv1.2", "TLSv1.3")
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method="GET", target="/health", headers=[("Host", "127.0.0.1")])
            await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
            status, _, body = await read_response(conn, stream)
    assert status == 200 and body["status"] == "healthy"


async def test_wss_join_and_relay(server_factory: Callable[..., Any], pki: Pki) -> None:
    server = await start_tls_server(server_factory, pki)
    async with connect(server.port, ssl_context=pki.client) as a, connect(server.port, ssl_context=pki.client) as b:
        await a.join("secure", "ada")
        await b.join("secure", "bob")
        await a.expect("user-joined", peerId=b.peer_id)
        await a.send(type="webrtc-offer", to=b.peer_id, sdp="v=0")
        await b.expect("webrtc-offer", sdp="v=0", **{"from": a.peer_id})


async def test_plain_http_on_the_tls_port_is_dropped_and_harms_nothing(
    server_factory: Callable[..., Any], pki: Pki
) -> None:
    server = await start_tls_server(server_factory, pki)
    with trio.fail_after(TIMEOUT):
        plain = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with plain:
            await plain.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            while await plain.receive_some(4096):  # no HTTP answer: the handshake failed, the server hangs up
                pass
    async with connect(server.port, ssl_context=pki.client) as client:
        await client.roundtrip_ping()


def test_cert_and_key_come_together() -> None:
    with pytest.raises(ConfigError, match=r"^server\.tls_key: required when server\.tls_cert is set$"):
        structure({"server": {"tls_cert": "/etc/signald/cert.pem"}})
    with pytest.raises(ConfigError, match=r"^server\.tls_cert: required when server\.tls_key is set$"):
        structure({"server": {"tls_key": "/etc/signald/key.pem"}})


@pytest.mark.parametrize("case", ["missing", "not-pem", "wrong-key"])
def test_unusable_certificates_refuse_to_start(tmp_path: Path, pki: Pki, case: str) -> None:
    cert, key = str(pki.cert), str(pki.key)
    if case == "missing":
        key = str(tmp_path / "nope.pem")
    elif case == "not-pem":
        (tmp_path / "junk.pem").write_text("hello")
        cert = str(tmp_path / "junk.pem")
    else:
        other = tmp_path / "other.pem"
        trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other))
        key = str(other)
    config = tmp_path / "signald.toml"
    config.write_text(f'[server]\nport = 0\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "signald", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"signald: cannot start: server.tls_cert: cannot load {cert} with {key}: "
    )


async def test_drain_closes_an_idle_tls_keep_alive_connection_cleanly(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server(make_config(server={"tls_cert": str(pki.cert), "tls_key": str(pki.key), "request_timeout": 30.0}))
    with trio.fail_after(TIMEOUT):  # well before request_timeout: the idle connection does not hold the drain
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            assert server.port
            # https_compatible: the server closes without close_notify, as HTTPS servers may.
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", server.port, ssl_context=pki.client, https_compatible=True
            )
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(conn.send(h11.Request(method="GET", target="/health", headers=[("Host", "x")])))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            status, headers, _ = await read_response(conn, stream)
            assert status == 200 and "connection" not in headers
            server.shutdown()
            assert await stream.receive_some(1024) == b""
    await stream.aclose()
    assert "connection failed" not in caplog.text
