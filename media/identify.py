"""Which kind of medium a file is, checked as a request's media are (for the media store)."""

from __future__ import annotations

from pathlib import Path

from media.container import SUPPORTED_CONTAINERS
from media.errors import InvalidSource, UnsupportedMedia
from media.image import read_image
from media.store import MediaKind
from media.video import video_duration


def identify(path: Path, *, max_image_pixels: int, max_video_pixels: int) -> MediaKind:
    """``"image"`` when Pillow's guarded reader decodes the file whole, ``"video"`` when the video
    reader probes it and counts its frames; raises the media error a request with this file
    would get (an image that is damaged is UndecodableMedia, not tried as a video). Run it in a
    decode process (media.DecodePool.run): it parses caller bytes."""
    if path.stat().st_size == 0:
        raise InvalidSource("the uploaded file is empty")
    try:
        read_image(path, max_pixels=max_image_pixels)
        return "image"
    except UnsupportedMedia:
        pass  # not an image format we read: perhaps a video
    try:
        video_duration(path, max_pixels=max_video_pixels)
    except UnsupportedMedia as error:
        if "not a video in a supported container" not in str(error):
            raise  # a container without a video stream, an unsupported codec: its own message
        raise UnsupportedMedia(
            "the file is neither an image (PNG, JPEG, WebP, GIF, TIFF or BMP) "
            f"nor a video in a supported container ({SUPPORTED_CONTAINERS})"
        ) from error
    return "video"
