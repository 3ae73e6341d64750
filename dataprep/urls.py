"""Which annotation URLs dataprep fetches: http(s) to public addresses, unless a corpus allows private
ones (`allow_private_urls: true`: a loopback test server, an intranet mirror).

An annotation list is someone else's file. A `file://` row would copy a local file into a shard; a
URL of a loopback, private or link-local address reaches services inside the cluster (the cloud
metadata service at 169.254.169.254 among them). The annotations stage refuses such rows, counted
per reason; host names are resolved (once each) and judged by every address they resolve to.
dataprep's own fetcher (videos, local folders) checks again when it connects and on every redirect;
img2dataset follows redirects itself, unchecked.
"""
from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

REFUSED = "refused"  # the prefix of every reason: "refused: loopback_address", ...


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why dataprep must not connect to an address (None: a public one)."""
    if getattr(ip, "ipv4_mapped", None) is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback_address"
    if ip.is_link_local:
        return "link_local_address"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved:
        return "reserved_address"
    if ip.is_private or not ip.is_global:
        return "private_address"
    return None


def resolve(host: str) -> list[str]:
    """Every address a host name resolves to ([] when it does not resolve: the download counts that)."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError):
        return []


def url_problem(url: str, addresses=resolve) -> str | None:
    """Why a URL must not be fetched, or None. `addresses(host)`: the host's addresses."""
    try:
        parts = urlsplit(str(url).strip())
        host = parts.hostname
    except ValueError:
        return "invalid_url"
    scheme = parts.scheme.lower()
    if scheme == "file":
        return "file_url"
    if scheme not in ("http", "https"):
        return "unsupported_scheme"
    if not host:
        return "invalid_url"
    if host == "localhost" or host.endswith(".localhost"):
        return "loopback_address"
    try:
        return address_problem(ipaddress.ip_address(host))
    except ValueError:
        pass
    for address in addresses(host):
        try:
            problem = address_problem(ipaddress.ip_address(address.split("%")[0]))
        except ValueError:
            continue
        if problem:
            return problem
    return None


def refuse_unsafe(urls: list[str], threads: int = 32) -> list[str | None]:
    """Each URL's reason to be refused ("refused: <reason>") or None; host names resolved once each,
    `threads` at a time."""
    hosts = set()
    for url in urls:
        try:
            host = urlsplit(str(url).strip()).hostname
        except ValueError:
            continue
        if host and not _is_ip(host):
            hosts.add(host)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        resolved = dict(zip(hosts, pool.map(resolve, sorted(hosts))))
    out = []
    for url in urls:
        problem = url_problem(url, lambda h: resolved.get(h) or resolve(h))
        out.append(f"{REFUSED}: {problem}" if problem else None)
    return out


def count(reasons: list[str | None]) -> Counter:
    return Counter(r for r in reasons if r)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
