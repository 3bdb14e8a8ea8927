"""download_to_file against a real threaded HTTP server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from media import (
    FetchLimits,
    InvalidSource,
    MediaTooLarge,
    UpstreamError,
    UpstreamTimeout,
    download_to_file,
)

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes
LIMITS = FetchLimits(max_bytes=200_000, connect_timeout=1.0, read_timeout=1.0, total_timeout=5.0, max_redirects=3)


class Handler(BaseHTTPRequestHandler):
    """Routes: each path segment after the first is an argument."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
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


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


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
    limits = FetchLimits(max_bytes=200_000, read_timeout=1.0, total_timeout=0.5)
    started = time.monotonic()

    with pytest.raises(UpstreamTimeout):
        download_to_file(f"{server}/drip", dest, limits)

    assert time.monotonic() - started < 1.5
    assert_no_files(dest)


def test_stalled_read_hits_the_read_timeout(server: str, dest: Path) -> None:
    limits = FetchLimits(max_bytes=200_000, read_timeout=0.3, total_timeout=5.0)

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
