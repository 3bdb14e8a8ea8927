"""The model runner: the only code that calls the model, for the scheduler's thread.

Vision features, prompt embeddings, a prefill chunk and a decode step, all over the model's own
modules (transformers' LlavaOnevision with llava_custom.modeling's layout) and the engine's paged
KV cache (kv_cache.py): a prefill writes one request's keys and values into its blocks, a decode
step writes one token per running row in place, and attention reads each row up to its own length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from llava_custom.kv_cache import BlockPool, PagedPass, RowKV, install_paged_attention

if TYPE_CHECKING:  # the scheduler imports the runner
    from llava_custom.scheduler import VisualItem

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs the model over requests' inputs and their rows of the KV pool."""

    def __init__(
        self,
        model,
        device: torch.device,
        kv_cache_tokens: int,
        block_size: int,
        vision_chunk_frames: int,
        compile_decode: bool = False,
    ) -> None:
        self.model = model
        self.device = device
        self.vision_chunk_frames = vision_chunk_frames
        language_model = model.model.language_model
        # The decode step compiled with dynamic shapes: one graph serves every batch size and
        # length (the pool's reads and writes stay outside it, see PagedPass.update). Prefill is
        # not compiled: its shapes differ with every prompt, and its arithmetic dominates anyway.
        self.compiled = compile_decode
        self._decode_model = torch.compile(language_model, dynamic=True) if compile_decode else language_model
        text = model.config.text_config
        install_paged_attention(text)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        dtype = model.model.get_input_embeddings().weight.dtype
        self.pool = BlockPool(
            text.num_hidden_layers,
            text.num_key_value_heads,
            head_dim,
            -(-kv_cache_tokens // block_size),
            block_size,
            dtype,
            device,
        )

    def new_row(self) -> RowKV:
        return RowKV(self.pool)

    # --- pictures and prompts -------------------------------------------------------------------

    def visual_features(self, modality: str, pixel_inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """(visual tokens, hidden) from the vision tower and projector, and the seconds they took."""
        began = time.monotonic()
        inner = self.model.model
        vision_dtype = inner.vision_tower.dtype
        pixels = {
            name: value.to(self.device, vision_dtype) if name.startswith("pixel_values") else value.to(self.device)
            for name, value in pixel_inputs.items()
            if value is not None
        }
        if modality == "video":
            output = inner.get_video_features(**pixels, frames_per_chunk=self.vision_chunk_frames, return_dict=True)
            features = output.pooler_output.flatten(0, 1)
        elif modality == "padded_image":
            features = inner.get_padded_image_features(**pixels, return_dict=True).pooler_output.flatten(0, 1)
        else:
            features = torch.cat(inner.get_image_features(**pixels, return_dict=True).pooler_output, dim=0)
        if features.is_cuda:  # kernels run asynchronously: wait for them to time the tower
            torch.cuda.synchronize(features.device)
        return features, time.monotonic() - began

    def embed(
        self, input_ids: torch.Tensor, offset: int, items: Sequence[VisualItem], features: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """The embeddings of the prompt's tokens from ``offset`` on (``input_ids`` holds those), each
        of ``items``' visual features in its placeholders' places, as LlavaOnevisionModel.forward
        puts them there (a copy of the same values)."""
        embeds = self.embed_tokens(input_ids)
        for item, item_features in zip(items, features, strict=True):
            start = item.start - offset
            embeds[0, start : start + item.tokens] = item_features.to(embeds.device, embeds.dtype)
        return embeds

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.get_input_embeddings()(input_ids.to(self.device))

    # --- the language model over the pool -------------------------------------------------------

    def prefill(self, row: RowKV, embeds: torch.Tensor, *, logits: bool) -> torch.Tensor | None:
        """Run (1, tokens, hidden) embeddings after the row's tokens; the last token's logits if asked."""
        paged = PagedPass([row], [embeds.shape[1]])
        hidden = self._language_model(paged, inputs_embeds=embeds)
        paged.advance([row])
        return self.model.lm_head(hidden[:, -1]) if logits else None

    def decode(self, rows: list[RowKV], tokens: torch.Tensor) -> torch.Tensor:
        """One token for each row: (rows,) ids in, (rows, vocabulary) logits out."""
        paged = PagedPass(rows, [1] * len(rows))
        try:
            hidden = self._language_model(paged, self._decode_model, input_ids=tokens[None])
        except Exception:
            if self._decode_model is self.model.model.language_model:
                raise
            # A compiler fault must not take the service down: the step runs eagerly from now on
            # (its writes to the pool are repeated with the same values).
            logger.exception("the compiled decode step failed; decoding without compilation from now on")
            self._decode_model, self.compiled = self.model.model.language_model, False
            hidden = self._language_model(paged, self._decode_model, input_ids=tokens[None])
        paged.advance(rows)
        return self.model.lm_head(hidden[0])

    def _language_model(self, paged: PagedPass, model=None, **inputs: torch.Tensor) -> torch.Tensor:
        output = (self.model.model.language_model if model is None else model)(
            **inputs,
            position_ids=paged.position_ids(self.device),
            attention_mask={"full_attention": paged.mask},  # built by the pass: no mask creation here
            cache=paged,
            use_cache=True,
            paged=paged,
        )
        return output.last_hidden_state

    # --- prompt KV kept for reuse ---------------------------------------------------------------

    def read_prefix(self, row: RowKV, length: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Copies of the row's first ``length`` tokens' keys and values, (1, kv heads, length, dim) per layer."""
        slots = row.slots(0, length)
        return tuple(
            (keys[slots].transpose(0, 1)[None], values[slots].transpose(0, 1)[None])
            for keys, values in zip(self.pool.keys, self.pool.values, strict=True)
        )

    def write_prefix(self, row: RowKV, layers: tuple[tuple[torch.Tensor, torch.Tensor], ...], length: int) -> None:
        """Start an empty row with the first ``length`` tokens of a kept prefix."""
        row.reserve(length)
        slots = row.slots(0, length)
        for (keys, values), pool_keys, pool_values in zip(layers, self.pool.keys, self.pool.values, strict=True):
            pool_keys.index_copy_(0, slots, keys[0, :, :length].transpose(0, 1).to(pool_keys.dtype))
            pool_values.index_copy_(0, slots, values[0, :, :length].transpose(0, 1).to(pool_values.dtype))
        row.length = length
