"""Service settings, read once from ``LLAVA_*`` environment variables (see README, Configuration).

:class:`Settings` also hands out the limit objects the other parts take (the engine's, the
fetcher's, the request guard's); where such an object has a default, the setting's default is
that one, so each default is stated once.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The limit objects live with the behaviour they limit, in modules that import nothing heavy
# (tests/test_imports.py checks that reading the settings imports no torch, and no circle).
from http_api.limits import GuardLimits, RequestDefaults
from jobs.limits import DEFAULT_CLAIM_TIMEOUT_SECONDS, JobLimits, SharedJobSettings, check_redis_url
from llava_custom.limits import DEFAULT_MAX_NEW_TOKENS, EngineLimits
from media.fetch import AddressPolicy, FetchLimits
from media.sizes import format_bytes
from media.store import MediaStore, Records
from media.video import DEFAULT_CHUNK_BYTES, VideoReading

MiB = 1024 * 1024
_ENGINE = EngineLimits()
_FETCH = FetchLimits(max_bytes=1024 * MiB)
_JOBS = JobLimits(max_frames=1)  # its max_frames is LLAVA_MAX_FRAMES; the other defaults are read


class Settings(BaseSettings):
    """Everything an operator can tune; each field is ``LLAVA_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="LLAVA_", extra="ignore")

    model: str = "lmms-lab/LLaVA-Video-7B-Qwen2"
    served_model_name: str = Field(
        "", description="the model's id in the OpenAI API (/v1/models); default: the hub id, or the folder's name"
    )
    api_key: SecretStr | None = Field(
        None, description="when set, every route but health and metrics needs 'Authorization: Bearer <key>'"
    )
    load_4bit: bool = True
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    attn: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"

    num_frames: int = Field(16, ge=1, description="frames sampled when the request does not say")
    max_frames: int = Field(64, ge=1, description="most frames a request may ask for")
    decode_chunk_bytes: int = Field(
        DEFAULT_CHUNK_BYTES,
        ge=MiB,
        description="bytes of full-resolution frames held at once while decoding (at least one frame)",
    )
    max_new_tokens: int = Field(DEFAULT_MAX_NEW_TOKENS, ge=1, description="answer length when the request does not say")
    max_new_tokens_limit: int = Field(4096, ge=1, description="longest answer a request may ask for")
    max_images_per_request: int = Field(8, ge=1, description="most images one request may hold")
    max_videos_per_request: int = Field(2, ge=1, description="most videos one request may hold")

    max_upload_bytes: int = Field(1024 * MiB, ge=1)
    max_download_bytes: int = Field(_FETCH.max_bytes, ge=1)
    max_image_pixels: int = Field(64_000_000, ge=1)
    connect_timeout: float = Field(_FETCH.connect_timeout, gt=0)
    read_timeout: float = Field(_FETCH.read_timeout, gt=0)
    download_timeout: float = Field(_FETCH.total_timeout, gt=0, description="whole download, seconds")
    max_redirects: int = Field(_FETCH.max_redirects, ge=0)
    url_allowlist: str = Field(
        "", description="host names, IPs or CIDRs that URLs may reach although private, loopback, etc."
    )
    max_data_url_bytes: int = Field(_FETCH.max_data_url_bytes, ge=1, description="largest decoded data: URL")
    max_video_pixels: int = Field(7680 * 4320, ge=1, description="largest video frame, width x height")
    decode_timeout: float = Field(120.0, gt=0, description="seconds one video or image may take to decode")
    decode_workers: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1), ge=1, description="decode child processes"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_pending_requests: int = Field(
        _ENGINE.max_waiting, ge=0, description="requests waiting beyond the running batch"
    )
    max_batch_size: int = Field(
        _ENGINE.max_batch_size, ge=1, description="requests generating together (continuous batching)"
    )
    kv_cache_tokens: int = Field(
        _ENGINE.kv_cache_tokens, ge=1, description="the KV cache, in tokens of all requests, allocated at start"
    )
    compile: Literal["auto", "on", "off"] = Field(
        _ENGINE.compile, description="torch.compile the decode step (during warm-up); auto: where it measured faster"
    )
    kv_block_tokens: int = Field(_ENGINE.kv_block_tokens, ge=1, le=4096, description="tokens per block of the KV cache")
    prefill_chunk_tokens: int = Field(
        _ENGINE.prefill_chunk_tokens, ge=16, description="prompt tokens prefilled between two decode steps"
    )
    request_timeout: float = Field(_ENGINE.request_timeout, gt=0, description="seconds a request may wait and generate")
    vision_chunk_frames: int = Field(
        _ENGINE.vision_chunk_frames, ge=1, description="video frames through the vision tower at once"
    )
    feature_cache_bytes: int = Field(
        2048 * MiB, ge=0, description="host memory for visual features of media seen before; 0 disables"
    )
    prefix_cache_bytes: int = Field(
        2048 * MiB, ge=0, description="device memory for the KV cache of prompts about media seen before; 0 disables"
    )
    warmup_frames: int = Field(
        0, ge=0, description="frames of a synthetic video warmed up after the image at start-up; 0: the image only"
    )
    job_dir: Path = Field(
        Path("~/.cache/llava-video-service/jobs"),
        description="where long-video job records live (status, captions, answer); put it on a volume to keep them",
    )
    job_result_seconds: float = Field(
        86400.0, gt=0, description="seconds a finished job's result stays available (and its follow-up questions)"
    )
    max_job_bytes: int = Field(8192 * MiB, ge=1, description="largest video a job may upload or download")
    max_job_video_seconds: float = Field(
        _JOBS.max_video_seconds, gt=0, description="longest video a job may analyse, in seconds"
    )
    max_job_segments: int = Field(_JOBS.max_segments, ge=1, description="most segments one job may cut its video into")
    max_running_jobs: int = Field(_JOBS.max_running, ge=1, description="jobs captioning at once; more wait in order")
    max_pending_jobs: int = Field(
        _JOBS.max_pending, ge=0, description="jobs allowed to wait; one more is refused with 503"
    )
    job_captions_in_flight: int = Field(
        _JOBS.captions_in_flight,
        ge=1,
        description="captions one job keeps in the engine at once (2 overlaps decoding with generation)",
    )
    redis_url: str = Field(
        "",
        description="the Redis replicas share jobs through (redis://host:6379/0); empty: jobs stay on their machine",
    )
    job_claim_timeout_s: float = Field(
        DEFAULT_CLAIM_TIMEOUT_SECONDS,
        gt=0,
        description="with Redis: seconds after which the segments of a replica that stopped are taken over",
    )
    job_dir_shared: bool = Field(
        False, description="with Redis: LLAVA_JOB_DIR is on storage every replica sees, so any replica reads uploads"
    )
    media_dir: Path = Field(
        Path("~/.cache/llava-video-service/media"),
        description="where media uploaded once (POST /v1/files, /media) are kept; a shared volume for replicas",
    )
    media_store_bytes: int = Field(
        20 * 1024 * MiB, ge=1, description="bytes the media store holds; the least recently used files go first"
    )
    media_ttl_s: float = Field(48 * 3600.0, gt=0, description="seconds an uploaded file is kept (48 h, as Gemini's)")
    body_timeout_s: float = Field(300.0, gt=0, description="seconds a request's whole body may take to arrive (408)")
    body_idle_timeout_s: float = Field(
        30.0, gt=0, description="seconds a request's body may stop arriving before it is refused (408)"
    )
    send_timeout_s: float = Field(
        60.0, gt=0, description="seconds a client may take nothing of its answer before it is dropped"
    )
    shutdown_grace_seconds: float = Field(
        30.0, ge=0, description="on SIGTERM, seconds the requests in flight may take to finish before they are stopped"
    )

    @property
    def max_json_body_bytes(self) -> int:
        """JSON bodies carry a data: URL in base64 (4 characters per 3 bytes) plus the rest."""
        return self.max_data_url_bytes * 4 // 3 + MiB

    @property
    def api_key_value(self) -> str | None:
        """LLAVA_API_KEY as the key check compares it; None: no key, every route is open."""
        return self.api_key.get_secret_value() if self.api_key is not None else None

    @property
    def model_id(self) -> str:
        """The id clients name the model by: stable across restarts and machines."""
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model).expanduser()
        return path.resolve().name if path.is_dir() else self.model

    def engine_limits(self) -> EngineLimits:
        return EngineLimits(
            max_batch_size=self.max_batch_size,
            max_waiting=self.max_pending_requests,
            kv_cache_tokens=self.kv_cache_tokens,
            kv_block_tokens=self.kv_block_tokens,
            compile=self.compile,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
            request_timeout=self.request_timeout,
            vision_chunk_frames=self.vision_chunk_frames,
        )

    def job_limits(self) -> JobLimits:
        return JobLimits(
            max_video_seconds=self.max_job_video_seconds,
            max_segments=self.max_job_segments,
            max_frames=self.max_frames,
            max_running=self.max_running_jobs,
            max_pending=self.max_pending_jobs,
            captions_in_flight=self.job_captions_in_flight,
        )

    def shared_jobs(self) -> SharedJobSettings | None:
        """How replicas share jobs through Redis; None without LLAVA_REDIS_URL (one machine)."""
        if not self.redis_url:
            return None
        return SharedJobSettings(
            redis_url=self.redis_url, claim_timeout_s=self.job_claim_timeout_s, shared_dir=self.job_dir_shared
        )

    def media_store(self, records: Records | None = None) -> MediaStore:
        """The store of media sent once (LLAVA_MEDIA_DIR); its records in ``records`` (Redis,
        with LLAVA_REDIS_URL) or beside the bytes."""
        return MediaStore(self.media_dir, self.media_store_bytes, self.media_ttl_s, records=records)

    def fetch_limits(self, max_bytes: int | None = None) -> FetchLimits:
        """The fetcher's limits; ``max_bytes`` instead of LLAVA_MAX_DOWNLOAD_BYTES (jobs)."""
        return FetchLimits(
            max_bytes=max_bytes or self.max_download_bytes,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            total_timeout=self.download_timeout,
            max_redirects=self.max_redirects,
            max_data_url_bytes=self.max_data_url_bytes,
            policy=AddressPolicy.from_allowlist(self.url_allowlist),
        )

    def request_defaults(self) -> RequestDefaults:
        return RequestDefaults(
            max_new_tokens=self.max_new_tokens,
            max_new_tokens_limit=self.max_new_tokens_limit,
            num_frames=self.num_frames,
            max_frames=self.max_frames,
            max_images=self.max_images_per_request,
            max_videos=self.max_videos_per_request,
        )

    def video_reading(self, frame_size: tuple[int, int] | None) -> VideoReading:
        """How videos are decoded for a model whose vision tower takes ``frame_size`` pictures."""
        return VideoReading(
            frame_size=frame_size, max_pixels=self.max_video_pixels, chunk_bytes=self.decode_chunk_bytes
        )

    def guard_limits(self) -> GuardLimits:
        return GuardLimits(
            max_upload_bytes=self.max_upload_bytes,
            max_json_bytes=self.max_json_body_bytes,
            max_job_upload_bytes=self.max_job_bytes,
            # The running batch plus the requests allowed to wait; more are refused at once.
            max_in_flight=self.max_batch_size + self.max_pending_requests,
            body_timeout=self.body_timeout_s,
            body_idle_timeout=self.body_idle_timeout_s,
            send_timeout=self.send_timeout_s,
        )

    @field_validator("api_key")
    @classmethod
    def _api_key_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("LLAVA_API_KEY is set but empty: set a key, or unset it to serve without one")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_parses(cls, value: str) -> str:
        return check_redis_url(value) if value.strip() else ""

    @field_validator("url_allowlist")
    @classmethod
    def _allowlist_parses(cls, value: str) -> str:
        AddressPolicy.from_allowlist(value)  # raises ValueError naming the bad entry
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Settings:
        if self.num_frames > self.max_frames:
            raise ValueError(
                f"LLAVA_NUM_FRAMES={self.num_frames} exceeds LLAVA_MAX_FRAMES={self.max_frames}: "
                "lower LLAVA_NUM_FRAMES or raise LLAVA_MAX_FRAMES"
            )
        if self.warmup_frames > self.max_frames:
            raise ValueError(f"LLAVA_WARMUP_FRAMES={self.warmup_frames} exceeds LLAVA_MAX_FRAMES={self.max_frames}")
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"LLAVA_MAX_NEW_TOKENS={self.max_new_tokens} exceeds LLAVA_MAX_NEW_TOKENS_LIMIT="
                f"{self.max_new_tokens_limit}: lower LLAVA_MAX_NEW_TOKENS or raise LLAVA_MAX_NEW_TOKENS_LIMIT"
            )
        return self

    def describe_limits(self) -> str:
        """The limits in force, for the start-up log."""
        return (
            f"limits: frames {self.num_frames} by default, at most {self.max_frames}; new tokens "
            f"{self.max_new_tokens} by default, at most {self.max_new_tokens_limit}; batch "
            f"{self.max_batch_size} + {self.max_pending_requests} waiting; KV cache {self.kv_cache_tokens} tokens; "
            f"upload {format_bytes(self.max_upload_bytes)}, download {format_bytes(self.max_download_bytes)}, "
            f"data: URL {format_bytes(self.max_data_url_bytes)}; {self.decode_workers} decode workers, "
            f"{self.decode_timeout:g} s per file; request timeout {self.request_timeout:g} s; shutdown grace "
            f"{self.shutdown_grace_seconds:g} s; jobs: {self.max_running_jobs} at once + {self.max_pending_jobs} "
            f"waiting, videos up to {self.max_job_video_seconds:g} s and {format_bytes(self.max_job_bytes)} in "
            f"{self.max_job_segments} segments, "
            f"results kept {self.job_result_seconds:g} s in {self.job_dir}"
            + (
                f", shared through Redis (segments taken over after {self.job_claim_timeout_s:g} s"
                f"{', uploads in the shared LLAVA_JOB_DIR' if self.job_dir_shared else ''})"
                if self.redis_url
                else ""
            )
            + f"; media store {format_bytes(self.media_store_bytes)} for {self.media_ttl_s:g} s in {self.media_dir}"
        )


