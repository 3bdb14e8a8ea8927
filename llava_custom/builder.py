"""Load a LLaVA-Video checkpoint and its processor onto a device, 4-bit by default.

Mirrors LLaVA-NeXT's ``load_pretrained_model`` in spirit (one call gives model + processor) but
uses transformers' own loading: bitsandbytes nf4 for the language model, the vision tower,
projector and lm_head left unquantised, Flash Attention 2 when it is installed, SDPA otherwise.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoProcessor, BitsAndBytesConfig, LlavaOnevisionConfig, LlavaOnevisionProcessor

from llava_custom.errors import ModelLoadError
from llava_custom.modeling import LlavaVideoForConditionalGeneration

Device = Literal["auto", "cuda", "cpu"]
DType = Literal["auto", "float16", "bfloat16", "float32"]
Attention = Literal["auto", "flash_attention_2", "sdpa", "eager"]

# Module prefixes kept out of 4-bit: the SigLIP tower and projector are small and precision
# sensitive, and lm_head must stay exact for faithful logits. transformers 5 matches these by
# prefix, so the full dotted names are needed ("vision_tower" alone would not match).
UNQUANTISED_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


@dataclass
class LoadedModel:
    """A model ready for generation and everything needed to build its inputs."""

    model: LlavaVideoForConditionalGeneration
    processor: LlavaOnevisionProcessor
    device: torch.device
    dtype: torch.dtype
    load_4bit: bool
    attn_implementation: str

    @property
    def vision_dtype(self) -> torch.dtype:
        return self.model.model.vision_tower.dtype


def resolve_device(device: Device) -> torch.device:
    """``auto`` picks the GPU when there is one; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            "LLAVA_DEVICE=cuda but no CUDA GPU is visible to this process; "
            "check the driver and CUDA_VISIBLE_DEVICES, or set LLAVA_DEVICE=cpu"
        )
    return torch.device(device)


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on a GPU and float32 on CPU (CPU half precision is slow and lossy)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def resolve_attention(attn: Attention, device: torch.device) -> str:
    """``auto`` uses Flash Attention 2 on a GPU when the package is installed, else SDPA."""
    flash_available = importlib.util.find_spec("flash_attn") is not None
    if attn == "auto":
        return "flash_attention_2" if device.type == "cuda" and flash_available else "sdpa"
    if attn == "flash_attention_2" and (device.type != "cuda" or not flash_available):
        raise ModelLoadError(
            "LLAVA_ATTN=flash_attention_2 needs a CUDA GPU and the flash-attn package "
            "(pip install '.[gpu]'); use LLAVA_ATTN=auto to fall back to SDPA"
        )
    return attn


def read_checkpoint_config(model_path: str) -> tuple[str, LlavaOnevisionConfig]:
    """Find the checkpoint (local dir or hub id) and return its location and config."""
    local = Path(model_path).expanduser()
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"{local} has no config.json: point LLAVA_MODEL at a checkpoint directory")
        location = str(local)
    elif model_path.startswith((".", "/", "~")) or model_path.count("/") != 1:
        raise ModelLoadError(f"model path {model_path!r} does not exist and is not a hub id (org/name)")
    else:
        location = model_path
        try:
            from huggingface_hub import hf_hub_download

            config_file = Path(hf_hub_download(model_path, "config.json"))
        except Exception as exc:  # offline, unknown repo, auth: all mean "not reachable"
            raise ModelLoadError(
                f"could not fetch {model_path!r} from the Hugging Face hub ({exc.__class__.__name__}); "
                "download it first (huggingface-cli download) and set LLAVA_MODEL to the local directory"
            ) from exc
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") != "llava_onevision":
        architectures = ", ".join(raw.get("architectures") or []) or raw.get("model_type", "unknown")
        raise ModelLoadError(
            f"{model_path} is a {architectures} checkpoint, not a LLaVA-OneVision/LLaVA-Video one "
            "in the transformers layout"
        )
    return location, LlavaOnevisionConfig.from_pretrained(location)


def load_pretrained_model(
    model_path: str,
    *,
    load_4bit: bool = True,
    device: Device = "auto",
    dtype: DType = "auto",
    attn: Attention = "auto",
) -> LoadedModel:
    """Load model and processor; see the module docstring for what is quantised."""
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    attn_implementation = resolve_attention(attn, target)
    location, config = read_checkpoint_config(model_path)
    quantization = None
    if load_4bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelLoadError("4-bit loading needs bitsandbytes; install it or set LLAVA_LOAD_4BIT=false")
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=UNQUANTISED_MODULES,
        )
    model = LlavaVideoForConditionalGeneration.from_pretrained(
        location,
        config=config,
        dtype=torch_dtype,
        quantization_config=quantization,
        device_map={"": target},
        attn_implementation=attn_implementation,
    ).eval()
    if target.type == "cuda":
        # The vision side stays in float16 whatever the language model's dtype (as the original).
        model.model.vision_tower.to(torch.float16)
        model.model.multi_modal_projector.to(torch.float16)
    processor = AutoProcessor.from_pretrained(location)
    return LoadedModel(model, processor, target, torch_dtype, load_4bit, attn_implementation)
