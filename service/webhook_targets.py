"""Where a webhook may point: public addresses only, unless an allow-list names a network.

Checked when the job is created (422) and again at every delivery, after resolving DNS, on
every address the name resolves to; delivery then connects to the checked address itself, so a
name that re-resolves to 127.0.0.1 between the check and the connection (DNS rebinding) cannot
reach an internal service.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from contract.settings import Settings

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookTargetRefused(ValueError):
    """The URL is malformed, uses a refused scheme, or reaches a non-public address."""


class WebhookTargetUnresolved(WebhookTargetRefused):
    """The host name did not resolve: refused when a job is created, retried at delivery (a
    resolver's hiccup or a receiver's DNS outage passes like any other)."""


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    scheme: str
    host: str
    port: int
    address: str  # the checked IP to connect to

    @property
    def receiver(self) -> str:
        """The machine behind the URL, for the per-receiver send limit (contract.webhook_queue):
        its address, an IPv6 one by its /64 (what one host is usually given). Many names or
        ports of one server are then one receiver, not one each."""
        address = ipaddress.ip_address(self.address)
        if isinstance(address, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(address)
            if embedded is None:
                return f"ip {ipaddress.IPv6Network((address, 64), strict=False)}"
            address = embedded
        return f"ip {address}"


# NAT64 prefixes (RFC 6052 well-known, RFC 8215 local-use): on an IPv6-only cluster with DNS64
# every IPv4-only receiver is reached inside one of these /64s, so the IPv4 address it carries
# is the machine.
_LOCAL_USE_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), _LOCAL_USE_NAT64)
# The deprecated IPv4-compatible form (RFC 4291): still routed to the IPv4 address by some stacks.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 machine behind an IPv4-mapped, NAT64, 6to4 or Teredo IPv6 address."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _IPV4_TRANSLATED:  # SIIT (RFC 6145): ::ffff:0:a.b.c.d
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if any(address in network for network in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # (server, client): the client is the receiver
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # ::a.b.c.d, not :: or ::1
        return ipaddress.IPv4Address(int(address))
    return None


class WebhookPolicy:
    def __init__(self, allowed_networks: list[IpNetwork], allow_http: bool) -> None:
        self.allowed_networks = allowed_networks
        self.allow_http = allow_http

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookPolicy:
        networks = [
            ipaddress.ip_network(n.strip(), strict=False)
            for n in settings.webhook_allowed_networks.split(",")
            if n.strip()
        ]
        return cls(networks, settings.webhook_allow_http)

    def resolve(self, url: str) -> WebhookTarget:
        """The target to connect to; raises WebhookTargetRefused with a reason."""
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # unbalanced brackets, a bracketed host that is not an IP, ...
            raise WebhookTargetRefused(f"malformed URL: {exc}") from exc
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme not in schemes:
            raise WebhookTargetRefused(f"scheme must be {' or '.join(schemes)}")
        if not parts.hostname or parts.username or parts.password:
            raise WebhookTargetRefused("needs a host and no user info")
        try:
            explicit_port = parts.port  # parsed lazily: a bad one raises only here
        except ValueError as exc:
            raise WebhookTargetRefused(f"invalid port: {exc}") from exc
        if explicit_port == 0:  # nothing listens there; `or` below would quietly make it 443
            raise WebhookTargetRefused("invalid port: 0")
        port = explicit_port or (443 if parts.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except UnicodeError as exc:  # not a valid international name: it never will be
            raise WebhookTargetRefused(f"cannot resolve {parts.hostname}: {exc}") from exc
        except socket.gaierror as exc:
            raise WebhookTargetUnresolved(f"cannot resolve {parts.hostname}") from exc
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        for address in addresses:
            if not self.permits(address):
                raise WebhookTargetRefused(
                    f"{parts.hostname} resolves to a non-public address ({address})"
                )
        return WebhookTarget(url, parts.scheme, parts.hostname, port, str(addresses[0]))

    def permits(self, address: IpAddress) -> bool:
        # An IPv6 address that carries an IPv4 one reaches that machine (through NAT64 on an
        # IPv6-only cluster, a 6to4 or Teredo relay): it is judged as that IPv4 address. The
        # allow-list may name either form (an operator may allow a NAT64 prefix as such).
        embedded = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
        if any(a in n for a in (address, embedded) if a for n in self.allowed_networks):
            return True
        if address in _LOCAL_USE_NAT64:
            return False  # a site's own translation, with layouts that hide the IPv4 anywhere
        address = embedded or address
        # is_global is False for loopback, RFC 1918, link-local (169.254.169.254, the cloud
        # metadata address), CGNAT, unique-local IPv6 and the reserved ranges.
        return address.is_global and not address.is_multicast
