"""load_pretrained_model on the tiny checkpoint: float and 4-bit loads, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from torch import nn

from llava_custom.builder import load_pretrained_model
from llava_custom.engine import Engine, GenerationSettings
from llava_custom.errors import ModelLoadError

FRAMES = np.random.default_rng(0).integers(0, 256, (3, 384, 384, 3), dtype=np.uint8)


def linears(module: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


@pytest.fixture(scope="module")
def float_model(tiny_checkpoint):
    return load_pretrained_model(str(tiny_checkpoint), load_4bit=False, device="cpu")


@pytest.fixture(scope="module")
def four_bit_model(tiny_checkpoint):
    return load_pretrained_model(str(tiny_checkpoint), load_4bit=True, device="cpu")


def test_float_load_on_cpu_is_float32_with_sdpa(float_model):
    assert float_model.dtype == torch.float32 and not float_model.load_4bit
    assert float_model.attn_implementation == "sdpa"
    assert float_model.model.config.text_config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 for p in float_model.model.parameters())
    assert not any(isinstance(m, Linear4bit) for m in float_model.model.modules())


def test_four_bit_quantises_exactly_the_language_model(four_bit_model):
    model = four_bit_model.model
    language = linears(model.model.language_model)
    assert language and all(isinstance(m, Linear4bit) for m in language.values())
    assert all(m.weight.quant_state.quant_type == "nf4" for m in language.values())
    kept = linears(model.model.vision_tower) | linears(model.model.multi_modal_projector)
    kept["lm_head"] = model.lm_head
    assert all(not isinstance(m, Linear4bit) and m.weight.dtype == torch.float32 for m in kept.values())


def test_four_bit_model_is_smaller(float_model, four_bit_model):
    def language_bytes(loaded) -> int:
        return sum(p.numel() * p.element_size() for p in loaded.model.model.language_model.layers.parameters())

    assert language_bytes(four_bit_model) * 4 < language_bytes(float_model)


@pytest.mark.parametrize("fixture", ["float_model", "four_bit_model"])
def test_both_loads_generate(fixture, request):
    engine = Engine(request.getfixturevalue(fixture))
    answer = engine.submit_video(FRAMES, 3.0, [0.0, 1.0, 2.0], "What?", GenerationSettings(max_new_tokens=4)).result()
    assert 1 <= answer.completion_tokens <= 4
    assert answer.visual_tokens == 3 * 210


def test_four_bit_logits_stay_close_to_float(float_model, four_bit_model, tiny_checkpoint):
    """nf4 is lossy (about 0.9 cosine on these widened random weights) but computes the same function."""
    ids = torch.tensor([float_model.processor.tokenizer("Describe the scene in detail.")["input_ids"]])
    with torch.inference_mode():
        exact = float_model.model(input_ids=ids).logits[0, -1]
        quantised = four_bit_model.model(input_ids=ids).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(exact, quantised, dim=0) > 0.85


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained_model(str(tmp_path / "nowhere"), load_4bit=False, device="cpu")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_pretrained_model(str(tmp_path), load_4bit=False, device="cpu")


def test_not_a_llava_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelLoadError, match="BertModel"):
        load_pretrained_model(str(tmp_path), load_4bit=False, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_requested_without_gpu(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_pretrained_model(str(tiny_checkpoint), device="cuda")


def test_flash_attention_needs_cuda(tiny_checkpoint):
    with pytest.raises(ModelLoadError, match="flash_attention_2"):
        load_pretrained_model(str(tiny_checkpoint), load_4bit=False, device="cpu", attn="flash_attention_2")
