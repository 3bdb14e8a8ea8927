"""Video features follow the checkpoint's mm_* keys exactly as the original LLaVA-NeXT code.

Expected counts come from the original's arithmetic on SigLIP's 27x27 patch grid: bilinear
pooling with stride 2 rounds up (14x14), average/max pooling rounds down (13x13); ``grid`` adds
a newline after every pooled row, ``frame`` after every frame, ``one_token`` once per video.
"""

from __future__ import annotations

import pytest
import torch

from testing.tiny import build_config, build_model, build_tokenizer

FRAMES = 3
# (pool mode, newline position) -> tokens for a 3-frame video
EXPECTED = {
    ("bilinear", "grid"): 3 * 14 * 15,
    ("bilinear", "frame"): 3 * (14 * 14 + 1),
    ("bilinear", "one_token"): 3 * 14 * 14 + 1,
    ("bilinear", "no_token"): 3 * 14 * 14,
    ("average", "grid"): 3 * 13 * 14,
    ("average", "frame"): 3 * (13 * 13 + 1),
    ("max", "one_token"): 3 * 13 * 13 + 1,
    ("max", "no_token"): 3 * 13 * 13,
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def newline_positions(position: str, side: int) -> list[int]:
    if position == "grid":
        return [f * side * (side + 1) + r * (side + 1) + side for f in range(FRAMES) for r in range(side)]
    if position == "frame":
        return [f * (side * side + 1) + side * side for f in range(FRAMES)]
    if position == "one_token":
        return [FRAMES * side * side]
    return []


@pytest.mark.parametrize(("pool_mode", "newline_position"), sorted(EXPECTED))
def test_video_token_count_and_newline_placement(tokenizer, pool_mode, newline_position):
    config = build_config(tokenizer, mm_spatial_pool_mode=pool_mode, mm_newline_position=newline_position)
    model = build_model(config).model
    expected = EXPECTED[pool_mode, newline_position]
    assert model.video_layout.num_video_tokens(FRAMES) == expected

    pixels = torch.randn(1, FRAMES, 3, 384, 384)
    with torch.inference_mode():
        features = model.get_video_features(pixels).pooler_output
    assert features.shape == (1, expected, config.text_config.hidden_size)

    side = 14 if pool_mode == "bilinear" else 13
    is_newline = (features[0] == model.image_newline).all(dim=-1)
    assert torch.nonzero(is_newline).flatten().tolist() == newline_positions(newline_position, side)


def test_average_pooling_averages_projected_patches(tokenizer):
    """Pooling runs on projected features (encode_images, then get_2dPool), as in the original."""
    config = build_config(tokenizer, mm_spatial_pool_mode="average", mm_newline_position="no_token")
    model = build_model(config).model
    pixels = torch.randn(1, 1, 3, 384, 384)
    with torch.inference_mode():
        pooled = model.get_video_features(pixels).pooler_output[0].view(13, 13, -1)
        patches = model.vision_tower(pixels[0], output_hidden_states=True).hidden_states[-1]
        projected = model.multi_modal_projector(patches).view(27, 27, -1)
    torch.testing.assert_close(pooled[2, 5], projected[4:6, 10:12].mean(dim=(0, 1)), rtol=1e-5, atol=1e-5)


def test_unknown_pool_mode_is_refused(tokenizer):
    with pytest.raises(ValueError, match="mm_spatial_pool_mode"):
        build_model(build_config(tokenizer, mm_spatial_pool_mode="median"))
