"""Write tiny random-weight LLaVA-Video checkpoints for tests and the demo.

Same architecture and file layout as the published model (SigLIP 384 px / patch 14 vision tower,
two-layer MLP projector, Qwen2 language model, byte-level BPE tokenizer with the Qwen chat markers)
but tiny widths, so the real loading, preprocessing and generation code runs on a laptop CPU.
Every quantised width is a multiple of 64 so bitsandbytes 4-bit also runs on CPU.

    python -m llava_custom.tiny DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    Qwen2Tokenizer,
    SiglipVisionConfig,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from llava_custom.modeling import LlavaVideoForConditionalGeneration

SYSTEM_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VISUAL_TOKENS = ("<image>", "<video>")
# SigLIP normalisation used by LLaVA-Video (mean = std = 0.5), not the OpenAI CLIP defaults.
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]

# Qwen2 chat template (as shipped with Qwen2 instruct tokenizers), with <image>/<video> parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'video' %}{{ '<video>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Text the BPE merges are learnt from: the words the service's prompts and answers use.
_CORPUS = """\
You are a helpful assistant. Please describe what is happening in this video.
Please describe what is in this image. What is the person doing? Describe the scene in detail.
The video lasts for 10.50 seconds, and 16 frames are uniformly sampled from it. These frames are
located at 0.00s,0.70s,1.40s,2.10s. Please answer the following questions related to this video.
A red car drives down a street while people walk on the sidewalk. The sky is blue and the sun
shines. A cat sits on a wooden table next to a cup of coffee and a laptop computer. There are
three dogs playing in the green grass of a park. The man is cooking food in the kitchen.
"""


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny model; the production model's are in the comments."""

    vision_hidden: int = 64  # 1152
    vision_intermediate: int = 128  # 4304
    vision_layers: int = 2  # 26 (27 minus the unused last layer)
    vision_heads: int = 2  # 16
    image_size: int = 384  # 384: same processor, same 27 x 27 patch grid as production
    patch_size: int = 14  # 14
    text_hidden: int = 128  # 3584
    text_intermediate: int = 256  # 18944
    text_layers: int = 2  # 28
    text_heads: int = 4  # 28
    text_kv_heads: int = 2  # 4
    bpe_vocab: int = 512  # 151643
    # Random weights this much wider than the default init make answers depend on the input,
    # instead of one token repeated whatever the picture.
    init_scale: float = 8.0


def build_tokenizer(spec: TinySpec = TinySpec()) -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer with Qwen2's pre-tokenizer, learnt offline from a small corpus.

    Special tokens follow the regular vocabulary in the same order as Qwen2's
    (<|endoftext|>, <|im_start|>, <|im_end|>), then <image> and <video> as in llava-hf.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    tokenizer = Qwen2Tokenizer(
        vocab=bpe.get_vocab(),
        merges=[tuple(pair) for pair in merges],
        errors="replace",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SYSTEM_TOKENS[1:] + VISUAL_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer: Qwen2Tokenizer, spec: TinySpec = TinySpec(), **video_keys: object) -> LlavaOnevisionConfig:
    """LlavaOnevision config of the tiny model; ``video_keys`` override the LLaVA-Video ``mm_*`` keys."""
    # Like Qwen2-7B (152064 rows for 151665 tokens) the embedding has spare rows.
    vocab_size = (len(tokenizer) // 64 + 1) * 64
    vision = SiglipVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    )
    mm_keys = {
        "mm_spatial_pool_mode": "bilinear",
        "mm_spatial_pool_stride": 2,
        "mm_newline_position": "grid",
        "mm_patch_merge_type": "spatial_unpad",
    }
    mm_keys.update(video_keys)
    return LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        **mm_keys,
    )


def build_model(config: LlavaOnevisionConfig, spec: TinySpec = TinySpec(), seed: int = 0):
    """Random weights, deterministic for a seed, scaled so outputs depend on the input."""
    torch.manual_seed(seed)
    model = LlavaVideoForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Norm weights stay at 1; the rest are widened (see TinySpec.init_scale).
            if "norm" not in name:
                param.mul_(spec.init_scale)
    return model


def build_processor(tokenizer: Qwen2Tokenizer, config: LlavaOnevisionConfig) -> LlavaOnevisionProcessor:
    """Processor with the SigLIP 384 px settings and the config's anyres grid."""
    size = {"height": config.vision_config.image_size, "width": config.vision_config.image_size}
    image_processor = LlavaOnevisionImageProcessor(
        size=size, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, image_grid_pinpoints=config.image_grid_pinpoints
    )
    video_processor = LlavaOnevisionVideoProcessor(size=size, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    patches = config.vision_config.image_size // config.vision_config.patch_size
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=patches * patches,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=CHAT_TEMPLATE,
    )


def write_tiny_checkpoint(
    path: Path | str, *, seed: int = 0, spec: TinySpec = TinySpec(), **video_keys: object
) -> Path:
    """Write a tiny checkpoint in the transformers (llava-hf) layout to ``path`` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec)
    config = build_config(tokenizer, spec, **video_keys)
    model = build_model(config, spec, seed)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(path)
    build_processor(tokenizer, config).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_tiny_checkpoint(args.path, seed=args.seed))


if __name__ == "__main__":
    main()
