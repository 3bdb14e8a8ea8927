"""Every route of the service in one table: what it is and how each middleware treats it.

The request guard (body checks), the API key check, the lifecycle gate (503 until the model is
loaded), the request log (quiet routes), the metrics (route label), the failure bodies and the
OpenAPI page all look a path up here with :func:`route_for` instead of keeping lists of their own.
An exact path wins; then the longest prefix (``prefix=True``, e.g. everything under ``/v1/``);
anything else is :data:`OTHER` (BentoML's 404 and 405, answered with the native failure body).

    path                  kind     upload  guard  model  key  quiet  metric label
    /analyze_video        native   video   yes    yes    yes  no     /analyze_video
    /analyze_image        native   image   yes    yes    yes  no     /analyze_image
    /v1/chat/completions  openai   -       yes    yes    yes  no     /v1/chat/completions
    /v1/models            openai   -       no     yes    yes  no     /v1/models
    /v1/files             openai   file    yes    no     yes  no     /v1/files
    /v1/files/...         openai   -       no     no     yes  no     /v1/files/{id}
    /v1/...               openai   -       no     yes    yes  no     other
    /media                media    file    yes    no     yes  no     /media
    /media/...            media    -       no     no     yes  no     /media/{id}
    /jobs/submit          job      video   yes    yes    yes  no     /jobs/submit
    /jobs/{status,get,cancel,ask}  job     no     yes    yes  no     the path
    /jobs/...             job      -       no     yes    yes  no     other
    /livez /readyz /healthz  health        no     no     no   yes    the path
    /metrics              metrics  -       no     no     no   yes    (not counted)
    /docs /docs.json /schema.json /static_content/...  docs  no  no  no  no  other
    / /ui /ui/...         page     -       no     no     no   no     other
    anything else         other    -       no     no     yes  no     other

The docs routes are open: they describe the API and hold no data, a browser opening ``/docs``
cannot send the key, and BentoML's client reads ``/schema.json`` before its first call (without
it, a client without a token fails with "Failed to fetch schema" instead of the route's 401).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    NATIVE = "native"  # /analyze_*: the native failure body
    OPENAI = "openai"  # /v1: OpenAI's error object
    JOB = "job"  # /jobs: the native failure body
    MEDIA = "media"  # /media, the files API's native twin: the native failure body
    PAGE = "page"  # the web page's static files (ui/)
    HEALTH = "health"  # probes
    METRICS = "metrics"  # Prometheus
    DOCS = "docs"  # BentoML's OpenAPI page, its document and assets, BentoML's client schema
    OTHER = "other"  # no route of ours: BentoML answers 404/405


class Shape(enum.Enum):
    """The shape of a route's failure body (http_api.errors)."""

    NATIVE = "native"  # {"response": "", "status": "failed", "error": "..."}
    OPENAI = "openai"  # {"error": {"message", "type", "param", "code"}}


@dataclass(frozen=True)
class Route:
    """One path (or, with ``prefix``, every path starting with it) and how it is handled."""

    path: str
    kind: Kind
    prefix: bool = False
    # The multipart part that is the upload, the JSON field of its URL, and every part or field
    # the route takes (for messages naming them).
    upload: str | None = None
    url_field: str | None = None
    fields: tuple[str, ...] = ()
    more_uploads: tuple[str, ...] = ()  # other parts that are files (images beside the video)
    repeatable: tuple[str, ...] = ()  # parts that may come more than once (several images)
    guarded: bool = False  # POST bodies checked by http_api.guard before BentoML parses them
    job_upload: bool = False  # its upload may reach max_job_upload_bytes instead of max_upload_bytes
    needs_model: bool = False  # 503 while the model loads, after it failed, while draining
    needs_key: bool = True  # LLAVA_API_KEY, when set
    quiet: bool = False  # logged at DEBUG (probed every few seconds)
    metric: str | None = "other"  # llava_requests_total's route label; None: not counted

    @property
    def shape(self) -> Shape | None:
        """The failure body of this route's errors; None where answers are passed on as they are."""
        if self.kind is Kind.OPENAI:
            return Shape.OPENAI
        if self.kind in (Kind.NATIVE, Kind.JOB, Kind.MEDIA, Kind.OTHER):
            return Shape.NATIVE
        return None

    @property
    def uploads(self) -> tuple[str, ...]:
        """Every part of this route that is a file."""
        return (self.upload, *self.more_uploads) if self.upload else ()

    def describe_fields(self) -> str:
        """The parts this route takes, as a message says them."""
        names = [f"'{name}' (a file)" if name in self.uploads else f"'{name}'" for name in self.fields]
        return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else "".join(names)


