"""The service's own Prometheus metrics, next to BentoML's on ``/metrics``.

Two kinds, both through prometheus_client (no hand-written exposition):

- counters and histograms of what requests did (requests by route and status, durations of
  queueing, decoding, vision encoding, prefill and generation, frames, tokens), recorded as
  requests finish. They live in prometheus_client's default registry, which BentoML's worker
  puts into multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) and serves on ``/metrics``. That
  directory is set after service.py is imported, so prometheus_client is imported here only when
  the first metric is made (in the worker), never at import time;
- the engine's state at scrape time (requests running and waiting, the reuse caches' counts and
  bytes, GPU memory in use) and the media store's size, read by a collector when ``/metrics`` is scraped and appended to
  BentoML's text (the service's ``__metrics__`` hook).

Requests waiting (``llava_requests_waiting``) is what an autoscaler should follow
(deploy/kubernetes).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from http_api.errors import Message, Receive, Scope, Send
from http_api.routes import route_for

if TYPE_CHECKING:
    from llava_custom.engine import Answer, Engine
    from media import MediaStore

# Seconds: from a cached image's few milliseconds to a long video's minutes.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """The counters and histograms; make one per worker (after BentoML's worker set-up)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        def seconds(name: str, text: str, labels: tuple[str, ...] = ()) -> Any:
            return Histogram(name, text, labels, buckets=DURATION_BUCKETS)

        self.requests = Counter("llava_requests", "HTTP requests answered, by route and status", ("route", "status"))
        self.request_seconds = seconds("llava_request_duration_seconds", "Whole HTTP requests", ("route",))
        self.decode_seconds = seconds("llava_decode_seconds", "Decoding a video or image", ("kind",))
        self.queue_seconds = seconds("llava_queue_wait_seconds", "Waiting for a row of the batch")
        self.vision_seconds = seconds("llava_vision_encode_seconds", "Vision tower and projector")
        self.prefill_seconds = seconds("llava_prefill_seconds", "Prompt prefill to the first token")
        self.generate_seconds = seconds("llava_generate_seconds", "First token to the last")
        self.frames = Counter("llava_frames_decoded", "Video frames decoded")
        self.visual_tokens = Counter("llava_visual_tokens", "Visual tokens in prompts")
        self.prompt_tokens = Counter("llava_prompt_tokens", "Prompt tokens")
        self.generated_tokens = Counter("llava_generated_tokens", "Generated tokens")

    def decoded(self, kind: str, seconds: float, frames: int = 0) -> None:
        self.decode_seconds.labels(kind).observe(seconds)
        self.frames.inc(frames)

    def answered(self, answer: Answer) -> None:
        self.prompt_tokens.inc(answer.prompt_tokens)
        self.visual_tokens.inc(answer.visual_tokens)
        self.generated_tokens.inc(answer.completion_tokens)
        if answer.timings is not None:
            self.queue_seconds.observe(answer.timings.queued)
            if answer.timings.vision:
                self.vision_seconds.observe(answer.timings.vision)
            self.prefill_seconds.observe(answer.timings.prefill)
            self.generate_seconds.observe(answer.timings.generate)

    def responded(self, path: str, status: int, seconds: float) -> None:
        # The route table's label: anything but our routes is "other", so that scanners cannot
        # blow up the number of time series.
        route = route_label(path)
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)


@functools.cache
def process_metrics() -> Metrics:
    """This process's metrics, made on first use (a metric name may be registered only once)."""
    return Metrics()


class RequestMetrics:
    """ASGI middleware counting every HTTP request by route and status, with its duration (for
    a streamed answer, until its last byte)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_for(scope["path"]).metric is None:
            await self.app(scope, receive, send)
            return
        metrics = process_metrics()
        began = time.monotonic()
        status = 500  # if the app fails before answering

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            metrics.responded(scope["path"], status, time.monotonic() - began)


def route_label(path: str) -> str:
    """The label a request to ``path`` is counted under: its route in the route table
    (``/v1/files/{id}``, never the id itself), ``other`` for paths that are none of ours."""
    return route_for(path).metric or path  # None: /metrics, which BentoML does not count


def labelled_by_route(traffic_metrics: type) -> type:
    """BentoML's traffic metrics middleware, counting each request under its route's label.

    BentoML labels ``bentoml_service_request_total``, its duration histogram and in-progress
    gauge with the raw request path, so every stored file's id (``GET``/``DELETE
    /v1/files/file-...``, ``/media/file-...``) and every path a scanner tries became time series
    of their own, kept for good: the soak benchmark's /metrics grew by 20 series a request kind
    cycle (8,100 lines about ids after 8 minutes, 2 MB a scrape). The same metrics, labelled by
    :func:`route_label`; the app underneath still gets the request's own scope.
    """

    class ByRoute(traffic_metrics):  # type: ignore[misc, valid-type]
        def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
            async def unlabelled(scope: Scope, receive: Receive, send: Send) -> None:
                await app(scope["llava.scope"], receive, send)

            super().__init__(unlabelled, *args, **kwargs)
            self.inner = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] not in ("http", "websocket"):
                await self.inner(scope, receive, send)
                return
            labelled = {**scope, "path": route_label(scope["path"]), "llava.scope": scope}
            await super().__call__(labelled, receive, send)

    ByRoute.__name__ = ByRoute.__qualname__ = traffic_metrics.__name__
    return ByRoute


def engine_state(engine: Engine) -> str:
    """The engine's state now, in Prometheus' text format."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(engine))
    return generate_latest(registry).decode()


def media_store_state(store: MediaStore) -> str:
    """The media store's size now, in Prometheus' text format."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    held, count = store.stats()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        _Fixed(
            GaugeMetricFamily("llava_media_store_bytes", "Bytes of media the store holds (each content once)", held),
            GaugeMetricFamily("llava_media_store_files", "Files (ids) the media store holds", count),
        )
    )
    return generate_latest(registry).decode()


class _Fixed:
    """A collector of families read already."""

    def __init__(self, *families: Any) -> None:
        self.families = families

    def collect(self) -> Iterator[Any]:
        yield from self.families


class _EngineCollector:
    """Reads the engine when scraped: its queue, its batch, its caches, its GPU memory."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        scheduler = self.engine.scheduler
        yield GaugeMetricFamily("llava_requests_running", "Requests prefilling or generating", scheduler.running)
        yield GaugeMetricFamily("llava_requests_waiting", "Requests queued for a row of the batch", scheduler.waiting)
        caches = {"features": self.engine.reuse.features.stats(), "prefix": self.engine.reuse.prefixes.stats()}
        for name, text, attribute in (
            ("llava_cache_hits", "Reuse cache hits", "hits"),
            ("llava_cache_misses", "Reuse cache misses", "misses"),
            ("llava_cache_evictions", "Reuse cache evictions", "evictions"),
        ):
            family = CounterMetricFamily(name, text, labels=["cache"])
            for cache, stats in caches.items():
                family.add_metric([cache], getattr(stats, attribute))
            yield family
        held = GaugeMetricFamily("llava_cache_bytes", "Bytes held by a reuse cache", labels=["cache"])
        for cache, stats in caches.items():
            held.add_metric([cache], stats.bytes)
        yield held
        device = self.engine.loaded.device
        if device.type == "cuda":
            import torch

            yield GaugeMetricFamily(
                "llava_gpu_memory_bytes", "GPU memory allocated by PyTorch", torch.cuda.memory_allocated(device)
            )
            yield GaugeMetricFamily(
                "llava_gpu_memory_reserved_bytes", "GPU memory reserved by PyTorch", torch.cuda.memory_reserved(device)
            )
