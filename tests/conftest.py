"""Session fixtures: a tiny checkpoint, real media files, the app in-process and a file server.

Everything here is built for real once per session (checkpoint written by testing.tiny,
videos encoded with PyAV, images with Pillow) so tests exercise the production code paths.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Offline, with a Hugging Face cache of the tests' own, set before huggingface_hub is imported
# (it reads these once): the original-layout checkpoint names its vision tower by hub id, as the
# published one does, and testing.tiny puts that tower into this cache.
HUB_CACHE = tempfile.mkdtemp(prefix="llava-tests-hub-")
atexit.register(shutil.rmtree, HUB_CACHE, ignore_errors=True)
os.environ["HF_HUB_CACHE"] = HUB_CACHE
os.environ["HF_HUB_OFFLINE"] = "1"
# Job records of every service the tests start, in-process or served, unless a test says otherwise.
JOB_DIR = tempfile.mkdtemp(prefix="llava-tests-jobs-")
atexit.register(shutil.rmtree, JOB_DIR, ignore_errors=True)
os.environ["LLAVA_JOB_DIR"] = JOB_DIR
# And the media store (LLAVA_MEDIA_DIR), shared the same way.
MEDIA_DIR = tempfile.mkdtemp(prefix="llava-tests-media-")
atexit.register(shutil.rmtree, MEDIA_DIR, ignore_errors=True)
os.environ["LLAVA_MEDIA_DIR"] = MEDIA_DIR

import pytest  # noqa: E402

from testing import served as served_instance  # noqa: E402
from testing.mediafiles import write_image, write_video  # noqa: E402
from testing.served import cpu_env, free_port  # noqa: E402
from testing.tiny import write_tiny_checkpoint  # noqa: E402

# Short answers keep the suite fast; a test that needs the default asks explicitly.
TEST_MAX_NEW_TOKENS = 6
# Small enough that a test can fill the service: 4 generating together + 2 waiting.
TEST_MAX_BATCH_SIZE = 4
TEST_MAX_PENDING_REQUESTS = 2
# The key of the `keyed` instance.
TEST_API_KEY = "test-key-3f9a1c"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny LLaVA-Video in the transformers (llava-hf) layout."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny-llava-video")


@pytest.fixture(scope="session")
def tiny_original_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights in the original LLaVA-NeXT layout of lmms-lab/LLaVA-Video-7B-Qwen2."""
    folder = tmp_path_factory.mktemp("checkpoints") / "tiny-llava-video-original"
    return write_tiny_checkpoint(folder, layout="original")


@pytest.fixture(scope="session")
def loaded(tiny_checkpoint: Path):
    """The tiny checkpoint loaded as the service loads it (CPU, float32), shared by engine tests."""
    from llava_custom.builder import load_pretrained_model

    return load_pretrained_model(str(tiny_checkpoint), load_4bit=False, device="cpu")


