"""LLaVA-Video as a BentoML service: ask questions about videos and images over HTTP.

    bentoml serve service:LLaVAVideoService

The only module that imports bentoml, and it only wires: the engine (started by startup.py in
the background, so /livez answers at once and /readyz once the model is warmed up), the routes
(the native endpoints' bodies are http_api.native, /v1, /jobs and /ui are apps of http_api), the
middlewares in front of them (http_api.stack, reading the route table http_api.routes), start-up
checks and shutdown (startup.py, http_api.lifecycle: SIGTERM lets requests in flight finish).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import bentoml
from bentoml._internal.server.http import instruments as bentoml_instruments
from bentoml._internal.server.http import traffic as bentoml_traffic

import media
import settings
import startup
from http_api import native
from http_api.files_api import create_app as create_files_app
from http_api.jobs_api import create_app as create_jobs_app
from http_api.lifecycle import Lifecycle, drain_on_sigterm
from http_api.metrics import engine_state, labelled_by_route, media_store_state
from http_api.openai_api import create_app as create_openai_app
from http_api.response_timeout import ResponseTimeout
from http_api.stack import middlewares
from http_api.web_ui import create_app as create_page_app

# This process's phase (loading, ready, failed, draining), shared by the service and the gate in
# front of its routes; a worker process holds one service.
lifecycle = Lifecycle()


def _loaded(part: str) -> Callable[[], Any]:
    """This worker's ``part`` of the loaded model (its Analyzer or its jobs); the lifecycle gate
    lets requests through only once it exists."""

    def current() -> Any:
        value = getattr(bentoml.get_current_service().startup, part)
        if value is None:
            raise RuntimeError("the model is not loaded")
        return value

    return current


current_analyzer, current_jobs = _loaded("analyzer"), _loaded("jobs")


def current_library() -> media.MediaLibrary:
    """This worker's media store (made before the model loads: uploads need no model)."""
    return bentoml.get_current_service().library


@bentoml.service(
    name="llava_video_service",
    traffic={"timeout": 900},
    # One GPU with at least 12 GB (an L4's 24 GB is BentoCloud's hint); CPU and memory for the
    # decode workers and host caches, sized in deploy/kubernetes/deployment.yaml.
    resources={"gpu": 1, "gpu_type": "nvidia-l4", "cpu": "6", "memory": "16Gi"},
    # http_api.request_log writes one line per request, with the X-Request-ID; BentoML's access
    # log would be a second one.
    logging={"access": {"enabled": False}},
)
@bentoml.asgi_app(create_openai_app(current_analyzer, current_library), path="/v1")
@bentoml.asgi_app(create_files_app(current_library), path="/media")
@bentoml.asgi_app(create_jobs_app(current_jobs, current_analyzer), path="/jobs")
@bentoml.asgi_app(create_page_app(), path="/ui")
class LLaVAVideoService:
    """Loads the model once per worker and answers /analyze_video, /analyze_image, /v1 and /jobs;
    the web page to try them is at /ui."""

    @bentoml.on_deployment
    def preflight() -> None:
        """In `bentoml serve`'s main process, once, before any worker starts (see startup.py)."""
        startup.check_before_serving()
        startup.stop_server_when_a_worker_fails()

    def __init__(self) -> None:
        s = settings.current()
        startup.configure_logging(s.log_level)
        self.decoder = media.DecodePool(s.decode_workers, time_limit=s.decode_timeout)
        self.decoder.start()  # their imports overlap the model's loading
        self.library = startup.media_library(s, self.decoder)
        # The model loads in the background: uvicorn accepts connections only once this returns.
        self.startup = startup.ModelStartup(s, self.decoder, lifecycle, self.library)
        self.startup.start()
        drain_on_sigterm(lifecycle, s.shutdown_grace_seconds, self.startup.close)

    # Coroutines, so that BentoML answers probes on the event loop instead of a worker thread.
    async def __is_alive__(self) -> bool:
        return lifecycle.alive  # /livez: 503 once the model failed to load

    async def __is_ready__(self) -> bool:
        return lifecycle.ready  # /readyz: 200 once loaded and warmed up, 503 before and while draining

    async def __metrics__(self, content: str) -> str:
        """BentoML's /metrics text plus the media store's size and, once loaded, the engine's
        state now (http_api.metrics)."""
        analyzer = self.startup.analyzer
        engine = engine_state(analyzer.engine) if analyzer is not None else ""
        return content + media_store_state(self.library.store) + engine

    @bentoml.on_shutdown
    def close(self) -> None:
        self.startup.close()  # first: running jobs end, recorded as stopped, before their decoder
        self.decoder.close()

    # BentoML 1.4 needs `Path = None` for an optional upload (not Optional[Path]); a streamed
    # answer is a Starlette response, which BentoML sends as it is.
    @bentoml.api(route="/analyze_video")
    async def analyze_video(
        self,
        ctx: bentoml.Context,
        video: Path = None,
        video_url: str = None,
        image: list[Path] = None,
        image_url: str | list[str] = None,
        metadata: Any = None,
        media_id: str | list[str] = None,
    ) -> dict[str, Any]:
        """Answer a question about a video (multipart ``video`` upload, JSON ``video_url`` or the
        ``media_id`` of a stored one) and any images beside it (``image`` parts, ``image_url``s or
        more ``media_id``s: a list, the video's first), seen after the video."""
        return await native.analyze(
            current_analyzer, "video", video, video_url, metadata, ctx, image, image_url, media_id
        )

    @bentoml.api(route="/analyze_image")
    async def analyze_image(
        self,
        ctx: bentoml.Context,
        image: list[Path] = None,
        image_url: str | list[str] = None,
        metadata: Any = None,
        media_id: str | list[str] = None,
    ) -> dict[str, Any]:
        """Answer a question about one or several images, in order: multipart ``image`` uploads,
        JSON ``image_url`` (one URL or a list) or ``media_id`` (stored images, one id or a list)."""
        return await native.analyze(current_analyzer, "image", None, None, metadata, ctx, image, image_url, media_id)


# BentoML's own request time limit (traffic.timeout) leaves a timer armed per request, holding
# its context for the whole limit: ours cancels it (http_api.response_timeout). BentoML looks the
# class up by name when a worker builds its app.
bentoml_traffic.TimeoutMiddleware = ResponseTimeout
# BentoML's request metrics are labelled by the raw path, a series per stored file's id kept for
# good: ours label by route (http_api.metrics.labelled_by_route). Looked up by name likewise.
bentoml_instruments.RunnerTrafficMetricsMiddleware = labelled_by_route(
    bentoml_instruments.RunnerTrafficMetricsMiddleware
)

for _api in LLaVAVideoService.apis.values():
    _api.input_spec = native.refuse_unknown_fields(_api.input_spec)
# The key and the guard's limits are read when BentoML builds the app in a worker, after the
# settings were checked.
_stack = middlewares(
    lifecycle,
    api_key=lambda: settings.current().api_key_value,
    guard_limits=lambda: settings.current().guard_limits(),
)
for _middleware, _options in _stack:
    LLaVAVideoService.add_asgi_middleware(_middleware, **_options)
