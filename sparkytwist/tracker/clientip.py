# -*- test-case-name: tests.test_tracker_parts -*-
"""Who made the request: the peer, or what a trusted proxy in front of us says.

``X-Forwarded-For`` is believed only from peers in ``trusted_proxies``; then the
client is the right-most address that is not itself a trusted proxy (every hop
appends, so the left part is whatever the client chose to send and proves
nothing). Straight on the internet, with the default loopback-only trust, a
client cannot spoof its address with a header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Peers whose trust decision is remembered (the set is cleared when full).
_CACHE_SIZE = 4096


def _parse(text: str) -> _Address | None:
    """An address from an XFF item: ``1.2.3.4``, ``1.2.3.4:80``, ``[::1]:80``, ``::1``."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class ClientAddress:
    """Resolves the client IP of a request from its peer and forwarding headers."""

    def __init__(self, trusted: Iterable[str]) -> None:
        self._networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in trusted)
        self._peer_trust: dict[str, bool] = {}

    def _trusted(self, address: _Address) -> bool:
        return any(address in network for network in self._networks)

    def _peer_trusted(self, peer: str) -> bool:
        known = self._peer_trust.get(peer)
        if known is None:
            address = _parse(peer)
            known = address is not None and self._trusted(address)
            if len(self._peer_trust) >= _CACHE_SIZE:
                self._peer_trust.clear()
            self._peer_trust[peer] = known
        return known

    def resolve(self, peer: str, forwarded_for: bytes | None, real_ip: bytes | None) -> str:
        """The client address as a string.

        From a trusted peer: the right-most untrusted address of X-Forwarded-For
        (all of them trusted: the left-most), else X-Real-IP; an unparsable item
        ends the walk at the last address we could vouch for.
        """
        if not self._networks or not self._peer_trusted(peer):
            return peer
        if forwarded_for:
            chosen = peer
            for item in reversed(forwarded_for.decode("latin-1").split(",")):
                address = _parse(item)
                if address is None:
                    break
                chosen = str(address)
                if not self._trusted(address):
                    break
            return chosen
        if real_ip:
            address = _parse(real_ip.decode("latin-1"))
            if address is not None:
                return str(address)
        return peer