def _native(path: str, kind: str) -> Route:
    # Several images may come (repeated 'image' parts, or a list of 'image_url's), beside the
    # video on /analyze_video.
    images = ("image", "image_url") if kind == "video" else ()
    return Route(
        path,
        Kind.NATIVE,
        upload=kind,
        url_field=f"{kind}_url",
        fields=(kind, f"{kind}_url", *images, "metadata", "media_id"),
        more_uploads=("image",) if kind == "video" else (),
        repeatable=("image",),
        guarded=True,
        needs_model=True,
        metric=path,
    )


def _job(path: str, **options: object) -> Route:
    return Route(path, Kind.JOB, needs_model=True, metric=path, **options)  # type: ignore[arg-type]


def _files(path: str, kind: Kind) -> tuple[Route, Route]:
    """The media store's upload (a large video may be kept for a job) and its files by id."""
    upload = Route(path, kind, upload="file", fields=("file", "purpose"), guarded=True, job_upload=True, metric=path)
    return upload, Route(f"{path}/", kind, prefix=True, metric=f"{path}/{{id}}")


def _open(path: str, kind: Kind, prefix: bool = False, quiet: bool = False, metric: str | None = "other") -> Route:
    return Route(path, kind, prefix=prefix, needs_key=False, quiet=quiet, metric=metric)


ROUTES: tuple[Route, ...] = (
    _native("/analyze_video", "video"),
    _native("/analyze_image", "image"),
    Route("/v1/chat/completions", Kind.OPENAI, guarded=True, needs_model=True, metric="/v1/chat/completions"),
    Route("/v1/models", Kind.OPENAI, needs_model=True, metric="/v1/models"),
    # The media store needs no model: files may be uploaded while it loads.
    *_files("/v1/files", Kind.OPENAI),
    Route("/v1/", Kind.OPENAI, prefix=True, needs_model=True),
    _job(
        "/jobs/submit",
        upload="video",
        url_field="video_url",
        fields=("video", "video_url", "file_id", "metadata"),
        guarded=True,
        job_upload=True,
    ),
    *_files("/media", Kind.MEDIA),
    _job("/jobs/status"),
    _job("/jobs/get"),
    _job("/jobs/cancel"),
    _job("/jobs/ask"),
    Route("/jobs/", Kind.JOB, prefix=True, needs_model=True),
    # Probes and scrapers must not need the key (Kubernetes probes and Prometheus carry none).
    _open("/livez", Kind.HEALTH, quiet=True, metric="/livez"),
    _open("/readyz", Kind.HEALTH, quiet=True, metric="/readyz"),
    _open("/healthz", Kind.HEALTH, quiet=True, metric="/healthz"),
    _open("/metrics", Kind.METRICS, quiet=True, metric=None),
    _open("/docs", Kind.DOCS),
    _open("/docs.json", Kind.DOCS),
    _open("/schema.json", Kind.DOCS),
    _open("/static_content/", Kind.DOCS, prefix=True),
    # The page holds no data and a browser cannot add a header when it opens a URL; the page
    # sends the key with each API call.
    _open("/", Kind.PAGE),
    _open("/ui", Kind.PAGE),
    _open("/ui/", Kind.PAGE, prefix=True),
)
OTHER = Route("", Kind.OTHER)
# The multipart parts of any route that must be files (a text part there is a URL BentoML would fetch).
UPLOAD_FIELDS = frozenset(name for route in ROUTES for name in route.uploads)

_EXACT = {route.path: route for route in ROUTES if not route.prefix}
_PREFIXES = sorted((route for route in ROUTES if route.prefix), key=lambda route: -len(route.path))


def route_for(path: str) -> Route:
    """The route a request to ``path`` takes."""
    exact = _EXACT.get(path)
    if exact is not None:
        return exact
    return next((route for route in _PREFIXES if path.startswith(route.path)), OTHER)


def routes_of(kind: Kind) -> tuple[Route, ...]:
    return tuple(route for route in ROUTES if route.kind is kind)
