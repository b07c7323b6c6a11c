"""LoRA adapters served as models: outputs equal to peft's own greedy forward, on the OpenAI, HF
and TGI (`adapter_id`) routes, two adapters and the base answered together."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import LiveServer, settings_for
from tests.tiny_models import build_tiny_llama

PROMPT = [5, 9, 17, 33, 40]
NEW_TOKENS = 12


def build_adapter(base: Path, folder: Path, seed: int) -> Path:
    """A random LoRA (B non-zero, so it changes the output) on the attention and MLP projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(folder)
    return folder


def peft_greedy(base: Path, adapter: Path | None) -> list[int]:
    """peft's own forward, greedy, token by token (no cache tricks): the reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = list(PROMPT)
    eos = model.config.eos_token_id
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            ids.append(token)
            if token == eos:
                break
    return ids[len(PROMPT) :]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, list[int]]]]:
    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_llama(root / "base")
    adapters = {name: build_adapter(base, root / name, seed) for name, seed in (("ada", 1), ("bob", 2))}
    expected = {"base": peft_greedy(base, None), **{n: peft_greedy(base, p) for n, p in adapters.items()}}
    assert len({tuple(v) for v in expected.values()}) == 3, "the adapters must change the output"
    backend = {"kind": "local", "source": str(base), "dtype": "float32", "max_batch_size": 4}
    models = [{"name": "base", "task": "text-generation", "default": True, "backend": backend}]
    models += [{"name": n, "backend": {**backend, "adapter": str(p)}} for n, p in adapters.items()]
    with LiveServer(settings_for(models)) as server:
        server.wait_ready(120)
        yield server, expected


def generated_ids(url: str, prompt: str, name: str, *, adapter_id: bool) -> list[int]:
    """The generated token IDs from TGI's details: by `adapter_id` on /generate, or by the model URL."""
    parameters: dict[str, Any] = {"max_new_tokens": NEW_TOKENS, "details": True}
    if adapter_id and name != "base":
        parameters["adapter_id"] = name
    path = "/generate" if adapter_id else f"/models/{name}"
    answer = httpx.post(f"{url}{path}", json={"inputs": prompt, "parameters": parameters}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    details = (body[0] if isinstance(body, list) else body)["details"]
    return [t["id"] for t in details["tokens"]]


def prompt_text(server: LiveServer) -> str:
    tokenizer = server.state.registry.lookup("base").backend.tokenizer
    prompt = tokenizer.decode(PROMPT)
    assert tokenizer(prompt)["input_ids"] == PROMPT
    return str(prompt)


def test_two_adapters_and_the_base_together_equal_peft(setup: tuple[LiveServer, dict[str, list[int]]]) -> None:
    server, expected = setup
    prompt = prompt_text(server)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        # the base and both adapters at once, by adapter_id and by model URL: each answer is its own model's
        futures = {
            pool.submit(generated_ids, server.url, prompt, name, adapter_id=by_id): name
            for name in expected
            for by_id in (True, False)
        }
        for future, name in futures.items():
            assert future.result() == expected[name], name


def test_openai_routes_serve_the_adapter_and_unknown_adapters_are_refused(
    setup: tuple[LiveServer, dict[str, list[int]]],
) -> None:
    server, expected = setup
    prompt = prompt_text(server)
    for name in expected:
        body = {"model": name, "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0}
        answer = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == len(expected[name])
    assert {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]} == {"base", "ada", "bob"}
    unknown = httpx.post(
        f"{server.url}/generate", json={"inputs": prompt, "parameters": {"adapter_id": "nope"}}, timeout=60
    )
    assert unknown.status_code == 404
    not_adapter = httpx.post(
        f"{server.url}/generate", json={"inputs": prompt, "parameters": {"adapter_id": "base"}}, timeout=60
    )
    assert not_adapter.status_code in (400, 422) and "adapter" in not_adapter.text
