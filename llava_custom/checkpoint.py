"""Read a LLaVA-Video checkpoint in either layout into a transformers config, processors and a key mapping.

Two layouts exist:

- the transformers (llava-hf) layout: ``model_type: llava_onevision``, weights under
  ``model.language_model``/``model.vision_tower``/``model.multi_modal_projector``, processor configs;
- the original LLaVA-NeXT layout that ``lmms-lab/LLaVA-Video-7B-Qwen2`` is published in:
  ``architectures: ["LlavaQwenForCausalLM"]``, a Qwen2 config with ``mm_*`` keys, weights under
  ``model.layers``/``model.vision_tower.vision_tower``/``model.mm_projector``, Qwen2 tokenizer files.

The original layout is turned into a :class:`LlavaOnevisionConfig` plus regex key renames that
transformers applies tensor by tensor while loading, so no converted copy of the weights is ever
written or held (sharded safetensors and 4-bit loading work unchanged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    Qwen2Tokenizer,
    SiglipVisionConfig,
)

from llava_custom.errors import ModelLoadError

# The tower every published LLaVA-Video/OneVision Qwen2 checkpoint names. Its numbers are built in
# so that loading needs no second download (the checkpoint already holds the tower's weights).
SO400M_ID = "google/siglip-so400m-patch14-384"
SO400M = SiglipVisionConfig(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
    vision_use_head=False,
)
# SigLIP normalisation used by LLaVA-Video (mean = std = 0.5), not the OpenAI CLIP defaults.
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]

# Original weight names -> transformers LlavaOnevision names (regexes on whole keys).
ORIGINAL_KEY_MAPPING = {
    r"^model\.vision_tower\.vision_tower\.vision_model\.": "model.vision_tower.",
    r"^model\.mm_projector\.0\.": "model.multi_modal_projector.linear_1.",
    r"^model\.mm_projector\.2\.": "model.multi_modal_projector.linear_2.",
    r"^model\.embed_tokens\.": "model.language_model.embed_tokens.",
    r"^model\.layers\.": "model.language_model.layers.",
    r"^model\.norm\.": "model.language_model.norm.",
}
# Keys of the original config that describe how visual tokens are laid out; carried over as-is
# and read by llava_custom.modeling.
CARRIED_MM_KEYS = ("mm_spatial_pool_mode", "mm_spatial_pool_stride", "mm_newline_position", "mm_patch_merge_type")
VISUAL_TOKENS = ("<image>", "<video>")


class SigLipVideoProcessor(LlavaOnevisionVideoProcessor):
    """LlavaOnevisionVideoProcessor that rescales and normalises with the original's arithmetic.

    Reproduces LLaVA-NeXT's SigLipImageProcessor.preprocess (siglip_encoder.py), which uses
    transformers 4.x numpy ``rescale`` (``x.astype(float64) * 1/255``, then float32) and then
    ``normalize`` (``(x - mean) / std`` in float32). transformers 5 fuses both into one float32
    ``(x - 255 mean) / (255 std)``, which rounds about 40% of the pixel values one ulp apart and
    moved tiny-model first-step logits by up to 5e-5 in tests/test_golden.py (5e-6 with this).
    """

    def rescale_and_normalize(self, images, do_rescale, rescale_factor, do_normalize, image_mean, image_std):
        if do_rescale:
            # Frame by frame: a float64 copy of a whole 64-frame batch would be ~230 MB.
            images = torch.stack([(frame.to(torch.float64) * rescale_factor).to(torch.float32) for frame in images])
        if do_normalize:
            images = images.to(torch.float32)
            mean = torch.as_tensor(image_mean, dtype=torch.float32, device=images.device).reshape(-1, 1, 1)
            std = torch.as_tensor(image_std, dtype=torch.float32, device=images.device).reshape(-1, 1, 1)
            images = (images - mean) / std
        return images


@dataclass
class Checkpoint:
    """Everything needed to instantiate the model and build its inputs."""

    location: str
    layout: Literal["transformers", "original"]
    config: LlavaOnevisionConfig
    processor: LlavaOnevisionProcessor
    key_mapping: dict[str, str] | None
    generation_config: GenerationConfig
    folder: Path | None = None  # where config.json was found (a hub id's snapshot in the cache)


def read_checkpoint(model_path: str) -> Checkpoint:
    """Find the checkpoint (local directory or hub id), recognise its layout and read it."""
    source = locate_checkpoint(model_path)
    if source.layout == "transformers":
        checkpoint = _read_transformers_layout(source.location)
    else:
        checkpoint = _read_original_layout(source.location, source.raw_config)
    checkpoint.folder = source.folder
    return checkpoint


@dataclass(frozen=True)
class CheckpointSource:
    """Where a checkpoint's files are and which layout they are in, found without reading weights."""

    location: str  # what from_pretrained takes: the local directory, or the hub id
    folder: Path  # the directory holding config.json (a hub id's snapshot in the Hugging Face cache)
    layout: Literal["transformers", "original"]
    raw_config: dict[str, Any]


