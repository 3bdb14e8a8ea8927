"""read_image on real files written with Pillow."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from media import MediaTooLarge, UndecodableMedia, UnsupportedMedia, read_image
from testing.mediafiles import frame_color, truncate_file, write_exif_rotated_jpeg, write_image

BIG = 10_000_000  # max_pixels for tests that are not about the limit
WHITE = (255, 255, 255)


def pixel(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[y, x])


def grey_of(color: tuple[int, int, int]) -> int:
    return Image.new("RGB", (1, 1), color).convert("L").getpixel((0, 0))


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 12) -> None:
    assert max(abs(a - b) for a, b in zip(actual, expected, strict=True)) <= tolerance, actual


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("rgb.png", "RGB"),
        ("rgb.jpg", "RGB"),
        ("rgb.webp", "RGB"),
        ("rgb.bmp", "RGB"),
        ("rgb.tiff", "RGB"),
        ("grey.png", "L"),
        ("palette.png", "P"),
        ("cmyk.jpg", "CMYK"),
        ("cmyk.tiff", "CMYK"),
    ],
)
def test_opaque_images_become_rgb(tmp_path: Path, name: str, mode: str) -> None:
    path = write_image(tmp_path / name, mode=mode)

    image = read_image(path, max_pixels=BIG)

    assert image.mode == "RGB"
    assert image.size == (64, 48)
    expected = (grey_of(frame_color(0)),) * 3 if mode == "L" else frame_color(0)
    assert_close(pixel(image, 5, 5), expected)


@pytest.mark.parametrize(
    ("name", "mode"),
    [("rgba.png", "RGBA"), ("la.png", "LA"), ("rgba.webp", "RGBA"), ("transparent.gif", "RGBA")],
)
def test_transparent_pixels_are_composited_on_white(tmp_path: Path, name: str, mode: str) -> None:
    path = write_image(tmp_path / name, mode=mode)

    image = read_image(path, max_pixels=BIG)

    assert image.mode == "RGB"
    assert pixel(image, 60, 5) == WHITE  # right half is fully transparent
    assert pixel(image, 5, 5) != WHITE


@pytest.mark.parametrize("name", ["anim.gif", "anim.webp", "anim.png"])
def test_animation_gives_its_first_frame(tmp_path: Path, name: str) -> None:
    path = write_image(tmp_path / name, mode="P" if name.endswith(".gif") else "RGB", frames=3)

    image = read_image(path, max_pixels=BIG)

    assert image.mode == "RGB"
    assert_close(pixel(image, 5, 5), frame_color(0))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = write_image(tmp_path / "grey16.png", mode="I;16")
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")  # really stored with 16 bits

    image = read_image(path, max_pixels=BIG)

    assert image.mode == "RGB"
    assert_close(pixel(image, 5, 5), (grey_of(frame_color(0)),) * 3, tolerance=1)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 64x48 with a red top-left quarter; orientation 6 = rotate 90 degrees clockwise.
    path = write_exif_rotated_jpeg(tmp_path / "rotated.jpg", size=(64, 48), orientation=6)

    image = read_image(path, max_pixels=BIG)

    assert image.size == (48, 64)
    assert_close(pixel(image, 40, 5), (220, 40, 40), tolerance=30)  # red is now top-right
    assert_close(pixel(image, 5, 5), (40, 40, 220), tolerance=30)


def test_pixel_limit_is_enforced(tmp_path: Path) -> None:
    path = write_image(tmp_path / "wide.png", size=(200, 100))

    assert read_image(path, max_pixels=20_000).size == (200, 100)
    with pytest.raises(MediaTooLarge, match="200x100"):
        read_image(path, max_pixels=19_999)


def test_pillow_decompression_bomb_is_too_large(tmp_path: Path) -> None:
    # A GIF header claiming 20000x20000 pixels, over twice Pillow's own limit: Pillow refuses
    # it while opening, before our (here much larger) limit is checked.
    path = tmp_path / "bomb.gif"
    Image.new("P", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[6:10] = (20_000).to_bytes(2, "little") * 2  # logical screen width, height
    path.write_bytes(bytes(data))

    with pytest.raises(MediaTooLarge):
        read_image(path, max_pixels=10**12)


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png", "cut.webp"])
def test_truncated_image_is_undecodable(tmp_path: Path, name: str) -> None:
    path = write_image(tmp_path / name, size=(256, 192))
    truncate_file(path, keep=0.6)

    with pytest.raises(UndecodableMedia):
        read_image(path, max_pixels=BIG)


def test_random_bytes_are_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "noise.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    with pytest.raises(UnsupportedMedia):
        read_image(path, max_pixels=BIG)


def test_formats_outside_the_allow_list_are_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "picture.ppm"
    Image.new("RGB", (8, 8)).save(path)  # Pillow reads PPM, but we do not accept it

    with pytest.raises(UnsupportedMedia):
        read_image(path, max_pixels=BIG)


def test_empty_file_is_undecodable(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.touch()

    with pytest.raises(UndecodableMedia, match="empty"):
        read_image(path, max_pixels=BIG)


def test_result_does_not_keep_the_file_open(tmp_path: Path) -> None:
    path = write_image(tmp_path / "closed.png")

    image = read_image(path, max_pixels=BIG)
    os.remove(path)

    assert image.getpixel((0, 0)) is not None
