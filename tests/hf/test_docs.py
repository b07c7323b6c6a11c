"""The README's Hugging Face section works as written: every curl and Python block, in order,
against `gateway serve --config examples/hf-tasks.yaml` (only the port and the tiny models' folder differ)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, free_port, gateway_process
from tests.hf import tiny_models

SECTION = re.compile(r"<!-- hf-api:start.*?-->(.*?)<!-- hf-api:end -->", re.DOTALL)


def hf_section() -> str:
    found = SECTION.search((ROOT / "README.md").read_text())
    assert found, "README.md lost its Hugging Face section markers"
    return found.group(1)


BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.DOTALL)


def _example_config(tiny_root: Path, port: int) -> dict:
    config = yaml.safe_load((ROOT / "examples" / "hf-tasks.yaml").read_text())
    config["server"]["port"] = port
    for model in config["models"]:
        source = model["backend"]["source"]
        if source.startswith("./.tiny-models/"):
            model["backend"]["source"] = str(tiny_root / source.removeprefix("./.tiny-models/"))
    return config


@pytest.mark.e2e
@pytest.mark.slow
def test_documented_examples_work(tmp_path: Path) -> None:
    tiny_models.build_all(tmp_path / "tiny")
    port = free_port()
    config = _example_config(tmp_path / "tiny", port)
    blocks = BLOCK.findall(hf_section())
    assert sum(kind == "bash" for kind, _ in blocks) >= 10 and sum(kind == "python" for kind, _ in blocks) >= 10
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv is "activated"
    with gateway_process(config, tmp_path) as url:
        for number, (kind, code) in enumerate(blocks):
            code = code.replace("127.0.0.1:8000", url.removeprefix("http://"))
            if kind == "bash":
                script = 'curl() { command curl --fail-with-body -sS "$@"; }\nset -e\n' + code
                run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, env=env)
            else:
                run = subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT
                )
            assert run.returncode == 0, f"block {number} ({kind}) failed:\n{code}\n{run.stdout}\n{run.stderr}"