def locate_checkpoint(model_path: str) -> CheckpointSource:
    """The checkpoint ``model_path`` names, its layout recognised and its weight files present.

    A local directory needs config.json and its weights; a hub id is read from the Hugging Face
    cache, or downloaded into it (only config.json here: the weights download while the model
    loads). Offline (HF_HUB_OFFLINE=1) every weight file must already be in the cache. Raises
    ModelLoadError with what to do; cheap enough to run before the service starts.
    """
    location, folder, raw = _read_raw_config(model_path)
    if raw.get("model_type") == "llava_onevision":
        layout: Literal["transformers", "original"] = "transformers"
    elif is_original_layout(raw):
        layout = "original"
    else:
        kind = ", ".join(raw.get("architectures") or []) or raw.get("model_type", "unknown")
        raise ModelLoadError(
            f"{model_path} is a {kind} checkpoint, not LLaVA-Video/LLaVA-OneVision "
            "(original LlavaQwenForCausalLM layout or transformers llava_onevision layout)"
        )
    if location == str(folder) or _hub_offline():
        _check_weight_files(model_path, folder, local=location == str(folder))
    return CheckpointSource(location, folder, layout, raw)


def is_original_layout(raw: dict[str, Any]) -> bool:
    """LLaVA-NeXT's Qwen2 checkpoints: LlavaQwenForCausalLM with the mm_* keys of its trainer."""
    return "LlavaQwenForCausalLM" in (raw.get("architectures") or []) and "mm_vision_tower" in raw


def download_hint(model_id: str) -> str:
    """The command that fetches a hub checkpoint ahead (huggingface_hub's ``hf`` command line)."""
    folder = "/models/" + model_id.rsplit("/", 1)[-1]
    return f"`hf download {model_id} --local-dir {folder}` and set LLAVA_MODEL={folder}"


def _read_raw_config(model_path: str) -> tuple[str, Path, dict[str, Any]]:
    local = Path(model_path).expanduser()
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"{local} has no config.json: point LLAVA_MODEL at a checkpoint directory")
        return str(local), local, _json(config_file)
    if model_path.startswith((".", "/", "~")) or model_path.count("/") != 1:
        raise ModelLoadError(
            f"LLAVA_MODEL={model_path!r} does not exist and is not a hub id (org/name): "
            "set it to a checkpoint directory or a Hugging Face hub id"
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        config_file = Path(hf_hub_download(model_path, "config.json"))
    except GatedRepoError as exc:
        raise ModelLoadError(
            f"{model_path} is gated on the Hugging Face hub: accept its terms on the hub and set HF_TOKEN "
            f"(or log in with `hf auth login`), or fetch it ahead with {download_hint(model_path)}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(
            f"LLAVA_MODEL={model_path}: no such model on the Hugging Face hub (or it is private: set HF_TOKEN)"
        ) from exc
    except LocalEntryNotFoundError as exc:
        if _hub_offline():
            raise ModelLoadError(
                f"{model_path} is not in the Hugging Face cache ({_hub_cache()}) and HF_HUB_OFFLINE=1 forbids "
                f"downloading it: fetch it ahead with `hf download {model_path}` (same HF_HOME), "
                f"or with {download_hint(model_path)}"
            ) from exc
        raise ModelLoadError(
            f"could not reach the Hugging Face hub to download {model_path} (not in the cache {_hub_cache()}): "
            f"check the network, or fetch it ahead with {download_hint(model_path)}"
        ) from exc
    except Exception as exc:  # a hub error we did not foresee: still one line, with its name
        raise ModelLoadError(
            f"could not fetch {model_path!r} from the Hugging Face hub ({exc.__class__.__name__}: {exc}); "
            f"fetch it ahead with {download_hint(model_path)}"
        ) from exc
    return model_path, config_file.parent, _json(config_file)


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON ({exc}); the download may be incomplete") from exc
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path} is not a model config (a JSON object)")
    return value


