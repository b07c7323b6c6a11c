"""Extractive question answering: the best context spans by start x end probability.

Long contexts are split into overlapping windows (`max_seq_len`, `doc_stride`); spans from
every window compete. Scores are start-probability x end-probability within a window.
"""

from __future__ import annotations

from typing import Any

import torch

from gateway.engine.encoders.tasks import TaskModel
from gateway.errors import InvalidRequest


def _span_chars(enc: Any, window: int, start: int, end: int, align_to_words: bool) -> tuple[int, int]:
    offsets = enc["offset_mapping"][window]
    if align_to_words:
        start_word, end_word = enc.token_to_word(window, start), enc.token_to_word(window, end)
        if start_word is not None and end_word is not None:
            return enc.word_to_chars(window, start_word, 1)[0], enc.word_to_chars(window, end_word, 1)[1]
    return int(offsets[start][0]), int(offsets[end][1])


def _candidates(
    p_start: torch.Tensor, p_end: torch.Tensor, context: torch.Tensor, max_answer_len: int, top_k: int
) -> list[tuple[float, int, int]]:
    """(score, start token, end token) of the best spans inside the context of one window."""
    scores = p_start[:, None] * p_end[None, :]
    allowed = context[:, None] & context[None, :]
    length = torch.arange(scores.shape[0])
    gap = length[None, :] - length[:, None]
    allowed &= (gap >= 0) & (gap < max_answer_len)
    scores = scores.masked_fill(~allowed, -1.0).flatten()
    best = torch.topk(scores, min(top_k, scores.numel()))
    width = p_start.shape[0]
    return [
        (float(s), int(i) // width, int(i) % width) for s, i in zip(best.values, best.indices, strict=True) if s >= 0
    ]


def _questions(
    tokenizer: Any, items: list[dict[str, str]], params: dict[str, Any], max_len: int
) -> tuple[list[str], int]:
    """The questions (cut to `max_question_len` tokens if asked) and the stride between context
    windows, checking each question leaves its windows room for the context."""
    stride = min(params.get("doc_stride", 128), max_len // 2)
    questions = [item["question"] for item in items]
    if "max_question_len" in params:  # keep the first max_question_len tokens of each question
        limit = params["max_question_len"]
        questions = [tokenizer.decode(tokenizer(q, add_special_tokens=False)["input_ids"][:limit]) for q in questions]
    for number, q in enumerate(questions):
        room = max_len - len(tokenizer(q)["input_ids"]) - 1
        if room < 8:  # the context is read in windows next to the question: leave it some room
            raise InvalidRequest(
                f"Question {number} is too long for this model's {max_len}-token windows; "
                "shorten it or set max_question_len.",
                param="inputs.question",
            )
        stride = min(stride, room // 2)
    return questions, stride


Span = tuple[float, int, int]  # (score, start char, end char)


def _spans(
    tm: TaskModel, enc: Any, count: int, params: dict[str, Any], top_k: int
) -> tuple[list[list[Span]], list[float]]:
    """Per item: its candidate spans from every window, and its best "no answer" score."""
    inputs = {k: v.to(tm.device) for k, v in enc.items() if k not in ("offset_mapping", "overflow_to_sample_mapping")}
    out = tm.model(**inputs)
    found: list[list[Span]] = [[] for _ in range(count)]
    null_scores = [0.0] * count
    max_answer_len = params.get("max_answer_len", 15)
    align = params.get("align_to_words", True)
    for window, item in enumerate(enc["overflow_to_sample_mapping"].tolist()):
        context = torch.tensor([s == 1 for s in enc.sequence_ids(window)])
        keep = context.clone()
        keep[0] = True  # the first token stands for "no answer"
        p_start = torch.softmax(out.start_logits[window].float().cpu().masked_fill(~keep, -1e4), -1)
        p_end = torch.softmax(out.end_logits[window].float().cpu().masked_fill(~keep, -1e4), -1)
        null_scores[item] = max(null_scores[item], float(p_start[0] * p_end[0]))
        # several token spans can widen to the same words, so take more than top_k before de-duplicating
        for score, start, end in _candidates(p_start, p_end, context, max_answer_len, top_k * 8):
            s, e = _span_chars(enc, window, start, end, align)
            found[item].append((score, s, e))
    return found, null_scores


def _answers(context: str, found: list[Span], null_score: float, params: dict[str, Any], top_k: int) -> Any:
    """One item's answers, best first, without duplicates: one dict when `top_k` is 1, else a list."""
    spans: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    for score, s, e in sorted(found, reverse=True):
        if (s, e) not in seen:
            seen.add((s, e))
            spans.append({"answer": context[s:e], "score": score, "start": s, "end": e})
    if params.get("handle_impossible_answer") and (not spans or null_score > spans[0]["score"]):
        spans.insert(0, {"answer": "", "score": null_score, "start": 0, "end": 0})
    spans = spans[:top_k]
    return spans[0] if top_k == 1 and spans else spans


@torch.inference_mode()
def run(tm: TaskModel, items: list[dict[str, str]], params: dict[str, Any]) -> list[Any]:
    """Per item: one {answer, score, start, end}, or a list of them when `top_k` > 1."""
    top_k = params.get("top_k", 1)
    max_len = min(params.get("max_seq_len", 384), tm.max_length)
    questions, stride = _questions(tm.tokenizer, items, params, max_len)
    enc = tm.tokenizer(
        questions,
        [item["context"] for item in items],
        truncation="only_second",
        max_length=max_len,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=True,
        return_tensors="pt",
    )
    found, null_scores = _spans(tm, enc, len(items), params, top_k)
    return [_answers(item["context"], found[i], null_scores[i], params, top_k) for i, item in enumerate(items)]
