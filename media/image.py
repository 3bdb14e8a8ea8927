"""Read one still image (the first frame of an animation) as an upright RGB Pillow image."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from media.errors import MediaTooLarge, UndecodableMedia, UnsupportedMedia

# Formats Pillow may open. An allow-list keeps parsers such as EPS (which runs Ghostscript)
# away from caller bytes. JPEG includes MPO, the multi-picture JPEG many cameras write.
_ALLOWED_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")
_SUPPORTED_FORMATS = "PNG, JPEG, WebP, GIF, TIFF or BMP"
# What Pillow's parsers raise on corrupt or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
# Greyscale modes deeper than 8 bits, which Pillow's convert() clips at 255 instead of scaling.
_HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255, 255)


def read_image(path: Path, *, max_pixels: int) -> Image.Image:
    """Open, check and fully decode the image at ``path``; return it upright in RGB.

    Only the first frame of an animated GIF/WebP/PNG is read. EXIF orientation is applied.
    Transparent pixels are composited on white (dropping alpha would expose whatever colour
    the encoder left under them, often black). 16-bit greyscale is scaled down to 8 bits.

    Raises UnsupportedMedia (not an image in a supported format), MediaTooLarge (more than
    ``max_pixels`` pixels, checked from the header before decoding) or UndecodableMedia
    (empty, corrupt or truncated file).
    """
    if path.stat().st_size == 0:
        raise UndecodableMedia("the image file is empty (0 bytes); send the complete file")
    Image.init()  # register all plugins, so that `formats` below can name non-core ones
    try:
        with Image.open(path, formats=_ALLOWED_FORMATS) as image:
            _check_pixel_count(image.size, max_pixels)
            upright = ImageOps.exif_transpose(image)  # decodes the first frame
    except UnidentifiedImageError as exc:
        raise UnsupportedMedia(f"the file is not an image in a supported format ({_SUPPORTED_FORMATS})") from exc
    except Image.DecompressionBombError as exc:
        raise MediaTooLarge(f"the image has too many pixels (limit {max_pixels}); downscale it and retry") from exc
    except _DECODE_ERRORS as exc:
        raise UndecodableMedia(
            "the image is damaged or incomplete and could not be decoded; send the complete file"
        ) from exc
    return _to_rgb(upright)


def read_image_array(path: Path, *, max_pixels: int) -> np.ndarray:
    """:func:`read_image` as an (H, W, 3) uint8 array (cheap to send between processes)."""
    return np.asarray(read_image(path, max_pixels=max_pixels))


def _check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width * height > max_pixels:
        raise MediaTooLarge(
            f"the image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels}; downscale it and retry"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_rgb(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:  # a mode Pillow cannot convert, e.g. "La"
        raise UnsupportedMedia(f"images in colour mode {image.mode} are not supported; convert it to RGB") from exc


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Map 16-bit (or wider) greyscale to 8 bits: 16-bit range / 257, then clip to 0..255."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
