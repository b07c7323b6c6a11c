"""A lean forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3, SmolLM).

The transformers modelling code spends more time in Python, in per-call mask and
cache bookkeeping and in slow matmul kernels than in arithmetic when a small model
decodes a batch on a CPU (measured on SmolLM2-135M, bf16, 16 sequences: 41 ms a
step against 21 ms here). This module runs the same weights with:

- the tokens of every sequence packed into one `[tokens, hidden]` matrix, so each
  projection is one matmul for decode tokens and prefill chunks alike;
- fused QKV and gate/up projections (one matmul each instead of three and two);
- on a CPU, every projection prepacked for oneDNN (`packed.py`: the decode matmuls
  of 8 tokens take 7.7 ms instead of 13.8 in bf16, 14 instead of 32 in fp32);
- a slot KV cache written in place, and attention over a slice of it with a
  per-sequence mask, computed once per step and shared by every layer;
- grouped-query attention folded into the batch dimension, so keys and values
  are never repeated per head;
- RoPE as one complex multiplication for queries and keys together: the rows of
  each head's query and key weights are permuted at load time so that the pairs
  RoPE rotates sit side by side (q.k is unchanged when q and k are permuted alike);
- in bfloat16/float16, the residual stream, the norms and RoPE in float32 (the
  matmuls and the KV cache stay in the model's dtype). SmolLM2's residual grows to
  ~25,000, where bfloat16 resolves steps of 128: in pure bfloat16 (transformers'
  way) its first answer token to "What is the capital of France?" is a near-tie,
  and a different rounding order sent the answer astray. Float32 costs little on
  a [tokens, hidden] matrix and keeps bfloat16 answers close to float32 ones;
- the output projection in float32 in every dtype (a float32 copy of the head),
  so argmax, log-probabilities and sampling see float32 logits.

`supports()` says which checkpoints qualify; everything else runs on the generic
path (`hf_step.py`). Outputs match transformers to float32 rounding (tested). The
fused model takes the decoder layers over: it releases transformers' copies, so the
weights are held once.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from gateway.engine.generation.step import PrefillChunk, PromptScores, SlotKVCache, StepPlan, add_scores
from gateway.engine.runtime.packed import LogitsLinear, PackedLinear

log = logging.getLogger(__name__)

_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
# RoPE variants whose cos/sin depend only on the position, so one table serves every step.
_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}


def supports(model: Any) -> bool:
    config = model.config
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}).get(
        "rope_type", "default"
    )
    return (
        config.model_type in _FAMILIES
        and getattr(config, "hidden_act", "silu") == "silu"
        and not getattr(config, "mlp_bias", False)
        and rope in _STATIC_ROPE
        and getattr(config, "sliding_window", None) is None
        and not getattr(model, "is_quantized", False)
        and not getattr(model, "hf_device_map", None)
    )


class FusedLlama:
    def __init__(self, model: Any, *, slots: int, max_len: int) -> None:
        config = model.config
        self.compiled: Any = None  # a CompiledDecode once `compile_decode` ran (the `compile` setting)
        self.layers_n = config.num_hidden_layers
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.group = self.heads // self.kv_heads
        self.eps = config.rms_norm_eps
        self.max_len = max_len
        weight = model.model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.embed = weight
        self.norm = model.model.norm.weight.float()
        self._batch_hint = slots
        head = model.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0])
        # The head runs in float32 whatever the model's dtype (a float32 copy of its weight, on the
        # float32 normed residual): bfloat16 logits step by 0.125 at SmolLM2's magnitudes, and
        # near-ties rounded to one value made greedy answers depend on the CPU's kernels.
        # (float16 weights with float32 arithmetic where that is exact: `LogitsLinear`)
        self.head = LogitsLinear(head.weight, head.bias, slots)
        if head.weight is not weight:  # an untied head is only read through that copy from here on
            model.set_output_embeddings(None)
        del head
        # rows of a head: [x0..x(d/2-1) | y0..y(d/2-1)] -> [x0, y0, x1, y1, ...], RoPE's pairs side by side
        half = self.head_dim // 2
        self._pairs = torch.tensor([i // 2 + (i % 2) * half for i in range(self.head_dim)], device=self.device)
        self.layers = [self._fuse(layer) for layer in model.model.layers]
        self.rope = self._rope_table(model, max_len)
        # transformers' layers are not run any more: free their weights (the embedding, shared
        # with a tied head, and the config stay). One slot more than the batch is for `score`.
        model.model.layers = torch.nn.ModuleList()
        self.scratch = slots
        self.cache = SlotKVCache(
            self.layers_n, slots + 1, self.kv_heads, self.head_dim, max_len, self.dtype, self.device
        )

    def _paired(self, rows: torch.Tensor) -> torch.Tensor:
        """Query or key projection rows (or bias, or per-head norm weight) with each head's RoPE pairs adjacent."""
        shape = rows.shape
        return rows.reshape(-1, self.head_dim, *shape[1:])[:, self._pairs].reshape(shape)

    def _fuse(self, layer: Any) -> dict[str, Any]:
        attn, mlp = layer.self_attn, layer.mlp
        biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        if all(b is not None for b in biases):
            qkv_bias = torch.cat([self._paired(biases[0]), self._paired(biases[1]), biases[2]]).contiguous()
        else:
            qkv_bias = None
        norms = [getattr(getattr(attn, name, None), "weight", None) for name in ("q_norm", "k_norm")]  # Qwen3
        q_rows, k_rows = self._paired(attn.q_proj.weight), self._paired(attn.k_proj.weight)
        hint = self._batch_hint
        fused: dict[str, Any] = {
            "ln_in": layer.input_layernorm.weight.float(),
            "ln_post": layer.post_attention_layernorm.weight.float(),
            "qkv": PackedLinear(torch.cat([q_rows, k_rows, attn.v_proj.weight]).contiguous(), qkv_bias, hint),
            "o": PackedLinear(attn.o_proj.weight, attn.o_proj.bias, hint),
            "gate_up": PackedLinear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(), None, hint),
            "down": PackedLinear(mlp.down_proj.weight, None, hint),
            "q_norm": None if norms[0] is None else self._paired(norms[0]).float(),
            "k_norm": None if norms[1] is None else self._paired(norms[1]).float(),
        }
        return fused

    def _rope_table(self, model: Any, length: int) -> torch.Tensor:
        """The rotation of every position as complex numbers [length, head_dim / 2], from the
        model's own rotary embedding (so every static scaling variant is exactly the model's)."""
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, 1, self.head_dim, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            cos, sin = model.model.rotary_emb(probe, position_ids=positions)
        half = self.head_dim // 2
        return torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float())

    # ----------------------------------------------------------------------------------------------
    def copy_slot(self, source: int, target: int, length: int) -> None:
        self.cache.copy_slot(source, target, length)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def _rotate(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """RoPE on float32 [tokens, heads, head_dim] with paired rows: a complex multiplication."""
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * rope).flatten(-2)

    def compile_decode(self) -> float | None:
        """Run decode steps through `torch.compile` (compiled here, at load); the seconds the
        compile took, or None if it failed (the eager step serves on; one warning logged)."""
        from gateway.engine.generation.compiled_step import CompiledDecode

        try:
            self.compiled = CompiledDecode(self)
        except Exception as exc:  # torch.compile unavailable in this build
            log.warning("torch.compile is unavailable (%s: %s); the eager step serves", type(exc).__name__, exc)
            return None
        with torch.inference_mode():
            self.compiled.warm_up()
        if not self.compiled.enabled:  # it logged why
            self.compiled = None
            return None
        return float(self.compiled.compile_seconds)

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> torch.Tensor:
        compiled = self.compiled.run(plan) if self.compiled is not None else None
        x = self._residual(plan) if compiled is None else compiled
        rows = list(range(len(plan.decode_tokens)))
        end = len(plan.decode_tokens)
        for chunk in plan.prefills:
            end += len(chunk.tokens)
            if chunk.last:
                rows.append(end - 1)
        if not rows:
            return torch.empty(0, self.vocab_size)
        picked = x if len(rows) == x.shape[0] else x[torch.tensor(rows, device=self.device)]
        return self._logits(picked)

    @torch.inference_mode()
    def score(self, tokens: list[int], top_n: int = 0, chunk: int = 256) -> PromptScores:
        """Log-probability of each token after the first given those before it (and the `top_n`
        most likely tokens at each position), through the spare slot."""
        scores = PromptScores([], [])
        for start in range(0, len(tokens) - 1, chunk):
            piece = tokens[start : start + chunk]
            x = self._residual(StepPlan(prefills=[PrefillChunk(self.scratch, start, piece, True)]))
            following = torch.tensor(tokens[start + 1 : start + 1 + len(piece)], device=self.device)
            add_scores(scores, self._logits(x[: len(following)]), following, top_n)
        return scores

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits from the float32 residual stream, never rounded to the model's dtype."""
        return self.head(self._rms(x, self.norm))

    def _residual(self, plan: StepPlan) -> torch.Tensor:
        """Run the layers over every token of the plan (writing the cache); the final residual stream."""
        self.cache.reserve(plan.longest)
        dev = self.device
        tokens = plan.decode_tokens + [t for c in plan.prefills for t in c.tokens]
        positions = plan.decode_positions + [p for c in plan.prefills for p in range(c.start, c.end)]
        slots = plan.decode_slots + [c.slot for c in plan.prefills for _ in c.tokens]
        token_t = torch.tensor(tokens, device=dev)
        pos_t = torch.tensor(positions, device=dev)
        slot_t = torch.tensor(slots, device=dev)
        single = (slots[0], positions[0]) if len(tokens) == 1 else None
        rope = self.rope[pos_t].unsqueeze(1)  # [tokens, 1, head_dim / 2]
        decode = _DecodeAttention(plan, dev) if plan.decode_tokens else None
        prefills = [_PrefillAttention(c, self.group, dev) for c in plan.prefills]

        dtype = self.dtype
        x = F.embedding(token_t, self.embed).float()  # the residual stream, in float32
        n = x.shape[0]
        for index, w in enumerate(self.layers):
            h = self._rms(x, w["ln_in"]).to(dtype)
            qkv = w["qkv"](h)
            split = (self.heads + self.kv_heads) * self.head_dim
            qk = qkv[:, :split].reshape(n, self.heads + self.kv_heads, self.head_dim).float()
            if w["q_norm"] is not None:
                qk = torch.cat(
                    (self._rms(qk[:, : self.heads], w["q_norm"]), self._rms(qk[:, self.heads :], w["k_norm"])), 1
                )
            qk = self._rotate(qk, rope).to(dtype)
            q, k = qk[:, : self.heads], qk[:, self.heads :]
            keys, values = self.cache.keys[index], self.cache.values[index]
            v = qkv[:, split:].reshape(n, self.kv_heads, self.head_dim)
            if single is not None:  # one token (one stream decoding): a plain copy, no index tensors
                keys[single[0], :, single[1]].copy_(k[0])
                values[single[0], :, single[1]].copy_(v[0])
            else:
                keys[slot_t, :, pos_t] = k
                values[slot_t, :, pos_t] = v
            parts = []
            if decode is not None:
                parts.append(decode(q[: decode.count], keys, values, self.kv_heads, self.group))
            offset = decode.count if decode is not None else 0
            for chunk in prefills:
                parts.append(chunk(q[offset : offset + chunk.count], keys, values, self.kv_heads))
                offset += chunk.count
            attn = parts[0] if len(parts) == 1 else torch.cat(parts)
            x.add_(w["o"](attn.reshape(n, -1)))
            h = self._rms(x, w["ln_post"]).to(dtype)
            gate, up = w["gate_up"](h).chunk(2, dim=-1)
            x.add_(w["down"](F.silu(gate) * up))
        return x


