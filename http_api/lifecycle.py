"""The worker's life: loading, ready, failed, draining; what the routes answer in each phase.

:class:`Lifecycle` holds the phase (the model loads in a background thread, see startup.py) and
counts the requests in flight. :class:`LifecycleGate`, an ASGI middleware in front of the routes
that need the model (http_api.routes), answers 503 while the model loads, after it failed to
load, and while the worker drains; health routes, the OpenAPI page and metrics always pass.

:func:`drain_on_sigterm` makes SIGTERM graceful. Left to itself uvicorn stops accepting at once,
but under `bentoml serve` the listening socket belongs to the circus arbiter, so connections made
meanwhile wait unanswered until the server has exited and are then reset. Instead the worker keeps
accepting and answers new requests 503 (``Connection: close``, /readyz 503 too, so a load balancer
moves on), lets the requests in flight finish for up to the grace period, stops the engine if some
are still generating (they end with 503), and only then hands the signal to uvicorn, whose
shutdown runs the service's on_shutdown hook (engine, decode children).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import signal
import threading
from collections.abc import Awaitable, Callable

from http_api.errors import Receive, Scope, Send, reply_for
from http_api.routes import route_for

logger = logging.getLogger("llava_video_service")
# After the grace period the engine is stopped; requests then end within this many seconds.
STOPPED_REQUESTS_WAIT = 10.0


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


class Lifecycle:
    """One worker's phase and its requests in flight (counted on the event loop only)."""

    def __init__(self) -> None:
        self.phase = Phase.LOADING
        self.failure = ""
        self.in_flight = 0
        self._idle: asyncio.Event | None = None

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def alive(self) -> bool:
        """False once the model failed to load: the process is of no use and should be replaced."""
        return self.phase is not Phase.FAILED

    def set_ready(self) -> None:
        """Called by the loading thread; a drain that began meanwhile is not undone."""
        if self.phase is Phase.LOADING:
            self.phase = Phase.READY

    def set_failed(self, message: str) -> None:
        self.failure = message
        self.phase = Phase.FAILED

    def begin_drain(self) -> None:
        if self.phase is not Phase.FAILED:
            self.phase = Phase.DRAINING

    def refusal(self) -> str | None:
        """Why a model route is refused now, or None when it may run."""
        if self.phase is Phase.LOADING:
            return "the model is still loading; retry in a few seconds"
        if self.phase is Phase.FAILED:
            return "the model could not be loaded; the server log says why"
        if self.phase is Phase.DRAINING:
            return "the service is shutting down; retry in a few seconds"
        return None

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight, at most ``timeout`` seconds; True if none is."""
        if self.in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:  # not the built-in TimeoutError before Python 3.11
            return self.in_flight == 0
        finally:
            self._idle = None
        return True


class LifecycleGate:
    """ASGI middleware: model routes pass only while the worker is ready; counts them in flight."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not route_for(path).needs_model:
            await self.app(scope, receive, send)
            return
        reason = self.lifecycle.refusal()
        if reason is not None:
            # The body is not read; and a draining worker wants no reuse of the connection.
            await reply_for(path, 503, reason).send(send, [(b"connection", b"close")])
            return
        self.lifecycle.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.leave()


def drain_on_sigterm(lifecycle: Lifecycle, grace: float, stop_generation: Callable[[], None]) -> bool:
    """Take over SIGTERM in this worker (see the module docstring); False when it cannot be done
    here (not the main thread, e.g. the app served in-process by a test client).

    Call it from the running event loop after uvicorn installed its handlers (the service's
    ``__init__`` runs in uvicorn's lifespan start-up): uvicorn's handler is the one handed over to.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    loop = asyncio.get_running_loop()
    handed_over = signal.getsignal(signal.SIGTERM)
    draining = threading.Event()

    def on_sigterm(signum: int, frame: object) -> None:
        if draining.is_set():
            return  # circus and a process-group kill may both send one
        draining.set()
        loop.call_soon_threadsafe(lambda: loop.create_task(drain(), name="llava-drain"))

    async def drain() -> None:
        lifecycle.begin_drain()
        logger.info("SIGTERM: refusing new requests, %d in flight get up to %g s", lifecycle.in_flight, grace)
        if not await lifecycle.wait_idle(grace):
            logger.warning(
                "grace period over: stopping the generation of the %d requests still in flight (503)",
                lifecycle.in_flight,
            )
            await asyncio.to_thread(stop_generation)
            await lifecycle.wait_idle(STOPPED_REQUESTS_WAIT)
        logger.info("drained; shutting down")
        if callable(handed_over):
            handed_over(signal.SIGTERM, None)
        else:  # nobody had installed a handler: the default action ends the process
            signal.signal(signal.SIGTERM, handed_over)
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    return True
