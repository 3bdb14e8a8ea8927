"""A served instance for tests, benchmarks and tools: a real ``bentoml serve`` (or ``make demo``)
in its own process group, waited for until /readyz answers, stopped with its whole group after.

:func:`running_service` runs any such command; :func:`served` is ``bentoml serve`` of a checkpoint
on the CPU, with LLAVA_* settings given by name.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class ServiceDidNotStart(RuntimeError):
    """The command ended, or /readyz did not answer 200 in time; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(port: int) -> list[str]:
    """``bentoml serve`` of this repository's service with this interpreter."""
    return [sys.executable, "-m", "bentoml", "serve", "service:LLaVAVideoService", "--port", str(port)]


def own_home(folder: Path) -> dict[str, str]:
    """A BENTOML_HOME of the instance's own under ``folder``: every `bentoml serve` empties its
    home's Prometheus folder at start, so instances sharing one would wipe each other's /metrics."""
    home = folder / "bentoml-home"
    home.mkdir(parents=True, exist_ok=True)
    return {"BENTOML_HOME": str(home)}


def cpu_env(checkpoint: Path | str) -> dict[str, str]:
    """The settings that serve ``checkpoint`` on the CPU in float32, as ``make demo`` does."""
    return {
        "LLAVA_MODEL": str(checkpoint),
        "LLAVA_LOAD_4BIT": "false",
        "LLAVA_DEVICE": "cpu",
        "LLAVA_DTYPE": "float32",
    }


@contextmanager
def running_service(
    command: list[str],
    env: dict[str, str],
    port: int,
    log_path: Path,
    start_seconds: float = 240,
    max_file_bytes: int | None = None,
) -> Iterator[str]:
    """Run ``command`` (a `bentoml serve` or `make demo`) in its own process group, its output in
    ``log_path``, until /readyz answers; yield its base URL; stop the whole group afterwards.
    Raises :class:`ServiceDidNotStart` when it ends or is not ready within ``start_seconds``.
    Unless ``env`` names another BENTOML_HOME than this process's, the instance gets its own.
    ``max_file_bytes``: no file the server writes may grow past it (RLIMIT_FSIZE, SIGXFSZ
    ignored), so that its writes fail as on a full disk."""
    if env.get("BENTOML_HOME") == os.environ.get("BENTOML_HOME"):
        env = env | own_home(log_path.parent / f"serve-{port}")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if max_file_bytes is None else functools.partial(_limit_file_size, max_file_bytes),
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + start_seconds
            while not _ready(base):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise ServiceDidNotStart(f"{' '.join(command)} did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield base
        finally:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
            except ProcessLookupError:  # already gone (a test killed it to see what survives)
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _limit_file_size(limit: int) -> None:
    # In the child before exec: writes past the limit fail with EFBIG (File too large) instead of
    # killing the process; both the ignored signal and the limit pass on to its children.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@contextmanager
def served(checkpoint: Path, log: Path, **settings: str) -> Iterator[str]:
    """`bentoml serve` on ``checkpoint`` (CPU) with LLAVA_<NAME> ``settings`` until the block ends;
    yields its base URL. Room for load tests (32 requests may wait) and a quiet log by default."""
    port = free_port()
    env = os.environ | cpu_env(checkpoint) | {"LLAVA_MAX_PENDING_REQUESTS": "32", "LLAVA_LOG_LEVEL": "WARNING"}
    env |= {f"LLAVA_{name.upper()}": value for name, value in settings.items()}
    with running_service(serve_command(port), env, port, log, start_seconds=300) as base:
        yield base


def kill_tree(port: int, signum: int = signal.SIGKILL) -> None:
    """Send ``signum`` (default SIGKILL, as a machine failing) to the `bentoml serve` on ``port``
    and every process under it: its worker runs in a session of its own, out of reach of the
    group's signal. After SIGKILL, waits until they are gone; SIGSTOP/SIGCONT freeze and thaw."""
    import psutil

    victims = []
    for pid in server_pids(port):
        with contextlib.suppress(psutil.Error):
            victims.append(psutil.Process(pid))
            victims[-1].send_signal(signum)
    if signum == signal.SIGKILL:
        psutil.wait_procs(victims, timeout=30)


def server_pids(port: int) -> set[int]:
    """The pids of the `bentoml serve` on ``port`` and of every process under it."""
    import psutil

    found = set()
    for process in psutil.process_iter(["cmdline"]):
        if process.info["cmdline"] and "serve" in process.info["cmdline"] and str(port) in process.info["cmdline"]:
            with contextlib.suppress(psutil.Error):
                found |= {process.pid, *(child.pid for child in process.children(recursive=True))}
    return found


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