class _DecodeAttention:
    """Attention of every decoding sequence's new token over its slot, in one call.

    The call covers slots 0..S-1 (S = highest decoding slot + 1), a slice of the
    cache that needs no copy; slots in that range that are not decoding get a
    dummy query whose output is dropped.
    """

    def __init__(self, plan: StepPlan, device: torch.device) -> None:
        self.count = len(plan.decode_slots)
        span = max(plan.decode_slots) + 1
        self.span = span
        self.length = max(plan.decode_positions) + 1
        self.dense = plan.decode_slots == list(range(self.count))
        lengths = torch.ones(span, dtype=torch.long)
        lengths[torch.tensor(plan.decode_slots)] = torch.tensor(plan.decode_positions) + 1
        keep = torch.arange(self.length)[None, :] < lengths[:, None]
        # every row sees the whole span (one stream, or streams of one length): no mask needed,
        # and SDPA without one skips reading and applying it in every layer
        self.mask = None if bool(keep.all()) else keep.view(span, 1, 1, self.length).to(device)
        self.index = None if self.dense else torch.tensor(plan.decode_slots, device=device)

    def __call__(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kv_heads: int, group: int
    ) -> torch.Tensor:
        q = q.reshape(self.count, kv_heads, group, -1)
        if not self.dense:
            full = q.new_zeros(self.span, kv_heads, group, q.shape[-1])
            full[self.index] = q
            q = full
        out = F.scaled_dot_product_attention(
            q, keys[: self.span, :, : self.length], values[: self.span, :, : self.length], attn_mask=self.mask
        )
        if not self.dense:
            out = out[self.index]
        return out.reshape(self.count, -1)


class _PrefillAttention:
    """Causal attention of one prompt chunk over its slot (earlier chunks included)."""

    def __init__(self, chunk: Any, group: int, device: torch.device) -> None:
        self.count = len(chunk.tokens)
        self.slot, self.start, self.end = chunk.slot, chunk.start, chunk.end
        self.group = group
        query_pos = torch.arange(chunk.start, chunk.end)
        causal = torch.arange(chunk.end)[None, :] <= query_pos[:, None]  # [count, end]
        self.mask = causal.repeat(group, 1).to(device)  # rows ordered (group, position)

    def __call__(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kv_heads: int) -> torch.Tensor:
        dim = q.shape[-1]
        # [count, heads, dim] -> [kv_heads, group * count, dim]: the query heads sharing a
        # key/value head become extra query rows of that head.
        q = q.view(self.count, kv_heads, self.group, dim).permute(1, 2, 0, 3).reshape(kv_heads, -1, dim)
        k = keys[self.slot, :, : self.end]
        v = values[self.slot, :, : self.end]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return out.view(kv_heads, self.group, self.count, dim).permute(2, 0, 1, 3).reshape(self.count, -1)
