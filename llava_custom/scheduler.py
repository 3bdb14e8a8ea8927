"""The scheduler: one thread that owns the model and serves every request through it.

Continuous batching over the model's own forward and transformers' ``DynamicCache``:

- Requests wait in a FIFO queue, background ones (``GenerationSettings.background``: a long-video
  job's captions) behind all others. The head of the queue starts when the running batch has a free
  row (``max_batch_size``) and the KV budget allows it (``kv_cache_tokens``, counted for the
  padded batch, see :meth:`Scheduler._fits`); past ``max_waiting`` queued requests, a new one is
  refused with :class:`EngineBusy` instead of queueing.
- A request is prefilled on its own, exactly as ``generate()`` would: vision features scattered
  into the prompt's embeddings, then the language model over the prompt in chunks of
  ``prefill_chunk_tokens``. One unit of prefill work (the vision encoding, or one chunk) runs
  between two decode steps, so a long video delays the running batch by one chunk at a time, not
  by its whole prefill.
- A request about media seen before (``PreparedRequest.media``, llava_custom/reuse.py) takes its
  visual features from the cache instead of the vision tower, and starts its prefill from the
  cached KV of the longest prompt prefix it shares with the last prompt about that media.
- Its first token comes from the prefill's logits; then its cache joins the batch. The batch
  cache holds every row right-aligned (left padding, as batched ``generate()`` uses): joining
  pads the shorter side, leaving drops the row and the columns nobody needs any more. Each decode
  step feeds every row its last token with its own position id and a padding mask, so a row's
  answer is what it would be alone, up to float rounding.
- A request that finishes (end-of-turn, a stop id, a stop string, ``max_new_tokens``), is
  cancelled or passes its deadline leaves the batch before the next step, and its cache rows are
  freed.
- A text-only request (no media) is the same without the vision step, and is never reused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llava_custom.errors import EngineBusy, EngineClosed, PromptTooLong, RequestCancelled, RequestTimeout
from llava_custom.limits import EngineLimits
from llava_custom.reuse import MediaRef, ReuseCache
from llava_custom.sampling import GenerationSettings, TokenChooser, row_generator
from llava_custom.streaming import (
    Answer,
    Delta,
    FinishReason,
    IncrementalDetokenizer,
    Timings,
    TokenLogprob,
    TokenStream,
)

logger = logging.getLogger(__name__)


@dataclass
class PreparedRequest:
    """A prompt ready for the model: ids with the visual placeholder expanded, and its pixels."""

    modality: Literal["video", "image", "text"]
    input_ids: torch.Tensor  # (1, prompt_tokens)
    visual_tokens: int  # 0 for text
    pixel_inputs: dict[str, torch.Tensor]  # empty for text or when media.features holds the visual tokens
    settings: GenerationSettings
    media: MediaRef | None = None  # set: its features and prompt KV are reused and stored for reuse

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def final_length(self) -> int:
        """Tokens its KV cache holds at most: the prompt and every new token."""
        return self.prompt_tokens + self.settings.max_new_tokens


@dataclass
class SchedulerStats:
    """Counters for tests, benchmarks and logs."""

    decode_steps: int = 0
    prefill_chunks: int = 0
    prefill_tokens: int = 0  # prompt tokens run through the model (reused ones are not)
    vision_encodings: int = 0  # videos or images run through the vision tower
    largest_batch: int = 0
    completed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0


@dataclass(eq=False)
class _Request:
    """One request inside the scheduler."""

    prepared: PreparedRequest
    stream: TokenStream
    deadline: float
    stop_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    length: int = 0  # tokens in its KV cache
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when its settings ask for them
    # time.monotonic() of submission, prefill start and first token; seconds in the vision tower.
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    first_token: float | None = None
    vision_seconds: float = 0.0

    @property
    def settings(self) -> GenerationSettings:
        return self.prepared.settings

    def accept(self, token: int, logprob: TokenLogprob | None) -> bool:
        """Record a generated token and stream it; True when the request is finished."""
        self.token_ids.append(token)
        logprobs = (logprob,) if logprob is not None else ()
        self.logprobs.extend(logprobs)
        text = self.detokenizer.add(token)
        reason: FinishReason | None = None
        if token in self.stop_ids or self.detokenizer.stopped:
            reason = "stop"
        elif len(self.token_ids) >= self.settings.max_new_tokens:
            reason = "length"
        if reason is None:
            self.stream.push(Delta(text, (token,), logprobs=logprobs))
            return False
        text += self.detokenizer.finish()
        answer = Answer(
            self.detokenizer.text,
            self.prepared.prompt_tokens,
            self.prepared.visual_tokens,
            tuple(self.token_ids),
            reason,
            tuple(self.logprobs) if self.settings.logprobs is not None else None,
            self._timings(),
        )
        self.stream.finish(Delta(text, (token,), reason, answer, logprobs))
        return True

    def _timings(self) -> Timings:
        now = time.monotonic()
        started = self.started if self.started is not None else now
        first = self.first_token if self.first_token is not None else now
        return Timings(started - self.submitted, self.vision_seconds, first - started, now - first)


@dataclass(eq=False)
class _Prefill:
    request: _Request
    steps: Generator[None, None, tuple[DynamicCache, torch.Tensor]]


class _Batch:
    """The running rows: their requests, one padded KV cache, their last tokens and what each generated."""

    def __init__(self) -> None:
        self.requests: list[_Request] = []
        self.cache: DynamicCache | None = None
        self.next_tokens: torch.Tensor | None = None  # (rows,) fed at the next step
        self.generated: torch.Tensor | None = None  # (rows, vocabulary) bool

    @property
    def width(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def add(self, request: _Request, cache: DynamicCache, token: torch.Tensor, generated: torch.Tensor) -> None:
        """Join a prefilled request; both caches are left-padded to the longer one."""
        if self.cache is None:
            self.requests, self.cache, self.next_tokens, self.generated = [request], cache, token, generated
            return
        width = max(self.width, cache.get_seq_length())
        for layer, new in zip(self.cache.layers, cache.layers, strict=True):
            layer.keys = torch.cat((_left_pad(layer.keys, width), _left_pad(new.keys, width)))
            layer.values = torch.cat((_left_pad(layer.values, width), _left_pad(new.values, width)))
        self.requests.append(request)
        self.next_tokens = torch.cat((self.next_tokens, token))
        self.generated = torch.cat((self.generated, generated))

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows``; drop the leading columns that are padding for every remaining row."""
        if not rows:
            self.requests, self.cache, self.next_tokens, self.generated = [], None, None, None
            return
        index = torch.tensor(rows, device=self.next_tokens.device)
        self.requests = [self.requests[i] for i in rows]
        drop = self.width - max(request.length for request in self.requests)
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, drop:]
            layer.values = layer.values[index, :, drop:]
        self.next_tokens = self.next_tokens[index]
        self.generated = self.generated[index]


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, heads, length, dim) -> (batch, heads, width, dim), zeros in front."""
    return torch.nn.functional.pad(tensor, (0, 0, width - tensor.shape[-2], 0))


class Scheduler:
    """Owns the model: queue, prefill, batched decode steps, one :class:`TokenStream` per request."""

    def __init__(
        self,
        model,
        tokenizer,
        device: torch.device,
        chooser: TokenChooser,
        stop_ids: list[int],
        limits: EngineLimits,
        reuse: ReuseCache | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.chooser = chooser
        self.stop_ids = frozenset(stop_ids)
        self.limits = limits
        self.reuse = reuse or ReuseCache()
        self.stats = SchedulerStats()
        self.context_length = model.config.text_config.max_position_embeddings
        self._check_cache_layout()
        self._condition = threading.Condition()
        self._waiting: deque[_Request] = deque()  # guarded by _condition
        self._closing = False
        self._prefill: _Prefill | None = None  # the rest is touched by the scheduler thread only
        self._batch = _Batch()
        self._thread = threading.Thread(target=self._run, name="llava-scheduler", daemon=True)
        self._thread.start()

    # --- any thread -----------------------------------------------------------------------------

    def submit(self, prepared: PreparedRequest) -> TokenStream:
        """Queue a request; raises PromptTooLong or EngineBusy at once instead of queueing."""
        settings = prepared.settings
        for limit, name in (
            (self.context_length, "the model's context"),
            (self.limits.kv_cache_tokens, "the KV cache budget (LLAVA_KV_CACHE_TOKENS)"),
        ):
            if prepared.final_length > limit:
                raise PromptTooLong(
                    f"the prompt takes {prepared.prompt_tokens} tokens and {settings.max_new_tokens} new tokens "
                    f"were asked for, more than {name} of {limit} tokens: use fewer frames, a smaller image or a "
                    "lower max_new_tokens"
                )
        request = _Request(
            prepared,
            TokenStream(),
            deadline=time.monotonic() + self.limits.request_timeout,
            stop_ids=frozenset(settings.stop_token_ids) | (frozenset() if settings.ignore_eos else self.stop_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer, settings.stop),
            generator=row_generator(settings, self.device),
        )
        with self._condition:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            if len(self._waiting) >= self.limits.max_waiting + self._free_rows():
                raise EngineBusy(
                    f"the service is busy ({len(self._waiting)} requests wait for the model); retry in a few seconds"
                )
            if settings.background:
                self._waiting.append(request)
            else:  # ahead of the background requests waiting, behind the others (FIFO each)
                position = next((i for i, r in enumerate(self._waiting) if r.prepared.settings.background), None)
                self._waiting.insert(len(self._waiting) if position is None else position, request)
            self._condition.notify()
        return request.stream

    def close(self) -> None:
        """Stop the scheduler thread; unfinished requests fail with EngineClosed."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        self._thread.join()

    @property
    def running(self) -> int:
        """Requests being prefilled or decoded."""
        return len(self._batch.requests) + (self._prefill is not None)

    @property
    def waiting(self) -> int:
        """Requests queued for a free row."""
        return len(self._waiting)

    def _free_rows(self) -> int:
        # Requests that will start at once do not count as waiting.
        return max(0, self.limits.max_batch_size - self.running)

    # --- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while self._next_round():
                try:
                    if self._prefill is not None:
                        self._advance_prefill()
                    if self._batch.requests:
                        self._decode_step()
                except Exception as error:  # a fault of the model or the device: fail who was affected
                    logger.exception("decode step failed; failing the %d running requests", len(self._batch.requests))
                    self._fail_batch(error)
        closed = EngineClosed("the engine was shut down")
        self._fail_batch(closed)
        with self._condition:
            ended = list(self._waiting) + ([self._prefill.request] if self._prefill else [])
            self._waiting.clear()
            self._prefill = None
        for request in ended:
            request.stream.fail(closed)

    def _next_round(self) -> bool:
        """Wait for work, drop requests nobody waits for, start the next prefill. False when closing."""
        with self._condition:
            while not (self._closing or self._waiting or self._prefill or self._batch.requests):
                self._condition.wait()
            if self._closing:
                return False
            for request in list(self._waiting):
                if self._ended_early(request):
                    self._waiting.remove(request)
            if self._prefill is None and self._waiting and self._fits(self._waiting[0]):
                request = self._waiting.popleft()
                request.started = time.monotonic()
                request.stream.mark_started()
                self._prefill = _Prefill(request, self._prefill_steps(request))
        return True

    def _fits(self, request: _Request) -> bool:
        """Whether the batch can take ``request`` now. The padded cache of n rows can grow to
        n x the longest final length among them, so that product must stay within the budget."""
        rows = self._batch.requests
        if len(rows) >= self.limits.max_batch_size:
            return False
        longest = max([r.prepared.final_length for r in rows] + [request.prepared.final_length])
        return (len(rows) + 1) * longest <= self.limits.kv_cache_tokens

    def _ended_early(self, request: _Request) -> bool:
        """End a request that was cancelled or ran out of time; True if it ended."""
        if request.stream.cancelled:
            request.stream.fail(RequestCancelled("the request was cancelled"))
            self.stats.cancelled += 1
            logger.info("request cancelled after %d new tokens; its cache is freed", len(request.token_ids))
            return True
        if time.monotonic() > request.deadline:
            logger.warning(
                "request timed out after %g s with %d new tokens", self.limits.request_timeout, len(request.token_ids)
            )
            request.stream.fail(
                RequestTimeout(
                    f"the answer took longer than the {self.limits.request_timeout:g} s time limit "
                    "(LLAVA_REQUEST_TIMEOUT); the service is overloaded or the answer too long, retry later"
                )
            )
            self.stats.timed_out += 1
            return True
        return False

    def _advance_prefill(self) -> None:
        prefill = self._prefill
        assert prefill is not None
        if self._ended_early(prefill.request):
            self._prefill = None
            return
        try:
            next(prefill.steps)
            self.stats.prefill_chunks += 1
            return
        except StopIteration as done:
            cache, logits = done.value
        except Exception as error:
            logger.exception("prefill failed")
            self._prefill = None
            self.stats.failed += 1
            prefill.request.stream.fail(error)
            return
        self._prefill = None
        request = prefill.request
        request.length = request.prepared.prompt_tokens
        generated = torch.zeros_like(logits, dtype=torch.bool)
        token, logprobs = self.chooser.choose(logits, generated, [request.settings], [request.generator])
        request.first_token = time.monotonic()
        if request.accept(int(token[0]), logprobs[0]):
            self.stats.completed += 1
            return
        generated[0, token[0]] = True
        self._batch.add(request, cache, token, generated)
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._batch.requests))

    def _prefill_steps(self, request: _Request) -> Generator[None, None, tuple[DynamicCache, torch.Tensor]]:
        """Prefill one request, yielding between units of work; returns its cache and last logits.

        With a cached prefix of the same media, only the tokens after the common prefix are
        prefilled (text only: the visual tokens are inside the prefix)."""
        prepared = request.prepared
        input_ids = prepared.input_ids.to(self.device)
        reused, cache = self._reused_prefix(prepared)
        if prepared.media is not None:
            recalled = prepared.media.features is not None
            logger.info(
                "reuse %s: features %s, KV of %d of %d prompt tokens reused (%s)",
                prepared.media.key,
                "recalled" if recalled else "not needed" if reused else "computed",
                reused,
                prepared.prompt_tokens,
                self.reuse.summary(),
            )
        if reused:
            embeds = self.model.model.get_input_embeddings()(input_ids[:, reused:])
        else:
            embeds = self._embed(request, input_ids)
            yield
            cache = DynamicCache(config=self.model.config)
        total, chunk = embeds.shape[1], self.limits.prefill_chunk_tokens
        self.stats.prefill_tokens += total
        start = 0
        while total - start > chunk:
            positions = torch.arange(reused + start, reused + start + chunk, device=self.device)[None]
            # The language model alone: no logits are needed before the last chunk.
            self.model.model.language_model(
                inputs_embeds=embeds[:, start : start + chunk], position_ids=positions, cache=cache, use_cache=True
            )
            start += chunk
            yield
        positions = torch.arange(reused + start, reused + total, device=self.device)[None]
        output = self.model(
            inputs_embeds=embeds[:, start:], position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        )
        if prepared.media is not None:
            self.reuse.store_prefix(prepared.media.key, prepared.input_ids, cache)
        return cache, output.logits[:, -1]

    def _reused_prefix(self, prepared: PreparedRequest) -> tuple[int, DynamicCache | None]:
        """Tokens of the prompt whose KV a cached prefix of the same media holds, and that KV."""
        if prepared.media is None or not self.reuse.prefixes.enabled:
            return 0, None
        prefix = self.reuse.prefix(prepared.media.key)
        config = self.model.config
        placeholder = config.video_token_index if prepared.modality == "video" else config.image_token_index
        visual_end = int((prepared.input_ids[0] == placeholder).nonzero()[-1]) + 1
        reused = prefix.usable_length(prepared.input_ids, visual_end) if prefix is not None else 0
        return reused, prefix.to_cache(reused, config) if reused else None

    def _embed(self, request: _Request, input_ids: torch.Tensor) -> torch.Tensor:
        """The prompt's embeddings with the visual features in the placeholders' places, as
        LlavaOnevisionModel.forward builds them (same calls, so the same numbers)."""
        prepared = request.prepared
        inner = self.model.model
        embeds = inner.get_input_embeddings()(input_ids)
        if prepared.modality == "text":
            return embeds
        media = prepared.media
        if media is not None and media.features is not None:
            features = media.features.to(self.device)
        else:
            began = time.monotonic()
            features = self._visual_features(prepared)
            if features.is_cuda:  # kernels run asynchronously: wait for them to time the tower
                torch.cuda.synchronize(features.device)
            request.vision_seconds = time.monotonic() - began
            if media is not None:
                self.reuse.store_features(media, features)
        if prepared.modality == "video":
            _, mask = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, video_features=features)
        else:
            mask, _ = inner.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
        return embeds.masked_scatter(mask, features.to(embeds.device, embeds.dtype))

    def _visual_features(self, prepared: PreparedRequest) -> torch.Tensor:
        """(visual tokens, hidden): the vision tower and projector over the request's pixels."""
        self.stats.vision_encodings += 1
        inner = self.model.model
        vision_dtype = inner.vision_tower.dtype
        pixels = {
            name: value.to(self.device, vision_dtype) if name.startswith("pixel_values") else value.to(self.device)
            for name, value in prepared.pixel_inputs.items()
            if value is not None
        }
        if prepared.modality == "video":
            output = inner.get_video_features(
                **pixels, frames_per_chunk=self.limits.vision_chunk_frames, return_dict=True
            )
            return output.pooler_output.flatten(0, 1)
        return torch.cat(inner.get_image_features(**pixels, return_dict=True).pooler_output, dim=0)

    def _decode_step(self) -> None:
        """One token for every running row."""
        batch = self._batch
        survivors = [i for i, request in enumerate(batch.requests) if not self._ended_early(request)]
        if len(survivors) < len(batch.requests):
            batch.keep(survivors)
            if not batch.requests:
                return
        width = batch.width
        lengths = torch.tensor([request.length for request in batch.requests], device=self.device)
        # Row i's cache is right-aligned: its real tokens are the last lengths[i] columns, plus the new one.
        mask = torch.arange(width + 1, device=self.device)[None, :] >= (width - lengths)[:, None]
        output = self.model(
            input_ids=batch.next_tokens[:, None],
            attention_mask=mask,
            position_ids=lengths[:, None],
            cache=batch.cache,
            use_cache=True,
        )
        tokens, logprobs = self.chooser.choose(
            output.logits[:, -1],
            batch.generated,
            [request.settings for request in batch.requests],
            [request.generator for request in batch.requests],
        )
        self.stats.decode_steps += 1
        batch.generated[torch.arange(len(tokens), device=self.device), tokens] = True
        batch.next_tokens = tokens
        keep = []
        for row, (request, token, logprob) in enumerate(zip(batch.requests, tokens.tolist(), logprobs, strict=True)):
            request.length += 1
            if request.accept(token, logprob):
                self.stats.completed += 1
            else:
                keep.append(row)
        if len(keep) < len(batch.requests):
            batch.keep(keep)

    def _fail_batch(self, error: BaseException) -> None:
        for request in self._batch.requests:
            request.stream.fail(error)
        self.stats.failed += len(self._batch.requests)
        self._batch = _Batch()

    def _check_cache_layout(self) -> None:
        """The batch cache pads and slices plain full-attention layers; refuse anything else."""
        cache = DynamicCache(config=self.model.config)
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            raise ValueError("the scheduler supports full-attention language models only (no sliding window)")
