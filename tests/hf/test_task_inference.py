"""Task inference from a checkpoint's config, as transformers.pipeline picks a head."""

from __future__ import annotations

import pytest
from transformers import BartConfig, BertConfig, GPT2Config, ViTConfig

from gateway.backends.local import infer_task
from gateway.domain import Task


@pytest.mark.parametrize(
    ("config", "task"),
    [
        (GPT2Config(architectures=["GPT2LMHeadModel"]), Task.TEXT_GENERATION),
        (BertConfig(architectures=["BertForSequenceClassification"]), Task.TEXT_CLASSIFICATION),
        (
            BertConfig(
                architectures=["BertForSequenceClassification"],
                id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"},
            ),
            Task.ZERO_SHOT_CLASSIFICATION,
        ),
        (BertConfig(architectures=["BertForTokenClassification"]), Task.TOKEN_CLASSIFICATION),
        (BertConfig(architectures=["BertForMaskedLM"]), Task.FILL_MASK),
        (BertConfig(architectures=["BertForQuestionAnswering"]), Task.QUESTION_ANSWERING),
        (BertConfig(architectures=["BertModel"]), Task.FEATURE_EXTRACTION),
        (ViTConfig(architectures=["ViTForImageClassification"]), Task.IMAGE_CLASSIFICATION),
        (BartConfig(architectures=["BartForConditionalGeneration"]), Task.TEXT2TEXT_GENERATION),
        (
            BartConfig(architectures=["BartForConditionalGeneration"], task_specific_params={"summarization": {}}),
            Task.SUMMARIZATION,
        ),
        (
            BartConfig(
                architectures=["BartForConditionalGeneration"],
                task_specific_params={"translation_en_to_de": {}, "translation_en_to_fr": {}},
            ),
            Task.TRANSLATION,
        ),
    ],
)
def test_infer_task(config: object, task: Task) -> None:
    assert infer_task(config) == task
