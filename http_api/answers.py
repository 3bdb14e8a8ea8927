"""The JSON answers of the native endpoints and their failure body (/v1 answers with the
``openai`` package's own types)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from media import VideoInfo


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


class PictureUsage(BaseModel):
    """One of a request's several pictures: what it is and the visual tokens it took."""

    kind: Literal["image", "video"]
    visual_tokens: int
    video_info: VideoInfo | None = Field(None, exclude_if=lambda info: info is None, description="a video's")


# Present only when the request held several pictures, so one-picture answers keep their shape.
Pictures = Annotated[
    list[PictureUsage] | None,
    Field(None, exclude_if=lambda pictures: pictures is None, description="with several pictures only, in order"),
]


class ImageAnswer(BaseModel):
    response: str
    status: str = "success"
    error: str | None = None
    usage: Usage | None = None
    frames: Frames = None
    pictures: Pictures = None


class VideoAnswer(BaseModel):
    response: str
    video_info: VideoInfo
    status: str = "success"
    error: str | None = None
    usage: Usage | None = None
    frames: Frames = None
    pictures: Pictures = None


class Failure(BaseModel):
    response: str = ""
    status: str = "failed"
    error: str
