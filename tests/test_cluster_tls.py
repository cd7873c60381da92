"""TLS to Redis (``rediss://``): a real redis-server that speaks TLS only and asks every client for
a certificate, certificates from trustme, and two nodes in the test's process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme

from signald import Server
from signald import _startup as startup
from signald._config import ConfigError, structure

from ._clients import connect, http_request
from ._redis import RedisTls, poll_until, redis_server
from ._topology import serve
from .conftest import make_config


@attrs.frozen
class Pki:
    ca: Path
    redis: RedisTls
    #: This node's certificate and key, from the CA Redis trusts for clients.
    cert: Path
    key: Path
    #: Another CA, trusted by nothing.
    stranger: Path


def write_cert(ca: trustme.CA, directory: Path, name: str, *hosts: str) -> tuple[Path, Path]:
    issued = ca.issue_cert(*hosts)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("redis-pki")
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    stranger.cert_pem.write_to_path(str(directory / "stranger.pem"))
    redis_cert, redis_key = write_cert(ca, directory, "redis", "127.0.0.1")
    cert, key = write_cert(ca, directory, "node", "signald-node")
    redis = RedisTls(redis_cert, redis_key, client_ca=directory / "ca.pem")
    return Pki(directory / "ca.pem", redis, cert, key, directory / "stranger.pem")


def cluster(url: str, **tls: Path) -> dict[str, Any]:
    return {"cluster": {"redis_url": url, "node_timeout": 2, **{k: str(v) for k, v in tls.items()}}}


async def test_two_nodes_on_a_tls_redis_are_one_server(pki: Pki) -> None:
    async with redis_server(tls=pki.redis) as redis, trio.open_nursery() as nursery:
        assert redis.url.startswith("rediss://127.0.0.1:")
        sections = cluster(redis.url, tls_ca=pki.ca, tls_cert=pki.cert, tls_key=pki.key)
        topology = await serve(nursery, [make_config(**sections)] * 2)
        one, two = topology.ports
        async with connect(one) as a, connect(two) as b:
            await a.join("r", "a")
            joined = await b.join("r", "b")
            assert [p["peerId"] for p in joined["participants"]] == [a.peer_id]
            await a.expect("user-joined", peerId=b.peer_id)
            await a.send(type="webrtc-offer", to=b.peer_id, sdp="over tls")
            await b.expect("webrtc-offer", sdp="over tls")
            for port in topology.ports:
                health = (await http_request(port, "GET", "/health"))[2]
                assert (health["status"], health["users"]) == ("healthy", 2)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("case", ["unknown-ca", "wrong-host", "no-client-cert"])
async def test_a_redis_that_cannot_be_trusted_or_refuses_the_node_leaves_it_degraded(
    pki: Pki, tmp_path: Path, case: str
) -> None:
    """The node serves (its own rooms), says why in /health, and never talks to that Redis."""
    ca = trustme.CA()
    if case == "wrong-host":  # signed by a CA the node trusts, for another host
        cert, key = write_cert(ca, tmp_path, "redis", "redis.example")
        tls, ca_file = RedisTls(cert, key, pki.ca), tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
    else:
        tls, ca_file = pki.redis, pki.stranger if case == "unknown-ca" else pki.ca
    client = {} if case == "no-client-cert" else {"tls_cert": pki.cert, "tls_key": pki.key}
    async with redis_server(tls=tls) as redis, trio.open_nursery() as nursery:
        server = Server(make_config(**cluster(redis.url, tls_ca=ca_file, **client)))
        await nursery.start(server.serve)
        reasons: list[str] = []

        async def refused() -> bool:
            health = (await http_request(server.port, "GET", "/health"))[2]
            reasons[:] = [health.get("reason", "")]
            return health["status"] == "degraded" and "not connected to redis yet" not in reasons[0]

        await poll_until(refused, "the node reports why it has no Redis")
        # TLS 1.3: Redis refuses a missing client certificate after the client's side of the
        # handshake is done, so the node hears an alert, or only a reset, on its first request.
        expected = {
            "unknown-ca": ["certificate verify failed: self-signed certificate in certificate chain"],
            "wrong-host": ["certificate is not valid for '127.0.0.1'"],
            "no-client-cert": ["certificate required", "Connection reset by peer"],
        }
        assert reasons[0].startswith("redis unreachable: "), reasons[0]
        assert any(words in reasons[0] for words in expected[case]), reasons[0]
        nursery.cancel_scope.cancel()


def test_tls_keys_go_with_a_rediss_url_and_their_files_are_checked_at_start(pki: Pki, tmp_path: Path) -> None:
    for url in ("redis://127.0.0.1", ""):
        with pytest.raises(ConfigError) as info:
            structure(cluster(url, tls_ca=pki.ca))
        assert info.value.key == "cluster.tls_ca" and "rediss://" in str(info.value)
    with pytest.raises(ConfigError) as info:
        structure(cluster("rediss://127.0.0.1", tls_cert=pki.cert))
    assert info.value.key == "cluster.tls_key"
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    for key, tls in [
        ("cluster.tls_ca", {"tls_ca": not_pem}),
        ("cluster.tls_ca", {"tls_ca": tmp_path / "missing.pem"}),
        ("cluster.tls_cert", {"tls_cert": not_pem, "tls_key": pki.key}),
        ("cluster.tls_key", {"tls_cert": pki.cert, "tls_key": pki.redis.key}),  # another certificate's key
    ]:
        config = structure(cluster("rediss://127.0.0.1", **tls))
        with pytest.raises(ConfigError) as info:
            startup.check(config)
        assert info.value.key == key, (key, str(info.value))
    startup.check(structure(cluster("rediss://127.0.0.1", tls_ca=pki.ca, tls_cert=pki.cert, tls_key=pki.key)))
