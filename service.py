"""LLaVA-Video as a BentoML service: ask questions about videos and images over HTTP.

    bentoml serve service:LLaVAVideoService

The only module that imports bentoml: the service class, its endpoints and what is mounted on
it. The HTTP concerns live in http_api (failure bodies and statuses, the request guard,
admission, the OpenAI routes, the web page's routes), the model side in llava_custom, media in
media. Endpoints parse the request, hand plain values to http_api.analysis.Analyzer, and map every
failure to ``{"response": "", "status": "failed", "error": ...}`` with a fitting HTTP status. Before BentoML
parses a request, http_api.guard.RequestGuard checks its size and form and whether the worker is
busy; media decoding runs in child processes under a time limit (media.DecodePool), several
requests at once.

Endpoints are coroutines: blocking work (downloads, decoding, input preparation) runs in worker
threads and the answer is awaited from the engine's stream, so every request in flight can be in
the engine's batch at once, and a client that disconnects is noticed and its request cancelled.
Media is identified by a hash of its bytes: media seen before is not decoded again (the engine
keeps its features and prompt KV cache, llava_custom/reuse.py).

Start-up and shutdown (startup.py, http_api/lifecycle.py): `bentoml serve` checks the settings and
the checkpoint in its main process before any worker starts (``preflight``) and exits with one
line when something is wrong; a worker loads the model in the background, so /livez answers at
once and /readyz only once a warm-up generation succeeded; SIGTERM lets the requests in flight
finish (up to LLAVA_SHUTDOWN_GRACE_SECONDS) while new ones get 503. Every request is logged as one
line under a request id (http_api/request_log.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import bentoml
from anyio import to_thread
from starlette.responses import Response

import media
import settings
import startup
from http_api import request_log
from http_api.analysis import Analyzer, Kind, Started, until_answered
from http_api.auth import ApiKeyAuth
from http_api.errors import CLIENT_ERRORS, FailureBodyMiddleware, RequestError, error_headers, status_for
from http_api.guard import RequestGuard
from http_api.jobs_api import create_app as create_jobs_app
from http_api.lifecycle import Lifecycle, LifecycleGate, drain_on_sigterm
from http_api.metrics import RequestMetrics, engine_state
from http_api.native import answer_body, event_stream
from http_api.openai_api import create_app
from http_api.openapi import OpenAPIDocs
from http_api.schemas import Failure, Metadata
from http_api.web_ui import PageRoutes
from http_api.web_ui import create_app as create_page_app
from jobs.manager import JobManager

logger = logging.getLogger("llava_video_service")

# This process's phase (loading, ready, failed, draining), shared by the service and the gate in
# front of its routes; a worker process holds one service.
lifecycle = Lifecycle()
# Routes under /v1 (OpenAI's API) and /jobs (long videos); they reach this worker's service once
# it is instantiated.
openai_app = create_app(lambda: bentoml.get_current_service().analyzer)
jobs_app = create_jobs_app(lambda: bentoml.get_current_service().jobs, lambda: bentoml.get_current_service().analyzer)
# The web page's static files (ui/), at /ui; / redirects there (http_api.web_ui).
page_app = create_page_app()


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
@bentoml.asgi_app(openai_app, path="/v1")
@bentoml.asgi_app(jobs_app, path="/jobs")
@bentoml.asgi_app(page_app, path="/ui")
class LLaVAVideoService:
    """Loads the model once per worker and answers /analyze_video, /analyze_image and /v1; the
    web page to try them is at /ui."""

    @bentoml.on_deployment
    def preflight() -> None:
        """In `bentoml serve`'s main process, once, before any worker starts (see startup.py)."""
        startup.check_before_serving()
        startup.stop_server_when_a_worker_fails()

    def __init__(self) -> None:
        self.settings = settings.current()
        s = self.settings
        # BentoML's server logging shows WARNING and up from other loggers; ours say more.
        for name in (logger.name, "llava_custom", "media"):
            logging.getLogger(name).setLevel(s.log_level)
        request_log.install_framework_filter()
        self.decoder = media.DecodePool(s.decode_workers, time_limit=s.decode_timeout)
        self.decoder.start()  # their imports overlap the model's loading
        # The model loads in the background: uvicorn accepts connections only once this returns.
        self.startup = startup.ModelStartup(s, self.decoder, lifecycle)
        self.startup.start()
        drain_on_sigterm(lifecycle, s.shutdown_grace_seconds, self.startup.close)

    @property
    def jobs(self) -> JobManager:
        """The worker's long-video jobs (http_api.jobs_api); they exist once the model is loaded."""
        jobs = self.startup.jobs
        if jobs is None:
            raise RuntimeError("the model is not loaded")
        return jobs

    @property
    def analyzer(self) -> Analyzer:
        """The worker's Analyzer; the gate lets requests through only once it exists."""
        analyzer = self.startup.analyzer
        if analyzer is None:
            raise RuntimeError("the model is not loaded")
        return analyzer

    # Coroutines, so that BentoML answers probes on the event loop instead of a worker thread
    # (those may all be busy downloading and decoding).
    async def __is_alive__(self) -> bool:
        """/livez: 200 from the start, 503 once the model failed to load."""
        return lifecycle.alive

    async def __is_ready__(self) -> bool:
        """/readyz: 200 once the model is loaded and warmed up, 503 before and while draining."""
        return lifecycle.ready

    async def __metrics__(self, content: str) -> str:
        """BentoML's /metrics text plus the engine's state now (http_api.metrics), once loaded."""
        analyzer = self.startup.analyzer
        return content + (engine_state(analyzer.engine) if analyzer is not None else "")

    @bentoml.on_shutdown
    def close(self) -> None:
        self.startup.close()  # first: running jobs end, recorded as stopped, before their decoder
        self.decoder.close()

    @bentoml.api(route="/analyze_video")
    async def analyze_video(
        self,
        ctx: bentoml.Context,
        video: Path = None,  # BentoML 1.4 needs this form for an optional upload (not Optional[Path])
        video_url: str = None,
        metadata: Any = None,
    ) -> dict[str, Any]:
        """Answer a question about a video: multipart ``video`` upload or JSON ``video_url``."""
        # A streamed answer is a Starlette response, which BentoML sends as it is.
        return await self._respond(ctx, "video", video, video_url, metadata)

    @bentoml.api(route="/analyze_image")
    async def analyze_image(
        self,
        ctx: bentoml.Context,
        image: Path = None,
        image_url: str = None,
        metadata: Any = None,
    ) -> dict[str, Any]:
        """Answer a question about an image: multipart ``image`` upload or JSON ``image_url``."""
        return await self._respond(ctx, "image", image, image_url, metadata)

    async def _respond(
        self, ctx: bentoml.Context, kind: Kind, upload: Path | None, url: str | None, metadata: Any
    ) -> dict[str, Any] | Response:
        """Run one request; every failure becomes the documented error body and status."""
        try:
            try:
                meta = Metadata.parse(metadata)
            except ValueError as error:
                raise RequestError(str(error), "metadata") from error
            # The input file is gone once decoded, before the answer is generated.
            with tempfile.TemporaryDirectory(prefix="llava-request-") as workdir:
                source = await to_thread.run_sync(self.analyzer.source_file, kind, upload, url, Path(workdir))
                started = await self._start(kind, source, meta)
            if meta.stream:
                return event_stream(started)
            answer = await until_answered(started.stream, ctx.request.is_disconnected)
            return answer_body(answer, started).model_dump()
        except CLIENT_ERRORS as error:
            ctx.response.status_code = status_for(error)
            for name, value in error_headers(ctx.response.status_code):
                ctx.response.headers[name.decode()] = value.decode()
            return Failure(error=str(error)).model_dump()
        except Exception as error:  # a bug or a device failure: log it, tell the caller without internals
            request_log.note_failure(error, f"{kind} request failed")
            ctx.response.status_code = 500
            return Failure(error=f"internal error while analysing the {kind}; see the server log").model_dump()

    async def _start(self, kind: Kind, source: Path, meta: Metadata) -> Started:
        generation = self.analyzer.generation_of(meta)
        if kind == "image":
            return await self.analyzer.start_image(source, meta.prompt, generation, meta.return_frames)
        sampling = self.analyzer.video_sampling(meta)
        return await self.analyzer.start_video(source, sampling, meta.prompt, generation, meta.return_frames)


