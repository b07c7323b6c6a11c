"""Each token's own bytes and text (OpenAI's logprobs `token` and `bytes`).

Decoding one token alone with `tokenizer.decode` is lossy: a byte-level BPE token that holds
part of a UTF-8 character comes out as a replacement character. The bytes come from the
tokenizer's own mapping instead: GPT-2's byte-to-unicode alphabet for byte-level BPE
(GPT-2, Llama 3, SmolLM2, Qwen), `<0xNN>` byte tokens and `▁` for a space for SentencePiece.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

from gateway.domain import TokenText

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table: printable bytes map to themselves, the
    others to the code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_types(tokenizer: Any) -> set[str]:
    """The kinds of the fast tokenizer's decoder (and of the steps of a Sequence decoder)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders") or [decoder]
    return {str(step.get("type")) for step in steps if isinstance(step, dict)}


def token_string(raw: bytes) -> str:
    """A token's text: its bytes decoded, or for bytes that are not whole UTF-8 characters
    OpenAI's `bytes:\\xNN...` form, so that distinct tokens keep distinct strings (completions'
    top_logprobs are keyed by them)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TokenBytes:
    """Token ID -> TokenText, cached per ID (thread-safe enough: a race computes one twice)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, TokenText] = {}
        self._lock = threading.Lock()
        self._kinds: set[str] | None = None  # read on first use: serialising a large tokenizer takes a while

    def __call__(self, token_id: int) -> TokenText:
        found = self._cache.get(token_id)
        if found is None:
            with self._lock:
                if self._kinds is None:
                    self._learn()
            found = self._compute(token_id)
            with self._lock:
                self._cache[token_id] = found
        return found

    def _learn(self) -> None:
        kinds = _decoder_types(self.tokenizer)
        self._byte_level = _gpt2_byte_decoder() if "ByteLevel" in kinds else None
        self._sentencepiece = self._byte_level is None and bool(kinds & {"Metaspace", "Replace", "ByteFallback"})
        self._added = {int(i) for i in getattr(self.tokenizer, "added_tokens_decoder", {}) or {}}
        self._kinds = kinds

    def _compute(self, token_id: int) -> TokenText:
        raw = self._raw(token_id)
        return TokenText(token_string(raw), raw)

    def _raw(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if token_id in self._added:  # special and added tokens are their text as written
            return piece.encode()
        if self._byte_level is not None and all(c in self._byte_level for c in piece):
            return bytes(self._byte_level[c] for c in piece)
        if self._sentencepiece:
            match = _BYTE_TOKEN.fullmatch(piece)
            return bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode()
        return str(self.tokenizer.decode([token_id])).encode()
