"""Incremental detokenisation with stop sequences.

Decoding one token at a time is wrong for byte-level tokenizers (a character
can span tokens) and for SentencePiece (leading spaces depend on context), so
each step decodes a short window of recent tokens and emits only the new text.
Stop sequences are matched on text, by StopFilter, which upstream streams reuse.
"""

from __future__ import annotations

from typing import Any


class StopFilter:
    """Text in, text that is safe to send out, cut at the first stop sequence.

    Text that could be the start of a stop sequence is held back until it is known not
    to be one, so a dropped stop never reaches the client. A kept stop (TGI) ends the
    text and is sent like any other text, so nothing is held back.
    """

    def __init__(self, stop: tuple[str, ...] = (), keep_stop: bool = False) -> None:
        self._stop = tuple(s for s in stop if s)
        self._keep_stop = keep_stop
        self.text = ""  # everything received so far, up to a stop sequence
        self._emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.text += piece
        if self._stop:
            window_start = max(0, self._emitted - max(len(s) for s in self._stop))
            found = [(i, i + len(s)) for s in self._stop if (i := self.text.find(s, window_start)) >= 0]
            if found:
                # kept: cut after the first stop to complete; dropped: before the first to begin
                self.text = self.text[: min(end for _, end in found) if self._keep_stop else min(found)[0]]
                self.stopped = True
                return self.flush()
        safe = len(self.text) - self._held_back()
        delta = self.text[self._emitted : safe]
        self._emitted = max(self._emitted, safe)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that starts some stop sequence."""
        if self._keep_stop:
            return 0
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        """Everything not yet sent; call when the sequence ends."""
        delta = self.text[self._emitted :]
        self._emitted = len(self.text)
        return delta


class TextAssembler:
    """Token ids in, safe text out (see StopFilter)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), keep_stop: bool = False) -> None:
        self._tokenizer = tokenizer
        self._filter = StopFilter(stop, keep_stop)
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    @property
    def text(self) -> str:
        return self._filter.text

    @property
    def stopped(self) -> bool:
        return self._filter.stopped

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to send (maybe empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        piece = ""
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._filter.feed(piece)

    def flush(self) -> str:
        return self._filter.flush()
