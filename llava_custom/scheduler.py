"""The scheduler: one thread that owns the model and serves every request through it.

Continuous batching over the model's own forward and the engine's paged KV cache (kv_cache.py),
the model calls themselves in runner.py:

- Requests wait in a queue (request_queue.py), background ones (``GenerationSettings.background``:
  a long-video job's captions) behind all others. The head of the queue starts when the running
  batch has a free row (``max_batch_size``) and the KV pool can hold everything the request will
  ever write (``kv_cache_tokens``, counted in real tokens, see :meth:`Scheduler._fits`); past
  ``max_waiting`` queued requests, a new one is refused with :class:`EngineBusy` instead of queueing.
- A request is prefilled on its own, exactly as ``generate()`` would: vision features scattered
  into the prompt's embeddings, then the language model over the prompt in chunks of
  ``prefill_chunk_tokens``, writing its keys and values into blocks of the pool. One unit of
  prefill work (the vision encoding, or one chunk) runs between two decode steps, so a long video
  delays the running batch by one chunk at a time, not by its whole prefill.
- A request about media seen before (each picture's ``VisualItem.media``, llava_custom/reuse.py)
  takes their visual features from the cache instead of the vision tower, and starts its prefill
  from the kept KV of the longest prompt prefix it shares with the last prompt that began with the
  same picture, up to the first picture that differs.
- Its first token comes from the prefill's logits; then it joins the batch. Nothing is copied when
  a row joins or leaves: each row's keys stay in its own blocks, a decode step writes one token per
  row in place and attention reads each row up to its own length, so a row's answer is what it
  would be alone, up to float rounding.
- A request that finishes (end-of-turn, a stop id, a stop string, ``max_new_tokens``), is
  cancelled or passes its deadline leaves the batch before the next step, and its blocks are freed.
- A text-only request (no media) is the same without the vision step, and is never reused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llava_custom.errors import EngineBusy, EngineClosed, PromptTooLong, RequestCancelled, RequestTimeout
from llava_custom.kv_cache import RowKV
from llava_custom.limits import EngineLimits
from llava_custom.request_queue import RequestQueue
from llava_custom.reuse import MediaRef, ReuseCache
from llava_custom.runner import ModelRunner
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


@dataclass(frozen=True)
class VisualItem:
    """One picture of a prompt: where its visual tokens are and what makes them.

    ``padded_image`` is an image among several pictures: padded to a square, one tile (the
    original's "pad" recipe); ``image`` is a lone image, tiled (anyres)."""

    modality: Literal["video", "image", "padded_image"]
    start: int  # position of its first visual token in the prompt
    tokens: int
    pixel_inputs: dict[str, torch.Tensor]  # empty when media.features holds the visual tokens
    media: MediaRef | None = None  # set: its features are reused and stored for reuse

    @property
    def end(self) -> int:
        return self.start + self.tokens


@dataclass
class PreparedRequest:
    """A prompt ready for the model: ids with each picture's placeholder expanded, and its pictures."""

    input_ids: torch.Tensor  # (1, prompt_tokens)
    items: tuple[VisualItem, ...]  # in prompt order; none for text
    settings: GenerationSettings

    @property
    def modality(self) -> Literal["video", "image", "text", "pictures"]:
        """What the prompt is about: one video, one image, no picture, or several pictures."""
        if len(self.items) > 1:
            return "pictures"
        return self.items[0].modality if self.items else "text"  # type: ignore[return-value]

    @property
    def visual_tokens(self) -> int:
        return sum(item.tokens for item in self.items)

    @property
    def media(self) -> MediaRef | None:
        """The first picture's: the prompt KV is kept under its key (a conversation starts with it)."""
        return self.items[0].media if self.items else None

    @property
    def pixel_inputs(self) -> dict[str, torch.Tensor]:
        """The lone picture's pixels (benchmarks); empty for text."""
        return self.items[0].pixel_inputs if len(self.items) == 1 else {}

    def pictures(self) -> tuple[tuple[str | None, int, int], ...]:
        """(media key, start, end) of every picture: what a kept prompt prefix must match."""
        return tuple((item.media.key if item.media else None, item.start, item.end) for item in self.items)

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
    # The most KV the running rows held after a decode step (whole blocks), and the tokens they had then.
    peak_kv_tokens_held: int = 0
    kv_tokens_at_peak: int = 0


@dataclass(eq=False)
class _Request:
    """One request inside the scheduler."""

    prepared: PreparedRequest
    stream: TokenStream
    deadline: float
    stop_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    kv: RowKV | None = None  # its blocks of the KV pool, from the start of its prefill
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

    def accept(self, token: int, logprob: TokenLogprob | None) -> Delta | None:
        """Record a generated token and stream it; when it ends the request, return the last delta
        instead, for the scheduler to send once the request's row is freed."""
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
            return None
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
        return Delta(text, (token,), reason, answer, logprobs)

    def _timings(self) -> Timings:
        now = time.monotonic()
        started = self.started if self.started is not None else now
        first = self.first_token if self.first_token is not None else now
        return Timings(started - self.submitted, self.vision_seconds, first - started, now - first)


def _feature_source(item: VisualItem, needed: bool) -> str:
    if item.media is not None and item.media.features is not None:
        return "recalled"
    return "computed" if needed else "not needed"


@dataclass(eq=False)
class _Prefill:
    request: _Request
    steps: Generator[None, None, torch.Tensor]


class _Batch:
    """The running rows: their requests (each with its blocks of the pool), last tokens and generated ids."""

    def __init__(self) -> None:
        self.requests: list[_Request] = []
        self.next_tokens: torch.Tensor | None = None  # (rows,) fed at the next step
        self.generated: torch.Tensor | None = None  # (rows, vocabulary) bool

    @property
    def rows(self) -> list[RowKV]:
        return [request.kv for request in self.requests]

    def add(self, request: _Request, token: torch.Tensor, generated: torch.Tensor) -> None:
        """Join a prefilled request; its keys stay where its prefill wrote them."""
        if not self.requests:
            self.requests, self.next_tokens, self.generated = [request], token, generated
            return
        self.requests.append(request)
        self.next_tokens = torch.cat((self.next_tokens, token))
        self.generated = torch.cat((self.generated, generated))

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows``; the others give their blocks back."""
        kept = set(rows)
        for index, request in enumerate(self.requests):
            if index not in kept:
                request.kv.release()
        if not rows:
            self.requests, self.next_tokens, self.generated = [], None, None
            return
        index = torch.tensor(rows, device=self.next_tokens.device)
        self.requests = [self.requests[i] for i in rows]
        self.next_tokens = self.next_tokens[index]
        self.generated = self.generated[index]


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
        self.runner = ModelRunner(
            model,
            device,
            limits.kv_cache_tokens,
            limits.kv_block_tokens,
            limits.vision_chunk_frames,
            compile_decode(limits.compile, device),
        )
        self._condition = threading.Condition()
        self._waiting: RequestQueue[_Request] = RequestQueue(lambda r: r.prepared.settings.background)
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
                    f"the prompt is too long: its {prepared.prompt_tokens} tokens and the {settings.max_new_tokens} "
                    f"new tokens asked for make {prepared.final_length}, {prepared.final_length - limit} more than "
                    f"{name} of {limit} tokens: use fewer frames, a smaller image, a shorter conversation or a "
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
            self._waiting.add(request)
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

    @property
    def kv_tokens_held(self) -> int:
        """Tokens of KV memory the running requests hold (whole blocks)."""
        return self.runner.pool.used_blocks * self.runner.pool.block_size

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
            ended = self._waiting.drain()
            if self._prefill is not None:
                ended.append(self._prefill.request)
                self._release(self._prefill.request)
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
            self._waiting.remove_if(self._ended_early)
            head = self._waiting.peek()
            if self._prefill is None and head is not None and self._fits(head):
                request = self._waiting.pop()
                request.started = time.monotonic()
                request.stream.mark_started()
                request.kv = self.runner.new_row()
                self._prefill = _Prefill(request, self._prefill_steps(request))
        return True

    def _fits(self, request: _Request) -> bool:
        """Whether the batch can take ``request`` now: a free row, and free blocks for every token
        it and each running request will ever hold (prompt and new tokens), so no row ever waits
        for memory mid-answer."""
        rows = self._batch.requests
        if len(rows) >= self.limits.max_batch_size:
            return False
        pool = self.runner.pool
        promised = sum(pool.blocks_for(r.prepared.final_length) for r in [*rows, request])
        return promised <= pool.num_blocks

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

    @staticmethod
    def _release(request: _Request) -> None:
        if request.kv is not None:
            request.kv.release()

    def _advance_prefill(self) -> None:
        prefill = self._prefill
        assert prefill is not None
        request = prefill.request
        if self._ended_early(request):
            self._prefill = None
            self._release(request)
            return
        try:
            next(prefill.steps)
            self.stats.prefill_chunks += 1
            return
        except StopIteration as done:
            logits = done.value
        except Exception as error:
            logger.exception("prefill failed")
            self._prefill = None
            self._release(request)
            self.stats.failed += 1
            request.stream.fail(error)
            return
        self._prefill = None
        generated = torch.zeros_like(logits, dtype=torch.bool)
        token, logprobs = self.chooser.choose(logits, generated, [request.settings], [request.generator])
        request.first_token = time.monotonic()
        last = request.accept(int(token[0]), logprobs[0])
        if last is not None:
            self.stats.completed += 1
            self._release(request)
            request.stream.finish(last)
            return
        generated[0, token[0]] = True
        self._batch.add(request, token, generated)
        self.stats.largest_batch = max(self.stats.largest_batch, len(self._batch.requests))

    def _prefill_steps(self, request: _Request) -> Generator[None, None, torch.Tensor]:
        """Prefill one request into its blocks, yielding between units of work; returns its last logits.

        With a kept prefix of the same media, only the tokens after the common prefix are
        prefilled, with the features of the pictures after it (a follow-up that adds a picture)."""
        prepared = request.prepared
        row = request.kv
        reused = self._reuse_prefix(prepared, row)
        pending = [item for item in prepared.items if item.start >= reused]
        if prepared.media is not None:
            logger.info(
                "reuse %s: features %s, KV of %d of %d prompt tokens reused (%s)",
                " + ".join(item.media.key if item.media else "?" for item in prepared.items),
                ", ".join(_feature_source(item, item in pending) for item in prepared.items),
                reused,
                prepared.prompt_tokens,
                self.reuse.summary(),
            )
        features = []
        for item in pending:
            if features:
                yield  # one vision encoding per unit of work
            features.append(self._features(request, item))
        embeds = self.runner.embed(prepared.input_ids[:, reused:], reused, pending, features)
        if pending or not reused:
            yield
        total, chunk = embeds.shape[1], self.limits.prefill_chunk_tokens
        self.stats.prefill_tokens += total
        start = 0
        while total - start > chunk:
            # No logits are needed before the last chunk.
            self.runner.prefill(row, embeds[:, start : start + chunk], logits=False)
            start += chunk
            yield
        logits = self.runner.prefill(row, embeds[:, start:], logits=True)
        if prepared.media is not None and self.reuse.prefixes.enabled:
            layers = self.runner.read_prefix(row, prepared.prompt_tokens)
            self.reuse.store_prefix(prepared.media.key, prepared.input_ids, layers, prepared.pictures())
        return logits

    def _reuse_prefix(self, prepared: PreparedRequest, row: RowKV) -> int:
        """Write the KV of the longest prompt prefix a kept prefix of the same first picture holds
        into the (empty) row; the number of tokens written."""
        if prepared.media is None or not self.reuse.prefixes.enabled:
            return 0
        prefix = self.reuse.prefix(prepared.media.key)
        if prefix is None:
            return 0
        reused = prefix.usable_length(prepared.input_ids, prepared.pictures())
        if reused:
            self.runner.write_prefix(row, prefix.layers, reused)
        return reused

    def _features(self, request: _Request, item: VisualItem) -> torch.Tensor:
        """A picture's visual features: recalled, or from the vision tower (then kept for reuse)."""
        media = item.media
        if media is not None and media.features is not None:
            return media.features.to(self.device)
        self.stats.vision_encodings += 1
        features, seconds = self.runner.visual_features(item.modality, item.pixel_inputs)
        request.vision_seconds += seconds
        if media is not None:
            self.reuse.store_features(media, features)
        return features

    def _decode_step(self) -> None:
        """One token for every running row."""
        batch = self._batch
        survivors = [i for i, request in enumerate(batch.requests) if not self._ended_early(request)]
        if len(survivors) < len(batch.requests):
            batch.keep(survivors)
            if not batch.requests:
                return
        logits = self.runner.decode(batch.rows, batch.next_tokens)
        tokens, logprobs = self.chooser.choose(
            logits,
            batch.generated,
            [request.settings for request in batch.requests],
            [request.generator for request in batch.requests],
        )
        self.stats.decode_steps += 1
        if self.kv_tokens_held > self.stats.peak_kv_tokens_held:
            self.stats.peak_kv_tokens_held = self.kv_tokens_held
            self.stats.kv_tokens_at_peak = sum(row.length for row in batch.rows)
        batch.generated[torch.arange(len(tokens), device=self.device), tokens] = True
        batch.next_tokens = tokens
        keep, finished = [], []
        for row, (request, token, logprob) in enumerate(zip(batch.requests, tokens.tolist(), logprobs, strict=True)):
            last = request.accept(token, logprob)
            if last is None:
                keep.append(row)
            else:
                finished.append((request, last))
        if finished:
            batch.keep(keep)  # rows freed before their readers hear the end
            self.stats.completed += len(finished)
            for request, last in finished:
                request.stream.finish(last)

    def _fail_batch(self, error: BaseException) -> None:
        for request in self._batch.requests:
            request.stream.fail(error)
            self._release(request)
        self.stats.failed += len(self._batch.requests)
        self._batch = _Batch()

    def _check_cache_layout(self) -> None:
        """The paged cache holds plain full-attention layers; refuse anything else (sliding windows)."""
        cache = DynamicCache(config=self.model.config)
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            raise ValueError("the scheduler supports full-attention language models only (no sliding window)")


def compile_decode(setting: str, device: torch.device) -> bool:
    """Whether the decode step is compiled: ``on``/``off`` as said; ``auto`` where bench.kv_cache
    showed compilation to win (see docs/BENCHMARKS.md)."""
    if setting != "auto":
        return setting == "on"
    return COMPILE_WINS.get(device.type, False)


# Where bench.kv_cache measured the compiled decode step faster than the eager one.
COMPILE_WINS: dict[str, bool] = {"cpu": False, "cuda": False}
