"""Which task a checkpoint serves, read from its architecture, and the head class that serves it."""

from __future__ import annotations

from typing import Any

from gateway.domain import Task
from gateway.engine import EngineArgs

# Architecture-name suffix -> task, as transformers.pipeline picks a head for each task.
_HEAD_TASKS = (
    ("ForCausalLM", Task.TEXT_GENERATION),
    ("LMHeadModel", Task.TEXT_GENERATION),
    ("ForSequenceClassification", Task.TEXT_CLASSIFICATION),
    ("ForTokenClassification", Task.TOKEN_CLASSIFICATION),
    ("ForMaskedLM", Task.FILL_MASK),
    ("ForQuestionAnswering", Task.QUESTION_ANSWERING),
    ("ForImageClassification", Task.IMAGE_CLASSIFICATION),
)
SEQ2SEQ_TASKS = (Task.TEXT2TEXT_GENERATION, Task.SUMMARIZATION, Task.TRANSLATION)

# Tasks a model loaded for one task can also serve (/pipeline/{task}/{model} forces a task).
ALSO_SERVES: dict[Task, set[Task]] = {
    Task.TEXT_CLASSIFICATION: {Task.ZERO_SHOT_CLASSIFICATION},
    Task.ZERO_SHOT_CLASSIFICATION: {Task.TEXT_CLASSIFICATION},
    **{t: set(SEQ2SEQ_TASKS) for t in SEQ2SEQ_TASKS},
}


def infer_task(config: Any) -> Task:
    """The task a checkpoint's architecture implies, following pipeline()'s defaults.

    A sequence classifier with an 'entailment' label is an NLI model, which is what
    zero-shot classification runs on; an encoder-decoder is text2text-generation unless its
    `task_specific_params` name only summarization or only translation.
    """
    from gateway.engine import entailment_index

    archs = config.architectures or []
    arch = archs[0] if archs else ""
    for suffix, task in _HEAD_TASKS:
        if arch.endswith(suffix):
            if task == Task.TEXT_CLASSIFICATION and entailment_index(config) is not None:
                return Task.ZERO_SHOT_CLASSIFICATION
            return task
    if getattr(config, "is_encoder_decoder", False):
        declared = {key.split("_")[0] for key in (getattr(config, "task_specific_params", None) or {})}
        if declared == {"summarization"}:
            return Task.SUMMARIZATION
        if declared == {"translation"}:
            return Task.TRANSLATION
        return Task.TEXT2TEXT_GENERATION
    return Task.FEATURE_EXTRACTION


def config_task(args: EngineArgs) -> Task | None:
    """The task of a checkpoint whose config can be read now, without downloading, converting or
    running anything (a local folder, or a Hub id already cached); None leaves it to load time."""
    if args.trust_remote_code:
        return None  # its config class is the checkpoint's own code: not run before the load
    from gateway.engine import resolve_source

    try:
        source = resolve_source(args)
        if source.gguf_file is not None:
            return None  # a GGUF has a config only once converted
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source.path, revision=args.revision, local_files_only=True)
    except Exception:  # missing, not cached, unknown architecture: the load says why
        return None
    return infer_task(config)


def model_class(task: Task) -> Any:
    """The transformers auto class whose head serves `task`."""
    import transformers as tf

    if task in SEQ2SEQ_TASKS:
        return tf.AutoModelForSeq2SeqLM
    return {
        Task.TEXT_GENERATION: tf.AutoModelForCausalLM,
        Task.TEXT_CLASSIFICATION: tf.AutoModelForSequenceClassification,
        Task.ZERO_SHOT_CLASSIFICATION: tf.AutoModelForSequenceClassification,
        Task.TOKEN_CLASSIFICATION: tf.AutoModelForTokenClassification,
        Task.FILL_MASK: tf.AutoModelForMaskedLM,
        Task.QUESTION_ANSWERING: tf.AutoModelForQuestionAnswering,
        Task.IMAGE_CLASSIFICATION: tf.AutoModelForImageClassification,
    }.get(task, tf.AutoModel)