# Weight files as transformers looks for them, sharded (an index naming the shards) or not.
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _check_weight_files(model_path: str, folder: Path, *, local: bool) -> None:
    """Every weight file of the checkpoint is in ``folder`` (a directory, or a hub snapshot)."""

    def present(name: str) -> bool:
        return (folder / name).is_file()

    where = str(folder) if local else f"the Hugging Face cache ({_hub_cache()})"
    fetch = (
        f"fetch it again with `hf download <hub id> --local-dir {folder}`"
        if local
        else f"fetch it with `hf download {model_path}` (same HF_HOME) or {download_hint(model_path)}"
    )
    index = next((name for name in _WEIGHT_INDEXES if present(name)), None)
    if index is None:
        if not any(present(name) for name in _WEIGHT_FILES):
            raise ModelLoadError(
                f"no weights for {model_path} in {where} (model.safetensors or model.safetensors.index.json "
                f"and its shards): the download is missing or incomplete; {fetch}"
            )
        return
    shards = sorted(set(_json(folder / index).get("weight_map", {}).values()))
    missing = [name for name in shards if not present(name)]
    if missing:
        raise ModelLoadError(
            f"{len(missing)} of the {len(shards)} weight files of {model_path} are missing from {where} "
            f"(e.g. {missing[0]}): the download is incomplete; {fetch}"
        )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _read_transformers_layout(location: str) -> Checkpoint:
    config = LlavaOnevisionConfig.from_pretrained(location)
    tokenizer = AutoTokenizer.from_pretrained(location)
    # The PIL backend resizes exactly like the original SigLIP processor (torchvision's bicubic
    # differs by one intensity level on a fraction of pixels).
    image_processor = AutoImageProcessor.from_pretrained(location, backend="pil")
    video_processor = SigLipVideoProcessor.from_pretrained(location)
    processor = assemble_processor(tokenizer, image_processor, video_processor, config)
    return Checkpoint(location, "transformers", config, processor, None, _generation_config(location))


def _read_original_layout(location: str, raw: dict[str, Any]) -> Checkpoint:
    _check_supported(raw)
    # Named directly: AutoTokenizer would parse config.json as transformers' unrelated "llava" type.
    tokenizer = Qwen2Tokenizer.from_pretrained(location)
    # The original code splits "<image>" out of the prompt itself; transformers needs real tokens.
    # They get ids in the embedding table's spare rows (152064 rows for 151646 tokens in Qwen2-7B).
    missing = [token for token in VISUAL_TOKENS if token not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if len(tokenizer) > raw["vocab_size"]:
        rows = raw["vocab_size"]
        raise ModelLoadError(f"the tokenizer ({len(tokenizer)} tokens) does not fit the {rows}-row embedding")
    vision = _vision_config(raw["mm_vision_tower"])
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=_text_config(raw).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        # SigLipVisionTower deletes the tower's last layer and takes hidden_states[-1] of the rest,
        # whatever mm_vision_select_layer says; the checkpoint stores only the kept layers.
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=raw.get("image_aspect_ratio", "anyres_max_9"),
        image_grid_pinpoints=raw.get("image_grid_pinpoints"),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        **{key: raw[key] for key in CARRIED_MM_KEYS if raw.get(key) is not None},
    )
    image_processor, video_processor = _original_image_processors(location, config)
    processor = assemble_processor(tokenizer, image_processor, video_processor, config)
    return Checkpoint(location, "original", config, processor, ORIGINAL_KEY_MAPPING, _generation_config(location))


