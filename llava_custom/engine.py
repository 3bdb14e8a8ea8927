"""Turn frames or an image plus a question (or a conversation) into a stream of the model's answer.

Builds the inputs as the original LLaVA-Video code does (prompting.py), expands the visual
placeholder to the number of tokens the model will put there, and hands the request to the
scheduler (scheduler.py), which batches it with every other request in flight and streams its
tokens back (streaming.py). Preparing inputs (tokenising, pixel normalisation) runs on the
caller's thread, so only model work happens on the scheduler's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.convert_slow_tokenizer import bytes_to_unicode

from llava_custom import prompting
from llava_custom.builder import LoadedModel
from llava_custom.errors import InvalidPrompt
from llava_custom.limits import EngineLimits
from llava_custom.modeling import VideoLayout
from llava_custom.prompting import Conversation, Turn, as_conversation
from llava_custom.reuse import MediaRef, ReuseCache
from llava_custom.sampling import GenerationSettings, TokenChooser
from llava_custom.scheduler import PreparedRequest, Scheduler, VisualItem
from llava_custom.streaming import Answer, Delta, TokenLogprob, TokenStream

__all__ = [
    "Answer",
    "Conversation",
    "Delta",
    "Engine",
    "EngineLimits",
    "GenerationSettings",
    "ImageInput",
    "MediaRef",
    "Picture",
    "PreparedRequest",
    "ReuseCache",
    "TokenLogprob",
    "TokenStream",
    "Turn",
    "VideoInput",
]


@dataclass(frozen=True)
class VideoInput:
    """A video among a request's pictures: (N, H, W, 3) uint8 RGB frames sampled at
    ``frame_times`` seconds, or None with ``media`` carrying recalled features."""

    frames: np.ndarray | None
    duration: float
    frame_times: Sequence[float]
    media: MediaRef | None = None


@dataclass(frozen=True)
class ImageInput:
    """An image among a request's pictures (RGB), or None with ``media`` carrying recalled features."""

    image: Image.Image | None
    media: MediaRef | None = None


Picture = VideoInput | ImageInput

# Byte-level BPE spells each byte as one printable character; this maps them back.
_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}


