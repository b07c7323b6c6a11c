"""Every non-generation task through the real InferenceClient against the live gateway."""

from __future__ import annotations

import asyncio
import base64
import io
import math
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from tests.helpers import LiveServer
from tests.hf.tiny_models import IMAGE_LABELS, NER_LABELS, SENTIMENT_LABELS


def client(server: LiveServer, model: str) -> InferenceClient:
    return InferenceClient(base_url=f"{server.url}/models/{model}")


def png(color: tuple[int, int, int], size: int = 40) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


# text-classification ------------------------------------------------------------
def test_text_classification_matches_the_model(hf_server: LiveServer, tiny: dict[str, Path]) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    text = "I love it"
    out = client(hf_server, "acme/sentiment").text_classification(text)
    assert [o.label for o in out] and {o.label for o in out} == set(SENTIMENT_LABELS)
    assert out[0].score >= out[1].score
    assert math.isclose(sum(o.score for o in out), 1.0, rel_tol=1e-5)

    tok = AutoTokenizer.from_pretrained(tiny["sentiment"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny["sentiment"]).eval()
    with torch.no_grad():
        probs = torch.softmax(model(**tok(text, return_tensors="pt")).logits[0], -1)
    expected = {model.config.id2label[i]: float(p) for i, p in enumerate(probs)}
    for o in out:
        assert o.score == pytest.approx(expected[o.label], abs=1e-5)


def test_text_classification_wire_shape_and_params(hf_server: LiveServer) -> None:
    url = f"{hf_server.url}/models/acme/sentiment"
    one = requests.post(url, json={"inputs": "I love it", "parameters": {"top_k": 1}}).json()
    assert isinstance(one, list) and len(one) == 1 and isinstance(one[0], list) and len(one[0]) == 1
    many = requests.post(url, json={"inputs": ["I love it", "the game"]}).json()
    assert len(many) == 2 and all(len(r) == 2 for r in many)
    sig = requests.post(url, json={"inputs": ["I love it"], "parameters": {"function_to_apply": "sigmoid"}}).json()
    assert sum(r["score"] for r in sig[0]) != pytest.approx(1.0, abs=1e-3)
    assert all(0 < r["score"] < 1 for r in sig[0])


# token-classification -----------------------------------------------------------
@pytest.mark.parametrize("strategy", ["simple", "first", "average", "max"])
def test_token_classification_aggregations(hf_server: LiveServer, strategy: str) -> None:
    text = "My name is Sarah and I live in London"
    entities = client(hf_server, "ner").token_classification(text, aggregation_strategy=strategy)
    assert entities, "a random 5-label model still tags most words"
    groups = {label.split("-")[-1] for label in NER_LABELS if label != "O"}
    for e in entities:
        assert e.entity_group in groups
        assert text[e.start : e.end].lower() == e.word.replace(" ##", "").replace("##", "")
        assert 0 < e.score <= 1


def test_token_classification_none_gives_per_token_entities(hf_server: LiveServer) -> None:
    r = requests.post(
        f"{hf_server.url}/models/ner",
        json={"inputs": "My name is Sarah", "parameters": {"aggregation_strategy": "none", "ignore_labels": []}},
    )
    entities = r.json()
    assert r.status_code == 200 and len(entities) == 4  # every token, "O" included
    assert all(e["entity"] in NER_LABELS and "index" in e for e in entities)


def test_token_classification_bad_strategy_is_a_validation_error(hf_server: LiveServer) -> None:
    r = requests.post(
        f"{hf_server.url}/models/ner", json={"inputs": "x", "parameters": {"aggregation_strategy": "mean"}}
    )
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert "aggregation_strategy" in r.json()["error"]


# zero-shot -----------------------------------------------------------------------
def test_zero_shot_flat_list_scores_sum_to_one(hf_server: LiveServer) -> None:
    labels = ["sports", "politics", "cooking"]
    out = client(hf_server, "nli").zero_shot_classification("the game tonight", labels)
    assert sorted(o.label for o in out) == sorted(labels)
    assert math.isclose(sum(o.score for o in out), 1.0, rel_tol=1e-5)
    assert [o.score for o in out] == sorted((o.score for o in out), reverse=True)


def test_zero_shot_multi_label_and_template(hf_server: LiveServer) -> None:
    out = client(hf_server, "nli").zero_shot_classification(
        "the game tonight", ["sports", "politics"], multi_label=True, hypothesis_template="It is about {}."
    )
    assert len(out) == 2 and all(0 < o.score < 1 for o in out)
    assert sum(o.score for o in out) != pytest.approx(1.0, abs=1e-4)
    r = requests.post(
        f"{hf_server.url}/models/nli",
        json={"inputs": "x", "parameters": {"candidate_labels": ["a"], "hypothesis_template": "no slot"}},
    )
    assert r.status_code == 422 and "hypothesis_template" in r.json()["error"]
    r = requests.post(f"{hf_server.url}/models/nli", json={"inputs": "x", "parameters": {}})
    assert r.status_code == 422 and "candidate_labels" in r.json()["error"]


# fill-mask -----------------------------------------------------------------------
def test_fill_mask(hf_server: LiveServer) -> None:
    out = client(hf_server, "mlm").fill_mask("life is [MASK] .", top_k=3)
    assert len(out) == 3
    for o in out:
        assert o.sequence.startswith("life is") and o.token_str.lstrip("#") in o.sequence and isinstance(o.token, int)
    assert [o.score for o in out] == sorted((o.score for o in out), reverse=True)
    targeted = client(hf_server, "mlm").fill_mask("life is [MASK] .", targets=["happiness", "london"])
    assert sorted(o.token_str for o in targeted) == ["happiness", "london"]


def test_fill_mask_without_mask_is_a_validation_error(hf_server: LiveServer) -> None:
    r = requests.post(f"{hf_server.url}/models/mlm", json={"inputs": "no mask here"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and "[MASK]" in r.json()["error"]


# question-answering --------------------------------------------------------------
def test_question_answering_spans_come_from_the_context(hf_server: LiveServer) -> None:
    context = "My name is Clara and I live in Berkeley"
    qa = client(hf_server, "qa")
    best = qa.question_answering(question="Where do I live?", context=context)
    assert context[best.start : best.end] == best.answer and 0 < best.score <= 1
    top = qa.question_answering(question="Where do I live?", context=context, top_k=3)
    assert isinstance(top, list) and len(top) == 3
    assert top[0].answer == best.answer and top[0].score == pytest.approx(best.score)
    assert len({(t.start, t.end) for t in top}) == 3
    for t in top:
        assert context[t.start : t.end] == t.answer


def test_question_answering_long_context_uses_windows(hf_server: LiveServer) -> None:
    context = " ".join(["the game tonight was great ."] * 60) + " My name is Clara"
    r = requests.post(
        f"{hf_server.url}/models/qa",
        json={"inputs": {"question": "who?", "context": context}, "parameters": {"max_seq_len": 64, "doc_stride": 16}},
    )
    body = r.json()
    assert r.status_code == 200 and context[body["start"] : body["end"]] == body["answer"]


# summarization / translation -----------------------------------------------------
def test_summarization_matches_greedy_generate(hf_server: LiveServer, tiny: dict[str, Path]) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    text = "the game tonight was great and i love it"
    out = client(hf_server, "bart-summarizer").summarization(
        text, generate_parameters={"max_new_tokens": 6, "min_new_tokens": 6}
    )
    tok = AutoTokenizer.from_pretrained(tiny["bart"])
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny["bart"]).eval()
    ids = model.generate(
        **tok(text, return_tensors="pt", return_token_type_ids=False), max_new_tokens=6, min_new_tokens=6
    )
    assert out.summary_text == tok.decode(ids[0], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    raw = requests.post(f"{hf_server.url}/models/bart-summarizer", json={"inputs": [text, "hello"]}).json()
    assert len(raw) == 2 and all(set(r) == {"summary_text"} for r in raw)


def test_translation_list_shape_and_language_errors(hf_server: LiveServer) -> None:
    out = client(hf_server, "bart-translator").translation("hello world")
    assert isinstance(out.translation_text, str)
    raw = requests.post(f"{hf_server.url}/models/bart-translator", json={"inputs": "hello"}).json()
    assert isinstance(raw, list) and set(raw[0]) == {"translation_text"}
    r = requests.post(
        f"{hf_server.url}/models/bart-translator",
        json={"inputs": "hello", "parameters": {"src_lang": "en", "tgt_lang": "fr"}},
    )
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and "'fr'" in r.json()["error"]


def test_text2text_generation(hf_server: LiveServer, tiny: dict[str, Path]) -> None:
    """The inferred task of a T5 (/models/t5) and a forced one on a BART (/pipeline/...): both answer
    [{"generated_text"}], what InferenceClient.text_generation reads, as it does from the hosted API."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    texts = ["hello world", "the game tonight was great"]
    routes = [
        ("models/t5", "t5"),
        ("pipeline/text2text-generation/t5", "t5"),
        ("pipeline/text2text-generation/bart-summarizer", "bart"),
    ]
    for route, checkpoint in routes:
        url = f"{hf_server.url}/{route}"
        tok = AutoTokenizer.from_pretrained(tiny[checkpoint])
        model = AutoModelForSeq2SeqLM.from_pretrained(tiny[checkpoint]).eval()
        enc = tok(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
        ids = model.generate(**enc, max_new_tokens=4, min_new_tokens=4)
        expected = tok.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert checkpoint != "t5" or all(expected), "the tiny T5 writes text (the tiny BART only special tokens)"
        generate = {"generate_parameters": {"max_new_tokens": 4, "min_new_tokens": 4}}
        r = requests.post(url, json={"inputs": texts, "parameters": generate})
        assert r.status_code == 200 and r.json() == [{"generated_text": t} for t in expected]
        one = requests.post(url, json={"inputs": texts[0], "parameters": generate}).json()
        assert one == [{"generated_text": expected[0]}]  # a list even for one input, as hosted

        greedy = tok.decode(
            model.generate(**tok(texts[0], return_tensors="pt", return_token_type_ids=False))[0],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,
        )
        assert InferenceClient(base_url=url).text_generation(texts[0]) == greedy
        assert asyncio.run(AsyncInferenceClient(base_url=url).text_generation(texts[0])) == greedy


def test_seq2seq_seed_is_per_request(hf_server: LiveServer) -> None:
    """A seeded sampling request is reproducible and leaves the process's global generator alone
    (the server runs in this process), so it does not reseed other requests' randomness."""
    url = f"{hf_server.url}/models/t5"

    def sample(seed: int) -> str:
        generate = {"do_sample": True, "temperature": 5.0, "max_new_tokens": 8, "seed": seed}
        return requests.post(
            url, json={"inputs": "hello world", "parameters": {"generate_parameters": generate}}
        ).json()

    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = sample(7)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample(7) == first and torch.equal(torch.get_rng_state(), state)
    assert len({str(sample(seed)) for seed in range(5)}) > 1  # the seed does choose the sample


def test_bad_generate_parameter_is_named(hf_server: LiveServer) -> None:
    r = requests.post(
        f"{hf_server.url}/models/bart-summarizer",
        json={"inputs": "hello", "parameters": {"generate_parameters": {"max_new_tokenz": 3}}},
    )
    assert r.status_code == 422 and "max_new_tokenz" in r.json()["error"]
    assert "model_kwargs" not in r.text


# image-classification ------------------------------------------------------------
def test_image_classification_raw_bytes_and_base64(hf_server: LiveServer) -> None:
    image = png((200, 10, 10))
    out = client(hf_server, "vit").image_classification(image)
    assert sorted(o.label for o in out) == sorted(IMAGE_LABELS)
    assert math.isclose(sum(o.score for o in out), 1.0, rel_tol=1e-5)
    top1 = client(hf_server, "vit").image_classification(image, top_k=1)  # sent as JSON base64
    assert len(top1) == 1 and top1[0].label == out[0].label and top1[0].score == pytest.approx(out[0].score)

    url = f"{hf_server.url}/models/vit"
    typed = requests.post(url, data=image, headers={"content-type": "image/png"}).json()
    assert [r["label"] for r in typed] == [o.label for o in out]
    b64 = base64.b64encode(image).decode()
    both = requests.post(url, json={"inputs": [b64, base64.b64encode(png((0, 0, 250))).decode()]}).json()
    assert len(both) == 2 and both[0] == typed


def test_image_classification_garbage_is_a_validation_error(hf_server: LiveServer) -> None:
    r = requests.post(
        f"{hf_server.url}/models/vit", data=b"\x00\x01not an image", headers={"content-type": "image/png"}
    )
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = requests.post(f"{hf_server.url}/models/vit", json={"inputs": "%%%not base64"})
    assert r.status_code == 422 and "base64" in r.json()["error"]


# feature-extraction / sentence-similarity (the default MiniLM model) -------------
def test_feature_extraction_minilm(hf_server: LiveServer) -> None:
    c = client(hf_server, "sentence-transformers/all-MiniLM-L6-v2")
    one = c.feature_extraction("hello world")
    assert one.shape == (1, 384)
    normalized = c.feature_extraction(["hello world", "a cat"], normalize=True)
    assert normalized.shape == (2, 384)
    assert np.allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-4)
    assert np.allclose(normalized[0] / np.linalg.norm(normalized[0]), one[0] / np.linalg.norm(one[0]), atol=1e-4)


def test_sentence_similarity_minilm_is_meaningful(hf_server: LiveServer) -> None:
    c = client(hf_server, "all-minilm-l6-v2")
    scores = c.sentence_similarity(
        "A man is playing a guitar.",
        ["Someone plays an instrument.", "The stock market fell sharply today.", "A man is playing a guitar."],
    )
    assert len(scores) == 3
    assert scores[2] == pytest.approx(1.0, abs=1e-4)
    assert scores[0] > scores[1] + 0.2


def test_feature_extraction_truncate(hf_server: LiveServer) -> None:
    """Inputs over the model's 256 tokens are cut by default (as hosted); `truncate: false` refuses them."""
    url = f"{hf_server.url}/models/all-minilm-l6-v2"
    long = "word " * 400
    r = requests.post(url, json={"inputs": [long, "short"]})
    assert r.status_code == 200 and len(r.json()) == 2 and len(r.json()[0]) == 384
    r = requests.post(url, json={"inputs": [long, "short"], "truncate": True})
    assert r.status_code == 200
    r = requests.post(url, json={"inputs": ["short", long], "truncate": False})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert "Input 1" in r.json()["error"] and "256" in r.json()["error"]
    with pytest.raises(HfHubHTTPError) as info:
        client(hf_server, "all-minilm-l6-v2").feature_extraction(long, truncate=False)
    assert info.value.response.status_code == 422
    assert requests.post(url, json={"inputs": "short", "truncate": False}).status_code == 200


def test_stream_is_refused_where_the_task_does_not_stream(hf_server: LiveServer) -> None:
    for model, inputs in (("acme/sentiment", "I love it"), ("all-minilm-l6-v2", "hello"), ("t5", "hello")):
        r = requests.post(f"{hf_server.url}/models/{model}", json={"inputs": inputs, "stream": True})
        assert r.status_code == 422 and r.json()["error_type"] == "validation" and "stream" in r.json()["error"]
        assert requests.post(f"{hf_server.url}/models/{model}", json={"inputs": inputs, "stream": False}).ok
    r = requests.post(
        f"{hf_server.url}/pipeline/feature-extraction/acme/sentiment", json={"inputs": "x", "stream": True}
    )
    assert r.status_code == 422 and "stream" in r.json()["error"]


def test_pipeline_route_forces_feature_extraction_on_a_classifier(hf_server: LiveServer) -> None:
    c = InferenceClient(base_url=f"{hf_server.url}/pipeline/feature-extraction/acme/sentiment")
    vectors = c.feature_extraction(["I love it", "the game"])
    assert vectors.shape == (2, 32)  # the tiny BERT's hidden size
    r = requests.post(f"{hf_server.url}/pipeline/no-such-task/acme/sentiment", json={"inputs": "x"})
    assert r.status_code == 422 and "no-such-task" in r.json()["error"]
    r = requests.post(f"{hf_server.url}/pipeline/fill-mask/acme/sentiment", json={"inputs": "x [MASK]"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


# async client ---------------------------------------------------------------------
def test_async_client_tasks(hf_server: LiveServer) -> None:
    async def main() -> None:
        c = AsyncInferenceClient(base_url=f"{hf_server.url}/models/acme/sentiment")
        out = await c.text_classification("I love it")
        assert {o.label for o in out} == set(SENTIMENT_LABELS)
        qa = AsyncInferenceClient(base_url=f"{hf_server.url}/models/qa")
        answer = await qa.question_answering(question="who?", context="My name is Clara")
        assert answer.answer in "My name is Clara"

    asyncio.run(main())


def test_async_client_every_task_matches_the_sync_client(hf_server: LiveServer) -> None:
    calls = {
        "acme/sentiment": ("text_classification", ("I love it",), {}),
        "ner": ("token_classification", ("My name is Sarah",), {"aggregation_strategy": "max"}),
        "nli": ("zero_shot_classification", ("the game", ["sports", "politics"]), {}),
        "mlm": ("fill_mask", ("life is [MASK] .",), {"top_k": 2}),
        "qa": ("question_answering", (), {"question": "who?", "context": "My name is Clara"}),
        "bart-summarizer": ("summarization", ("the game tonight",), {"generate_parameters": {"max_new_tokens": 3}}),
        "bart-translator": ("translation", ("hello world",), {}),
        "vit": ("image_classification", (png((0, 200, 0)),), {}),
        "all-minilm-l6-v2": ("sentence_similarity", ("a cat", ["a dog", "the game"]), {}),
    }

    async def run_async() -> dict[str, object]:
        out = {}
        for model, (method, args, kwargs) in calls.items():
            c = AsyncInferenceClient(base_url=f"{hf_server.url}/models/{model}")
            out[model] = await getattr(c, method)(*args, **kwargs)
        c = AsyncInferenceClient(base_url=f"{hf_server.url}/models/all-minilm-l6-v2")
        out["features"] = (await c.feature_extraction("hello")).tolist()
        return out

    async_results = asyncio.run(run_async())
    for model, (method, args, kwargs) in calls.items():
        sync = getattr(client(hf_server, model), method)(*args, **kwargs)
        assert async_results[model] == sync, model
    features = client(hf_server, "all-minilm-l6-v2").feature_extraction("hello").tolist()
    assert np.allclose(async_results["features"], features, atol=1e-5)
