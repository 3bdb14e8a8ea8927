"""The golden fidelity cases: tiny checkpoints, committed media and questions compared against LLaVA-NeXT.

Golden data (``tests/data/golden/golden.json``) is made by running the original LLaVA-NeXT
inference recipe on these cases; ``tests/test_golden.py`` runs our pipeline on the same cases and
compares. Regenerating it takes two steps, in two environments:

    # 1. with this project's environment: case checkpoints (original layout) + their HF cache
    python -m tools.golden_cases WORK_DIR
    # 2. with a LLaVA-NeXT environment (see README, "Fidelity"): run the original code on them
    python tools/golden_reference.py --llava-next PATH/TO/LLaVA-NeXT --work WORK_DIR

Checkpoints are not committed: they are rewritten deterministically by
:func:`testing.tiny.write_tiny_checkpoint`; the golden file records a fingerprint of each so
a test fails clearly if that writer ever changes. The media under ``tests/data/golden`` are
committed bytes, so both sides decode exactly the same file (:func:`write_media` made them once).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO / "tests" / "data" / "golden"
GOLDEN_FILE = GOLDEN_DIR / "golden.json"
MAX_NEW_TOKENS = 24
SEED = 0
REGENERATE = (
    "python -m tools.golden_cases WORK && "
    "python tools/golden_reference.py --llava-next PATH/TO/LLaVA-NeXT --work WORK (README, Fidelity)"
)

# Checkpoint variants: the LLaVA-Video mm_* keys that change the video token layout.
VARIANTS: dict[str, dict[str, str]] = {
    "grid-bilinear": {"mm_newline_position": "grid", "mm_spatial_pool_mode": "bilinear"},
    "frame-bilinear": {"mm_newline_position": "frame", "mm_spatial_pool_mode": "bilinear"},
    "one_token-bilinear": {"mm_newline_position": "one_token", "mm_spatial_pool_mode": "bilinear"},
    "no_token-bilinear": {"mm_newline_position": "no_token", "mm_spatial_pool_mode": "bilinear"},
    "grid-average": {"mm_newline_position": "grid", "mm_spatial_pool_mode": "average"},
    "grid-max": {"mm_newline_position": "grid", "mm_spatial_pool_mode": "max"},
}

VIDEO_QUESTION = "Please describe what is happening in this video in detail."
IMAGE_QUESTION = "Please describe what is in this image in detail."


@dataclass(frozen=True)
class Case:
    name: str
    variant: str
    modality: str  # "video", "image", or "multi" (several pictures: ``pictures`` and ``turns``)
    media: str | None  # file name under tests/data/golden (one picture)
    question: str | None
    num_frames: int | None = None
    # what the case exercises, for people reading the golden file
    about: str = field(default="", compare=False)
    # Several pictures, in the order the prompt's placeholders take them: (modality, file, frames).
    pictures: tuple[tuple[str, str, int | None], ...] | None = None
    # The conversation: (role, text, how many of the pictures open this turn), in order.
    turns: tuple[tuple[str, str, int], ...] | None = None


def multi(name: str, about: str, pictures: list[tuple[str, str, int | None]], *turns: tuple[str, str, int]) -> Case:
    """A case with several pictures (the original's "pad" recipe for its images, see docs/ENGINE.md)."""
    return Case(name, "grid-bilinear", "multi", None, None, about=about, pictures=tuple(pictures), turns=turns)


COMPARE = "What is different between these pictures?"


CASES = (
    Case("video-16", "grid-bilinear", "video", "video.mp4", VIDEO_QUESTION, 16, "16 of 64 frames, 210 tokens a frame"),
    Case("video-8", "grid-bilinear", "video", "video.mp4", "What is the person doing?", 8, "8 frames"),
    Case(
        "image-wide",
        "grid-bilinear",
        "image",
        "wide.png",
        IMAGE_QUESTION,
        about="1280x400: 2x4 tiles (rows x cols), rows unpadded, no downscale",
    ),
    Case(
        "image-tall",
        "grid-bilinear",
        "image",
        "tall.png",
        "Describe the scene in detail.",
        about="900x2200: 6x3 tiles, columns unpadded, scaled down to about 9 tiles (anyres_max_9)",
    ),
    Case("video-8-frame", "frame-bilinear", "video", "video.mp4", VIDEO_QUESTION, 8, "newline after each frame"),
    Case("video-8-one_token", "one_token-bilinear", "video", "video.mp4", VIDEO_QUESTION, 8, "one newline a video"),
    Case("video-8-no_token", "no_token-bilinear", "video", "video.mp4", VIDEO_QUESTION, 8, "no newline"),
    Case("video-8-average", "grid-average", "video", "video.mp4", VIDEO_QUESTION, 8, "average pooling, 13x13"),
    Case("video-8-max", "grid-max", "video", "video.mp4", VIDEO_QUESTION, 8, "max pooling, 13x13"),
    multi(
        "images-2",
        "two images, each padded to a square and one tile: 730 rows each",
        [("image", "wide.png", None), ("image", "tall.png", None)],
        ("user", COMPARE, 2),
    ),
    multi(
        "images-2-swapped",
        "the same two the other way round",
        [("image", "tall.png", None), ("image", "wide.png", None)],
        ("user", COMPARE, 2),
    ),
    multi(
        "images-3",
        "three images",
        [("image", "wide.png", None), ("image", "small.png", None), ("image", "tall.png", None)],
        ("user", "Which of these three images is the brightest?", 3),
    ),
    multi(
        "image-video",
        "an image, then a video of 8 frames (210 rows a frame)",
        [("image", "small.png", None), ("video", "video.mp4", 8)],
        ("user", "Does the video show the object of the image?", 2),
    ),
    multi(
        "video-image",
        "a video of 8 frames, then an image",
        [("video", "video.mp4", 8), ("image", "small.png", None)],
        ("user", "What do the video and the image share?", 2),
    ),
    multi(
        "two-turns",
        "a picture in each of two user turns, an answer between them",
        [("image", "wide.png", None), ("image", "small.png", None)],
        ("user", "What is in this image?", 1),
        ("assistant", "Coloured shapes on a gradient.", 0),
        ("user", "And how does this one differ from it?", 1),
    ),
)


def checkpoint_fingerprint(path: Path) -> str:
    """sha256 of what the original code reads from a checkpoint: tensors, config, tokenizer files.

    Tensors are hashed by name order (not file bytes, so sharding does not matter); JSON files
    are hashed parsed, without ``transformers_version``.
    """
    digest = hashlib.sha256()
    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as file:
            tensors |= {name: file.get_tensor(name) for name in file.keys()}
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    for file in ("config.json", "generation_config.json", "tokenizer_config.json", "tokenizer.json", "vocab.json"):
        content = json.loads((path / file).read_text())
        content.pop("transformers_version", None)
        digest.update(f"{file}|{json.dumps(content, sort_keys=True)}|".encode())
    digest.update((path / "merges.txt").read_bytes())
    return digest.hexdigest()


def write_checkpoint(path: Path, variant: str) -> Path:
    """One case checkpoint, in the original layout; its vision tower goes into ``HF_HUB_CACHE``."""
    # Imported here: huggingface_hub reads HF_HUB_CACHE when first imported, after main() sets it.
    from testing.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(path, layout="original", seed=SEED, **VARIANTS[variant])


def write_work_dir(work: Path) -> Path:
    """Checkpoints of every variant under ``work/checkpoints`` and ``work/cases.json`` for the reference run.

    ``HF_HUB_CACHE`` must already point at ``work/hub`` (see :func:`main`).
    """
    cases = []
    variants = {}
    for variant in sorted({case.variant for case in CASES}):
        checkpoint = write_checkpoint(work / "checkpoints" / variant, variant)
        variants[variant] = {
            "path": str(checkpoint),
            "seed": SEED,
            "mm_keys": VARIANTS[variant],
            "fingerprint": checkpoint_fingerprint(checkpoint),
        }
    for case in CASES:
        paths = {"media_path": str(GOLDEN_DIR / case.media)} if case.media else {"media_dir": str(GOLDEN_DIR)}
        cases.append(asdict(case) | paths)
    manifest = {
        "hub_cache": os.environ["HF_HUB_CACHE"],
        "max_new_tokens": MAX_NEW_TOKENS,
        "variants": variants,
        "cases": cases,
    }
    (work / "cases.json").write_text(json.dumps(manifest, indent=2))
    return work / "cases.json"


# --- the committed media (made once; the committed bytes are what both sides read) -------------


def write_media(folder: Path) -> None:
    """video.mp4 (64 frames, 24 fps, 160x120 H.264), two anyres test images and a small one (PNG)."""
    folder.mkdir(parents=True, exist_ok=True)
    width, height, frames = 160, 120, 64
    with av.open(str(folder / "video.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # No B-frames and short closed GOPs, so any decord seek returns the exact frame.
        stream.options = {"crf": "23", "g": "16", "bf": "0"}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(_video_frame(index, frames, width, height), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    Image.fromarray(_still(1280, 400, seed=0)).save(folder / "wide.png", optimize=True)
    Image.fromarray(_still(900, 2200, seed=1)).save(folder / "tall.png", optimize=True)
    write_small_image(folder)


def write_small_image(folder: Path) -> None:
    """small.png, 333x250, the third picture of the several-picture cases (added after the rest)."""
    Image.fromarray(_still(333, 250, seed=2)).save(folder / "small.png", optimize=True)


def _video_frame(index: int, frames: int, width: int, height: int) -> np.ndarray:
    """Moving colour waves and a disc crossing the frame: every frame differs."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = index / frames
    rgb = np.stack(
        [
            127 + 100 * np.sin(2 * np.pi * (x / width + t)),
            127 + 100 * np.sin(2 * np.pi * (1.5 * y / height - 2 * t)),
            127 + 100 * np.cos(2 * np.pi * ((x + y) / (width + height) + 3 * t)),
        ],
        axis=-1,
    )
    cx, cy = width * (0.15 + 0.7 * t), height * (0.5 + 0.3 * np.sin(2 * np.pi * t))
    rgb[(x - cx) ** 2 + (y - cy) ** 2 < (height / 6) ** 2] = (250, 240, 30)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _still(width: int, height: int, seed: int) -> np.ndarray:
    """Linear gradients (small as PNG) with a few flat discs and boxes."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([255 * x / width, 255 * y / height, 255 * np.abs((x + y) / (width + height) * 2 - 1)], axis=-1)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * min(width, height)
        rgb[(x - cx) ** 2 + (y - cy) ** 2 < radius**2] = rng.integers(0, 256, 3)
    for _ in range(4):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        rgb[(abs(x - x0) < width * 0.08) & (abs(y - y0) < height * 0.05)] = rng.integers(0, 256, 3)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="work directory (checkpoints, HF cache, cases.json)")
    parser.add_argument("--media", action="store_true", help="also rewrite the committed media files")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    # Before huggingface_hub is imported: the tiny tower is written into this cache.
    os.environ["HF_HUB_CACHE"] = str(work / "hub")
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.media:
        write_media(GOLDEN_DIR)
    print(write_work_dir(work))


if __name__ == "__main__":
    main()
