"""Write tiny random-weight LLaVA-Video checkpoints for tests and the demo.

Same architecture and file layout as the published model (SigLIP 384 px / patch 14 vision tower,
two-layer MLP projector, Qwen2 language model, byte-level BPE tokenizer with the Qwen chat markers)
but tiny widths, so the real loading, preprocessing and generation code runs on a laptop CPU.
Every quantised width is a multiple of 64 so bitsandbytes 4-bit also runs on CPU.

:func:`write_random_checkpoint` writes the original layout for any sizes (:data:`LLAVA_VIDEO_7B`
is the published model's) without building the model: each tensor is drawn on the given device
and written shard by shard, so 7B parameters take seconds on a GPU and one shard of host memory.

    python -m testing.tiny DIR [--layout transformers|original] [--seed N] [--readable]

``--readable`` (``make demo``) gives the tokens that decode to no printable text a logit of 0 (see
:func:`make_answers_readable`), so that the demo's random answers are readable random text instead
of control characters; the tests' checkpoints (and the golden data's fingerprints) are written
without it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import huggingface_hub.constants
import torch
from safetensors.torch import save_file
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
    SiglipVisionModel,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from llava_custom.checkpoint import SIGLIP_MEAN, SIGLIP_STD, SO400M, SO400M_ID, assemble_processor
from llava_custom.modeling import LlavaVideoForConditionalGeneration

SYSTEM_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VISUAL_TOKENS = ("<image>", "<video>")

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
    vocab_rows: int = 0  # 152064; 0: the tokenizer's size rounded up to a multiple of 64
    # Random weights this much wider than the default init make answers depend on the input,
    # instead of one token repeated whatever the picture.
    init_scale: float = 8.0


# LLaVA-Video-7B-Qwen2's sizes (Qwen2-7B, SigLIP so400m without its last layer), with the tiny
# tokenizer: its ids all fall inside the 152064-row embedding, so only the vocabulary is small.
LLAVA_VIDEO_7B = TinySpec(
    vision_hidden=1152,
    vision_intermediate=4304,
    vision_layers=26,
    vision_heads=16,
    text_hidden=3584,
    text_intermediate=18944,
    text_layers=28,
    text_heads=28,
    text_kv_heads=4,
    vocab_rows=152064,
)


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
    vocab_size = spec.vocab_rows or (len(tokenizer) // 64 + 1) * 64
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_rows={vocab_size} is smaller than the {len(tokenizer)}-token tokenizer")
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
    """Random weights, deterministic for a seed, scaled so outputs depend on the input.

    Every value is representable in bfloat16, the dtype the original layout is stored in, so both
    layouts of one seed hold exactly the same weights.
    """
    torch.manual_seed(seed)
    model = LlavaVideoForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Norm weights stay at 1; the rest are widened (see TinySpec.init_scale).
            if "norm" not in name:
                param.mul_(spec.init_scale)
            param.copy_(param.to(torch.bfloat16))
    return model


def unreadable_token_ids(tokenizer: Qwen2Tokenizer, rows: int) -> list[int]:
    """Ids of the ``rows`` output rows that decode to no printable text on their own: control
    bytes (all but the newline), lone bytes of multi-byte characters (which decode to U+FFFD),
    and the rows past the tokenizer. Special tokens (the end of the turn) are kept."""
    special = set(tokenizer.all_special_ids)
    unreadable = []
    for token_id in range(rows):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id]) if token_id < len(tokenizer) else ""
        if not text or "\ufffd" in text or any(not ch.isprintable() and ch != "\n" for ch in text):
            unreadable.append(token_id)
    return unreadable


def make_answers_readable(model: LlavaVideoForConditionalGeneration, tokenizer: Qwen2Tokenizer) -> None:
    """Zero the lm_head rows of :func:`unreadable_token_ids` and widen the others 4 times (exact in
    bfloat16): the unreadable tokens' logit is 0 whatever the input, far below the largest of the
    others, so neither greedy decoding nor sampling at temperature 1 picks them (greedy decoding
    ranks the others as before). Weights only: the code paths are those of every checkpoint."""
    weight = model.get_output_embeddings().weight
    with torch.no_grad():
        weight.mul_(4)
        weight[unreadable_token_ids(tokenizer, weight.shape[0])] = 0


def build_processor(tokenizer: Qwen2Tokenizer, config: LlavaOnevisionConfig) -> LlavaOnevisionProcessor:
    """Processor with the SigLIP 384 px settings and the config's anyres grid."""
    size = {"height": config.vision_config.image_size, "width": config.vision_config.image_size}
    image_processor = LlavaOnevisionImageProcessor(
        size=size, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD, image_grid_pinpoints=config.image_grid_pinpoints
    )
    video_processor = LlavaOnevisionVideoProcessor(size=size, image_mean=SIGLIP_MEAN, image_std=SIGLIP_STD)
    return assemble_processor(tokenizer, image_processor, video_processor, config, chat_template=CHAT_TEMPLATE)


