"""The JSON shapes of the HTTP API: request metadata and the answers."""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jobs.limits import DEFAULT_FRAMES_PER_SEGMENT, DEFAULT_SEGMENT_SECONDS
from media import VideoInfo

M = TypeVar("M", bound=BaseModel)


class VideoSampling(BaseModel):
    """Which frames of a video the model sees: the native ``metadata`` fields and the chat route's
    extensions alike. Without any of them: ``LLAVA_NUM_FRAMES`` frames over the whole video."""

    num_frames: int | None = Field(
        None, strict=True, ge=1, description="frames to sample from a video (server limit applies)"
    )
    fps: float | None = Field(
        None,
        strict=True,
        gt=0,
        allow_inf_nan=False,
        description="sample at this rate over the analysed span, at most num_frames",
    )
    start_time: float | None = Field(
        None,
        strict=True,
        ge=0,
        allow_inf_nan=False,
        description="analyse from this second on (frame_times stay whole-video)",
    )
    end_time: float | None = Field(
        None, strict=True, gt=0, allow_inf_nan=False, description="analyse up to this second"
    )

    @model_validator(mode="after")
    def _segment_is_ordered(self) -> VideoSampling:
        if self.start_time is not None and self.end_time is not None and self.end_time <= self.start_time:
            raise ValueError("end_time must be after start_time")
        return self


class Metadata(VideoSampling):
    """The optional ``metadata`` object of both endpoints."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="the question; a default description prompt applies when absent")
    max_new_tokens: int | None = Field(
        None, strict=True, ge=1, description="longest answer, in tokens (server limit applies)"
    )
    temperature: float | None = Field(None, strict=True, ge=0, le=2, description="0 (default) decodes greedily")
    top_p: float | None = Field(
        None, strict=True, gt=0, le=1, description="nucleus sampling, used when temperature > 0"
    )
    top_k: int | None = Field(
        None, strict=True, ge=0, description="sample from the k most likely tokens; 0 or absent: all"
    )
    seed: int | None = Field(
        None, strict=True, ge=0, lt=2**63, description="makes a sampled answer (temperature > 0) reproducible"
    )
    stop: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, max_length=4, description="up to 4 strings that end the answer (not included in it)"
    )
    stream: bool = Field(False, description="answer as server-sent events, token by token (see README)")
    ignore_eos: bool = Field(
        False, description="generate exactly max_new_tokens, past the end of the answer (load tests)"
    )
    return_frames: bool = Field(
        False, description="add 'frames' to the answer: JPEG data URLs of the pictures the model was given"
    )

    @classmethod
    def parse(cls, raw: Any) -> Metadata:
        return parse_object(cls, raw, example='{"prompt": "..."}')


class JobMetadata(BaseModel):
    """The optional ``metadata`` object of ``POST /jobs/submit`` (a long video, segment by segment)."""

    model_config = ConfigDict(extra="forbid")

    question: str | None = Field(
        None, description="what the final answer answers; default: a summary of the whole video, in order"
    )
    caption_prompt: str | None = Field(
        None, description="what each segment's caption describes; default: a dense, factual description"
    )
    segment_seconds: float = Field(
        DEFAULT_SEGMENT_SECONDS, strict=True, gt=0, allow_inf_nan=False, description="length of each captioned segment"
    )
    overlap_seconds: float = Field(
        0.0,
        strict=True,
        ge=0,
        allow_inf_nan=False,
        description="each segment starts this long before the previous one ends",
    )
    frames_per_segment: int = Field(
        DEFAULT_FRAMES_PER_SEGMENT, strict=True, ge=1, description="frames each caption sees (server limit applies)"
    )
    start_time: float | None = Field(
        None, strict=True, ge=0, allow_inf_nan=False, description="analyse from this second on"
    )
    end_time: float | None = Field(
        None, strict=True, gt=0, allow_inf_nan=False, description="analyse up to this second"
    )
    max_new_tokens: int | None = Field(None, strict=True, ge=1, description="longest caption and answer, in tokens")
    temperature: float | None = Field(None, strict=True, ge=0, le=2, description="0 (default) decodes greedily")
    top_p: float | None = Field(None, strict=True, gt=0, le=1)
    top_k: int | None = Field(None, strict=True, ge=0)
    seed: int | None = Field(None, strict=True, ge=0, lt=2**63)
    ignore_eos: bool = Field(False, description="generate exactly max_new_tokens per caption (load tests)")

    @model_validator(mode="after")
    def _span_is_ordered(self) -> JobMetadata:
        if self.start_time is not None and self.end_time is not None and self.end_time <= self.start_time:
            raise ValueError("end_time must be after start_time")
        if self.overlap_seconds >= self.segment_seconds:
            raise ValueError("overlap_seconds must be shorter than segment_seconds")
        return self

    @classmethod
    def parse(cls, raw: Any) -> JobMetadata:
        return parse_object(cls, raw, example='{"question": "..."}')


class JobQuestion(BaseModel):
    """The body of ``POST /jobs/ask``: a new question about a finished job's video."""

    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(description="the finished job's id, as /jobs/submit answered")
    question: str = Field(min_length=1, description="answered from the job's captions, citing times")
    max_new_tokens: int | None = Field(None, strict=True, ge=1)
    temperature: float | None = Field(None, strict=True, ge=0, le=2)
    top_p: float | None = Field(None, strict=True, gt=0, le=1)
    top_k: int | None = Field(None, strict=True, ge=0)
    seed: int | None = Field(None, strict=True, ge=0, lt=2**63)

    @classmethod
    def parse(cls, raw: Any) -> JobQuestion:
        return parse_object(cls, raw, name="body", example='{"task_id": "...", "question": "..."}')


def parse_object(model: type[M], raw: Any, *, name: str = "metadata", example: str = "{}") -> M:
    """``raw`` as ``model``: an object, a JSON string of one, or absent (all defaults); ValueError
    says what is wrong, naming the object ``name`` and showing ``example``."""
    if raw is None or raw == "":
        raw = {}
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON ({exc.msg} at position {exc.pos})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{name} must be a JSON object such as {example}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid {name}: {problems}") from exc


class Usage(BaseModel):
    prompt_tokens: int
    visual_tokens: int
    completion_tokens: int


class Frame(BaseModel):
    """One picture the model was given (``metadata.return_frames``)."""

    time: float | None = Field(description="seconds into the video; null for an image")
    image: str = Field(description="data:image/jpeg;base64,... of the frame as the model received it")


# Present only when metadata.return_frames asked for it, so other answers keep their shape.
Frames = Annotated[
    list[Frame] | None,
    Field(None, exclude_if=lambda frames: frames is None, description="with metadata.return_frames only"),
]


class ImageAnswer(BaseModel):
    response: str
    status: str = "success"
    error: str | None = None
    usage: Usage | None = None
    frames: Frames = None


class VideoAnswer(BaseModel):
    response: str
    video_info: VideoInfo
    status: str = "success"
    error: str | None = None
    usage: Usage | None = None
    frames: Frames = None


class Failure(BaseModel):
    response: str = ""
    status: str = "failed"
    error: str
