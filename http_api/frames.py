"""What ``metadata.return_frames`` answers: the pictures the model was given, as small JPEGs.

A video's frames come from media.read_video already upright and resized to the engine's frame
size, so each one is encoded as it is: the client sees exactly the pixels the model saw. An image
is given to the model whole (its tiles are cut later), so it is encoded upright but shrunk to at
most :data:`IMAGE_PREVIEW_SIDE` pixels a side, to keep the answer small.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from http_api.answers import Frame

JPEG_QUALITY = 85
# The vision tower's input side: an image preview larger than this shows nothing more.
IMAGE_PREVIEW_SIDE = 384


def video_frames(frames: np.ndarray, times: Sequence[float]) -> list[Frame]:
    """(N, H, W, 3) uint8 RGB frames at ``times`` seconds, each as a JPEG data URL."""
    pairs = zip(frames, times, strict=True)
    return [Frame(time=float(time), image=_jpeg(Image.fromarray(frame))) for frame, time in pairs]


def image_frame(image: Image.Image) -> list[Frame]:
    """The image (already upright, RGB) as one JPEG data URL without a time."""
    preview = image.copy()
    preview.thumbnail((IMAGE_PREVIEW_SIDE, IMAGE_PREVIEW_SIDE))  # only ever shrinks, keeps the aspect
    return [Frame(time=None, image=_jpeg(preview))]


def _jpeg(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