def build_generation_config(tokenizer: Qwen2Tokenizer) -> GenerationConfig:
    """What LLaVA-Video-7B-Qwen2 ships (Qwen2-7B-Instruct's sampling defaults and repetition penalty)."""
    endoftext, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    return GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[im_end, endoftext],
        pad_token_id=endoftext,
        do_sample=True,
        temperature=0.7,
        top_k=20,
        top_p=0.8,
        repetition_penalty=1.05,
    )


def write_tiny_checkpoint(
    path: Path | str,
    *,
    layout: Literal["transformers", "original"] = "transformers",
    seed: int = 0,
    spec: TinySpec = TinySpec(),
    readable: bool = False,
    **video_keys: object,
) -> Path:
    """Write a tiny checkpoint to ``path`` and return it.

    ``readable``: zero the output rows of tokens that decode to no printable text (see
    :func:`make_answers_readable`); the weights then differ from those of the same seed without it.

    ``layout="transformers"`` writes the llava-hf layout; ``"original"`` the LLaVA-NeXT layout of
    lmms-lab/LLaVA-Video-7B-Qwen2, whose vision tower is named by hub id: it is written into the
    Hugging Face cache (``HF_HUB_CACHE``) as :data:`TINY_TOWER_ID`. Same seed, same weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec)
    config = build_config(tokenizer, spec, **video_keys)
    model = build_model(config, spec, seed)
    if readable:
        make_answers_readable(model, tokenizer)
    model.generation_config = build_generation_config(tokenizer)
    if layout == "transformers":
        model.save_pretrained(path)
        build_processor(tokenizer, config).save_pretrained(path)
    else:
        _write_original_layout(path, model, tokenizer)
    return path


# --- the original LLaVA-NeXT layout -------------------------------------------------------------

TINY_TOWER_ID = "llava-tiny/siglip-tiny-patch14-384"
_TOWER_REVISION = "0" * 40
# transformers name -> original name, the inverse of checkpoint.ORIGINAL_KEY_MAPPING
_ORIGINAL_NAMES = (
    ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("model.language_model.", "model."),
)


def original_weight_name(name: str) -> str:
    for prefix, original in _ORIGINAL_NAMES:
        if name.startswith(prefix):
            return original + name[len(prefix) :]
    return name


def _write_original_layout(path: Path, model: LlavaVideoForConditionalGeneration, tokenizer: Qwen2Tokenizer) -> None:
    tensors = {original_weight_name(k): v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    _save_sharded(tensors, path, shards=2)
    _write_original_files(path, model.config, model.generation_config, tokenizer, TINY_TOWER_ID)
    _write_tower_to_hub_cache(model.config.vision_config)


def _write_original_files(
    path: Path,
    config: LlavaOnevisionConfig,
    generation_config: GenerationConfig,
    tokenizer: Qwen2Tokenizer,
    vision_tower: str,
) -> None:
    """Everything of the original layout but the weights: config, generation config, tokenizer files."""
    (path / "config.json").write_text(json.dumps(_original_config(config, tokenizer, vision_tower), indent=2))
    generation_config.save_pretrained(path)
    _write_original_tokenizer(path, tokenizer)
    # The checkpoint's own preprocessor_config.json (SigLIP's), which the original code ignores.
    side = config.vision_config.image_size
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_convert_rgb": None,
                "do_normalize": True,
                "do_rescale": True,
                "do_resize": True,
                "image_mean": SIGLIP_MEAN,
                "image_processor_type": "SiglipImageProcessor",
                "image_std": SIGLIP_STD,
                "processor_class": "LlavaProcessor",
                "resample": 3,
                "rescale_factor": 1 / 255,
                "size": {"height": side, "width": side},
            },
            indent=2,
        )
    )


def _save_sharded(tensors: dict[str, torch.Tensor], path: Path, shards: int) -> None:
    """safetensors shards plus model.safetensors.index.json, as the published checkpoint (4 shards)."""
    names = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = names[shard * len(names) // shards : (shard + 1) * len(names) // shards]
        save_file({name: tensors[name] for name in part}, path / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    _write_index(path, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))


def _write_index(path: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _original_config(config: LlavaOnevisionConfig, tokenizer: Qwen2Tokenizer, vision_tower: str) -> dict:
    """config.json as LLaVA-NeXT's trainer writes it for a Qwen2 LLaVA-Video model."""
    text = config.text_config
    endoftext, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    return {
        "_name_or_path": "",
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        "add_faster_video": False,
        "add_time_instruction": True,
        "attention_dropout": 0.0,
        "bos_token_id": endoftext,
        "eos_token_id": im_end,
        "faster_token_stride": 10,
        "force_sample": True,
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "image_aspect_ratio": config.vision_aspect_ratio,
        "image_crop_resolution": None,
        "image_grid_pinpoints": config.image_grid_pinpoints,
        "image_split_resolution": None,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers,
        "mm_hidden_size": config.vision_config.hidden_size,
        "mm_newline_position": config.mm_newline_position,
        "mm_patch_merge_type": config.mm_patch_merge_type,
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_spatial_pool_mode": config.mm_spatial_pool_mode,
        "mm_spatial_pool_stride": config.mm_spatial_pool_stride,
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower,
        "mm_vision_tower_lr": 2e-06,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "pos_skipping_range": 4096,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": text.rope_parameters["rope_theta"],
        "sliding_window": text.max_position_embeddings,
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": text.max_position_embeddings,
        "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_mm_proj": True,
        "use_pos_skipping": False,
        "use_sliding_window": False,
        "vision_tower_pretrained": None,
        "vocab_size": text.vocab_size,
    }


