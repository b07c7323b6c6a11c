"""Tiny random checkpoints built offline, saved with save_pretrained and loaded by the real loader.

Weights are random, so answers are meaningless; what the tests check is shapes, label sets,
score arithmetic and determinism, which do not depend on the weights being trained.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

WORDS = (
    "my name is sarah and i live in london . the game tonight was great love it sports politics "
    "this example paris capital of france who where what life happiness hello world a cat dog "
    "tell me about python programming future ai , ? !"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
SENTIMENT_LABELS = ["NEGATIVE", "POSITIVE"]
NLI_LABELS = ["contradiction", "neutral", "entailment"]
IMAGE_LABELS = ["cat", "dog", "bird"]


def _vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = SPECIAL + sorted(set(WORDS)) + [c for c in chars if c not in WORDS] + [f"##{c}" for c in chars]
    return list(dict.fromkeys(vocab))


def bert_tokenizer(folder: Path):  # noqa: ANN201
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(_vocab())}
    return BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=128)


def _bert_config(**labels):  # noqa: ANN003, ANN202
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **labels,
    )


def _labels(names: list[str]) -> dict:
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def _save(model, tokenizer, folder: Path) -> Path:  # noqa: ANN001
    torch.manual_seed(0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_bert(kind: str, folder: Path) -> Path:
    """kind: sentiment | nli | ner | mlm | qa."""
    import transformers as tf

    torch.manual_seed(0)
    tok = bert_tokenizer(folder)
    if kind == "sentiment":
        model = tf.BertForSequenceClassification(_bert_config(**_labels(SENTIMENT_LABELS)))
    elif kind == "nli":
        model = tf.BertForSequenceClassification(_bert_config(**_labels(NLI_LABELS)))
    elif kind == "ner":
        model = tf.BertForTokenClassification(_bert_config(**_labels(NER_LABELS)))
    elif kind == "mlm":
        model = tf.BertForMaskedLM(_bert_config())
    elif kind == "qa":
        model = tf.BertForQuestionAnswering(_bert_config())
    else:
        raise ValueError(kind)
    return _save(model, tok, folder)


def _id(token: str) -> int:
    return _vocab().index(token)  # what bert_tokenizer maps it to


def _encoder_decoder(folder: Path, config_cls, model_cls, suppress: tuple[str, ...] = (), **config) -> Path:  # noqa: ANN001, ANN003
    """A tiny encoder-decoder over the BERT tokenizer: [PAD] pads, [SEP] ends, at most 20 tokens,
    never the `suppress` tokens."""
    torch.manual_seed(0)
    tok = bert_tokenizer(folder)
    model = model_cls(
        config_cls(vocab_size=len(_vocab()), d_model=32, pad_token_id=_id("[PAD]"), eos_token_id=_id("[SEP]"), **config)
    )
    model.generation_config.max_length = 20
    if suppress:
        model.generation_config.suppress_tokens = [_id(token) for token in suppress]
    return _save(model, tok, folder)


def build_bart(folder: Path) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration

    return _encoder_decoder(
        folder,
        BartConfig,
        BartForConditionalGeneration,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        bos_token_id=_id("[CLS]"),
        decoder_start_token_id=_id("[CLS]"),
        forced_eos_token_id=None,
    )


def build_t5(folder: Path) -> Path:
    """A tiny T5 with no `task_specific_params`: its task is inferred as text2text-generation."""
    from transformers import T5Config, T5ForConditionalGeneration

    return _encoder_decoder(
        folder,
        T5Config,
        T5ForConditionalGeneration,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=_id("[PAD]"),  # T5 starts decoding from its pad token
        # random T5 weights favour pad and end at once: never generating them gives text of known length
        suppress=("[PAD]", "[SEP]"),
    )


def build_gpt2(folder: Path) -> Path:
    """A tiny GPT-2 with a byte-level BPE tokenizer trained here on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [" ".join(WORDS)] * 3 + ["The future of AI is bright. Hello world! Tell me about Python."]
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(
        vocab_size=bpe.get_vocab_size(),
        n_positions=512,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # keep the end-of-text token unlikely so lengths are predictable
        model.lm_head.weight[eos].zero_()
        model.transformer.wte.weight[eos].fill_(0.0)
    return _save(model, tok, folder)


def build_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        **_labels(IMAGE_LABELS),
    )
    model = ViTForImageClassification(config)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_all(root: Path) -> dict[str, Path]:
    folders = {kind: build_bert(kind, root / kind) for kind in ("sentiment", "nli", "ner", "mlm", "qa")}
    folders["bart"] = build_bart(root / "bart")
    folders["t5"] = build_t5(root / "t5")
    folders["gpt2"] = build_gpt2(root / "gpt2")
    folders["vit"] = build_vit(root / "vit")
    return folders


if __name__ == "__main__":  # python -m tests.hf.tiny_models .tiny-models  (for examples/hf-tasks.yaml)
    import sys

    for kind, folder in build_all(Path(sys.argv[1] if len(sys.argv) > 1 else ".tiny-models")).items():
        print(f"{kind}: {folder}")
