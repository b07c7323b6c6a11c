"""The most characters a prompt text can have and still fit a model's token limit.

Every token of a tokenization stands for a bounded stretch of the text: at most C
characters, C read off the vocabulary once at load. A text of N characters therefore
has at least N / C tokens, and one longer than `max_tokens * C` cannot fit: it is
refused before the tokenizer runs (a 10 MB prompt costs the tokenizer seconds of CPU
and hundreds of MB it never gives back). The bound never refuses a text that fits; for
a tokenizer where no such C exists (unknown characters merged into one token, a
normaliser that deletes characters), there is no bound and the token count decides.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# NFC/NFKC compose: the most code points that fold into one character is 4 (U+1F82 is
# alpha + three combining marks), measured over all of Unicode. Decomposing, lowercasing
# and prepending never make a text shorter.
_COMPOSING = frozenset({"NFC", "NFKC"})
_NEVER_SHRINK = frozenset({"NFD", "NFKD", "Lowercase", "Prepend"})


def _shrink(normalizer: dict[str, Any] | None) -> int | None:
    """How many input characters may become one after `normalizer`; None when unbounded or unknown."""
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        factor = 1
        for part in normalizer.get("normalizers", []):
            step = _shrink(part)
            if step is None:
                return None
            factor *= step
        return factor
    if kind in _COMPOSING:
        return 4
    if kind in _NEVER_SHRINK:
        return 1
    if kind == "Replace":
        pattern, content = normalizer.get("pattern", {}).get("String"), normalizer.get("content", "")
        if pattern is None or not content:
            return None  # a regex, or a deletion
        return max(1, -(-len(pattern) // len(content)))
    return None  # Strip, StripAccents, BertNormalizer, Precompiled...: may delete characters


def _pre_tokenizers(spec: dict[str, Any] | None) -> list[str]:
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [t for part in spec.get("pretokenizers", []) for t in _pre_tokenizers(part)]
    return [spec.get("type", "")]


def _byte_symbols() -> dict[int, str]:
    """Byte-level BPE's alphabet: printable Latin-1 bytes stand for themselves, the others
    for the code points from U+0100 up, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(0x100 + extra)
            extra += 1
    return symbols


def _dropped_characters(model: dict[str, Any], pre_tokenizer: dict[str, Any] | None) -> str | None:
    """The characters tokenizing deletes (a byte-level vocabulary missing some ASCII bytes), or
    None when characters may vanish without bound or merge into a shared unknown token."""
    if model.get("byte_fallback"):
        return ""
    if model.get("type") != "BPE":
        return None  # WordPiece's [UNK] stands for a whole word, Unigram fuses unknown characters
    if "ByteLevel" in _pre_tokenizers(pre_tokenizer):
        vocab = model.get("vocab", {})
        missing = [byte for byte, symbol in _byte_symbols().items() if symbol not in vocab]
        # A missing ASCII byte deletes its character. A longer character keeps a token while its
        # continuation bytes (80-BF) have theirs, whatever its lead byte (SmolLM2 lacks F1, F2).
        if any(0x80 <= byte < 0xC0 for byte in missing):
            return None
        return "".join(chr(byte) for byte in missing if byte < 0x80)
    return "" if model.get("unk_token") is not None and not model.get("fuse_unk") else None


@dataclass(frozen=True)
class TextBound:
    """A text longer than `max_tokens * chars_per_token`, not counting the `dropped` characters
    its tokenizer deletes, has more than `max_tokens` tokens."""

    chars_per_token: int
    dropped: str = ""

    def counted(self, text: str) -> int:
        return len(text) - sum(text.count(c) for c in self.dropped)

    def too_long(self, text: str, max_tokens: int) -> int | None:
        """The characters that count when `text` is too long for `max_tokens` tokens, else None."""
        bound = max_tokens * self.chars_per_token
        if len(text) <= bound:
            return None
        counted = self.counted(text) if self.dropped else len(text)
        return counted if counted > bound else None


def text_bound(tokenizer: Any) -> TextBound | None:
    """The bound for `tokenizer`'s texts; None when one token may stand for unboundedly many characters."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None  # a slow (Python) tokenizer: nothing to read its rules from
    spec = json.loads(backend.to_str())
    shrink = _shrink(spec.get("normalizer"))
    dropped = _dropped_characters(spec.get("model", {}), spec.get("pre_tokenizer"))
    if shrink is None or dropped is None:
        log.info("no character bound for prompts of this tokenizer: prompts are only counted in tokens")
        return None
    ids = list(range(len(tokenizer)))
    # A token's piece ("Ġthe", "▁the", "<0xE2>", "<|im_start|>") has at least as many characters
    # as the text it stands for; its decoded text covers pieces in other alphabets.
    pieces = tokenizer.convert_ids_to_tokens(ids)
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    longest = max(max(len(piece or ""), len(text)) for piece, text in zip(pieces, texts, strict=True))
    return TextBound(max(1, longest) * shrink, dropped)