class Engine:
    """Owns a loaded model and its scheduler; every method may be called from any thread."""

    def __init__(
        self, loaded: LoadedModel, limits: EngineLimits | None = None, reuse: ReuseCache | None = None
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        chooser = TokenChooser(self._unused_token_ids(), loaded.repetition_penalty, loaded.device)
        self.reuse = reuse or ReuseCache()  # disabled unless sized
        self.scheduler = Scheduler(
            self.model,
            self.tokenizer,
            loaded.device,
            chooser,
            self._end_of_turn_ids(),
            limits or EngineLimits(),
            self.reuse,
        )

    def close(self) -> None:
        """Stop the scheduler; requests still in flight fail with EngineClosed."""
        self.scheduler.close()

    def check_capacity(self, max_frames: int, max_new_tokens: int) -> None:
        """Refuse limits under which the largest allowed video request could never run."""
        check_capacity(self.model.video_layout, self.scheduler.limits.kv_cache_tokens, max_frames, max_new_tokens)

    def warm_up(self, max_new_tokens: int = 2, video_frames: int = 0) -> Answer:
        """Answer one tiny synthetic image request through the whole path (pre-processing, vision
        tower, prefill, batched decode): a model that loads but cannot run is found before the
        service says it is ready, and the first client does not pay for lazy initialisation.
        With ``video_frames``, a synthetic video of that many frames follows, so that the first
        long video does not pay for the memory and kernels its size needs either."""
        image = Image.new("RGB", (64, 48), (128, 96, 64))
        settings = GenerationSettings(max_new_tokens=max_new_tokens, ignore_eos=True)
        answer = self.submit_image(image, "What colour is this?", settings).result()
        if self.scheduler.runner.compiled:
            # torch.compile specialises a step of one row and of two, and makes a third graph of
            # any size from the third: compile all of them now, before the service says ready.
            # Long enough that the first is still decoding when the last has been prefilled.
            group = GenerationSettings(max_new_tokens=4 * 3, ignore_eos=True)
            for rows in (2, 3):
                streams = [self.submit_image(image, f"Colour {i}?", group) for i in range(rows)]
                for stream in streams:
                    stream.result()
        if video_frames:
            width, height = self.frame_size
            frames = np.full((video_frames, height, width, 3), 128, np.uint8)
            times = [float(second) for second in range(video_frames)]
            answer = self.submit_video(frames, float(video_frames), times, "What happens?", settings).result()
        return answer

    def recall(self, key: str) -> MediaRef | None:
        """The media under ``key`` (reuse.video_key / image_key) with its features, if cached:
        then pass it as ``media`` with no frames or image, and nothing is decoded or encoded."""
        return self.reuse.recall(key)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) the vision tower takes, so frames can be resized while decoding."""
        size = self.processor.video_processor.size
        return size["width"], size["height"]

    @property
    def context_length(self) -> int:
        return self.scheduler.context_length

    def submit_video(
        self,
        frames: np.ndarray | None,
        duration: float,
        frame_times: Sequence[float],
        question: str | Conversation | None,
        settings: GenerationSettings,
        media: MediaRef | None = None,
    ) -> TokenStream:
        """Queue a question about (N, H, W, 3) uint8 RGB frames sampled at ``frame_times`` seconds."""
        return self.submit(self.prepare_video(frames, duration, frame_times, question, settings, media))

    def submit_image(
        self,
        image: Image.Image | None,
        question: str | Conversation | None,
        settings: GenerationSettings,
        media: MediaRef | None = None,
    ) -> TokenStream:
        """Queue a question about one RGB image, tiled as the checkpoint's anyres setting says."""
        return self.submit(self.prepare_image(image, question, settings, media))

    def submit_text(self, conversation: Conversation, settings: GenerationSettings) -> TokenStream:
        """Queue a conversation without a picture."""
        return self.submit(self.prepare_text(conversation, settings))

    def submit(self, prepared: PreparedRequest) -> TokenStream:
        """Queue prepared inputs; raises PromptTooLong or EngineBusy at once instead of queueing."""
        return self.scheduler.submit(prepared)

    def prepare(
        self, question: str | Conversation | None, pictures: Sequence[Picture], settings: GenerationSettings
    ) -> PreparedRequest:
        """The model's inputs for a question or conversation about ``pictures``, in the order
        their placeholders take them (the k-th of the conversation, the k-th picture).

        One image alone is tiled (anyres); among several pictures each image is one padded tile,
        as the original's multi-image recipe does (docs/ENGINE.md). A picture whose ``media``
        carries recalled features needs no frames or image."""
        padded = len(pictures) > 1
        parts = [self._visual_part(picture, padded) for picture in pictures]
        if not pictures:
            prompt = _render(prompting.text_prompt, as_conversation(question))
        elif padded:
            prompt = _render(prompting.pictures_prompt, question, [opening for _, opening in parts])
        elif isinstance(pictures[0], VideoInput):
            prompt = _render(prompting.video_prompt, question, pictures[0].duration, pictures[0].frame_times)
        else:
            prompt = _render(prompting.image_prompt, question)
        input_ids, starts = self._expand_placeholders(prompt, [part for part, _ in parts])
        items = tuple(
            VisualItem(part.modality, start, part.tokens, part.pixel_inputs, part.media)
            for (part, _), start in zip(parts, starts, strict=True)
        )
        return PreparedRequest(input_ids, items, settings)

    def _visual_part(self, picture: Picture, padded: bool) -> tuple[VisualItem, str]:
        """A picture's item (its start not known yet) and the opening it writes into its turn."""
        media = picture.media
        if isinstance(picture, VideoInput):
            opening = prompting.video_opening(picture.duration, picture.frame_times)
            if picture.frames is None:
                return VisualItem("video", 0, self._recalled_tokens(media), {}, media), opening
            height, width = picture.frames.shape[1:3]
            pixels = self.processor.video_processor(
                videos=[picture.frames],
                return_tensors="pt",
                # Frames already resized with the same bicubic filter while decoding need no second pass.
                do_resize=(width, height) != self.frame_size,
            )["pixel_values_videos"]
            tokens = self.model.video_layout.num_video_tokens(len(picture.frames))
            return VisualItem("video", 0, tokens, {"pixel_values_videos": pixels}, media), opening
        modality = "padded_image" if padded else "image"
        if picture.image is None:
            return VisualItem(modality, 0, self._recalled_tokens(media), {}, media), prompting.IMAGE_OPENING
        if padded:
            pixels = {"pixel_values": self._padded_tile(picture.image)}
            tokens = self.model.image_layout.padded_tokens
        else:
            processed = self.processor.image_processor(images=picture.image, return_tensors="pt")
            pixels = {
                "pixel_values": processed["pixel_values"],
                "image_sizes": processed["image_sizes"],
                "batch_num_images": processed.get("batch_num_images"),
            }
            tokens = self.model.image_layout.num_image_tokens(picture.image.height, picture.image.width)
        return VisualItem(modality, 0, tokens, pixels, media), prompting.IMAGE_OPENING

    def _padded_tile(self, image: Image.Image) -> torch.Tensor:
        """(1, 3, H, W) pixels of ``image`` as the original's "pad" recipe makes them: centred on a
        square of the processor's mean colour (expand2square), resized to one tile with Pillow's
        bicubic filter, then rescaled and normalised as video frames are (the same SigLIP steps)."""
        background = tuple(int(mean * 255) for mean in self.processor.image_processor.image_mean)
        width, height = image.size
        side = max(width, height)
        square = Image.new(image.mode, (side, side), background)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        tile = np.array(square.convert("RGB").resize(self.frame_size, Image.Resampling.BICUBIC))
        pixels = self.processor.video_processor(videos=[tile[None]], return_tensors="pt", do_resize=False)
        return pixels["pixel_values_videos"][0]

    def prepare_video(
        self,
        frames: np.ndarray | None,
        duration: float,
        frame_times: Sequence[float],
        question: str | Conversation | None,
        settings: GenerationSettings,
        media: MediaRef | None = None,
    ) -> PreparedRequest:
        """The model's inputs for a question about a video: prompt ids and normalised pixels.

        ``media`` names the video for reuse; with recalled features, ``frames`` is None."""
        return self.prepare(question, [VideoInput(frames, duration, frame_times, media)], settings)

    def prepare_image(
        self,
        image: Image.Image | None,
        question: str | Conversation | None,
        settings: GenerationSettings,
        media: MediaRef | None = None,
    ) -> PreparedRequest:
        """The model's inputs for a question about an image: prompt ids and its tiles' pixels.

        ``media`` names the image for reuse; with recalled features, ``image`` is None."""
        return self.prepare(question, [ImageInput(image, media)], settings)

    def prepare_text(self, conversation: Conversation, settings: GenerationSettings) -> PreparedRequest:
        """The model's inputs for a conversation without a picture: prompt ids only, never reused
        (prefixes are kept per medium, and this request has none)."""
        return self.prepare(conversation, [], settings)

    def token_text(self, token_id: int) -> tuple[str, bytes]:
        """A token's text and its exact UTF-8 bytes (OpenAI's logprob ``token`` and ``bytes``).

        A byte-level BPE token may hold part of a multi-byte character: then the text has the
        replacement character there but the bytes are exact, and a client joins the bytes of
        consecutive tokens to get the character. Special tokens give their own text."""
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if token is None:
            raise ValueError(f"token id {token_id} is not in the tokenizer's vocabulary")
        if token_id not in self.tokenizer.added_tokens_decoder and all(c in _BYTE_OF_CHAR for c in token):
            raw = bytes(_BYTE_OF_CHAR[c] for c in token)
        else:
            raw = token.encode()
        return raw.decode("utf-8", errors="replace"), raw

    @staticmethod
    def _recalled_tokens(media: MediaRef | None) -> int:
        if media is None or media.features is None:
            raise ValueError("without frames or an image, media must carry recalled features (Engine.recall)")
        return int(media.features.shape[0])

    def _expand_placeholders(self, prompt: str, items: Sequence[VisualItem]) -> tuple[torch.Tensor, list[int]]:
        """Tokenise ``prompt`` and repeat the k-th visual placeholder as many times as the k-th
        item has tokens; the ids and where each item's tokens start."""
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        config = self.model.config
        wanted = [config.video_token_index if item.modality == "video" else config.image_token_index for item in items]
        found = [token for token in ids if token in (config.image_token_index, config.video_token_index)]
        if found != wanted:
            # A placeholder typed into the question would ask for features nobody provides.
            raise InvalidPrompt(
                f"the prompt may not contain {prompting.IMAGE_PLACEHOLDER} or {prompting.VIDEO_PLACEHOLDER}: "
                "the service puts the picture into the prompt itself"
            )
        expanded: list[int] = []
        starts = []
        remaining = iter(items)
        for token in ids:
            if token in (config.image_token_index, config.video_token_index):
                starts.append(len(expanded))
                expanded.extend([token] * next(remaining).tokens)
            else:
                expanded.append(token)
        return torch.tensor([expanded]), starts

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


def check_capacity(layout: VideoLayout, kv_cache_tokens: int, max_frames: int, max_new_tokens: int) -> None:
    """Raise ValueError when the KV cache budget cannot hold one video request at the limits."""
    visual = layout.num_video_tokens(max_frames)
    if visual + max_new_tokens > kv_cache_tokens:
        raise ValueError(
            f"LLAVA_KV_CACHE_TOKENS={kv_cache_tokens} cannot hold a request of LLAVA_MAX_FRAMES={max_frames} frames "
            f"({visual} visual tokens) and LLAVA_MAX_NEW_TOKENS_LIMIT={max_new_tokens} new tokens: "
            "raise LLAVA_KV_CACHE_TOKENS or lower those limits"
        )


def _render(render: Callable[..., str], *args: Any) -> str:
    """Render a prompt; a conversation the model cannot answer is the caller's InvalidPrompt."""
    try:
        return render(*args)
    except ValueError as error:
        raise InvalidPrompt(str(error)) from error
