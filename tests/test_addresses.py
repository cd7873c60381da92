"""Client addresses: X-Forwarded-For only from trusted proxies, IPv6 counted by /64."""

from __future__ import annotations

import pytest

from signald._addresses import TrustedProxies


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("198.51.100.7", None, "198.51.100.7"),
        # An untrusted peer's header is ignored: anyone can send one.
        ("198.51.100.7", "203.0.113.1", "198.51.100.7"),
        # A trusted proxy's last entry is the client it saw.
        ("10.0.0.5", "203.0.113.1", "203.0.113.1"),
        # Entries a client wrote itself, left of the proxy's, are not believed.
        ("10.0.0.5", "1.1.1.1, 203.0.113.1", "203.0.113.1"),
        # Chains of trusted proxies are walked from the right.
        ("10.0.0.5", "1.1.1.1, 203.0.113.1, 10.0.0.9, 127.0.0.1", "203.0.113.1"),
        # A trusted proxy that sent no header is itself the client.
        ("10.0.0.5", None, "10.0.0.5"),
        ("10.0.0.5", "", "10.0.0.5"),
        # Garbage stops the walk at the last hop a trusted proxy vouched for.
        ("10.0.0.5", "203.0.113.1, not-an-ip", "10.0.0.5"),
        ("10.0.0.5", "garbage, 10.0.0.9", "10.0.0.9"),
        # Ports and brackets, as some proxies write them.
        ("10.0.0.5", "203.0.113.1:4711", "203.0.113.1"),
        ("10.0.0.5", "[2001:db8:1:2::7]:443", "2001:db8:1:2::/64"),
        # IPv6 counts by /64; IPv4-mapped IPv6 counts as the IPv4 address.
        ("2001:db8:aaaa:bbbb:1:2:3:4", None, "2001:db8:aaaa:bbbb::/64"),
        ("::ffff:198.51.100.7", None, "198.51.100.7"),
        ("?", None, "?"),
    ],
)
def test_client_key(peer: str, forwarded: str | None, client: str) -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "127.0.0.1"])
    assert proxies.client_key(peer, forwarded) == client


def test_no_trusted_proxies_means_the_header_is_never_believed() -> None:
    assert TrustedProxies([]).client_key("127.0.0.1", "203.0.113.1") == "127.0.0.1"