def _write_original_tokenizer(path: Path, tokenizer: Qwen2Tokenizer) -> None:
    """Qwen2 tokenizer files as in the published checkpoint: vocab.json + merges.txt for slow
    tokenizers, tokenizer.json for fast ones, and no <video> token (the original has none)."""
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = bpe["vocab"]
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = ["#version: 0.2"] + [" ".join(pair) for pair in bpe["merges"]]
    (path / "merges.txt").write_text("\n".join(merges) + "\n")
    specials = {token: tokenizer.convert_tokens_to_ids(token) for token in SYSTEM_TOKENS}
    decoder = {
        str(token_id): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token, token_id in specials.items()
    }
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_prefix_space": False,
                "added_tokens_decoder": decoder,
                "additional_special_tokens": list(SYSTEM_TOKENS[1:]),
                "bos_token": None,
                "chat_template": CHAT_TEMPLATE,
                "clean_up_tokenization_spaces": False,
                "eos_token": "<|im_end|>",
                "errors": "replace",
                "model_max_length": 32768,
                "pad_token": "<|endoftext|>",
                "padding_side": "right",
                "split_special_tokens": False,
                "tokenizer_class": "Qwen2Tokenizer",
                "unk_token": None,
            },
            indent=2,
        )
    )
    (path / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "additional_special_tokens": list(SYSTEM_TOKENS[1:]),
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
            },
            indent=2,
        )
    )
    # The published added_tokens.json lists <image> after the chat markers.
    (path / "added_tokens.json").write_text(json.dumps(specials | {"<image>": max(specials.values()) + 1}))
    fast = json.loads(tokenizer.backend_tokenizer.to_str())
    fast["added_tokens"] = [t for t in fast["added_tokens"] if t["content"] in SYSTEM_TOKENS]
    (path / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False))


