"""LlavaOnevision with the visual-token layout of the original LLaVA-NeXT code.

transformers' LlavaOnevision differs from the code LLaVA-Video was trained and published with in
two places, both overridden here (everything else, vision tower, projector, language model, is
transformers' own):

- video: transformers always pools bilinearly and appends one ``image_newline`` per video. The
  original pools as ``mm_spatial_pool_mode`` says and places newlines as ``mm_newline_position``
  says (``get_2dPool``, ``add_token_per_grid``/``add_token_per_frame`` in ``llava_arch.py``);
  LLaVA-Video uses one newline after every pooled row, 14 x 15 = 210 tokens per frame.
- image (anyres): transformers rounds the unpadded feature size with ``int(round(x, 7))``, the
  original truncates with ``int(x)`` (``unpad_image``); a few image sizes get a different number
  of rows or columns, so the token count is computed here as the original does.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import LlavaOnevisionConfig
from transformers.image_processing_utils import select_best_resolution
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import select_hidden_states

logger = logging.getLogger(__name__)

PoolMode = Literal["bilinear", "average", "max"]
NewlinePosition = Literal["grid", "frame", "one_token", "no_token"]
# The original video path calls get_2dPool(feature) with its default stride of 2;
# mm_spatial_pool_stride is only read by code that inference never reaches.
VIDEO_POOL_STRIDE = 2


@dataclass(frozen=True)
class VideoLayout:
    """How frame features become video tokens, read from the checkpoint's config.

    Defaults (bilinear, one newline per video) are what transformers does, so a checkpoint
    converted by transformers without these keys keeps its own behaviour.
    """

    patches_per_side: int
    pool_mode: PoolMode = "bilinear"
    newline_position: NewlinePosition = "one_token"
    patch_merge_type: str = "spatial_unpad"

    @classmethod
    def from_config(cls, config: LlavaOnevisionConfig) -> VideoLayout:
        vision = config.vision_config
        layout = cls(
            patches_per_side=vision.image_size // vision.patch_size,
            pool_mode=getattr(config, "mm_spatial_pool_mode", None) or cls.pool_mode,
            newline_position=getattr(config, "mm_newline_position", None) or cls.newline_position,
            patch_merge_type=getattr(config, "mm_patch_merge_type", None) or cls.patch_merge_type,
        )
        if layout.pool_mode not in ("bilinear", "average", "max"):
            raise ValueError(f"unsupported mm_spatial_pool_mode {layout.pool_mode!r}")
        if layout.newline_position not in ("grid", "frame", "one_token", "no_token"):
            raise ValueError(f"unsupported mm_newline_position {layout.newline_position!r}")
        stride = getattr(config, "mm_spatial_pool_stride", None)
        if stride not in (None, VIDEO_POOL_STRIDE):
            logger.warning("mm_spatial_pool_stride=%s ignored: the original video path always pools by 2", stride)
        return layout

    @property
    def pooled_side(self) -> int:
        """Side of the pooled grid: bilinear rounds up (27 -> 14), average/max pooling round down (27 -> 13)."""
        if self.pool_mode == "bilinear":
            return math.ceil(self.patches_per_side / VIDEO_POOL_STRIDE)
        return self.patches_per_side // VIDEO_POOL_STRIDE

    def num_video_tokens(self, num_frames: int) -> int:
        """Visual tokens one video of ``num_frames`` frames takes in the prompt."""
        side = self.pooled_side
        if self.newline_position == "grid":
            return num_frames * side * (side + 1)
        if self.newline_position == "frame":
            return num_frames * (side * side + 1)
        if self.newline_position == "one_token" and "unpad" in self.patch_merge_type:
            return num_frames * side * side + 1
        return num_frames * side * side


@dataclass(frozen=True)
class ImageLayout:
    """The anyres tiling of a lone image (``image_aspect_ratio`` anyres / anyres_max_N,
    spatial_unpad), and the one padded tile of an image among several pictures."""

    patches_per_side: int
    tile_size: int
    grid_pinpoints: tuple[tuple[int, int], ...]
    max_tiles: int | None  # anyres_max_9 -> 9: larger unpadded grids are scaled down to ~9 tiles
    patch_merge_type: str = "spatial_unpad"

    @classmethod
    def from_config(cls, config: LlavaOnevisionConfig) -> ImageLayout:
        match = re.fullmatch(r"anyres(?:_max_(\d+))?", config.vision_aspect_ratio or "")
        if match is None:
            raise ValueError(f"unsupported image_aspect_ratio {config.vision_aspect_ratio!r} (anyres or anyres_max_N)")
        vision = config.vision_config
        return cls(
            patches_per_side=vision.image_size // vision.patch_size,
            tile_size=vision.image_size,
            grid_pinpoints=tuple(tuple(p) for p in config.image_grid_pinpoints),
            max_tiles=int(match.group(1)) if match.group(1) else None,
            patch_merge_type=getattr(config, "mm_patch_merge_type", None) or cls.patch_merge_type,
        )

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of tiles the image processor cuts the image into."""
        best_height, best_width = select_best_resolution((height, width), [list(p) for p in self.grid_pinpoints])
        return best_height // self.tile_size, best_width // self.tile_size

    def feature_grid(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Rows and columns kept after unpadding (rows slice, columns slice) and the final (rows, columns)."""
        rows, cols = self.tile_grid(height, width)
        current_height, current_width = rows * self.patches_per_side, cols * self.patches_per_side
        row_slice, col_slice = (0, current_height), (0, current_width)
        # unpad_image of llava_arch.py, with its int() truncation.
        if width / height > current_width / current_height:
            new_height = int(height * (current_width / width))
            padding = (current_height - new_height) // 2
            row_slice = (padding, current_height - padding)
        else:
            new_width = int(width * (current_height / height))
            padding = (current_width - new_width) // 2
            col_slice = (padding, current_width - padding)
        kept_height, kept_width = row_slice[1] - row_slice[0], col_slice[1] - col_slice[0]
        final = (kept_height, kept_width)
        if self.max_tiles is not None:
            times = math.sqrt(kept_height * kept_width / (self.max_tiles * self.patches_per_side**2))
            if times > 1.1:
                final = (int(kept_height // times), int(kept_width // times))
        return (row_slice, col_slice), final

    @property
    def padded_tokens(self) -> int:
        """Visual tokens of an image among several pictures: one padded tile, and a newline when
        the merge type unpads (729 + 1 at 384 px)."""
        return self.patches_per_side**2 + ("unpad" in self.patch_merge_type)

    def num_image_tokens(self, height: int, width: int) -> int:
        """Base tile (no newline) plus the unpadded grid with one newline per row."""
        _, (rows, cols) = self.feature_grid(height, width)
        return self.patches_per_side**2 + rows * (cols + 1)


def pool_frames(features: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
    """(frames, side*side, dim) -> (frames, pooled, pooled, dim), as ``get_2dPool``."""
    frames, _, dim = features.shape
    side = layout.patches_per_side
    grid = features.view(frames, side, side, dim).permute(0, 3, 1, 2)
    if layout.pool_mode == "average":
        grid = nn.functional.avg_pool2d(grid, VIDEO_POOL_STRIDE)
    elif layout.pool_mode == "max":
        grid = nn.functional.max_pool2d(grid, VIDEO_POOL_STRIDE)
    else:
        grid = nn.functional.interpolate(grid, size=[layout.pooled_side] * 2, mode="bilinear")
    return grid.permute(0, 2, 3, 1)


def add_video_newlines(pooled: torch.Tensor, newline: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
    """Flatten pooled frames to one token sequence, inserting ``image_newline`` where the config says."""
    frames, rows, cols, dim = pooled.shape
    newline = newline.to(pooled.device, pooled.dtype)
    if layout.newline_position == "grid":  # add_token_per_grid: after every pooled row
        row_end = newline.expand(frames, rows, 1, dim)
        return torch.cat((pooled, row_end), dim=2).reshape(-1, dim)
    if layout.newline_position == "frame":  # add_token_per_frame: after every frame
        frame_end = newline.expand(frames, 1, dim)
        return torch.cat((pooled.reshape(frames, rows * cols, dim), frame_end), dim=1).reshape(-1, dim)
    tokens = pooled.reshape(-1, dim)
    if layout.newline_position == "one_token" and "unpad" in layout.patch_merge_type:
        tokens = torch.cat((tokens, newline[None]), dim=0)
    return tokens


def pack_image(
    features: torch.Tensor, height: int, width: int, newline: torch.Tensor, layout: ImageLayout
) -> torch.Tensor:
    """(1 + tiles, side*side, dim) projected tile features -> the image's token sequence.

    The anyres branch of ``prepare_inputs_labels_for_multimodal``: base tile first (no newline),
    then the tile grid stitched together, unpadded, scaled down if over ``max_tiles``, with a
    newline after each row.
    """
    side = layout.patches_per_side
    base, tiles = features[0], features[1:]
    rows, cols = layout.tile_grid(height, width)
    grid = tiles.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    (row_slice, col_slice), final = layout.feature_grid(height, width)
    grid = grid[:, slice(*row_slice), slice(*col_slice)]
    if final != tuple(grid.shape[1:]):
        grid = nn.functional.interpolate(grid[None], list(final), mode="bilinear")[0]
    row_end = newline[:, None, None].to(grid.device, grid.dtype).expand(*grid.shape[:-1], 1)
    return torch.cat((base, torch.cat((grid, row_end), dim=-1).flatten(1, 2).transpose(0, 1)), dim=0)


def _selected(vision_outputs, layer: int | list[int], strategy: str | None) -> torch.Tensor:
    """The vision tower's hidden states the projector takes, as transformers selects them."""
    if isinstance(layer, int):
        selected = vision_outputs.hidden_states[layer]
    else:
        selected = torch.cat([vision_outputs.hidden_states[i] for i in layer], dim=-1)
    return selected[:, 1:] if strategy == "default" else selected


class LlavaVideoModel(LlavaOnevisionModel):
    """LlavaOnevisionModel whose visual tokens follow the original code (see the module docstring)."""

    def __init__(self, config: LlavaOnevisionConfig) -> None:
        super().__init__(config)
        self.video_layout = VideoLayout.from_config(config)
        self.image_layout = ImageLayout.from_config(config)

    def pack_image_features(self, image_features, image_sizes, image_newline=None, vision_aspect_ratio=None):
        """Replaces transformers' packing (same inputs: per-image tile features, (height, width) sizes)."""
        packed = [
            pack_image(features, int(size[0]), int(size[1]), self.image_newline, self.image_layout)
            for features, size in zip(image_features, image_sizes, strict=True)
        ]
        lengths = torch.tensor([len(p) for p in packed], dtype=torch.long, device=packed[0].device)
        return packed, lengths

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_padded_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Encode (images, 3, H, W) single tiles, each an image padded to a square (the original's
        "pad" recipe for several pictures); ``pooler_output`` is (images, tokens, dim).

        The single-image branch of ``prepare_inputs_labels_for_multimodal``: the tile's projected
        features, then one ``image_newline`` when the merge type unpads (729 + 1 rows at 384 px).
        """
        vision_outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        projected = self.multi_modal_projector(
            _selected(vision_outputs, vision_feature_layer, vision_feature_select_strategy)
        )
        if "unpad" in self.image_layout.patch_merge_type:
            newline = self.image_newline.to(projected.device, projected.dtype)
            projected = torch.cat((projected, newline.expand(len(projected), 1, -1)), dim=1)
        return BaseModelOutputWithPooling(pooler_output=projected)

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        frames_per_chunk: int | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Encode (batch, frames, 3, H, W) videos; ``pooler_output`` is (batch, tokens, dim).

        Frames go through the vision tower ``frames_per_chunk`` at a time (all at once when None),
        so activation memory does not grow with the frame count; every frame is encoded on its
        own either way, so the features are the same.
        """
        batch, frames = pixel_values_videos.shape[:2]
        flat = pixel_values_videos.flatten(0, 1)
        step = frames_per_chunk or len(flat)
        pooled_chunks = []
        for start in range(0, len(flat), step):
            vision_outputs = self.vision_tower(flat[start : start + step], return_dict=True, **kwargs)
            selected = _selected(vision_outputs, vision_feature_layer, vision_feature_select_strategy)
            # The original projects first and pools the projected features (encode_images, then get_2dPool).
            pooled_chunks.append(pool_frames(self.multi_modal_projector(selected), self.video_layout))
            del vision_outputs, selected  # free this chunk's activations before the next
        pooled = torch.cat(pooled_chunks).unflatten(0, (batch, frames))
        tokens = torch.stack([add_video_newlines(video, self.image_newline, self.video_layout) for video in pooled])
        return BaseModelOutputWithPooling(pooler_output=tokens)


class LlavaVideoForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """LlavaOnevisionForConditionalGeneration built around :class:`LlavaVideoModel`; same weight names."""

    def __init__(self, config: LlavaOnevisionConfig) -> None:
        # Skip the parent's __init__ so the language model is built once, as LlavaVideoModel.
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.model = LlavaVideoModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def video_layout(self) -> VideoLayout:
        return self.model.video_layout

    @property
    def image_layout(self) -> ImageLayout:
        return self.model.image_layout
