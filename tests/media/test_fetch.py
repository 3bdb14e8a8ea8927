"""download_to_file against a real threaded HTTP server on 127.0.0.1 (and localhost).

Traffic only ever goes to loopback: the address policy for other ranges is tested as a function
in test_address_policy.py; here the allow-list does or does not name the loopback server.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from media import (
    AddressPolicy,
    FetchLimits,
    InvalidSource,
    MediaTooLarge,
    RefusedAddress,
    UpstreamError,
    UpstreamTimeout,
    download_to_file,
)

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes
# The test servers listen on loopback, which the default policy refuses.
LOOPBACK = AddressPolicy.from_allowlist("127.0.0.1")
LIMITS = FetchLimits(
    max_bytes=200_000, connect_timeout=1.0, read_timeout=1.0, total_timeout=5.0, max_redirects=3, policy=LOOPBACK
)


class Handler(BaseHTTPRequestHandler):
    """Routes: each path segment after the first is an argument."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        route, *args = self.path.strip("/").split("/")
        getattr(self, f"route_{route.replace('-', '_')}")(*args)

    def log_message(self, *args: object) -> None:
        pass  # keep test output clean

    def route_file(self) -> None:
        self.send_body(PAYLOAD)

    def route_hops(self, remaining: str) -> None:
        if remaining == "0":
            self.route_file()
        else:
            self.redirect(f"/hops/{int(remaining) - 1}")

    def route_redirect_to_ftp(self) -> None:
        self.redirect(f"ftp://127.0.0.1:{self.server.server_port}/file")

    def route_status(self, code: str) -> None:
        self.send_response(int(code))
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"error")

    def route_declared(self, size: str) -> None:
        self.send_body(b"x" * int(size))

    def route_chunked(self, size: str) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(int(size) // 8192):
            self.write_chunk(b"x" * 8192)
        self.wfile.write(b"0\r\n\r\n")

    def route_close_delimited(self, size: str) -> None:
        # No Content-Length, no chunking: the body ends when the server closes the connection.
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.wfile.write(b"x" * int(size))

    def route_lying(self, declared: str, actual: str) -> None:
        self.send_response(200)
        self.send_header("Content-Length", declared)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.wfile.write(b"x" * int(actual))

    def route_drip(self) -> None:
        # One byte every 50 ms: each read is quick, the whole transfer never ends.
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(200):
            self.write_chunk(b"x")
            time.sleep(0.05)

    def route_stall(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "10")
        self.end_headers()
        self.wfile.flush()
        time.sleep(3)

    def route_echo_encoding(self) -> None:
        self.send_body(self.headers.get("Accept-Encoding", "").encode())

    def route_echo_host(self) -> None:
        self.send_body(self.headers.get("Host", "").encode())

    def route_to_ip(self) -> None:
        # From a name the allow-list may name to the loopback address it may not.
        self.redirect(f"http://127.0.0.1:{self.server.server_port}/file")

    def route_endless(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            while True:
                self.write_chunk(b"x" * 65536)
        except OSError:
            pass  # the client hung up

    def send_body(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class RecordingServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.hits: list[str] = []

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up mid-body (the point of several tests) are not errors here


@pytest.fixture(scope="module")
def httpd() -> Iterator[RecordingServer]:
    httpd = RecordingServer()
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(httpd: RecordingServer) -> str:
    return f"http://127.0.0.1:{httpd.server_port}"


@pytest.fixture
def hits(httpd: RecordingServer) -> list[str]:
    """The paths requested from the test server during this test."""
    httpd.hits.clear()
    return httpd.hits


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path


def assert_no_files(dest: Path) -> None:
    assert list(dest.iterdir()) == []


def test_downloads_the_body(server: str, dest: Path) -> None:
    path = download_to_file(f"{server}/file", dest, LIMITS, suffix=".mp4")

    assert path.parent == dest
    assert path.suffix == ".mp4"
    assert path.read_bytes() == PAYLOAD


def test_follows_redirects_up_to_the_limit(server: str, dest: Path) -> None:
    path = download_to_file(f"{server}/hops/3", dest, LIMITS)

    assert path.read_bytes() == PAYLOAD


def test_too_many_redirects(server: str, dest: Path) -> None:
    with pytest.raises(UpstreamError, match="redirected more than 3 times"):
        download_to_file(f"{server}/hops/4", dest, LIMITS)
    assert_no_files(dest)


def test_redirect_to_other_scheme_is_refused(server: str, dest: Path) -> None:
    with pytest.raises(UpstreamError):
        download_to_file(f"{server}/redirect-to-ftp", dest, LIMITS)
    assert_no_files(dest)


@pytest.mark.parametrize("status", [404, 500])
def test_error_status_is_upstream_error(server: str, dest: Path, status: int) -> None:
    with pytest.raises(UpstreamError, match=str(status)) as caught:
        download_to_file(f"{server}/status/{status}", dest, LIMITS)
    assert not isinstance(caught.value, UpstreamTimeout)
    assert_no_files(dest)


def test_body_of_exactly_max_bytes_is_accepted(server: str, dest: Path) -> None:
    path = download_to_file(f"{server}/declared/{LIMITS.max_bytes}", dest, LIMITS)

    assert path.stat().st_size == LIMITS.max_bytes


@pytest.mark.parametrize(
    "route",
    ["declared/300000", "chunked/300000", "close-delimited/300000"],
    ids=lambda r: r.split("/")[0],
)
def test_body_over_max_bytes_is_too_large(server: str, dest: Path, route: str) -> None:
    with pytest.raises(MediaTooLarge, match="limit"):
        download_to_file(f"{server}/{route}", dest, LIMITS)
    assert_no_files(dest)


def test_lying_small_content_length_cannot_exceed_the_cap(server: str, dest: Path) -> None:
    # HTTP/1.1 framing ends the body at Content-Length; the extra bytes are never read.
    path = download_to_file(f"{server}/lying/1000/300000", dest, LIMITS)

    assert path.stat().st_size == 1000


def test_body_shorter_than_content_length_is_upstream_error(server: str, dest: Path) -> None:
    with pytest.raises(UpstreamError):
        download_to_file(f"{server}/lying/5000/100", dest, LIMITS)
    assert_no_files(dest)


def test_slow_drip_hits_the_total_timeout(server: str, dest: Path) -> None:
    limits = FetchLimits(max_bytes=200_000, read_timeout=1.0, total_timeout=0.5, policy=LOOPBACK)
    started = time.monotonic()

    with pytest.raises(UpstreamTimeout):
        download_to_file(f"{server}/drip", dest, limits)

    assert time.monotonic() - started < 1.5
    assert_no_files(dest)


def test_stalled_read_hits_the_read_timeout(server: str, dest: Path) -> None:
    limits = FetchLimits(max_bytes=200_000, read_timeout=0.3, total_timeout=5.0, policy=LOOPBACK)

    with pytest.raises(UpstreamTimeout):
        download_to_file(f"{server}/stall", dest, limits)
    assert_no_files(dest)


def test_unreachable_port_is_upstream_error(dest: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there

    with pytest.raises(UpstreamError, match="could not connect"):
        download_to_file(f"http://127.0.0.1:{port}/file", dest, LIMITS)
    assert_no_files(dest)


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.1/file", "file:///etc/hostname", "not a url", "", "http://", "//host/path"],
)
def test_bad_urls_are_invalid_sources(dest: Path, url: str) -> None:
    with pytest.raises(InvalidSource):
        download_to_file(url, dest, LIMITS)
    assert_no_files(dest)


def test_asks_for_uncompressed_bytes(server: str, dest: Path) -> None:
    path = download_to_file(f"{server}/echo-encoding", dest, LIMITS)

    assert path.read_bytes() == b"identity"


def test_endless_body_is_cut_at_the_cap(server: str, dest: Path) -> None:
    started = time.monotonic()

    with pytest.raises(MediaTooLarge):
        download_to_file(f"{server}/endless", dest, LIMITS)

    assert time.monotonic() - started < 2
    assert_no_files(dest)


# The address policy end to end. Every URL below points at the loopback test server.


def test_loopback_is_refused_by_default(server: str, dest: Path, hits: list[str]) -> None:
    limits = FetchLimits(max_bytes=200_000)  # default policy: no allow-list

    with pytest.raises(RefusedAddress, match="127.0.0.1 is a loopback address"):
        download_to_file(f"{server}/file", dest, limits)
    assert hits == []  # refused before connecting
    assert_no_files(dest)


def test_localhost_is_refused_by_default(httpd: RecordingServer, dest: Path, hits: list[str]) -> None:
    with pytest.raises(RefusedAddress, match="loopback"):
        download_to_file(f"http://localhost:{httpd.server_port}/file", dest, FetchLimits(max_bytes=200_000))
    assert hits == []


def test_allow_listed_name_is_fetched_with_its_host_header(httpd: RecordingServer, dest: Path) -> None:
    limits = FetchLimits(max_bytes=200_000, policy=AddressPolicy.from_allowlist("localhost"))

    path = download_to_file(f"http://localhost:{httpd.server_port}/echo-host", dest, limits)

    assert path.read_bytes() == f"localhost:{httpd.server_port}".encode()


def test_redirect_to_a_refused_address_is_not_followed(httpd: RecordingServer, dest: Path, hits: list[str]) -> None:
    limits = FetchLimits(max_bytes=200_000, policy=AddressPolicy.from_allowlist("localhost"))

    with pytest.raises(RefusedAddress, match="127.0.0.1 is a loopback address"):
        download_to_file(f"http://localhost:{httpd.server_port}/to-ip", dest, limits)
    assert hits == ["/to-ip"]  # the second hop was checked, and refused before connecting
    assert_no_files(dest)


def test_connects_to_the_checked_address_and_keeps_the_host_name(server: str, httpd: RecordingServer, dest: Path):
    # A resolver that answers 127.0.0.1 for a made-up name stands in for DNS; the request must
    # reach the address that was checked, and carry the name in its Host header.
    resolved: list[str] = []

    def resolver(host: str, port: int) -> list:
        resolved.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    url = f"http://media.test:{httpd.server_port}/echo-host"
    with pytest.raises(RefusedAddress, match=r"media\.test \(127\.0\.0\.1\) is a loopback address"):
        download_to_file(url, dest, FetchLimits(max_bytes=1000), resolver=resolver)

    path = download_to_file(url, dest, LIMITS, resolver=resolver)

    assert path.read_bytes() == f"media.test:{httpd.server_port}".encode()
    assert resolved == ["media.test", "media.test"]  # once per request, never again to connect


def test_dns_failure_is_an_upstream_error(dest: Path) -> None:
    def resolver(host: str, port: int) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(UpstreamError, match="could not resolve the host name nowhere.test"):
        download_to_file("http://nowhere.test/clip.mp4", dest, LIMITS, resolver=resolver)
    assert_no_files(dest)


def test_slow_dns_hits_the_connect_timeout(dest: Path) -> None:
    def resolver(host: str, port: int) -> list:
        time.sleep(1.0)
        return [ipaddress.ip_address("127.0.0.1")]

    limits = FetchLimits(max_bytes=1000, connect_timeout=0.2, policy=LOOPBACK)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match="looking up the host name"):
        download_to_file("http://slow.test/clip.mp4", dest, limits, resolver=resolver)
    assert time.monotonic() - started < 0.8


# data: URLs are decoded locally, under their own cap.


def test_base64_data_url(dest: Path) -> None:
    url = "data:video/mp4;base64," + base64.b64encode(PAYLOAD).decode()

    assert download_to_file(url, dest, LIMITS).read_bytes() == PAYLOAD


def test_base64_data_url_with_line_breaks_and_any_media_type(dest: Path) -> None:
    encoded = base64.b64encode(b"hello world").decode()
    url = f"DATA:application/octet-stream;BASE64,{encoded[:8]}\n{encoded[8:]}"

    assert download_to_file(url, dest, LIMITS).read_bytes() == b"hello world"


def test_percent_encoded_data_url(dest: Path) -> None:
    assert download_to_file("data:,caf%C3%A9%00", dest, LIMITS).read_bytes() == "café".encode() + b"\0"


@pytest.mark.parametrize("data", [b"x" * 1001, b"x" * 5000])
def test_data_url_over_its_cap_is_too_large(dest: Path, data: bytes) -> None:
    limits = FetchLimits(max_bytes=10**6, max_data_url_bytes=1000)

    with pytest.raises(MediaTooLarge, match="data: URL"):
        download_to_file("data:;base64," + base64.b64encode(data).decode(), dest, limits)
    with pytest.raises(MediaTooLarge, match="data: URL"):
        download_to_file("data:," + data.decode(), dest, limits)
    assert_no_files(dest)


def test_data_url_of_exactly_the_cap_is_accepted(dest: Path) -> None:
    limits = FetchLimits(max_bytes=10**6, max_data_url_bytes=1000)

    path = download_to_file("data:;base64," + base64.b64encode(b"y" * 1000).decode(), dest, limits)

    assert path.stat().st_size == 1000


@pytest.mark.parametrize("url", ["data:image/png;base64", "data:;base64,abc$", "data:;base64,YQ=a"])
def test_malformed_data_urls_are_invalid_sources(dest: Path, url: str) -> None:
    with pytest.raises(InvalidSource, match="data: URL"):
        download_to_file(url, dest, LIMITS)
    assert_no_files(dest)
