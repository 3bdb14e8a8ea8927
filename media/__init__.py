"""Input side of the service: fetch URLs, read images, sample video frames.

Imports neither bentoml, torch nor transformers; every failure is a :class:`MediaError`.
:class:`DecodeWorker` runs the readers in a child process under a time limit; :class:`DecodePool`
runs several of them, so that requests decode in parallel.
"""

from media.digest import file_digest
from media.errors import (
    DecoderStopped,
    DecodeTimeout,
    InvalidSource,
    MediaError,
    MediaTooLarge,
    RefusedAddress,
    SegmentOutsideVideo,
    StoreUnavailable,
    UndecodableMedia,
    UnknownMedia,
    UnsupportedMedia,
    UpstreamError,
    UpstreamTimeout,
    WrongMediaKind,
)
from media.fetch import AddressPolicy, FetchLimits, address_refusal, download_to_file
from media.image import read_image
from media.library import MediaLibrary
from media.sizes import format_bytes
from media.store import MediaStore, RedisRecords, StoredMedia
from media.video import (
    SampledVideo,
    VideoInfo,
    VideoReading,
    read_video,
    sample_frame_indices,
    segment_frame_indices,
    video_duration,
)
from media.worker import DecodePool, DecodeWorker

__all__ = [
    "AddressPolicy",
    "DecodePool",
    "DecodeTimeout",
    "DecoderStopped",
    "DecodeWorker",
    "FetchLimits",
    "InvalidSource",
    "MediaLibrary",
    "MediaStore",
    "MediaError",
    "MediaTooLarge",
    "RedisRecords",
    "RefusedAddress",
    "SampledVideo",
    "SegmentOutsideVideo",
    "StoreUnavailable",
    "StoredMedia",
    "UndecodableMedia",
    "UnknownMedia",
    "UnsupportedMedia",
    "UpstreamError",
    "UpstreamTimeout",
    "VideoInfo",
    "VideoReading",
    "WrongMediaKind",
    "address_refusal",
    "download_to_file",
    "file_digest",
    "format_bytes",
    "read_image",
    "read_video",
    "sample_frame_indices",
    "segment_frame_indices",
    "video_duration",
]