@contextlib.contextmanager
def engine_with(loaded, **limits) -> Iterator:
    """An engine on ``loaded`` with these EngineLimits, closed afterwards."""
    from llava_custom.engine import Engine, EngineLimits

    engine = Engine(loaded, EngineLimits(**limits))
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clip.mp4: 30 frames at 10 fps (3.0 s); clip.webm: 24 frames at 8 fps; images; junk."""
    folder = tmp_path_factory.mktemp("media")
    write_video(folder / "clip.mp4", frames=30, fps=10, size=(96, 72))
    write_video(folder / "clip.webm", frames=24, fps=8, size=(96, 72))
    write_image(folder / "photo.jpg", size=(160, 120), mode="RGB", fmt="JPEG")
    write_image(folder / "wide.png", size=(300, 100), mode="RGBA", fmt="PNG")
    (folder / "notes.txt").write_text("this is not a video\n" * 20)
    data = (folder / "clip.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])
    return folder


def service_env(checkpoint: Path) -> dict[str, str]:
    """Environment that serves the tiny checkpoint on CPU through the production code."""
    return cpu_env(checkpoint) | {
        "LLAVA_MAX_NEW_TOKENS": str(TEST_MAX_NEW_TOKENS),
        "LLAVA_CONNECT_TIMEOUT": "2",
        "LLAVA_READ_TIMEOUT": "2",
        "LLAVA_DOWNLOAD_TIMEOUT": "10",
        # The tests' file servers listen on 127.0.0.1, which the service refuses by default.
        "LLAVA_URL_ALLOWLIST": "127.0.0.1",
        "LLAVA_MAX_BATCH_SIZE": str(TEST_MAX_BATCH_SIZE),
        "LLAVA_MAX_PENDING_REQUESTS": str(TEST_MAX_PENDING_REQUESTS),
        "LLAVA_DECODE_TIMEOUT": "30",
        # Small caps, so that tests can pass them cheaply (the test media are a few KB).
        "LLAVA_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
        "LLAVA_MAX_DATA_URL_BYTES": str(256 * 1024),
    }


@pytest.fixture(scope="session")
def client(tiny_checkpoint: Path) -> Iterator:
    """The BentoML app in-process (its ASGI app, lifespan included) behind Starlette's TestClient."""
    from starlette.testclient import TestClient

    with pytest.MonkeyPatch.context() as patch:
        for name, value in service_env(tiny_checkpoint).items():
            patch.setenv(name, value)
        from service import LLaVAVideoService

        with TestClient(LLaVAVideoService.to_asgi(), raise_server_exceptions=False) as test_client:
            # The model loads in the background; /readyz says when it is there.
            deadline = time.monotonic() + 240
            while test_client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the in-process service did not become ready"
                time.sleep(0.2)
            yield test_client


@pytest.fixture(scope="session")
def served_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the served instance keeps its checkpoint and its log (serve.log)."""
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="session")
def served(served_folder: Path) -> Iterator[str]:
    """`make demo PORT=...` in its own process group, using this interpreter's environment."""
    port = free_port()
    folder = served_folder
    command = ["make", "demo", f"PORT={port}", f"DEMO_MODEL={folder / 'tiny'}", f"VENV={sys.prefix}"]
    # make passes the environment through: the README's URL examples are served from 127.0.0.1.
    # The demo's own batch and queue sizes, whatever the in-process tests set in this environment.
    env = os.environ | {
        "LLAVA_MAX_NEW_TOKENS": str(TEST_MAX_NEW_TOKENS),
        "LLAVA_URL_ALLOWLIST": "127.0.0.1",
        "LLAVA_MAX_BATCH_SIZE": "8",
        "LLAVA_MAX_PENDING_REQUESTS": "8",
    }
    with running_service(command, env, port, folder / "serve.log") as base:
        yield base


@pytest.fixture(scope="session")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another `make demo`, with LLAVA_API_KEY=TEST_API_KEY (the auth tests and the web page's)."""
    folder = tmp_path_factory.mktemp("keyed")
    port = free_port()
    command = ["make", "demo", f"PORT={port}", f"DEMO_MODEL={folder / 'tiny'}", f"VENV={sys.prefix}"]
    env = os.environ | {
        "LLAVA_API_KEY": TEST_API_KEY,
        "LLAVA_MAX_NEW_TOKENS": str(TEST_MAX_NEW_TOKENS),
        "LLAVA_URL_ALLOWLIST": "127.0.0.1",
    }
    with running_service(command, env, port, folder / "serve.log") as base:
        yield base


@pytest.fixture(scope="session")
def file_server(media_dir: Path) -> Iterator[str]:
    """A static HTTP server on 127.0.0.1 serving ``media_dir``; yields its base URL."""
    handler = functools.partial(QuietFileHandler, directory=str(media_dir))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


class QuietFileHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def request_temp_dirs() -> set[str]:
    """Per-request work directories the service creates under the system temp dir."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return {p.name for p in tmp.glob("llava-request-*")}


@contextlib.contextmanager
def running_service(command: list[str], env: dict[str, str], port: int, log_path: Path) -> Iterator[str]:
    """testing.served.running_service, where a service that does not start fails the test."""
    try:
        with served_instance.running_service(command, env, port, log_path) as base:
            yield base
    except served_instance.ServiceDidNotStart as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One real redis-server for the session (testing.redis_server); tests that stop it start it again."""
    from testing.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
