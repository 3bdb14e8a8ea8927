"""Load a LLaVA-Video checkpoint and its processor onto a device, 4-bit by default.

Mirrors LLaVA-NeXT's ``load_pretrained_model`` in spirit (one call gives model + processor, for
the original layout as published or the transformers layout, see checkpoint.py) but uses
transformers' own loading: bitsandbytes nf4 for the language model, the vision tower,
projector and lm_head left unquantised, Flash Attention 2 when it is installed, SDPA otherwise.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import BitsAndBytesConfig, GenerationConfig, LlavaOnevisionProcessor

from llava_custom.checkpoint import read_checkpoint
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
    repetition_penalty: float = 1.0  # from the checkpoint's generation_config.json
    location: str = ""  # LLAVA_MODEL as resolved: a local directory or a hub id
    folder: Path | None = None  # the files loaded (a hub id's snapshot in the Hugging Face cache)
    layout: str = ""  # "original" (LLaVA-NeXT) or "transformers" (llava-hf)

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


def check_requirements(*, load_4bit: bool, device: Device, attn: Attention) -> torch.device:
    """The device the model would load on, once the hardware and packages these settings need
    are known to be there (raises ModelLoadError saying which setting to change)."""
    target = resolve_device(device)
    resolve_attention(attn, target)
    if load_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("LLAVA_LOAD_4BIT=true needs bitsandbytes; install it or set LLAVA_LOAD_4BIT=false")
    return target


def load_pretrained_model(
    model_path: str,
    *,
    load_4bit: bool = True,
    device: Device = "auto",
    dtype: DType = "auto",
    attn: Attention = "auto",
) -> LoadedModel:
    """Load model and processor; see the module docstring for what is quantised."""
    target = check_requirements(load_4bit=load_4bit, device=device, attn=attn)
    torch_dtype = resolve_dtype(dtype, target)
    attn_implementation = resolve_attention(attn, target)
    checkpoint = read_checkpoint(model_path)
    quantization = None
    if load_4bit:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=UNQUANTISED_MODULES,
        )
    try:
        model = LlavaVideoForConditionalGeneration.from_pretrained(
            checkpoint.location,
            config=checkpoint.config,
            dtype=torch_dtype,
            quantization_config=quantization,
            device_map={"": target},
            attn_implementation=attn_implementation,
            key_mapping=checkpoint.key_mapping,
        ).eval()
    except ValueError as exc:  # an mm_* option the model cannot lay out
        raise ModelLoadError(f"cannot load {model_path}: {exc}") from exc
    # Decoding settings come per request (engine.py); the checkpoint's file only says how to stop
    # and what repetition penalty the original applies, so generate() must not merge its
    # sampling defaults into every call.
    model.generation_config = GenerationConfig(
        eos_token_id=checkpoint.generation_config.eos_token_id,
        pad_token_id=checkpoint.generation_config.pad_token_id,
    )
    if target.type == "cuda":
        # The vision side stays in float16 whatever the language model's dtype (as the original).
        model.model.vision_tower.to(torch.float16)
        model.model.multi_modal_projector.to(torch.float16)
    return LoadedModel(
        model,
        checkpoint.processor,
        target,
        torch_dtype,
        load_4bit,
        attn_implementation,
        repetition_penalty=checkpoint.generation_config.repetition_penalty or 1.0,
        location=checkpoint.location,
        folder=checkpoint.folder,
        layout=checkpoint.layout,
    )


def describe(loaded: LoadedModel) -> str:
    """One log line saying what was loaded, how, and where."""
    files = f" from {loaded.folder}" if loaded.folder and str(loaded.folder) != loaded.location else ""
    layout = {"original": "original LLaVA-NeXT layout", "transformers": "transformers layout"}.get(
        loaded.layout, loaded.layout or "unknown layout"
    )
    language = "nf4 4-bit (double quantisation)" if loaded.load_4bit else str(loaded.dtype).removeprefix("torch.")
    vision = str(loaded.vision_dtype).removeprefix("torch.")
    where = str(loaded.device)
    if loaded.device.type == "cuda":
        index = loaded.device.index if loaded.device.index is not None else torch.cuda.current_device()
        where += f" ({torch.cuda.get_device_name(index)})"
    return (
        f"model {loaded.location}{files} ({layout}): language model {language}, vision tower {vision}, "
        f"attention {loaded.attn_implementation}, device {where}"
    )


def gpu_memory(device: torch.device) -> str | None:
    """GPU memory in use by this process and on the whole card, for the start-up log (None on CPU)."""
    if device.type != "cuda":
        return None
    gib = 1024**3
    free, total = torch.cuda.mem_get_info(device)
    return (
        f"GPU memory: {torch.cuda.memory_allocated(device) / gib:.2f} GiB allocated, "
        f"{torch.cuda.memory_reserved(device) / gib:.2f} GiB reserved by this worker; "
        f"{(total - free) / gib:.2f} of {total / gib:.2f} GiB in use on the card"
    )
