"""Constrained decoding: compiled grammars and the per-sequence token masks they give.

The grammar engine is llguidance (measured against xgrammar and outlines-core in
docs/structured-output.md: sub-millisecond compiles, so a new schema per request costs
nothing, masks computed lazily in Rust with the GIL released, JSON schema, regex and Lark).

`GrammarCompiler` is one per model: the llguidance view of its tokenizer (built once, on
the first constrained request) and a bounded LRU of compiled grammars (a pristine matcher,
deep-copied for each sequence). `Constraint` is one sequence's matcher; its mask for the next
token is computed on the compute thread, for the constrained rows only, and the scheduler
starts that work before the forward pass so the two overlap (`MaskWorker`).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from gateway.domain import Grammar
from gateway.errors import InvalidRequest, UnsupportedParameter

# Compact JSON: no optional whitespace for a model to wander into (or to spend its budget on).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
ANY_OBJECT = '{"type": "object"}'


class GrammarError(InvalidRequest):
    """A grammar the engine cannot compile: a 400 naming the field (422 on TGI routes)."""


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int], cache_size: int = 256) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_ids)
        self._lltok: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # compiled on request threads, copied on the compute thread

    def _lltokenizer(self) -> Any:
        if self._lltok is None:
            try:
                import llguidance.hf
            except ImportError as exc:  # pragma: no cover - a dependency of the project
                raise UnsupportedParameter("response_format", "needs the llguidance package") from exc
            try:
                eos = self._eos or None
                self._lltok = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab_size, eos_token=eos)
            except Exception as exc:  # e.g. a slow (Python) tokenizer
                raise UnsupportedParameter(
                    "response_format", f"is not supported by this model's tokenizer ({type(exc).__name__})"
                ) from exc
        return self._lltok

    def compile(self, grammar: Grammar) -> Any:
        """The compiled matcher of `grammar` (cached); raises GrammarError naming its field."""
        key = (grammar.kind, grammar.value)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            lltok = self._lltokenizer()
        matcher = _compile(lltok, grammar)  # outside the lock: llguidance drops the GIL while compiling
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def constraint(self, grammar: Grammar) -> Constraint:
        return Constraint(self.compile(grammar).deep_copy(), self.vocab_size)

    def cached(self) -> int:
        return len(self._cache)


def _compile(lltok: Any, grammar: Grammar) -> Any:
    import llguidance

    try:
        if grammar.kind in ("json_schema", "json_object"):
            schema = _closed(json.loads(grammar.value)) if grammar.kind == "json_schema" else ANY_OBJECT
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        elif grammar.kind == "regex":
            text = llguidance.LLMatcher.grammar_from_regex(grammar.value)
        elif grammar.kind == "lark":
            text = llguidance.LLMatcher.grammar_from_lark(grammar.value)
        else:
            raise GrammarError(f"Unknown grammar type '{grammar.kind}'.", param=grammar.param)
        matcher = llguidance.LLMatcher(lltok, text, log_level=0)
    except ValueError as exc:
        raise GrammarError(f"The {_what(grammar)} in '{grammar.param}' is invalid: {exc}", param=grammar.param) from exc
    if matcher.is_error():
        error = matcher.get_error()
        raise GrammarError(
            f"The {_what(grammar)} in '{grammar.param}' cannot be used for constrained decoding: {error}",
            param=grammar.param,
        )
    return matcher


def _closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others (as OpenAI's strict
    mode asks): a small model otherwise keeps inventing keys. Its output still validates against
    the schema as given; an explicit `additionalProperties` is kept."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {
        key: _closed(value) if key not in ("const", "enum", "default", "examples") else value
        for key, value in schema.items()
    }
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


def _what(grammar: Grammar) -> str:
    return {"json_schema": "JSON schema", "json_object": "JSON schema", "regex": "regular expression"}.get(
        grammar.kind, "grammar"
    )


class Constraint:
    """One sequence's grammar state: which tokens may come next, advanced by each sampled token."""

    __slots__ = ("matcher", "mask", "words")

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.words = (vocab_size + 31) // 32
        self.mask: torch.Tensor | None = None  # int32 bitmask of the allowed next tokens, once computed

    def consume(self, token: int) -> bool:
        self.mask = None
        return bool(self.matcher.consume_token(token))

    @property
    def error(self) -> str:
        return str(self.matcher.get_error())


_BITS = torch.arange(32, dtype=torch.int32)


def fill_masks(constraints: list[Constraint], executor: Any = None) -> None:
    """Compute the next-token masks of `constraints` that have none yet (in parallel when an
    llguidance executor is given: the work runs in Rust threads with the GIL released)."""
    todo = [c for c in constraints if c.mask is None]
    if not todo:
        return
    bitmask = torch.full((len(todo), todo[0].words), -1, dtype=torch.int32)
    if executor is not None and len(todo) > 1:
        executor.unsafe_compute_mask_ptr(
            [(c.matcher, i) for i, c in enumerate(todo)], bitmask.data_ptr(), bitmask.shape[1] * 4, len(todo)
        )
    else:
        for i, c in enumerate(todo):
            row = bitmask[i]
            c.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
    for i, c in enumerate(todo):
        c.mask = bitmask[i]


def apply_masks(logits: torch.Tensor, rows: list[int], constraints: list[Constraint]) -> None:
    """Forbid, in place, the tokens each constrained row's grammar does not allow next."""
    fill_masks(constraints)
    packed = torch.stack([c.mask for c in constraints])  # type: ignore[misc]
    allowed = ((packed[:, :, None] >> _BITS) & 1).reshape(len(rows), -1)[:, : logits.shape[1]].bool()
    index = torch.tensor(rows)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


class MaskWorker:
    """Computes the masks of a step's constrained sequences while the forward pass runs."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._executor: Any = None

    def start(self, constraints: list[Constraint]) -> Future[None] | None:
        if not constraints:
            return None
        if self._pool is None:
            import llguidance

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
            self._executor = llguidance.LLExecutor(num_threads=2)
        return self._pool.submit(fill_masks, constraints, self._executor)
