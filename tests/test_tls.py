"""TLS on the one port: an HTTPS handshake and request, a WSS join and relay, certificates from trustme."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

from signald import Server
from signald import _startup as startup
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


def signald(*args: str, user: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*user, sys.executable, "-m", "signald", *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT
    )


def refused_alike(config: Path, *flags: str, user: Sequence[str] = ()) -> str:
    """``--check-config`` and a start refuse ``config`` with the same one line and exit 2; that line."""
    check = signald("--check-config", "--config", str(config), *flags, user=user)
    start = signald("--config", str(config), *flags, user=user)
    assert (check.returncode, start.returncode) == (2, 2), (check.stderr, start.stderr)
    assert check.stderr == start.stderr and len(check.stderr.splitlines()) == 1, (check.stderr, start.stderr)
    line = check.stderr.strip()
    assert line.startswith("signald: configuration error: ")
    assert "_ssl.c" not in line and "PEM lib" not in line  # plain words, not OpenSSL's
    return line.removeprefix("signald: configuration error: ")


def encrypted_key(pki: Pki, path: Path) -> str:
    key = serialization.load_pem_private_key(pki.key.read_bytes(), password=None)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    path.write_bytes(pem)
    return str(path)


@pytest.mark.parametrize(
    "case", ["cert-missing", "cert-not-pem", "key-not-pem", "key-of-another-cert", "key-encrypted"]
)
def test_unusable_certificates_are_refused_by_check_config_and_at_start(tmp_path: Path, pki: Pki, case: str) -> None:
    cert, key = str(pki.cert), str(pki.key)
    if case == "cert-missing":
        cert = str(tmp_path / "nope.pem")
        expected = f"server.tls_cert: {cert}: cannot read: No such file or directory"
    elif case == "cert-not-pem":
        (tmp_path / "junk.pem").write_text("hello")
        cert = str(tmp_path / "junk.pem")
        expected = f"server.tls_cert: {cert}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    elif case == "key-not-pem":
        (tmp_path / "junk.pem").write_text("hello")
        key = str(tmp_path / "junk.pem")
        expected = f"server.tls_key: {key}: holds no PEM private key (-----BEGIN PRIVATE KEY-----)"
    elif case == "key-of-another-cert":
        key = str(tmp_path / "other.pem")
        trustme.CA().issue_cert("127.0.0.1").private_key_pem.write_to_path(key)
        expected = f"server.tls_key: {key}: is not the private key of the certificate in {cert}"
    else:
        key = encrypted_key(pki, tmp_path / "encrypted.pem")
        expected = f"server.tls_key: {key}: is encrypted with a passphrase; signald needs it without"
    with pytest.raises(ConfigError) as info:
        startup.check(structure({"server": {"tls_cert": cert, "tls_key": key}}))
    assert str(info.value) == expected
    if case == "key-of-another-cert":  # and the same through the command, both ways
        config = tmp_path / "signald.toml"
        config.write_text(f'[server]\nport = 0\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
        assert refused_alike(config) == expected


def test_a_key_the_daemon_cannot_read_is_refused(pki: Pki) -> None:
    """As the service's unprivileged user would be, given a root-only key (chmod 0600)."""
    directory = Path(tempfile.mkdtemp(prefix="signald-tls-"))
    try:
        directory.chmod(0o755)
        cert, key = directory / "cert.pem", directory / "key.pem"
        shutil.copy(pki.cert, cert)
        shutil.copy(pki.key, key)
        cert.chmod(0o644)
        key.chmod(0o000 if os.geteuid() != 0 else 0o600)
        config = directory / "signald.toml"
        config.write_text(f'[server]\nport = 0\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
        config.chmod(0o644)
        # root reads any file: run as nobody then, as systemd's DynamicUser= would.
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        assert refused_alike(config, user=nobody) == f"server.tls_key: {key}: cannot read: Permission denied"
    finally:
        shutil.rmtree(directory)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("[::1]:3000", "server.host: '[::1]:3000' has a port in it: give the address alone ('::1')"),
        ("[::1]", "server.host: '[::1]': give an IPv6 address without brackets ('::1')"),
        ("my host", "server.host: 'my host' is not an IP address or a host name"),
        ("", "server.host: '' is not an IP address or a host name"),
        ("signald.invalid", "server.host: cannot resolve 'signald.invalid' to an address to listen on"),
    ],
)
def test_a_listen_address_that_cannot_be_used_is_refused(host: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        startup.check(structure({"server": {"host": host}}))
    assert str(info.value).startswith(expected)


@pytest.mark.parametrize("host", ["127.0.0.1", "::", "0.0.0.0", "localhost", "::ffff:127.0.0.1"])
def test_usable_listen_addresses_pass(host: str) -> None:
    startup.check(structure({"server": {"host": host}}))


def test_a_port_in_host_is_refused_naming_the_flag(tmp_path: Path) -> None:
    config = tmp_path / "signald.toml"
    config.write_text("[server]\nport = 0\n")
    line = refused_alike(config, "--host", "0.0.0.0:3000")
    assert (
        line == "--host: '0.0.0.0:3000' has a port in it: give the address alone ('0.0.0.0'), the port as server.port"
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


def test_check_config_loads_good_tls_files(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "signald.toml"
    config.write_text(f'[server]\nport = 0\ntls_cert = "{pki.cert}"\ntls_key = "{pki.key}"\n')
    result = signald("--check-config", "--config", str(config))
    assert (result.returncode, result.stderr) == (0, f"signald: configuration OK ({config})\n")
