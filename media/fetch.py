"""Download a URL to a local temp file: streamed, size-capped and time-limited.

All HTTP traffic of the media package goes through :class:`_Connector`. An address policy
(resolve each hop's host and check it against an allow-list, against SSRF) belongs in
``_Connector._client``, as an httpx transport wrapping the default one: httpx sends every
request through the client's transport, redirect hops included, so one check there covers all.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import httpx

from media.errors import InvalidSource, MediaTooLarge, UpstreamError, UpstreamTimeout

_ALLOWED_SCHEMES = frozenset({"http", "https"})
_USER_AGENT = "llava-video-service/media-fetch"


@dataclass(frozen=True)
class FetchLimits:
    """Limits for one download; timeouts in seconds.

    ``read_timeout`` bounds each wait for data, ``total_timeout`` the whole body transfer:
    it is checked as data arrives, so a download can overrun it by at most one read timeout.
    """

    max_bytes: int
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float = 300.0
    max_redirects: int = 5


def download_to_file(url: str, dest_dir: Path, limits: FetchLimits, *, suffix: str = "") -> Path:
    """Stream ``url`` into a new file in ``dest_dir`` and return its path (the caller deletes it).

    Follows up to ``limits.max_redirects`` redirects. On any failure the partial file is removed.
    Raises InvalidSource (malformed URL, scheme other than http/https), MediaTooLarge (more than
    ``limits.max_bytes`` bytes, declared or received), UpstreamTimeout (connect, read or total
    time exceeded) or UpstreamError (DNS/connection failure, non-2xx answer, too many
    redirects, broken transfer).
    """
    target = _parse_url(url)
    fd, name = tempfile.mkstemp(prefix="download-", suffix=suffix, dir=dest_dir)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            _Connector(limits).download(target, file)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _parse_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise InvalidSource("the URL is malformed; send an absolute http(s) URL") from exc
    if parsed.scheme not in _ALLOWED_SCHEMES:
        scheme = f"'{parsed.scheme}'" if parsed.scheme else "no scheme"
        raise InvalidSource(f"only http and https URLs are supported, got {scheme}")
    if not parsed.host:
        raise InvalidSource("the URL has no host; send an absolute http(s) URL")
    return parsed


class _Connector:
    """Owns the HTTP client settings and turns httpx failures into media errors."""

    def __init__(self, limits: FetchLimits) -> None:
        self._limits = limits

    def download(self, url: httpx.URL, file: BinaryIO) -> None:
        """Write the body of ``url`` (after redirects) to ``file``, enforcing the limits."""
        deadline = time.monotonic() + self._limits.total_timeout
        try:
            with self._client() as client, client.stream("GET", url) as response:
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

    def _client(self) -> httpx.Client:
        limits = self._limits
        # No single wait may outlast the whole download.
        read = min(limits.read_timeout, limits.total_timeout)
        return httpx.Client(
            timeout=httpx.Timeout(connect=limits.connect_timeout, read=read, write=read, pool=read),
            follow_redirects=True,
            max_redirects=limits.max_redirects,
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
                raise UpstreamTimeout(
                    f"the download from {response.url.host} took longer than "
                    f"{self._limits.total_timeout:g} s; use a faster host or a smaller file"
                )
            file.write(chunk)

    def _too_large(self) -> MediaTooLarge:
        return MediaTooLarge(
            f"the download exceeds the {_format_bytes(self._limits.max_bytes)} limit; send a smaller file"
        )


def _format_bytes(count: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if count >= size:
            return f"{count / size:g} {unit}"
    return f"{count} bytes"
