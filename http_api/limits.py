"""The request guard's limits (http_api.guard enforces them; settings.py builds them).

Imports nothing from the rest of the HTTP side but the route table (plain data), so that reading
the settings does not import the jobs or the engine; http_api.guard re-exports :class:`GuardLimits`.
"""

from __future__ import annotations

from dataclasses import dataclass

from http_api.routes import UPLOAD_FIELDS


@dataclass(frozen=True)
class GuardLimits:
    """The caps the guard enforces; ``file_fields`` are the form fields that must be files."""

    max_upload_bytes: int
    max_json_bytes: int
    max_in_flight: int
    file_fields: frozenset[str] = UPLOAD_FIELDS
    max_job_upload_bytes: int | None = None  # None: jobs have the same cap as requests
    # Slow clients (seconds; None: no bound): the whole body, the wait for each piece of it, and
    # each piece of the answer the client does not take (a stream nobody reads).
    body_timeout: float | None = None
    body_idle_timeout: float | None = None
    send_timeout: float | None = None


@dataclass(frozen=True)
class RequestDefaults:
    """What a request gets for the decoding fields it leaves out, and the most it may ask for:
    built once from the settings and handed to every route (http_api.schemas applies them)."""

    max_new_tokens: int  # LLAVA_MAX_NEW_TOKENS
    max_new_tokens_limit: int  # LLAVA_MAX_NEW_TOKENS_LIMIT
    num_frames: int  # LLAVA_NUM_FRAMES
    max_frames: int  # LLAVA_MAX_FRAMES
    max_images: int = 8  # LLAVA_MAX_IMAGES_PER_REQUEST
    max_videos: int = 2  # LLAVA_MAX_VIDEOS_PER_REQUEST
