"""Turn frames or an image plus a question into the model's answer.

Builds the inputs as the original LLaVA-Video code does (prompting.py), expands the visual
placeholder to the number of tokens the model will put there, and generates. One generation runs
at a time: a GPU serves one request faster than two interleaved ones and memory stays bounded.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

from llava_custom import prompting
from llava_custom.builder import LoadedModel
from llava_custom.errors import InvalidPrompt, PromptTooLong


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: ``temperature`` 0 means greedy, as in the original example."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    visual_tokens: int
    token_ids: tuple[int, ...]  # the generated ids, end-of-turn included when generated

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class Engine:
    """Owns a loaded model; thread-safe, one generation at a time."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self._lock = threading.Lock()
        self._stop_ids = self._end_of_turn_ids()
        self._never_generate = SuppressTokensLogitsProcessor(self._unused_token_ids(), device=loaded.device)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) the vision tower takes, so frames can be resized while decoding."""
        size = self.processor.video_processor.size
        return size["width"], size["height"]

    @property
    def context_length(self) -> int:
        return self.model.config.text_config.max_position_embeddings

    def answer_video(
        self,
        frames: np.ndarray,
        duration: float,
        frame_times: Sequence[float],
        question: str | None,
        settings: GenerationSettings,
    ) -> Answer:
        """Answer about (N, H, W, 3) uint8 RGB frames sampled at ``frame_times`` seconds."""
        prompt = prompting.video_prompt(question, duration, frame_times)
        height, width = frames.shape[1:3]
        pixels = self.processor.video_processor(
            videos=[frames],
            return_tensors="pt",
            # Frames already resized with the same bicubic filter while decoding need no second pass.
            do_resize=(width, height) != self.frame_size,
        )["pixel_values_videos"]
        visual_tokens = self.model.video_layout.num_video_tokens(len(frames))
        input_ids = self._expand_placeholder(prompt, self.model.config.video_token_index, visual_tokens)
        return self._generate(input_ids, visual_tokens, settings, pixel_values_videos=pixels)

    def answer_image(self, image: Image.Image, question: str | None, settings: GenerationSettings) -> Answer:
        """Answer about one RGB image, tiled as the checkpoint's anyres setting says."""
        pixels = self.processor.image_processor(images=image, return_tensors="pt")
        visual_tokens = self.model.image_layout.num_image_tokens(image.height, image.width)
        prompt = prompting.image_prompt(question)
        input_ids = self._expand_placeholder(prompt, self.model.config.image_token_index, visual_tokens)
        return self._generate(
            input_ids,
            visual_tokens,
            settings,
            pixel_values=pixels["pixel_values"],
            image_sizes=pixels["image_sizes"],
            batch_num_images=pixels.get("batch_num_images"),
        )

    def _expand_placeholder(self, prompt: str, token_id: int, count: int) -> torch.Tensor:
        """Tokenise ``prompt`` and repeat its single visual placeholder ``count`` times."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        visual = {self.model.config.image_token_index, self.model.config.video_token_index}
        if sum(token in visual for token in ids) != 1:
            # A placeholder typed into the question would ask for features nobody provides.
            raise InvalidPrompt(
                f"the prompt may not contain {prompting.IMAGE_PLACEHOLDER} or {prompting.VIDEO_PLACEHOLDER}: "
                "the service puts the picture into the prompt itself"
            )
        at = ids.index(token_id)
        return torch.tensor([ids[:at] + [token_id] * count + ids[at + 1 :]])

    def _check_length(self, prompt_tokens: int, settings: GenerationSettings) -> None:
        if prompt_tokens + settings.max_new_tokens > self.context_length:
            raise PromptTooLong(
                f"the prompt takes {prompt_tokens} tokens and {settings.max_new_tokens} new tokens were asked for, "
                f"more than the model's context of {self.context_length}: use fewer frames, a smaller image "
                "or a lower max_new_tokens"
            )

    def _generate(
        self, input_ids: torch.Tensor, visual_tokens: int, settings: GenerationSettings, **pixel_inputs
    ) -> Answer:
        self._check_length(input_ids.shape[1], settings)
        device = self.loaded.device
        inputs = {
            name: value.to(device, self.loaded.vision_dtype) if name.startswith("pixel_values") else value.to(device)
            for name, value in pixel_inputs.items()
            if value is not None
        }
        prompt_length = input_ids.shape[1]
        with self._lock, torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=torch.ones_like(input_ids, device=device),
                generation_config=self._generation_config(settings),
                logits_processor=self._logits_processors(prompt_length),
                **inputs,
            )
        new_tokens = output[0, prompt_length:]
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        token_ids = tuple(new_tokens.tolist())
        return Answer(text, int(input_ids.shape[1]), visual_tokens, token_ids)

    def _generation_config(self, settings: GenerationSettings) -> GenerationConfig:
        """Decoding settings of this request only: the checkpoint's sampling defaults (LLaVA-Video
        ships do_sample=true, temperature 0.7) do not apply; the original example decodes greedily."""
        sampling = settings.temperature > 0
        return GenerationConfig(
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if sampling else None,
            top_k=None,
            eos_token_id=self._stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    def _logits_processors(self, prompt_length: int) -> LogitsProcessorList:
        processors = LogitsProcessorList([self._never_generate])
        penalty = self.loaded.repetition_penalty
        if penalty != 1.0:
            # The original generates from inputs_embeds, so the checkpoint's repetition_penalty
            # (1.05 for LLaVA-Video) only ever sees generated tokens, never the prompt.
            processors.append(RepetitionPenaltyLogitsProcessor(float(penalty), prompt_ignore_length=prompt_length))
        return processors

    def _unused_token_ids(self) -> list[int]:
        """Ids the original can never produce: the visual placeholders we add to the tokenizer and the
        embedding rows beyond the tokenizer (the original shrinks the embedding to len(tokenizer))."""
        config = self.model.config
        vocabulary = len(self.tokenizer)
        spare_rows = range(vocabulary, config.text_config.vocab_size)
        return [config.image_token_index, config.video_token_index, *spare_rows]

    def _end_of_turn_ids(self) -> list[int]:
        """Stop at the checkpoint's end-of-sequence ids, and always at ChatML's end of turn."""
        configured = self.model.generation_config.eos_token_id
        ids = list(configured) if isinstance(configured, list) else [configured] if configured is not None else []
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id and token_id not in ids:
                ids.append(token_id)
        return ids
