"""Outbound URL safety: which URLs the service may call on a tenant's behalf (webhooks), and how.

A webhook URL is chosen by a tenant, so calling it is a server-side request forgery risk: it could
aim at the cloud metadata service (169.254.169.254), at loopback admin ports or at the private
network. The rules:

* ``https`` only, unless ``settings.allow_http_urls`` (development and tests);
* the host is resolved and *every* address must be public: loopback, private, link-local, CGNAT
  (100.64/10), multicast, unspecified, reserved and documentation ranges are refused, including IPv4
  addresses hidden in IPv6 forms (``::ffff:127.0.0.1``, ``::127.0.0.1``, 6to4, NAT64, Teredo);
* hosts named in ``settings.url_allowlist`` skip the address check (e.g. a receiver on loopback in
  tests, or an internal service the operator vouches for);
* the connection goes to an address that was checked (:func:`pinned_request`), with the original
  ``Host`` header and TLS SNI, so a second DNS answer cannot swap in a private address (DNS rebinding).

Checks run at creation time (a clear 422) and again before every delivery (DNS may have changed).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from app.config import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

# IPv6 prefixes that embed an IPv4 address in their last 32 bits (NAT64, well-known and local-use).
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPAT = ipaddress.ip_network("::/96")


class UnsafeURLError(ValueError):
    """The URL may not be called; the message says why, in words fit for an API error."""


@dataclass(frozen=True)
class VettedURL:
    """A URL whose host resolved only to allowed addresses; connect to ``addresses[0]``."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def system_resolver(host: str, port: int) -> list[str]:
    """All addresses ``host`` resolves to (A and AAAA), in the resolver's order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]).split("%", 1)[0], None)  # drop an IPv6 zone id
    return list(seen)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address carries, which the network may route to as IPv4."""
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in _IPV4_COMPAT and int(ip) > 1:  # deprecated ::a.b.c.d (``::`` and ``::1`` are handled as IPv6)
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if any(ip in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def _why_not_public(ip: IPAddress) -> str | None:
    """A reason ``ip`` is not a public unicast address, or None when it is.

    IPv6 forms that carry an IPv4 address are judged by that address first (clearer message); even with a
    public IPv4 inside, IPv4-mapped/compatible forms are then refused as reserved — no real receiver needs them.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        for inner in _embedded_ipv4(ip):
            inner_reason = _why_not_public(inner)
            if inner_reason is not None:
                return f"an IPv6 form of {inner}, {inner_reason}"
    checks = (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address (e.g. the cloud metadata service)"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private-network address"),
        ("is_reserved", "a reserved address"),
        ("is_site_local", "a site-local address (fec0::/10)"),  # deprecated, but routed inside sites
    )
    for attribute, reason in checks:
        if getattr(ip, attribute, False):  # is_site_local exists on IPv6 addresses only
            return reason
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10"):
        return "a carrier-grade NAT address (100.64.0.0/10)"
    if not ip.is_global:  # anything else IANA lists as not globally reachable
        return "an address that is not globally reachable"
    return None


def check_address(address: str) -> None:
    """Raise :class:`UnsafeURLError` unless ``address`` (an IP literal) is public."""
    ip = ipaddress.ip_address(address)
    reason = _why_not_public(ip)
    if reason is not None:
        raise UnsafeURLError(f"the host resolves to {address}, {reason}; webhooks must reach the public internet")


def _host_allowed(host: str, settings: Settings) -> bool:
    allowed = {h.lower().strip("[]") for h in settings.url_allowlist}
    return host.lower() in allowed


def check_url(url: str, settings: Settings, resolver: Resolver | None = None) -> VettedURL:
    """Parse, resolve and vet ``url``; return where to connect. Raises :class:`UnsafeURLError`."""
    if len(url) > 2000:
        raise UnsafeURLError("the URL is longer than 2000 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURLError(f"the URL is not valid: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise UnsafeURLError("the URL must start with https://")
    if scheme == "http" and not settings.allow_http_urls:
        raise UnsafeURLError("the URL must use https (plain http is not allowed)")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURLError("the URL must not contain credentials (user:password@)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UnsafeURLError("the URL has no host")
    port = port or (443 if scheme == "https" else 80)
    try:
        addresses = (resolver or system_resolver)(host, port)
    except (OSError, UnicodeError) as exc:
        raise UnsafeURLError(f"the host {host!r} does not resolve") from exc
    if not addresses:
        raise UnsafeURLError(f"the host {host!r} does not resolve")
    if not _host_allowed(host, settings):
        # Every address, not just the first: a host with one public and one private record is refused.
        for address in addresses:
            check_address(address)
    return VettedURL(url=url, scheme=scheme, host=host, port=port, addresses=tuple(addresses))


def pinned_request(
    client: httpx.Client,
    vetted: VettedURL,
    method: str,
    *,
    headers: dict[str, str],
    content: bytes,
    timeout: httpx.Timeout,
) -> httpx.Response:
    """Send a request to the vetted address (not a fresh DNS answer), keeping ``Host`` and TLS SNI.

    The URL's host is replaced by the IP literal; the TLS layer still verifies the certificate for
    the original name because ``sni_hostname`` sets both SNI and the name checked. Redirects are never
    followed: a 3xx could point anywhere, and is a failed delivery. The response is streamed; close it.

    The connection is never reused (``Connection: close``): httpx pools connections by scheme, IP and
    port, so a pooled connection opened and verified for one name would carry the next request for
    another name at the same address without checking that name's certificate (and, behind an
    SNI-routed shared IP, to the first name's backend).
    """
    original = httpx.URL(vetted.url)
    target = original.copy_with(host=vetted.addresses[0])
    default_port = 443 if vetted.scheme == "https" else 80
    host_header = vetted.host if vetted.port == default_port else f"{vetted.host}:{vetted.port}"
    if ":" in vetted.host:  # an IPv6 literal host needs its brackets back in the Host header
        host_header = f"[{vetted.host}]" if vetted.port == default_port else f"[{vetted.host}]:{vetted.port}"
    request = client.build_request(
        method,
        target,
        headers={**headers, "Host": host_header, "Connection": "close"},
        content=content,
        timeout=timeout,
        extensions={"sni_hostname": vetted.host},
    )
    # Streamed: the caller reads as much of the answer as it wants, then closes it.
    return client.send(request, follow_redirects=False, stream=True)