def refuse_unknown_fields(spec: type[bentoml.IODescriptor]) -> type[bentoml.IODescriptor]:
    """The endpoint's input model, refusing fields it does not have (BentoML ignores them): a
    top-level ``prompt`` or form field ``num_frames`` must not be dropped silently. The failure
    body then points to ``metadata`` (http_api.errors.framework_error_message)."""
    return type(spec.__name__, (spec,), {"__module__": __name__, "model_config": {"extra": "forbid"}})


for _api in LLaVAVideoService.apis.values():
    _api.input_spec = refuse_unknown_fields(_api.input_spec)

# Added first, so it runs outermost of ours: it sees every answer, refusals included. Then count
# every request, then refuse a missing API key before anything else looks at the request.
LLaVAVideoService.add_asgi_middleware(request_log.RequestLog)
LLaVAVideoService.add_asgi_middleware(RequestMetrics)
LLaVAVideoService.add_asgi_middleware(ApiKeyAuth, key=lambda: settings.current().api_key_value)
# Inside the key check: / (open) redirects to the page, /docs (keyed, as / was) shows BentoML's page.
LLaVAVideoService.add_asgi_middleware(PageRoutes)
LLaVAVideoService.add_asgi_middleware(OpenAPIDocs)
LLaVAVideoService.add_asgi_middleware(FailureBodyMiddleware)
# Added after it, so these run inside FailureBodyMiddleware (their answers already have our body);
# the gate first, so that a loading or draining worker refuses before the guard reads the body.
LLaVAVideoService.add_asgi_middleware(LifecycleGate, lifecycle=lifecycle)
LLaVAVideoService.add_asgi_middleware(RequestGuard, limits=lambda: settings.current().guard_limits())
