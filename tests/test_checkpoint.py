"""The published (original LLaVA-NeXT) layout loads as it is and answers like the transformers layout.

The tiny checkpoint is written in both layouts from the same bfloat16-exact random weights; both
are loaded through load_pretrained_model and must give identical logits and greedy answers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from PIL import Image
from safetensors import safe_open

from llava_custom.builder import load_pretrained_model
from llava_custom.checkpoint import SO400M_ID, _vision_config, locate_checkpoint
from llava_custom.engine import Engine, GenerationSettings
from llava_custom.errors import ModelLoadError
from testing.tiny import TINY_TOWER_ID, TinySpec

# Token counts of anyres_max_9 images as the original code computes them (LLaVA-NeXT df17966,
# prepare_inputs_labels_for_multimodal run on these sizes). 369x820 and 1375x750 are sizes where
# transformers' rounding in unpad_image would give two more rows or columns.
ORIGINAL_IMAGE_TOKENS = {
    (640, 480): 2929,
    (1920, 1080): 7269,
    (384, 384): 1485,
    (100, 100): 1485,
    (500, 1000): 4050,
    (1000, 333): 2943,
    (3000, 2000): 7329,
    (369, 820): 729 + 59 * (27 + 1),
    (1375, 750): 729 + 54 * (98 + 1),
}


@pytest.fixture(scope="module")
def both_layouts(tiny_checkpoint, tiny_original_checkpoint):
    return (
        load_pretrained_model(str(tiny_checkpoint), load_4bit=False, device="cpu"),
        load_pretrained_model(str(tiny_original_checkpoint), load_4bit=False, device="cpu"),
    )


def test_original_layout_is_written_like_the_published_checkpoint(tiny_original_checkpoint):
    files = {p.name for p in tiny_original_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.json"} <= files
    assert {"model.safetensors.index.json", "model-00001-of-00002.safetensors"} <= files
    config = json.loads((tiny_original_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlavaQwenForCausalLM"]
    assert config["mm_vision_tower"] == TINY_TOWER_ID and config["mm_newline_position"] == "grid"
    index = json.loads((tiny_original_checkpoint / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "model.mm_projector.0.weight" in names and "model.image_newline" in names
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in names
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" in names
    assert not any("language_model" in n or "multi_modal_projector" in n for n in names)
    shard = tiny_original_checkpoint / "model-00001-of-00002.safetensors"
    with safe_open(str(shard), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16


def test_both_layouts_load_the_same_model(both_layouts):
    hf, original = both_layouts
    hf_weights, original_weights = hf.model.state_dict(), original.model.state_dict()
    assert hf_weights.keys() == original_weights.keys()
    assert all(torch.equal(hf_weights[k], original_weights[k]) for k in hf_weights)
    assert original.model.config.vision_config.num_hidden_layers == TinySpec().vision_layers
    for name in ("image_token_index", "video_token_index"):
        assert getattr(hf.model.config, name) == getattr(original.model.config, name)
    assert original.repetition_penalty == 1.05


def test_both_layouts_tokenise_alike(both_layouts):
    text = "<|im_start|>user\n<video>The video lasts for 12.50 seconds, wörld!<|im_end|>\n"
    hf, original = (loaded.processor.tokenizer for loaded in both_layouts)
    assert hf(text)["input_ids"] == original(text)["input_ids"]
    assert len(hf) == len(original)


def first_step_logits(engine: Engine, **answer_kwargs) -> torch.Tensor:
    """Logits of the first generated token, through the engine's own input building."""
    captured = []

    def hook(_module, _inputs, output):  # the model's head: the prefill's last token comes first
        captured.append(output.reshape(-1, output.shape[-1])[-1].clone())

    handle = engine.model.lm_head.register_forward_hook(hook)
    try:
        submit = engine.submit_video if "frames" in answer_kwargs else engine.submit_image
        answer = submit(**answer_kwargs, settings=GenerationSettings(max_new_tokens=8)).result()
    finally:
        handle.remove()
    return captured[0], answer


