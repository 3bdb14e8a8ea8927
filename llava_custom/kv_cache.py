"""The engine's KV cache: one pool of fixed-size blocks, allocated once, and a block table per request.

Why blocks (vLLM's paged layout) and not per-row slots: a slot sized for the longest request
wastes the difference on every short one, and slots of each request's own size fragment the pool
as requests of different lengths come and go. Blocks of ``block_size`` tokens waste at most one
partly filled block per request, and any free block serves any request.

- :class:`BlockPool` holds every layer's keys and values, ``(blocks x block_size, kv heads, head
  dim)``, allocated once at start-up from the KV budget, and hands out free block numbers.
- :class:`RowKV` is one request's block table and length. A request grows block by block as it
  decodes, and gives its blocks back when it ends; nobody else's keys move when it joins or leaves.
- :class:`PagedPass` is what one forward pass of the language model writes and reads: the
  ``update(keys, values, layer, ...)`` of transformers' ``Cache`` (which the model's attention
  layers call), writing the pass's new tokens into their slots in place and returning the keys and
  values the pass attends to, the rows packed one after another without padding.
  :func:`paged_attention` is registered with transformers' ``AttentionInterface`` and computes
  attention over that packing: each query sees its own row's keys only, up to its position.

transformers 5.24 ships the pieces separately: ``PagedAttentionCache`` (its continuous-batching
cache, whose allocators are tied to its own request states and scheduler) and a paged SDPA path
that gathers keys through read/write indices much as this module does. What it lacks for this
engine is a cache usable outside its ``ContinuousBatchingManager`` (which takes token ids only, no
pixels or embeddings), so the block table, the packed pass and the attention that needs no
``repeat_kv`` copy are written here; the attention layers, rotary embeddings and SDPA are transformers'.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

# The name under which paged_attention is registered; models keep their own implementation for
# every pass that is not paged (``generate()``, the vision tower).
PAGED_ATTENTION = "llava_paged"


class BlockPool:
    """Keys and values of every layer for ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a KV pool needs at least one block of at least one token")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, kv_heads, head_dim)
        # Never read before written: a pass reads only the slots of tokens it or an earlier pass wrote.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest numbers go first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of keys and values one token takes over all layers."""
        return sum(k[0].nbytes + v[0].nbytes for k, v in zip(self.keys, self.values, strict=True))

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"the KV pool has {len(self._free)} free blocks, {count} were asked for")
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: Sequence[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass(eq=False)
class RowKV:
    """One request's place in the pool: its blocks in order, and the tokens written so far."""

    pool: BlockPool
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    # Slot numbers of every token position the blocks hold, kept so a pass needs one slice per row.
    _slots: torch.Tensor | None = None

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` tokens in all (allocating blocks as needed)."""
        missing = self.pool.blocks_for(tokens) - len(self.blocks)
        if missing <= 0:
            return
        new = self.pool.allocate(missing)
        self.blocks.extend(new)
        size = self.pool.block_size
        device = self.pool.keys[0].device
        slots = (torch.tensor(new, device=device)[:, None] * size + torch.arange(size, device=device)).flatten()
        self._slots = slots if self._slots is None else torch.cat((self._slots, slots))

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Slot numbers of positions [start, end)."""
        assert self._slots is not None and end <= len(self._slots)
        return self._slots[start:end]

    def release(self) -> None:
        """Give the blocks back; the row holds nothing afterwards."""
        self.pool.release(self.blocks)
        self.blocks, self.length, self._slots = [], 0, None

    @property
    def held_tokens(self) -> int:
        return len(self.blocks) * self.pool.block_size


class PagedPass:
    """One forward pass over rows of the pool: a prefill chunk (one row adding ``new[0]`` tokens
    after its ``length``) or a decode step (every running row adding one token).

    Passed to the language model as its ``cache`` (the attention layers call :meth:`update`) and as
    the ``paged`` keyword that reaches :func:`paged_attention`. Everything it builds is a handful of
    small tensors per step, whatever the rows hold.
    """

    def __init__(self, rows: Sequence[RowKV], new: Sequence[int]) -> None:
        if len(rows) > 1 and max(new) > 1:
            raise ValueError("a pass is one row's prefill or one token for each of several rows")
        pool = rows[0].pool
        self.pool = pool
        device = pool.keys[0].device
        for row, count in zip(rows, new, strict=True):
            row.reserve(row.length + count)
        self.rows = len(rows)
        self.query_lengths = list(new)
        lengths = [row.length for row in rows]
        self.key_lengths = [length + count for length, count in zip(lengths, new, strict=True)]
        # A row that starts empty and is alone in the pass reads exactly what it writes: its own
        # keys are the layer's output, so the pass is the plain causal one transformers runs.
        self.fresh = self.rows == 1 and lengths[0] == 0
        # Several rows of one new token each: attention folds the KV heads (see paged_attention).
        self.folded = self.rows > 1
        if self.rows == 1:
            row, start, count = rows[0], lengths[0], new[0]
            self.positions = torch.arange(start, start + count, device=device)
            self.write = row.slots(start, start + count)
            self.read = None if self.fresh else row.slots(0, start + count)
            # A later chunk sees the row's earlier tokens and its own up to each position.
            self.mask = (
                None
                if self.fresh or count == 1
                else (torch.arange(start + count, device=device)[None, :] <= self.positions[:, None])[None, None]
            )
            return
        size = pool.block_size
        self.positions = torch.tensor(lengths, device=device)
        self.write = torch.tensor(
            [row.blocks[length // size] * size + length % size for row, length in zip(rows, lengths, strict=True)],
            device=device,
        )
        self.read = torch.cat([row.slots(0, n) for row, n in zip(rows, self.key_lengths, strict=True)])
        # Each row's one query sees all of its own keys (the new one included) and nobody else's:
        # keys [start, end) of the packing. (Bounds, not repeat_interleave: that one costs ms on CPU.)
        ends = list(itertools.accumulate(self.key_lengths))
        bounds = torch.tensor([[end - n, end] for end, n in zip(ends, self.key_lengths, strict=True)], device=device)
        keys = torch.arange(ends[-1], device=device)[None, :]
        self.mask = ((keys >= bounds[:, :1]) & (keys < bounds[:, 1:]))[None, None]

    def advance(self, rows: Sequence[RowKV]) -> None:
        """Record the pass's tokens as written (call once the forward succeeded)."""
        for row, count in zip(rows, self.query_lengths, strict=True):
            row.length += count

    def position_ids(self, device: torch.device) -> torch.Tensor:
        """(1, tokens): each new token's position in its own row."""
        return self.positions.to(device)[None]

    # transformers' Cache protocol, as the attention layers use it. Under torch.compile the
    # writes stay in place (no copy of the pool: a 2M-token pool steps as fast as a 20k one).
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the pass's (1, kv heads, tokens, dim) keys and values into their slots; return what
        the pass attends to, (1, kv heads, keys, dim), every row's keys one after another."""
        keys, values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        keys.index_copy_(0, self.write, key_states[0].transpose(0, 1))
        values.index_copy_(0, self.write, value_states[0].transpose(0, 1))
        if self.fresh:
            return key_states, value_states
        read = self.read
        return keys.index_select(0, read).transpose(0, 1)[None], values.index_select(0, read).transpose(0, 1)[None]


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    paged: PagedPass | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of a :class:`PagedPass`; any other pass goes to the model's own implementation."""
    if paged is None:
        return _fallback(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if not paged.folded or groups == 1:
        # One row, a prefill, or no grouped heads: transformers' SDPA path, as a model without a
        # paged cache runs it (a fresh prefill takes its causal kernel, a lone row needs no mask).
        return sdpa_attention_forward(module, query, key, value, paged.mask, scaling=scaling, dropout=dropout)
    # Several rows of one token each: fold each KV head's query heads into its query axis, so SDPA
    # reads every key once per KV head instead of copying it for every query head (repeat_kv).
    _, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    folded = query.reshape(1, kv_heads, groups * tokens, dim)
    mask = paged.mask.expand(1, 1, tokens, -1).repeat(1, 1, groups, 1)
    output = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(1, heads, tokens, dim).transpose(1, 2).contiguous(), None


# The implementation each model had before the paged one was installed, by config identity.
_ORIGINAL: dict[int, str] = {}


def _fallback(module: torch.nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _ORIGINAL.get(id(module.config), "sdpa")
    return ALL_ATTENTION_FUNCTIONS[name]


def install_paged_attention(text_config) -> None:
    """Route the language model's attention through :func:`paged_attention`. Passes without a
    :class:`PagedPass` (and their masks) keep the model's own implementation."""
    if text_config._attn_implementation == PAGED_ATTENTION:
        return
    original = text_config._attn_implementation or "sdpa"
    # Paged passes run on SDPA whatever the model's own implementation (flash-attn's kv-cache
    # kernels are not wired yet); the mask registry is global, so one original per process.
    if any(name != original for name in _ORIGINAL.values()):
        raise ValueError(f"models with different attention implementations in one process: {original!r}")
    _ORIGINAL[id(text_config)] = original
    AttentionInterface.register(PAGED_ATTENTION, paged_attention)
    # Masks of passes that are not paged (generate()) are built as the original implementation's.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PAGED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS[original])
    text_config._attn_implementation = PAGED_ATTENTION
