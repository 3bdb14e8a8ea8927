"""Choose the next token of every running request at once, each with its own settings.

One call handles a whole batch of logits: ids the model may never produce are masked, the
checkpoint's repetition penalty applies to each row's generated tokens only (as the original,
which generates from ``inputs_embeds``, never sees prompt ids), greedy rows take the argmax and
sampling rows draw with their own temperature, top-k, top-p and random generator, so a seeded
request draws the same tokens whatever else is in the batch. The arithmetic is transformers' own
(``SuppressTokensLogitsProcessor``, ``RepetitionPenaltyLogitsProcessor``,
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``, in that order), applied
per row. Rows that ask for log-probabilities get them from the same scores (see
:meth:`TokenChooser.choose`); the others cost nothing extra.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llava_custom.limits import DEFAULT_MAX_NEW_TOKENS
from llava_custom.streaming import TokenLogprob

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs allows


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode one request: ``temperature`` 0 means greedy, as in the original example."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # keep only the k most likely ids when sampling; 0: all
    seed: int | None = None  # makes a sampled answer reproducible; ignored when greedy
    stop_token_ids: tuple[int, ...] = ()  # besides the checkpoint's end-of-turn ids
    stop: tuple[str, ...] = ()  # the answer ends before the first of these it would contain
    logprobs: int | None = None  # None: none; n: each token's log-probability and the n likeliest
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (load tests, as vLLM's)
    background: bool = False  # waits behind every request that is not (long-video captions)

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if any(not stop for stop in self.stop):
            raise ValueError("a stop string may not be empty")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def row_generator(settings: GenerationSettings, device: torch.device) -> torch.Generator | None:
    """The random source of one sampling request: seeded as asked, or from the OS."""
    if not settings.sampling:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed if settings.seed is not None else secrets.randbits(63))
    return generator


class TokenChooser:
    """Picks next tokens for a batch of rows (``logits`` is (rows, vocabulary))."""

    def __init__(self, never_generate: Sequence[int], repetition_penalty: float, device: torch.device) -> None:
        self.never_generate = torch.tensor(sorted(set(never_generate)), dtype=torch.long, device=device)
        self.repetition_penalty = float(repetition_penalty)

    def choose(
        self,
        logits: torch.Tensor,
        generated: torch.Tensor,
        settings: Sequence[GenerationSettings],
        generators: Sequence[torch.Generator | None],
    ) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
        """Next token per row, and per row its log-probability when the row's settings ask for it.

        ``generated`` is a (rows, vocabulary) bool mask of ids each row produced. Log-probabilities
        are the log-softmax of the scores after masking the ids never generated and the repetition
        penalty, before temperature, top-k and top-p: the distribution greedy decoding ranks (the
        checkpoint's penalty is part of it), the same whatever the sampling settings. That is
        between vLLM's modes: its default ``raw_logprobs`` come before penalties, its
        ``processed_logprobs`` after temperature, top-k and top-p. They are computed after the
        tokens are chosen and never change them."""
        scores = logits.float().index_fill(1, self.never_generate, -float("inf"))
        if self.repetition_penalty != 1.0:
            penalty = self.repetition_penalty
            penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(generated, penalised, scores)
        tokens = scores.argmax(dim=-1)
        for row, (setting, generator) in enumerate(zip(settings, generators, strict=True)):
            if setting.sampling:
                tokens[row] = _sample(scores[row], setting, generator)
        logprobs: list[TokenLogprob | None] = [None] * len(settings)
        rows = [row for row, setting in enumerate(settings) if setting.logprobs is not None]
        if rows:  # nothing to compute, nothing copied to the host, for rows that did not ask
            counts = [settings[row].logprobs or 0 for row in rows]
            for row, logprob in zip(rows, _logprobs(scores[rows], tokens[rows], counts), strict=True):
                logprobs[row] = logprob
        return tokens, logprobs


def _logprobs(scores: torch.Tensor, tokens: torch.Tensor, counts: list[int]) -> list[TokenLogprob]:
    """Per row: the chosen token's log-probability and the ``counts[row]`` likeliest ids'."""
    logprobs = scores.log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    top_values, top_ids = logprobs.topk(max(counts), dim=-1)
    return [
        TokenLogprob(token, logprob, tuple(zip(ids[:count], values[:count], strict=True)))
        for token, logprob, ids, values, count in zip(
            tokens.tolist(), chosen, top_ids.tolist(), top_values.tolist(), counts, strict=True
        )
    ]


def _sample(scores: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> torch.Tensor:
    scores = scores / settings.temperature
    if settings.top_k > 0:
        # TopKLogitsWarper: drop every id scoring below the k-th best (ties with it stay).
        kth = torch.topk(scores, min(settings.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if settings.top_p < 1.0:
        # TopPLogitsWarper: drop the least likely tokens whose total probability is <= 1 - top_p,
        # always keeping the most likely one.
        sorted_scores, order = torch.sort(scores, descending=False)
        drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - settings.top_p)
        drop[-1] = False
        scores = scores.masked_fill(drop.scatter(0, order, drop), -float("inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[0]
