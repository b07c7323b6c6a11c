"""Each token's own bytes (OpenAI's logprobs `bytes`) from the tokenizer's byte mapping: the bytes of
a text's tokens give the text back, characters split across byte-level tokens included."""

from __future__ import annotations

from pathlib import Path

from gateway.engine.generation.token_bytes import TokenBytes, token_string
from tests.tiny_models import CORPUS, build_tokenizer

TEXT = "héllo wörld 日本語 🙂 naïve"


def _joined(tokenizer, text: str) -> bytes:  # type: ignore[no-untyped-def]
    pieces = TokenBytes(tokenizer)
    return b"".join(pieces(i).raw or b"" for i in tokenizer(text, add_special_tokens=False)["input_ids"])


def test_byte_level_bpe(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(tmp_path)  # trained on ASCII: non-ASCII text falls back to single bytes
    assert _joined(tokenizer, TEXT).decode() == TEXT
    pieces = TokenBytes(tokenizer)
    first = tokenizer("日", add_special_tokens=False)["input_ids"][0]
    assert pieces(first).raw == "日".encode()[:1] and pieces(first).text == "bytes:\\xe6"
    eos = tokenizer.eos_token_id
    assert pieces(eos).raw == b"<|im_end|>" and pieces(eos).text == "<|im_end|>"


def test_sentencepiece_metaspace() -> None:
    from tokenizers import SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(CORPUS, vocab_size=200, min_frequency=1, special_tokens=["<unk>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=sp._tokenizer, unk_token="<unk>")
    ids = tokenizer(" hello world", add_special_tokens=False)["input_ids"]
    assert b"".join(TokenBytes(tokenizer)(i).raw or b"" for i in ids) == b" hello world"


def test_token_string() -> None:
    assert token_string("é".encode()) == "é"
    assert token_string(b"\xe3\x81") == "bytes:\\xe3\\x81"