def explain(error: ValidationError) -> str:
    """A ValidationError of :class:`Settings` on one line, naming each variable as it is set."""
    problems = []
    for item in error.errors(include_url=False):
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        if item.get("loc"):
            field = str(item["loc"][0])
            message = f"LLAVA_{field.upper()}={_shown(field, item.get('input'))!r}: {message}"
        problems.append(message)
    return "invalid setting: " + "; ".join(problems)


def _shown(field: str, value: object) -> object:
    """A setting's value as an error may show it: never the API key, a URL without its password."""
    if field == "api_key":
        return "***"
    if field == "redis_url" and isinstance(value, str):
        # Redis URLs carry their password (redis://user:password@host); the log must not.
        return re.sub(r"(?<=://)([^@/]*?):[^@/]*@", r"\1:***@", value)
    return value


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``LLAVA_*`` variable that is no setting (a misspelt one is otherwise
    ignored without a word), naming the closest setting when one is close enough."""
    known = {"LLAVA_" + name.upper() for name in Settings.model_fields}
    warnings = []
    for name in sorted(environ if environ is not None else os.environ):
        if not name.startswith("LLAVA_") or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}?" if close else "see README, Configuration"
        warnings.append(f"{name} is not a setting of this service and is ignored; {hint}")
    return warnings


@functools.cache
def current() -> Settings:
    """The process's settings, read from the environment on first use and shared after that
    (the service and the request guard, built at different moments, see the same values)."""
    return Settings()
