"""Input side of the service: fetch URLs, read images, sample video frames.

Imports neither bentoml, torch nor transformers; every failure is a :class:`MediaError`.
"""

from media.errors import (
    InvalidSource,
    MediaError,
    MediaTooLarge,
    UndecodableMedia,
    UnsupportedMedia,
    UpstreamError,
    UpstreamTimeout,
)
from media.fetch import FetchLimits, download_to_file
from media.image import read_image
from media.video import SampledVideo, VideoInfo, read_video, sample_frame_indices

__all__ = [
    "FetchLimits",
    "InvalidSource",
    "MediaError",
    "MediaTooLarge",
    "SampledVideo",
    "UndecodableMedia",
    "UnsupportedMedia",
    "UpstreamError",
    "UpstreamTimeout",
    "VideoInfo",
    "download_to_file",
    "read_image",
    "read_video",
    "sample_frame_indices",
]
