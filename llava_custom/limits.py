"""The scheduler's limits and their defaults (stated here once; settings.py reads them).

Imports nothing heavy (no torch, no transformers), so that reading the settings does not load the
model's stack; llava_custom.scheduler and llava_custom.engine re-export :class:`EngineLimits`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Answer length when a request does not say (GenerationSettings, LLAVA_MAX_NEW_TOKENS).
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass(frozen=True)
class EngineLimits:
    """Limits of the scheduler, all settings of the service (README, Configuration)."""

    max_batch_size: int = 8  # sequences decoded together
    max_waiting: int = 8  # requests queued beyond those; more are refused (EngineBusy)
    kv_cache_tokens: int = 32768  # the KV pool, in tokens of all requests together
    kv_block_tokens: int = 16  # tokens per block of the pool
    prefill_chunk_tokens: int = 2048  # prompt tokens prefilled between two decode steps
    request_timeout: float = 600.0  # seconds from submission to the last token
    vision_chunk_frames: int = 8  # video frames through the vision tower at once
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile the decode step; auto: see compile_decode

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "kv_cache_tokens",
            "kv_block_tokens",
            "prefill_chunk_tokens",
            "vision_chunk_frames",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.compile not in ("auto", "on", "off"):
            raise ValueError("compile must be auto, on or off")
        if self.max_waiting < 0 or self.request_timeout <= 0:
            raise ValueError("max_waiting must be >= 0 and request_timeout > 0")
