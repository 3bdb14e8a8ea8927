"""LlavaOnevision with the video path of the original LLaVA-Video code.

transformers' LlavaOnevision always pools video frames bilinearly with stride 2 and appends a
single ``image_newline`` per video. LLaVA-Video checkpoints were trained with the pooling and
newline layout named in their config (``mm_spatial_pool_mode``, ``mm_spatial_pool_stride``,
``mm_newline_position``), e.g. one newline after every pooled row (``grid``: 14 x 15 = 210 tokens
per frame). ``LlavaVideoForConditionalGeneration`` reproduces ``get_2dPool`` and
``add_token_per_grid`` / ``add_token_per_frame`` of LLaVA-NeXT's ``llava_arch.py``; everything
else (vision tower, projector, image anyres path, language model) is transformers' own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import LlavaOnevisionConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import select_hidden_states

PoolMode = Literal["bilinear", "average", "max"]
NewlinePosition = Literal["grid", "frame", "one_token", "no_token"]


@dataclass(frozen=True)
class VideoLayout:
    """How frame features become video tokens, read from the checkpoint's config.

    Defaults (bilinear, stride 2, one newline per video) are what transformers does, so a
    checkpoint converted by transformers without these keys keeps its own behaviour.
    """

    patches_per_side: int
    pool_mode: PoolMode = "bilinear"
    pool_stride: int = 2
    newline_position: NewlinePosition = "one_token"
    patch_merge_type: str = "spatial_unpad"

    @classmethod
    def from_config(cls, config: LlavaOnevisionConfig) -> VideoLayout:
        vision = config.vision_config
        layout = cls(
            patches_per_side=vision.image_size // vision.patch_size,
            pool_mode=getattr(config, "mm_spatial_pool_mode", None) or cls.pool_mode,
            pool_stride=int(getattr(config, "mm_spatial_pool_stride", None) or cls.pool_stride),
            newline_position=getattr(config, "mm_newline_position", None) or cls.newline_position,
            patch_merge_type=getattr(config, "mm_patch_merge_type", None) or cls.patch_merge_type,
        )
        if layout.pool_mode not in ("bilinear", "average", "max"):
            raise ValueError(f"unsupported mm_spatial_pool_mode {layout.pool_mode!r}")
        if layout.newline_position not in ("grid", "frame", "one_token", "no_token"):
            raise ValueError(f"unsupported mm_newline_position {layout.newline_position!r}")
        return layout

    @property
    def pooled_side(self) -> int:
        """Side of the pooled token grid: bilinear rounds up (27 -> 14), pooling rounds down (27 -> 13)."""
        if self.pool_mode == "bilinear":
            return math.ceil(self.patches_per_side / self.pool_stride)
        return self.patches_per_side // self.pool_stride

    def num_video_tokens(self, num_frames: int) -> int:
        """Visual tokens one video of ``num_frames`` frames takes in the prompt."""
        side = self.pooled_side
        per_frame = side * side
        if self.newline_position == "grid":
            return num_frames * side * (side + 1)
        if self.newline_position == "frame":
            return num_frames * (per_frame + 1)
        if self.newline_position == "one_token" and "unpad" in self.patch_merge_type:
            return num_frames * per_frame + 1
        return num_frames * per_frame


def pool_frames(features: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
    """(frames, side*side, dim) -> (frames, pooled_side, pooled_side, dim), as ``get_2dPool``."""
    frames, _, dim = features.shape
    side = layout.patches_per_side
    grid = features.view(frames, side, side, dim).permute(0, 3, 1, 2)
    if layout.pool_mode == "average":
        grid = nn.functional.avg_pool2d(grid, layout.pool_stride)
    elif layout.pool_mode == "max":
        grid = nn.functional.max_pool2d(grid, layout.pool_stride)
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


class LlavaVideoModel(LlavaOnevisionModel):
    """LlavaOnevisionModel whose video features follow the checkpoint's pooling/newline config."""

    def __init__(self, config: LlavaOnevisionConfig) -> None:
        super().__init__(config)
        self.video_layout = VideoLayout.from_config(config)

    @merge_with_config_defaults
    @can_return_tuple
    @select_hidden_states("vision_feature_layer")
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Encode (batch, frames, 3, H, W) videos; ``pooler_output`` is (batch, tokens, dim)."""
        batch, frames = pixel_values_videos.shape[:2]
        vision_outputs = self.vision_tower(pixel_values_videos.flatten(0, 1), return_dict=True, **kwargs)
        if isinstance(vision_feature_layer, int):
            selected = vision_outputs.hidden_states[vision_feature_layer]
        else:
            selected = torch.cat([vision_outputs.hidden_states[i] for i in vision_feature_layer], dim=-1)
        if vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        # The original projects first and pools the projected features (encode_images, then get_2dPool).
        projected = self.multi_modal_projector(selected)
        pooled = pool_frames(projected, self.video_layout).unflatten(0, (batch, frames))
        vision_outputs.pooler_output = torch.stack(
            [add_video_newlines(video, self.image_newline, self.video_layout) for video in pooled]
        )
        return vision_outputs


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