def _check_supported(raw: dict[str, Any]) -> None:
    """Refuse original-layout options whose inference path we do not reproduce."""
    problems = []
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        problems.append(f"mm_projector_type {raw.get('mm_projector_type')!r} (only mlp2x_gelu)")
    if raw.get("mm_use_im_start_end") or raw.get("mm_use_im_patch_token"):
        problems.append("mm_use_im_start_end / mm_use_im_patch_token")
    if raw.get("add_faster_video"):
        problems.append("add_faster_video")
    if not str(raw.get("image_aspect_ratio", "")).startswith("anyres"):
        problems.append(f"image_aspect_ratio {raw.get('image_aspect_ratio')!r} (only anyres / anyres_max_N)")
    if raw.get("mm_patch_merge_type", "spatial_unpad") != "spatial_unpad":
        problems.append(f"mm_patch_merge_type {raw.get('mm_patch_merge_type')!r} (only spatial_unpad)")
    if problems:
        raise ModelLoadError("unsupported LLaVA checkpoint options: " + "; ".join(problems))


def _text_config(raw: dict[str, Any]) -> Qwen2Config:
    """The Qwen2 language model part of an original (Qwen2Config-derived) config."""
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "hidden_act",
        "use_sliding_window",
        "sliding_window",
        "max_window_layers",
        "attention_dropout",
        "bos_token_id",
        "eos_token_id",
        "tie_word_embeddings",
    )
    if raw.get("rope_scaling"):
        raise ModelLoadError(f"rope_scaling {raw['rope_scaling']!r} is not supported (LLaVA-Video has none)")
    rope = {"rope_type": "default", "rope_theta": raw.get("rope_theta", 10000.0)}
    return Qwen2Config(rope_parameters=rope, **{key: raw[key] for key in keys if key in raw})


def _vision_config(tower: str) -> SiglipVisionConfig:
    """Config of the SigLIP tower as the original loads it: its last encoder layer removed."""
    if tower == SO400M_ID:
        full = SO400M
    else:
        try:
            full = SiglipVisionConfig.from_pretrained(tower)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"the checkpoint's vision tower {tower!r} is not {SO400M_ID} and its config could not be read "
                f"({exc.__class__.__name__}); make it available in the Hugging Face cache or as a local directory"
            ) from exc
    if full.model_type != "siglip_vision_model":
        raise ModelLoadError(f"vision tower {tower!r} is {full.model_type}, only SigLIP towers are supported")
    kept = full.to_dict() | {"num_hidden_layers": full.num_hidden_layers - 1, "vision_use_head": False}
    return SiglipVisionConfig(**{k: v for k, v in kept.items() if k not in ("model_type", "transformers_version")})


def _original_image_processors(
    location: str, config: LlavaOnevisionConfig
) -> tuple[LlavaOnevisionImageProcessorPil, SigLipVideoProcessor]:
    """SigLIP pre-processing: the checkpoint's preprocessor_config.json when present, else SigLIP's numbers.

    The original code hard-codes the same values (384 px, mean = std = 0.5, bicubic); the anyres
    grid comes from the model config.
    """
    settings = {"image_mean": SIGLIP_MEAN, "image_std": SIGLIP_STD, "resample": 3}
    side = config.vision_config.image_size
    try:
        from transformers.utils import cached_file

        found = cached_file(location, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        found = None
    if found:
        saved = json.loads(Path(found).read_text())
        settings |= {key: saved[key] for key in ("image_mean", "image_std", "resample") if key in saved}
        side = saved.get("size", {}).get("height", side)
    size = {"height": side, "width": side}
    image_processor = LlavaOnevisionImageProcessorPil(
        size=size, image_grid_pinpoints=config.image_grid_pinpoints, do_pad=True, **settings
    )
    video_processor = SigLipVideoProcessor(size=size, **settings)
    return image_processor, video_processor


def assemble_processor(
    tokenizer, image_processor, video_processor, config: LlavaOnevisionConfig, chat_template: str | None = None
) -> LlavaOnevisionProcessor:
    """One LlavaOnevisionProcessor holding the three pre-processors, consistent with ``config``."""
    patches = config.vision_config.image_size // config.vision_config.patch_size
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=patches * patches,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=chat_template,
    )


def _generation_config(location: str) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(location)
    except OSError:
        return GenerationConfig()