def _write_tower_to_hub_cache(vision: SiglipVisionConfig) -> Path:
    """The vision tower repo as the original loader downloads it: the full tower (one layer more
    than the checkpoint keeps, with its pooling head), in the Hugging Face cache layout."""
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / ("models--" + TINY_TOWER_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / _TOWER_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(_TOWER_REVISION)
    full = SiglipVisionConfig(**(vision.to_dict() | {"num_hidden_layers": vision.num_hidden_layers + 1}))
    full.vision_use_head = True
    torch.manual_seed(0)
    SiglipVisionModel(full).save_pretrained(snapshot)
    return snapshot


# --- any size, drawn tensor by tensor ----------------------------------------------------------


def write_random_checkpoint(
    path: Path | str,
    spec: TinySpec = LLAVA_VIDEO_7B,
    *,
    device: torch.device | str = "cpu",
    std: float = 0.02,
    seed: int = 0,
    shard_bytes: int = 5 * 10**9,
) -> Path:
    """Write random weights of ``spec``'s sizes in the original LLaVA-NeXT layout; return ``path``.

    The model is built on the meta device for its tensor names and shapes only. Each tensor is drawn
    on ``device`` in bfloat16 (normal with ``std`` as Qwen2's ``initializer_range``; norm weights 1,
    norm biases 0), copied to the host and saved with the rest of its shard of at most
    ``shard_bytes``, so the host holds one shard at a time. A spec with so400m's vision sizes names
    google/siglip-so400m-patch14-384 as the published checkpoint does (the loader knows its config;
    nothing is downloaded); any other tower is written into the Hugging Face cache as
    :data:`TINY_TOWER_ID`, as :func:`write_tiny_checkpoint` does. Same seed and device, same weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec)
    config = build_config(tokenizer, spec)
    with torch.device("meta"):
        shapes = {
            original_weight_name(name): tuple(tensor.shape)
            for name, tensor in LlavaVideoForConditionalGeneration(config).state_dict().items()
        }
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)

    def draw(name: str) -> torch.Tensor:
        shape = shapes[name]
        if "norm" in name:
            fill = torch.ones if name.endswith(".weight") else torch.zeros
            return fill(shape, dtype=torch.bfloat16)
        values = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
        return values.mul_(std).cpu()

    _save_drawn_shards(shapes, draw, path, shard_bytes)
    tower = SO400M_ID if _is_so400m(config.vision_config) else TINY_TOWER_ID
    _write_original_files(path, config, build_generation_config(tokenizer), tokenizer, tower)
    if tower == TINY_TOWER_ID:
        _write_tower_to_hub_cache(config.vision_config)
    return path


def _save_drawn_shards(
    shapes: dict[str, tuple[int, ...]], draw: Callable[[str], torch.Tensor], path: Path, shard_bytes: int
) -> None:
    """bfloat16 shards of :func:`plan_shards`, each drawn and saved before the next is drawn."""
    sizes = {name: math.prod(shape) * torch.bfloat16.itemsize for name, shape in shapes.items()}
    shards = plan_shards(sizes, shard_bytes)
    weight_map = {}
    for number, part in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: draw(name) for name in part}, path / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    _write_index(path, weight_map, sum(sizes.values()))


def plan_shards(sizes: dict[str, int], shard_bytes: int) -> list[list[str]]:
    """Tensor names in name order, cut into shards of at most ``shard_bytes`` bytes (a shard is
    larger only when one tensor alone is)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name in sorted(sizes):
        if shards[-1] and filled + sizes[name] > shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += sizes[name]
    return shards


def _is_so400m(vision: SiglipVisionConfig) -> bool:
    """Whether the checkpoint's tower (its last layer removed, as stored) has so400m's sizes."""
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "image_size", "patch_size")
    same = all(getattr(vision, key) == getattr(SO400M, key) for key in keys)
    return same and vision.num_hidden_layers == SO400M.num_hidden_layers - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path)
    parser.add_argument("--layout", choices=("transformers", "original"), default="transformers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--readable", action="store_true", help="no control characters in answers (make demo; not for golden data)"
    )
    args = parser.parse_args()
    print(write_tiny_checkpoint(args.path, layout=args.layout, seed=args.seed, readable=args.readable))


if __name__ == "__main__":
    main()
