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
    from gateway.engine.encoders.embedder import Embedder, PoolingConfig, read_pooling_config
    from gateway.engine.encoders.microbatch import MicroBatcher
    from gateway.engine.encoders.tasks import TaskModel, runner
    from gateway.engine.encoders.tasks.classification import entailment_index
    from gateway.engine.generation.engine import GenerationEngine, context_length, create_engine
    from gateway.engine.runtime.device import device_worker, in_fresh_thread
    from gateway.engine.runtime.loader import checkpoint_path, load_model, resolve_source
    from gateway.engine.runtime.observer import EngineObserver, NoObserver
    from gateway.engine.runtime.packed import pack_linears
    from gateway.engine.runtime.prompt_limits import TextBound, text_bound

# name -> the module that defines it, under gateway.engine (the three parts; these names stay)
_WHERE = {
    "EngineArgs": "args",
    "device_worker": "runtime.device",
    "in_fresh_thread": "runtime.device",
    "resolve_source": "runtime.loader",
    "checkpoint_path": "runtime.loader",
    "load_model": "runtime.loader",
    "pack_linears": "runtime.packed",
    "EngineObserver": "runtime.observer",
    "NoObserver": "runtime.observer",
    "create_engine": "generation.engine",
    "context_length": "generation.engine",
    "GenerationEngine": "generation.engine",
    "text_bound": "runtime.prompt_limits",
    "TextBound": "runtime.prompt_limits",
    "Embedder": "encoders.embedder",
    "PoolingConfig": "encoders.embedder",
    "read_pooling_config": "encoders.embedder",
    "MicroBatcher": "encoders.microbatch",
    "TaskModel": "encoders.tasks",
    "runner": "encoders.tasks",
    "entailment_index": "encoders.tasks.classification",
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
