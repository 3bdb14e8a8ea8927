"""A job's record: what the store keeps for each job, and what the status and result routes answer.

One JSON object per job, written and read only here (:meth:`JobRecord.to_json`,
:meth:`JobRecord.from_json`)::

    {"task_id", "owner": "host:pid", "folder", "status", "created_at", "ended_at",
     "error", "error_kind",                  # a failed job's message and kind (jobs.errors)
     "video_info": {"video_duration", "start_time", "end_time", "segment_count", "frames_per_segment"},
     "progress": {"segments_total", "segments_decoded", "segments_captioned", "generated_tokens",
                  "elapsed_seconds", "remaining_seconds"},
     "segments": [{"start", "end", "caption", "error", "frame_times",
                   "captioned_by"}],          # the captions so far; the replica only with Redis
     "result": {"answer", "segments", "video_info", "usage", "status": "success"}}  # once completed

Records written before failures had a kind carry ``error_status`` (an HTTP status) instead; they
read as the kind that status stood for. A file that is not such a record reads as damaged (the
store then answers as for no record).
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from jobs.errors import InternalJobError, JobInterrupted, kind_of

# What GET /jobs/status answers, from the job's record.
STATUS_FIELDS = ("task_id", "status", "created_at", "ended_at", "video_info", "progress", "segments", "error")
# The kinds that the statuses of records from before kinds stood for (503: cut off, 422: media).
_KIND_OF_LEGACY_STATUS = {503: JobInterrupted.__name__, 422: "UndecodableMedia"}


class JobStatus(str, Enum):
    """A job's status, as the API answers it (the page's ui/jobs.js names the same values)."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    def __str__(self) -> str:
        return self.value

    @property
    def ended(self) -> bool:
        return self in ENDED


ENDED = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED})


class VideoInfo(BaseModel):
    video_duration: float
    start_time: float  # the span analysed, in seconds from the start of the video
    end_time: float
    segment_count: int
    frames_per_segment: int


class JobProgress(BaseModel):
    segments_total: int = 0
    segments_decoded: int = 0
    segments_captioned: int = 0
    generated_tokens: int = 0
    elapsed_seconds: float = 0.0
    remaining_seconds: float | None = None  # at the pace so far; None before the first caption


class CaptionRecord(BaseModel):
    """One segment's caption, or the error that kept it from being decoded."""

    start: float
    end: float
    caption: str | None
    error: str | None = None
    frame_times: list[float] = Field(default_factory=list)  # seconds of the frames the caption saw
    # The replica that captioned it, when replicas share jobs through Redis; left out otherwise,
    # so that one machine's records and answers stay as they were.
    captioned_by: str | None = Field(None, exclude_if=lambda value: value is None)


class TokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class JobResult(BaseModel):
    """A completed job's result, the body of GET /jobs/get."""

    answer: str
    segments: list[CaptionRecord]
    video_info: VideoInfo
    usage: TokenUsage
    status: Literal["success"] = "success"


class JobRecord(BaseModel):
    task_id: str
    owner: str  # "host:pid" of the process running the job
    folder: str | None  # the job's video folder: deleted when it ends, or by the next start after a crash
    status: JobStatus
    created_at: float
    video_info: VideoInfo
    ended_at: float | None = None
    error: str | None = None
    error_kind: str | None = None  # the class name of the error that ended a failed job
    progress: JobProgress = Field(default_factory=JobProgress)
    segments: list[CaptionRecord] = Field(default_factory=list)
    result: JobResult | None = None  # once completed

    @model_validator(mode="before")
    @classmethod
    def _legacy_error_status(cls, data: Any) -> Any:
        if isinstance(data, dict) and "error_status" in data and data.get("error_kind") is None:
            data = dict(data)
            status = data.pop("error_status")
            if data.get("status") == JobStatus.FAILED:
                data["error_kind"] = _KIND_OF_LEGACY_STATUS.get(status, InternalJobError.__name__)
        return data

    @model_validator(mode="after")
    def _completed_has_result(self) -> JobRecord:
        if self.status is JobStatus.COMPLETED and self.result is None:
            raise ValueError("a completed job's record has its result")
        return self

    def end(self, status: JobStatus, error: BaseException | None = None) -> None:
        """Mark the job ended now with ``status``; a failure keeps ``error``'s kind and message."""
        self.status, self.ended_at = status, time.time()
        if status is JobStatus.COMPLETED:
            self.progress.remaining_seconds = 0.0
        if error is not None:
            self.error, self.error_kind = str(error), kind_of(error)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> JobRecord:
        """The record in ``text``; raises ValueError when it is not one (damaged)."""
        try:
            return cls.model_validate_json(text)
        except ValidationError as error:
            raise ValueError(f"not a job record: {error}") from error

    def status_body(self) -> dict[str, Any]:
        """What GET /jobs/status answers."""
        return self.model_dump(mode="json", include=set(STATUS_FIELDS))
