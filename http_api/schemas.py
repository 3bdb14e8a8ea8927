"""The JSON shapes of the HTTP API, and what a request's fields become in the engine.

Each request schema converts itself: ``generation(defaults)`` gives its engine decoding settings
(:class:`~llava_custom.engine.GenerationSettings`), with the server's defaults and limits
(:class:`~http_api.limits.RequestDefaults`, built once from the settings) for what it leaves out;
``sampling(defaults)`` the frames a video request sees; a job's ``parameters(defaults)`` its
whole plan. Answers are the models below and, on /v1, the ``openai`` package's own types.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from openai.types.chat import (
    ChatCompletionContentPartTextParam,
    ChatCompletionStreamOptionsParam,
)
from openai.types.chat.chat_completion_content_part_image_param import ImageURL
from openai.types.chat.chat_completion_content_part_param import File
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from typing_extensions import Required, TypedDict

from http_api.errors import RequestError
from http_api.limits import RequestDefaults
from jobs.limits import DEFAULT_FRAMES_PER_SEGMENT, DEFAULT_SEGMENT_SECONDS
from jobs.manager import JobParameters
from llava_custom.sampling import GenerationSettings

M = TypeVar("M", bound=BaseModel)


def generation(
    defaults: RequestDefaults,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    logprobs: int | None = None,
    ignore_eos: bool = False,
    param: str = "max_new_tokens",
) -> GenerationSettings:
    """The engine's decoding settings of a request's fields: absent ones take the server's
    defaults (greedy, LLAVA_MAX_NEW_TOKENS); ``param`` names the length field in the error."""
    max_new_tokens = max_new_tokens or defaults.max_new_tokens
    if max_new_tokens > defaults.max_new_tokens_limit:
        raise RequestError(f"{param} may be at most {defaults.max_new_tokens_limit}", param)
    return GenerationSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature or 0.0,
        top_p=top_p if top_p is not None else 1.0,
        seed=seed,
        top_k=top_k or 0,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        logprobs=logprobs,
        ignore_eos=ignore_eos,
    )


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

    def sampling(self, defaults: RequestDefaults) -> VideoSampling:
        """These fields with the server's frame count when absent, checked against its limit."""
        count = self.num_frames or defaults.num_frames
        if count > defaults.max_frames:
            raise RequestError(f"num_frames may be at most {defaults.max_frames}", "num_frames")
        return VideoSampling(num_frames=count, fps=self.fps, start_time=self.start_time, end_time=self.end_time)


class Metadata(VideoSampling):
    """The optional ``metadata`` object of both endpoints."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="the question; a default description prompt applies when absent")
    media_id: str | list[str] | None = Field(
        None, description="stored media (POST /media or /v1/files) instead of an upload: the video, or the images"
    )
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

    def generation(self, defaults: RequestDefaults) -> GenerationSettings:
        return generation(
            defaults,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
        )


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

    def parameters(self, defaults: RequestDefaults) -> JobParameters:
        """The job's plan: its segments, prompts and the decoding of every caption and answer."""
        decoding = generation(
            defaults,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )
        return JobParameters(
            generation=decoding,
            segment_seconds=self.segment_seconds,
            overlap_seconds=self.overlap_seconds,
            frames_per_segment=self.frames_per_segment,
            start_time=self.start_time,
            end_time=self.end_time,
            caption_prompt=self.caption_prompt,
            question=self.question,
        )


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

    def generation(self, defaults: RequestDefaults) -> GenerationSettings:
        return generation(
            defaults,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
        )


class VideoURL(TypedDict, total=False):
    url: Required[str]


class ChatCompletionContentPartVideoParam(TypedDict, total=False):
    """vLLM's content part for a video; the openai package has none. ``uuid`` (vLLM's) names the
    video: sent with it, the service keeps it; sent alone (``video_url`` null), the one kept."""

    video_url: Required[VideoURL | None]
    type: Required[Literal["video_url"]]
    uuid: str


class ChatCompletionContentPartImageWithUUIDParam(TypedDict, total=False):
    """OpenAI's image part with vLLM's ``uuid`` (see the video part); ``image_url`` may then be null."""

    image_url: Required[ImageURL | None]
    type: Required[Literal["image_url"]]
    uuid: str


ContentPart = Annotated[
    ChatCompletionContentPartTextParam
    | ChatCompletionContentPartImageWithUUIDParam
    | ChatCompletionContentPartVideoParam
    | File,
    Field(discriminator="type"),
]


class ChatMessage(BaseModel):
    """One message; ``content`` is a string or a list of content parts."""

    model_config = ConfigDict(extra="ignore")  # name, refusal, ... carry nothing for this model

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[Any] | None = None


class ChatRequest(VideoSampling):
    """``POST /v1/chat/completions``: OpenAI's parameters and LLaVA's extensions."""

    # Fields OpenAI clients send that change nothing here (user, store, metadata, ...) are ignored;
    # those that would change the answer and are not supported are refused by openai_api.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool | None = None
    stream_options: ChatCompletionStreamOptionsParam | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    # LLaVA's controls, as vLLM takes extra sampling and media parameters in the body (the video
    # sampling fields come from VideoSampling).
    top_k: int | None = Field(None, ge=0, description="sample from the k most likely tokens (0: all)")
    ignore_eos: bool = False

    def generation(self, defaults: RequestDefaults) -> GenerationSettings:
        """OpenAI's names: ``max_completion_tokens`` (or the older ``max_tokens``) is the length,
        ``top_logprobs`` the alternatives per token when ``logprobs`` is true."""
        return generation(
            defaults,
            max_new_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=self.stop,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            ignore_eos=self.ignore_eos,
            param="max_completion_tokens" if self.max_completion_tokens else "max_tokens",
        )


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