def test_identical_logits_and_answers_for_video(both_layouts):
    frames = np.random.default_rng(3).integers(0, 256, (4, 384, 384, 3), dtype=np.uint8)
    kwargs = dict(frames=frames, duration=4.0, frame_times=[0.0, 1.0, 2.0, 3.0], question="What happens?")
    hf_logits, hf_answer = first_step_logits(Engine(both_layouts[0]), **kwargs)
    original_logits, original_answer = first_step_logits(Engine(both_layouts[1]), **kwargs)
    torch.testing.assert_close(hf_logits, original_logits, rtol=0, atol=0)
    assert hf_answer == original_answer
    assert hf_answer.visual_tokens == 4 * 210


def test_identical_logits_and_answers_for_image(both_layouts):
    pixels = np.random.default_rng(4).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    kwargs = dict(image=Image.fromarray(pixels), question="What is this?")
    hf_logits, hf_answer = first_step_logits(Engine(both_layouts[0]), **kwargs)
    original_logits, original_answer = first_step_logits(Engine(both_layouts[1]), **kwargs)
    torch.testing.assert_close(hf_logits, original_logits, rtol=0, atol=0)
    assert hf_answer == original_answer
    assert hf_answer.visual_tokens == ORIGINAL_IMAGE_TOKENS[640, 480]


@pytest.mark.parametrize(("size", "tokens"), sorted(ORIGINAL_IMAGE_TOKENS.items()))
def test_image_token_count_is_the_originals(both_layouts, size, tokens):
    width, height = size
    assert both_layouts[1].model.image_layout.num_image_tokens(height, width) == tokens


@pytest.mark.parametrize("size", [(369, 820), (1375, 750), (300, 100)])
def test_packed_image_features_match_the_count(both_layouts, size):
    """The model really produces as many features as the prompt has placeholders (else generate fails)."""
    engine = Engine(both_layouts[1])
    image = Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8))
    answer = engine.submit_image(image, "Q", GenerationSettings(max_new_tokens=1)).result()
    assert answer.visual_tokens == engine.model.image_layout.num_image_tokens(size[1], size[0])


def test_original_layout_in_four_bit(tiny_original_checkpoint):
    loaded = load_pretrained_model(str(tiny_original_checkpoint), load_4bit=True, device="cpu")
    layers = loaded.model.model.language_model.layers
    assert isinstance(layers[0].self_attn.q_proj, Linear4bit) and isinstance(layers[-1].mlp.down_proj, Linear4bit)
    assert not isinstance(loaded.model.model.multi_modal_projector.linear_1, Linear4bit)


def test_loading_writes_nothing(tiny_original_checkpoint):
    """Keys are renamed while loading: no converted copy appears next to the checkpoint."""
    before = sorted(p.name for p in tiny_original_checkpoint.iterdir())
    load_pretrained_model(str(tiny_original_checkpoint), load_4bit=False, device="cpu")
    assert sorted(p.name for p in tiny_original_checkpoint.iterdir()) == before


def test_so400m_tower_needs_no_download():
    """The published checkpoint's tower config is built in (the test session is offline)."""
    vision = _vision_config(SO400M_ID)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1152, 26, 384, 14)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mm_projector_type": "linear"}, "mm_projector_type"),
        ({"image_aspect_ratio": "pad"}, "image_aspect_ratio"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ({"mm_vision_tower": "someone/missing-tower"}, "someone/missing-tower"),
    ],
)
def test_unsupported_original_options_are_refused(tiny_original_checkpoint, tmp_path, change, message):
    copy = shutil.copytree(tiny_original_checkpoint, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text()) | change
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        load_pretrained_model(str(copy), load_4bit=False, device="cpu")


def test_an_incomplete_download_is_found_before_loading(tiny_original_checkpoint, tmp_path):
    """A shard missing from a local directory, or from the cache when offline, is named with the
    command that fetches it, before any weight is read."""
    local = shutil.copytree(tiny_original_checkpoint, tmp_path / "local")
    (local / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"1 of the 2 weight files .* missing .* `hf download"):
        locate_checkpoint(str(local))
    (local / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        locate_checkpoint(str(local))

    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)  # the session's own, offline (conftest)
    repo = cache / "models--llava-tiny--half-downloaded"
    snapshot = shutil.copytree(tiny_original_checkpoint, repo / "snapshots" / ("2" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("2" * 40)
    assert locate_checkpoint("llava-tiny/half-downloaded").layout == "original"
    (snapshot / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"missing from the Hugging Face cache .* `hf download llava-tiny/"):
        locate_checkpoint("llava-tiny/half-downloaded")
