"""A real ``redis-server`` for tests and benchmarks: on a free loopback port, nothing saved to
disk unless asked (``--save '' --appendonly no``; ``appendonly=True`` keeps an append-only file
in its folder, read again by the next start), stoppable and restartable on the same port (to test
what a Redis outage or restart does to the service)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from testing.served import free_port


class RedisServer:
    """One redis-server process; :meth:`start` waits until it answers PING."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, start_seconds: float = 20, appendonly: bool = False) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is missing: apt-get install redis-server (make test installs it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "yes" if appendonly else "no"]
        command += ["--dir", str(self.folder)]
        log = (self.folder / "redis.log").open("a")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + start_seconds
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError as error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.folder / "redis.log").read_text()[-2000:]
                    raise RuntimeError(f"redis-server did not start: {log}") from error
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)
