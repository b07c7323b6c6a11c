"""Automatic prefix caching: the keys and values of prompt prefixes already computed, reused by any
later request of the same model whose prompt starts with the same tokens.

Chat clients resend the whole conversation every turn and agents the same system prompt on every
call, so most of a prompt has usually been computed before. The cache keeps that work in blocks of
`BLOCK` tokens in a pool of its own, per layer `[blocks, kv_heads, BLOCK, head_dim]`:

- a block is found by its parent block and its own tokens, so a block stands for every token
  before it too (a chain: two prompts share a block only if they agree up to its end). The parent
  is named by a number never reused, so an evicted parent makes its children unreachable rather
  than wrong, and the dictionary compares the tokens themselves: no hash can collide;
- a sequence's full blocks are copied in from its slot (`SlotKVCache`) after each prefill chunk
  (a long prompt is reusable by the requests queued behind it before it has finished) and when it
  finishes, prompt and answer (the next turn of a conversation resends the answer), only those
  blocks that are not there yet;
- a new request's longest cached prefix is copied into its slot when its first chunk is planned,
  always leaving at least one prompt token to prefill, so the step has the logits to sample from;
- least recently used blocks go first when the pool is full; a lookup touches a chain from its
  leaf to its root, so a parent is always more recent than its children and leaves go first.

Copies rather than paged attention: the step models attend over a slot's contiguous keys (one SDPA
call over a slice, no gather per layer per step), and a copy of a 1,000-token prefix costs a few
milliseconds against hundreds for its prefill on a CPU (docs/engine.md). Runs on the compute thread
only.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from gateway.engine.generation.step import SlotKVCache

BLOCK = 16  # tokens per block: the granularity of reuse


@dataclass(eq=False)
class _Block:
    uid: int  # never reused: children key on it
    index: int  # its row in the pool


_ROOT = 0  # the parent uid of a prompt's first block


class PrefixCache:
    """The reusable prefixes of one model's sequences, at most `max_blocks` blocks of `BLOCK` tokens."""

    def __init__(self, cache: SlotKVCache, max_tokens: int) -> None:
        self.slots = cache
        self.max_blocks = max(0, max_tokens // BLOCK)
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()  # LRU first
        self._rows = 0  # pool rows handed out so far (each is a block's until it is evicted)
        self._next_uid = _ROOT + 1
        self.capacity = 0  # pool rows allocated (grows by doubling up to max_blocks)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def bytes_reserved(self) -> int:
        """The pool at its largest."""
        return self.slots.bytes_per_token() * self.max_blocks * BLOCK

    # lookup ----------------------------------------------------------------------------------------
    def _chain(self, tokens: list[int], limit: int) -> list[tuple[tuple[int, tuple[int, ...]], _Block | None]]:
        """Each full block of `tokens[:limit]`: its key and its cached block, up to the first missing one
        (which is listed with None, the rest not at all)."""
        found: list[tuple[tuple[int, tuple[int, ...]], _Block | None]] = []
        parent = _ROOT
        for start in range(0, limit - BLOCK + 1, BLOCK):
            key = (parent, tuple(tokens[start : start + BLOCK]))
            block = self._blocks.get(key)
            found.append((key, block))
            if block is None:
                break
            parent = block.uid
        return found

    def _touch(self, keys: list[tuple[int, tuple[int, ...]]]) -> None:
        for key in reversed(keys):  # leaf first: the root ends up the most recent
            self._blocks.move_to_end(key)

    def load(self, tokens: list[int], slot: int) -> int:
        """Copy the longest cached prefix of `tokens` (leaving at least one token) into `slot`;
        returns its length in tokens."""
        if not self.max_blocks or not self._blocks:
            return 0
        hits = [(key, block) for key, block in self._chain(tokens, len(tokens) - 1) if block is not None]
        if not hits:
            return 0
        self._touch([key for key, _ in hits])
        length = len(hits) * BLOCK
        self.slots.reserve(length)
        rows = torch.tensor([block.index for _, block in hits], device=self.slots.device)
        heads, dim = self.slots.shape[1], self.slots.shape[2]
        for pool, store in ((self.keys, self.slots.keys), (self.values, self.slots.values)):
            for layer, tensor in enumerate(store):
                # [blocks, heads, BLOCK, dim] -> [heads, blocks * BLOCK, dim]
                tensor[slot, :, :length] = pool[layer][rows].transpose(0, 1).reshape(heads, length, dim)
        return length

    # storing ---------------------------------------------------------------------------------------
    def store(self, tokens: list[int], slot: int) -> int:
        """Keep the full blocks of `tokens`, whose keys and values are in `slot` at positions
        0..len(tokens)-1; copies only the blocks not cached yet. Returns the blocks copied."""
        if not self.max_blocks:
            return 0
        chain = self._chain(tokens, len(tokens))
        known = [key for key, block in chain if block is not None]
        parent = self._blocks[known[-1]].uid if known else _ROOT
        start = len(known) * BLOCK
        # never evict the chain being extended (it is touched first, so the LRU end is elsewhere)
        wanted = min((len(tokens) - start) // BLOCK, self.max_blocks - len(known))
        self._touch(known)
        new: list[tuple[tuple[int, tuple[int, ...]], _Block]] = []
        for i in range(wanted):
            index = self._take()
            if index is None:
                break
            key = (parent, tuple(tokens[start + i * BLOCK : start + (i + 1) * BLOCK]))
            block = _Block(self._next_uid, index)
            self._next_uid += 1
            new.append((key, block))
            parent = block.uid
        if not new:
            return 0
        self._copy_out(slot, start, [block.index for _, block in new])
        for key, block in new:
            self._blocks[key] = block
        self._touch(known + [key for key, _ in new])
        return len(new)

    def _take(self) -> int | None:
        """A free pool row: unused, or a new one (the pool grows), or the least recently used block's."""
        if self._rows < self.capacity:
            self._rows += 1
            return self._rows - 1
        if self.capacity < self.max_blocks:
            self._grow()
            return self._take()
        if not self._blocks:
            return None
        _, evicted = self._blocks.popitem(last=False)
        return evicted.index

    def _grow(self) -> None:
        capacity = min(self.max_blocks, max(64, self.capacity * 2))
        _, heads, dim = self.slots.shape
        for pool, store in ((self.keys, self.slots.keys), (self.values, self.slots.values)):
            for layer in range(len(store)):
                grown = torch.empty(capacity, heads, BLOCK, dim, dtype=self.slots.dtype, device=self.slots.device)
                if self.capacity:
                    grown[: self.capacity] = pool[layer]
                    pool[layer] = grown
                else:
                    pool.append(grown)
        self.capacity = capacity

    def _copy_out(self, slot: int, start: int, rows: list[int]) -> None:
        length = len(rows) * BLOCK
        index = torch.tensor(rows, device=self.slots.device)
        heads, dim = self.slots.shape[1], self.slots.shape[2]
        for pool, store in ((self.keys, self.slots.keys), (self.values, self.slots.values)):
            for layer, tensor in enumerate(store):
                part = tensor[slot, :, start : start + length].reshape(heads, len(rows), BLOCK, dim)
                pool[layer].index_copy_(0, index, part.transpose(0, 1).contiguous())

    def clear(self) -> None:
        self._blocks.clear()
        self._rows = 0
