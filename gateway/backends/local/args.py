"""A local model's arguments, read once from its spec and the settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.config import LocalBackendSpec, ModelSpec, Settings
from gateway.engine import EngineArgs


@dataclass(frozen=True)
class LocalArgs:
    name: str
    engine: EngineArgs  # what loading and running the model take
    cache_dir: Path  # converted checkpoints and the load-time history
    max_input_tokens: int | None  # the gateway's request limits, which the engine does not know
    default_max_tokens: int


def local_args(spec: ModelSpec, settings: Settings) -> LocalArgs:
    local = spec.backend
    assert isinstance(local, LocalBackendSpec)
    return LocalArgs(
        name=spec.name,
        engine=EngineArgs.of(local),
        cache_dir=settings.cache_dir,
        max_input_tokens=local.max_input_tokens,
        default_max_tokens=local.default_max_tokens,
    )
