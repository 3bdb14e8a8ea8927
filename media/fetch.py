"""Turn a URL into a local temp file: guarded, streamed, size-capped and time-limited.

Every outbound request of the service goes through :class:`_Connector`, whose client sends all
traffic, redirect hops included, through :class:`_GuardedTransport`. That transport resolves each
hop's host once, checks every address it resolves to against the :class:`AddressPolicy`, and
connects to the checked address itself (keeping the Host header and the TLS server name), so a
DNS answer cannot change between the check and the connection. By default the policy refuses
loopback, private, link-local, multicast, reserved, not publicly routable and cloud-metadata
addresses, including IPv4 addresses embedded in IPv6 ones; an allow-list names the exceptions.

``data:`` URLs (base64 or percent-encoded) are decoded locally, under their own size cap.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote_to_bytes

import httpx

from media.errors import InvalidSource, MediaTooLarge, RefusedAddress, UpstreamError, UpstreamTimeout
from media.sizes import format_bytes

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses to connect to, in order (tests may pass their own resolver).
Resolver = Callable[[str, int], Sequence[IPAddress]]

_ALLOWED_SCHEMES = frozenset({"http", "https"})
_USER_AGENT = "llava-video-service/media-fetch"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Instance-metadata endpoints of cloud providers. Most are link-local or private anyway; the
# ones that Python calls global (Azure's wire server, Oracle's) are why this list exists.
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure wire server
    )
)
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
# DNS lookups run here so that a hanging resolver cannot outlast the connect timeout.
_DNS_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="media-dns")


def address_refusal(address: IPAddress) -> str | None:
    """Why the service does not connect to ``address`` by default, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # the IPv4 address itself, in IPv6 notation
            return address_refusal(address.ipv4_mapped)
        embedded = _embedded_ipv4(address)
        if embedded is not None and (reason := address_refusal(embedded)):
            return f"{reason} (embedded in the IPv6 address)"
    checks = (
        (address in _METADATA_ADDRESSES, "a cloud metadata address"),
        (address.is_loopback, "a loopback address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_unspecified, "an unspecified address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
        (not address.is_global, "an address that is not publicly routable"),
    )
    return next((reason for refused, reason in checks if refused), None)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a 6to4, NAT64 or Teredo address carries, if any."""
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.teredo is not None:
        return address.teredo[1]  # the client's address
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which hosts may be fetched from: public addresses, plus what the allow-list names."""

    allowed_hosts: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_allowlist(cls, entries: str | Iterable[str]) -> AddressPolicy:
        """Parse host names, IP addresses and CIDR networks (a comma-separated string or a list).

        Raises ValueError for an entry that is none of these.
        """
        items = entries.split(",") if isinstance(entries, str) else list(entries)
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for item in (entry.strip() for entry in items):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = _normalise_host(item)
            if not name or any(c in name for c in "/:@ ") or name.replace(".", "").isdigit():
                raise ValueError(f"{item!r} is not a host name, an IP address or a CIDR network")
            hosts.add(name)
        return cls(frozenset(hosts), tuple(networks))

    def check(self, host: str, addresses: Sequence[IPAddress]) -> None:
        """Raise RefusedAddress unless every address of ``host`` may be connected to."""
        if _normalise_host(host) in self.allowed_hosts:
            return
        for address in addresses:
            if any(address in network for network in self.allowed_networks):
                continue
            reason = address_refusal(address)
            if reason is not None:
                shown = host if host == str(address) else f"{host} ({address})"
                raise RefusedAddress(
                    f"the URL's host {shown} is {reason}, which the service does not fetch from; "
                    "use a public URL, or ask the operator to add the host to LLAVA_URL_ALLOWLIST"
                )


def _normalise_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """The addresses ``host`` resolves to (an IP literal resolves to itself), in resolver order."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canonical, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True)
class FetchLimits:
    """Limits for one download; timeouts in seconds.

    ``read_timeout`` bounds each wait for data, ``total_timeout`` the whole transfer, redirects
    included: it is checked before each hop and as data arrives, so a download can overrun it by
    at most one connect or read timeout. ``max_data_url_bytes`` caps a ``data:`` URL's bytes.
    """

    max_bytes: int
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float = 300.0
    max_redirects: int = 5
    max_data_url_bytes: int = 16 * 1024 * 1024
    policy: AddressPolicy = field(default_factory=AddressPolicy)


def download_to_file(
    url: str,
    dest_dir: Path,
    limits: FetchLimits,
    *,
    suffix: str = "",
    resolver: Resolver = resolve_host,
) -> Path:
    """Fetch ``url`` into a new file in ``dest_dir`` and return its path (the caller deletes it).

    http(s) URLs are streamed, following up to ``limits.max_redirects`` redirects, each hop
    checked against ``limits.policy``; ``data:`` URLs are decoded. On any failure the partial
    file is removed. Raises InvalidSource (malformed URL, scheme other than http/https/data,
    bad data: URL), RefusedAddress (a hop's host resolves to a refused address), MediaTooLarge
    (more bytes than allowed, declared or received), UpstreamTimeout (connect, read or total
    time exceeded, DNS too slow) or UpstreamError (DNS failure, connection failure, non-2xx
    answer, too many redirects, broken transfer).
    """
    is_data = isinstance(url, str) and url[:5].lower() == "data:"
    target = None if is_data else _parse_url(url)
    fd, name = tempfile.mkstemp(prefix="download-", suffix=suffix, dir=dest_dir)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            if target is None:
                file.write(decode_data_url(url, limits.max_data_url_bytes))
            else:
                _Connector(limits, resolver).download(target, file)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:[<type>][;base64],<data>`` URL, at most ``max_bytes`` of them."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidSource("the data: URL has no ',' before its data; send data:<type>;base64,<data>")
    if header.lower().endswith(";base64"):
        payload = "".join(payload.split())  # line breaks that some encoders insert
        if "%" in payload:
            payload = unquote_to_bytes(payload).decode("latin-1")
        # Refuse before decoding: 4 characters carry 3 bytes.
        if len(payload) // 4 * 3 > max_bytes + 3:
            raise _data_too_large(max_bytes)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidSource("the data: URL's base64 data is malformed") from exc
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise _data_too_large(max_bytes)
    return data


def _data_too_large(max_bytes: int) -> MediaTooLarge:
    return MediaTooLarge(f"the data: URL holds more than the {format_bytes(max_bytes)} limit; upload the file instead")


def _parse_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise InvalidSource("the URL is malformed; send an absolute http(s) URL") from exc
    if parsed.scheme not in _ALLOWED_SCHEMES:
        scheme = f"'{parsed.scheme}'" if parsed.scheme else "no scheme"
        raise InvalidSource(f"only http, https and data URLs are supported, got {scheme}")
    if not parsed.host:
        raise InvalidSource("the URL has no host; send an absolute http(s) URL")
    return parsed


class _GuardedTransport(httpx.BaseTransport):
    """Resolves each request's host once, checks the addresses, connects to a checked one."""

    def __init__(
        self,
        inner: httpx.BaseTransport,
        limits: FetchLimits,
        resolver: Resolver,
        deadline: float,
    ) -> None:
        self._inner = inner
        self._limits = limits
        self._resolver = resolver
        self._deadline = deadline

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if time.monotonic() > self._deadline:
            raise _total_timeout(url.host, self._limits)
        addresses = self._resolve(url.host, url.port or _DEFAULT_PORTS.get(url.scheme, 80))
        self._limits.policy.check(url.host, addresses)
        extensions = dict(request.extensions)
        if url.scheme == "https":
            extensions["sni_hostname"] = url.host  # TLS checks the certificate against the name
        error: httpx.ConnectError | None = None
        for address in addresses:
            pinned = httpx.Request(
                request.method,
                url.copy_with(host=str(address)),
                headers=request.headers,  # includes Host: the name, not the address
                stream=request.stream,
                extensions=extensions,
            )
            try:
                return self._inner.handle_request(pinned)
            except httpx.ConnectError as exc:
                error = exc  # try the host's next address, as a browser would
        assert error is not None  # resolve() never returns an empty list
        raise error

    def close(self) -> None:
        self._inner.close()

    def _resolve(self, host: str, port: int) -> Sequence[IPAddress]:
        timeout = max(0.0, min(self._limits.connect_timeout, self._deadline - time.monotonic()))
        future = _DNS_THREADS.submit(self._resolver, host, port)
        try:
            addresses = future.result(timeout=timeout)
        except FutureTimeout as exc:
            raise UpstreamTimeout(f"looking up the host name {host} took too long; try again later") from exc
        except (OSError, UnicodeError) as exc:
            raise UpstreamError(f"could not resolve the host name {host}; check the URL") from exc
        if not addresses:
            raise UpstreamError(f"the host name {host} has no addresses; check the URL")
        return addresses


def _total_timeout(host: str, limits: FetchLimits) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"the download from {host} took longer than {limits.total_timeout:g} s; use a faster host or a smaller file"
    )


class _Connector:
    """Owns the HTTP client settings and turns httpx failures into media errors."""

    def __init__(self, limits: FetchLimits, resolver: Resolver = resolve_host) -> None:
        self._limits = limits
        self._resolver = resolver

    def download(self, url: httpx.URL, file: BinaryIO) -> None:
        """Write the body of ``url`` (after redirects) to ``file``, enforcing the limits."""
        deadline = time.monotonic() + self._limits.total_timeout
        try:
            with self._client(deadline) as client, client.stream("GET", url) as response:
                self._check_response(response)
                self._copy_body(response, file, deadline)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(f"{url.host} did not respond in time; try again later or use a faster host") from exc
        except httpx.TooManyRedirects as exc:
            raise UpstreamError(
                f"{url.host} redirected more than {self._limits.max_redirects} times; send the final URL"
            ) from exc
        except httpx.ConnectError as exc:
            raise UpstreamError(f"could not connect to {url.host} ({exc}); check the URL") from exc
        except httpx.RequestError as exc:
            raise UpstreamError(f"the download from {url.host} failed ({exc})") from exc

    def _client(self, deadline: float) -> httpx.Client:
        """The only place an HTTP client is built: every request goes through the guard."""
        limits = self._limits
        # No single wait may outlast the whole download.
        read = min(limits.read_timeout, limits.total_timeout)
        return httpx.Client(
            timeout=httpx.Timeout(connect=limits.connect_timeout, read=read, write=read, pool=read),
            follow_redirects=True,
            max_redirects=limits.max_redirects,
            transport=_GuardedTransport(httpx.HTTPTransport(), limits, self._resolver, deadline),
            # Ignore proxy/netrc settings from the environment: .netrc credentials must never
            # be sent to hosts that callers choose.
            trust_env=False,
            # Ask for the bytes as stored: the size cap then measures the file itself.
            headers={"Accept-Encoding": "identity", "User-Agent": _USER_AGENT},
        )

    def _check_response(self, response: httpx.Response) -> None:
        if not response.is_success:
            raise UpstreamError(
                f"{response.url.host} answered HTTP {response.status_code} {response.reason_phrase}; check the URL"
            )
        declared = response.headers.get("Content-Length", "")
        # An honest Content-Length over the cap fails before any byte is read.
        if declared.isdigit() and int(declared) > self._limits.max_bytes:
            raise self._too_large()

    def _copy_body(self, response: httpx.Response, file: BinaryIO, deadline: float) -> None:
        # Count the bytes actually received: Content-Length may be absent or wrong. No chunk
        # size: httpx would buffer up to it, and the deadline must be checked on every read.
        received = 0
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received > self._limits.max_bytes:
                raise self._too_large()
            if time.monotonic() > deadline:
                raise _total_timeout(response.url.host, self._limits)
            file.write(chunk)

    def _too_large(self) -> MediaTooLarge:
        return MediaTooLarge(
            f"the download exceeds the {format_bytes(self._limits.max_bytes)} limit; send a smaller file"
        )
