"""Sampling and detokenisation units: exact arithmetic that the HTTP tests cannot see."""

from __future__ import annotations

import torch

from gateway.detokenize import TextAssembler
from gateway.domain import SamplingParams
from gateway.engine.generation.sampling import SequenceSampler


def test_presence_and_frequency_penalties_are_exact() -> None:
    sampler = SequenceSampler(SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25), [], 4)
    for token in (2, 2, 3):
        sampler.observe(token)
    penalised = sampler._penalised(torch.zeros(4))
    assert penalised.tolist() == [0.0, 0.0, -(0.5 + 2 * 0.25), -(0.5 + 0.25)]


def test_repetition_penalty_covers_prompt_and_divides_positive_logits() -> None:
    sampler = SequenceSampler(SamplingParams(temperature=0, repetition_penalty=2.0), [1], 3)
    sampler.observe(2)
    out = sampler._penalised(torch.tensor([1.0, 4.0, -4.0]))
    assert out.tolist() == [1.0, 2.0, -8.0]


def test_top_k_one_is_greedy_and_top_p_keeps_the_crossing_token() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    for seed in range(5):
        assert SequenceSampler(SamplingParams(temperature=1, top_k=1, seed=seed), [], 4).choose(logits)[0] == 1
    # probabilities are about [0.03, 0.64, 0.09, 0.24]: top_p=0.5 keeps token 1 alone,
    # top_p=0.85 keeps 1 and 3 (the token whose mass crosses 0.85 is kept)
    assert {
        SequenceSampler(SamplingParams(temperature=1, top_p=0.5, seed=s), [], 4).choose(logits)[0] for s in range(20)
    } == {1}
    seen = {
        SequenceSampler(SamplingParams(temperature=1, top_p=0.85, seed=s), [], 4).choose(logits)[0] for s in range(50)
    }
    assert seen == {1, 3}


class CharTokenizer:
    def decode(self, ids: list[int], **_: object) -> str:
        return "".join(chr(i) for i in ids)


def test_stop_sequence_never_leaks_even_across_tokens() -> None:
    text = TextAssembler(CharTokenizer(), stop=("END",))
    out = "".join(text.push(ord(c)) for c in "abcEN")
    assert out == "abc"  # "EN" is held back: it may start "END"
    out += text.push(ord("D"))
    assert text.stopped and out == "abc"


def test_held_back_prefix_is_released_when_it_is_not_a_stop() -> None:
    text = TextAssembler(CharTokenizer(), stop=("END",))
    out = "".join(text.push(ord(c)) for c in "aENx")
    assert out == "aENx" and not text.stopped


def test_multibyte_characters_wait_for_their_last_token() -> None:
    class ByteTokenizer:
        def decode(self, ids: list[int], **_: object) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    text = TextAssembler(ByteTokenizer())
    pieces = [text.push(b) for b in "é!".encode()]
    assert pieces == ["", "é", "!"]
