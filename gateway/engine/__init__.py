"""The local inference engine. Its facade: the names below are what backends/local uses.

Names load lazily (PEP 562): importing `gateway.engine` does not import torch, which a
gateway serving only fake or upstream models never needs. Modules inside engine/ import
each other's submodules directly, never these names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.engine.args import EngineArgs
    from gateway.engine.device import device_worker, in_fresh_thread
    from gateway.engine.embedder import Embedder, PoolingConfig, read_pooling_config
    from gateway.engine.loader import checkpoint_path, load_model, resolve_source
    from gateway.engine.microbatch import MicroBatcher
    from gateway.engine.observer import EngineObserver, NoObserver
    from gateway.engine.packed import pack_linears
    from gateway.engine.prompt_limits import TextBound, text_bound
    from gateway.engine.tasks import TaskModel, runner
    from gateway.engine.tasks.classification import entailment_index
    from gateway.engine.textgen import GenerationEngine, context_length, create_engine

# name -> the module that defines it (engine submodule paths move; these names stay)
_WHERE = {
    "EngineArgs": "args",
    "device_worker": "device",
    "in_fresh_thread": "device",
    "resolve_source": "loader",
    "checkpoint_path": "loader",
    "load_model": "loader",
    "pack_linears": "packed",
    "EngineObserver": "observer",
    "NoObserver": "observer",
    "create_engine": "textgen",
    "context_length": "textgen",
    "GenerationEngine": "textgen",
    "text_bound": "prompt_limits",
    "TextBound": "prompt_limits",
    "Embedder": "embedder",
    "PoolingConfig": "embedder",
    "read_pooling_config": "embedder",
    "MicroBatcher": "microbatch",
    "TaskModel": "tasks",
    "runner": "tasks",
    "entailment_index": "tasks.classification",
}

__all__ = [
    "EngineArgs",
    "device_worker",
    "in_fresh_thread",
    "resolve_source",
    "checkpoint_path",
    "load_model",
    "pack_linears",
    "EngineObserver",
    "NoObserver",
    "create_engine",
    "context_length",
    "GenerationEngine",
    "text_bound",
    "TextBound",
    "Embedder",
    "PoolingConfig",
    "read_pooling_config",
    "MicroBatcher",
    "TaskModel",
    "runner",
    "entailment_index",
]  # the keys of _WHERE


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        # also the path by which `from gateway.engine import loader` falls back to the submodule
        raise AttributeError(f"module 'gateway.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"gateway.engine.{module}"), name)
    globals()[name] = value  # once
    return value
