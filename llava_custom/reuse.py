"""Reuse of work across requests about the same media: never decode, encode or prefill it twice.

Two caches, each bounded in bytes with least-recently-used eviction:

- features (host memory): the visual tokens of a video or image, as the vision tower and projector
  made them, with the caller's description of the media (for a video: its duration and frame
  times). A hit skips decoding and vision encoding.
- prefixes (device memory): the KV cache of the last prompt prefilled that began with that
  media. A new prompt reuses it up to the longest common prefix of the two prompts' token ids
  (system prompt, visual tokens, time instruction, and any shared words) and pictures (the same
  picture at the same place), so a follow-up question prefills only what differs. Causal
  attention makes a position's keys and values depend on earlier tokens only, which is why a cut
  prefix is exactly the prefix the new prompt would compute.

Keys are content hashes of the media's bytes plus what decides its visual tokens (modality, frame
count, an image's recipe: tiled alone, one padded tile among several); the placeholder tokens
are the same for every video of a length, so a key built from tokens alone would hand one
video's features to another (LMDeploy PR #4618 is that bug).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

logger = logging.getLogger(__name__)

V = TypeVar("V")


def video_key(
    digest: str,
    num_frames: int,
    fps: float | None = None,
    start_time: float | None = None,
    end_time: float | None = None,
) -> str:
    """Cache key of ``num_frames`` frames sampled from the video whose bytes hash to ``digest``,
    at ``fps`` over [``start_time``, ``end_time``] when given: other frames, another key."""
    span = "" if fps is None and start_time is None and end_time is None else f"@{fps!r},{start_time!r},{end_time!r}"
    return f"video/{num_frames}{span}/{digest}"


def image_key(digest: str, padded: bool = False) -> str:
    """Cache key of the image whose bytes hash to ``digest``; ``padded``: as one of several
    pictures (one padded tile instead of anyres tiles: other visual tokens, another key)."""
    return f"image/pad/{digest}" if padded else f"image/{digest}"


@dataclass(frozen=True)
class MediaRef:
    """A request's media as the caches know it: its key, the caller's description, and its
    visual features when they were recalled from the cache (then nothing needs decoding)."""

    key: str
    info: Any = None
    features: torch.Tensor | None = None  # (visual tokens, hidden), host memory


# A prompt's pictures as a kept prefix must match them: (media key or None, first token, end).
Pictures = tuple[tuple[str | None, int, int], ...]


@dataclass(frozen=True)
class CachedPrefix:
    """The KV cache of one prompt, per layer (1, kv heads, tokens, head dim), its token ids and
    which picture's visual tokens sit where."""

    token_ids: torch.Tensor  # (tokens,) on the host
    # Copies of the prompt's keys and values (the engine's KV pool gives its blocks to other requests).
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    pictures: Pictures = ()

    @property
    def nbytes(self) -> int:
        return sum(keys.nbytes + values.nbytes for keys, values in self.layers)

    def usable_length(self, input_ids: torch.Tensor, pictures: Pictures) -> int:
        """Tokens of ``input_ids`` (1, n), whose pictures are ``pictures``, this prefix holds the KV
        of: the common token prefix, cut before the first picture that is not the same one at the
        same place (placeholder ids are alike for every picture of a size); 0 unless it covers the
        first picture. One token is always left, as its logits give the first answer token."""
        ids = input_ids[0].cpu()
        n = min(len(ids), len(self.token_ids))
        differ = (ids[:n] != self.token_ids[:n]).nonzero()
        usable = min(int(differ[0]) if len(differ) else n, len(ids) - 1)
        for picture in pictures:
            key, start, end = picture
            if start < usable and (key is None or picture not in self.pictures or usable < end):
                usable = start  # a different picture here, or a cut inside this one
                break
        return usable if pictures and usable >= pictures[0][2] else 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


class ByteLRU(Generic[V]):
    """A mapping bounded by the bytes of its values; the least recently used go first. Thread-safe.

    A capacity of 0 disables it: nothing is stored and lookups are not counted.
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def get(self, key: str) -> V | None:
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            return entry[0]

    def put(self, key: str, value: V, nbytes: int) -> None:
        """Store ``value`` (replacing any under ``key``), then evict until within capacity.
        A value larger than the whole capacity is not stored."""
        if nbytes > self.capacity_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._stats.bytes -= old[1]
            self._entries[key] = (value, nbytes)
            self._stats.bytes += nbytes
            while self._stats.bytes > self.capacity_bytes:
                _, (_, freed) = self._entries.popitem(last=False)
                self._stats.bytes -= freed
                self._stats.evictions += 1
            self._stats.entries = len(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(**vars(self._stats))


class ReuseCache:
    """The features cache (host memory) and the prefix cache (device memory) of one engine."""

    def __init__(self, feature_bytes: int = 0, prefix_bytes: int = 0) -> None:
        self.features: ByteLRU[MediaRef] = ByteLRU(feature_bytes)
        self.prefixes: ByteLRU[CachedPrefix] = ByteLRU(prefix_bytes)

    def recall(self, key: str) -> MediaRef | None:
        """The media's stored description and features, or None (then decode it)."""
        return self.features.get(key)

    def store_features(self, media: MediaRef, features: torch.Tensor) -> None:
        if self.features.enabled:
            host = features.to("cpu")
            self.features.put(media.key, MediaRef(media.key, media.info, host), host.nbytes)

    def prefix(self, key: str) -> CachedPrefix | None:
        return self.prefixes.get(key)

    def store_prefix(
        self,
        key: str,
        input_ids: torch.Tensor,
        layers: tuple[tuple[torch.Tensor, torch.Tensor], ...],
        pictures: Pictures,
    ) -> None:
        """Keep the prompt's KV (copies, per layer (1, kv heads, tokens, head dim)) for the next
        prompt that starts with the picture under ``key``."""
        if self.prefixes.enabled:
            prefix = CachedPrefix(input_ids[0].cpu(), layers, pictures)
            self.prefixes.put(key, prefix, prefix.nbytes)

    def summary(self) -> str:
        """Counts for the log: hits, misses, evictions and bytes of both caches."""
        parts = []
        for name, cache in (("features", self.features), ("prefixes", self.prefixes)):
            s = cache.stats()
            parts.append(f"{name} {s.hits} hits/{s.misses} misses/{s.evictions} evicted, {s.entries} in {s.bytes} B")
        return "; ".join(parts)
