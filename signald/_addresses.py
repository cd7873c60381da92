"""Who a client is, for per-address limits: its TCP peer, or what a trusted proxy says.

``X-Forwarded-For`` is a header any client can send, so it is believed only when the TCP peer
is one of ``server.trusted_proxies``; then the list is read from the right (the entry the
proxy itself appended) past every further trusted proxy, and the first untrusted address is
the client. That is the one entry no client can forge, whatever it put in the header first.

Per-address limits count an IPv6 client by its /64 network: one subscriber usually gets a
whole /64, so counting single IPv6 addresses would give an abuser 2**64 fresh identities.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

IPV6_PREFIX = 64

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(text: str) -> _Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    return address


def address_key(address: _Address) -> str:
    """What per-address limits count under: the IPv4 address, or the IPv6 /64."""
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


@functools.lru_cache(maxsize=4096)
def _peer_key(peer: str) -> str:
    """The key of a client connected directly: parsing an address costs more than the rest of
    a connection's admission, and clients reconnect from the same few addresses."""
    address = _parse(peer)
    return peer if address is None else address_key(address)


class TrustedProxies:
    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = [ipaddress.ip_network(network, strict=False) for network in networks]

    def _trusted(self, address: _Address) -> bool:
        return any(address in network for network in self._networks)

    def client_key(self, peer: str, forwarded_for: str | None) -> str:
        """The per-address key of the client behind a connection from ``peer``.

        ``peer`` is the TCP peer's host; anything that is not an IP address (a Unix socket,
        say) is its own key.
        """
        if not (forwarded_for and self._networks):
            return _peer_key(peer)
        address = _parse(peer)
        if address is None:
            return peer
        if self._trusted(address):
            for entry in reversed(forwarded_for.split(",")):
                hop = _parse(entry)
                if hop is None:
                    break  # garbage: stop at the last hop a trusted proxy vouched for
                address = hop
                if not self._trusted(hop):
                    break
        return address_key(address)
