"""`gateway warmup`, which image builds run: every model loads once, a GGUF lands converted in the
cache, and the process exits 0; a second run (the image's final stage) finds the conversion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import ROOT
from tests.tiny_models import build_tiny_gguf


def warmup(config: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gateway", "warmup", "--config", str(config), "--cache-dir", str(cache)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_warmup_converts_once_and_exits(tmp_path: Path) -> None:
    gguf = build_tiny_gguf(tmp_path / "model")
    models = [{"name": "tiny", "task": "text-generation", "backend": {"kind": "local", "source": str(gguf)}}]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": models}))
    cache = tmp_path / "cache"

    first = warmup(config, cache)
    assert first.returncode == 0, first.stderr
    assert "converting" in first.stderr and "model tiny: loading -> ready" in first.stderr
    (converted,) = (cache / "gguf").iterdir()
    assert (converted / "config.json").is_file()

    second = warmup(config, cache)
    assert second.returncode == 0, second.stderr
    assert "converting" not in second.stderr and "model tiny: loading -> ready" in second.stderr


def test_warmup_fails_when_a_model_cannot_load(tmp_path: Path) -> None:
    models = [{"name": "gone", "task": "text-generation", "backend": {"kind": "local", "source": "/nonexistent/m"}}]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"models": models}))
    result = warmup(config, tmp_path / "cache")
    assert result.returncode == 1
    # The registry logs the load's traceback, as a server does; the command ends with one clear line.
    assert result.stderr.splitlines()[-1].startswith("gateway: Model 'gone' failed to load")
