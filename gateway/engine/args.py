"""The engine's own arguments: what loading and running a local model needs, frozen.

Field names and defaults match `config.LocalBackendSpec`, so engine code reads either one
the same way, and the engine never imports the gateway's configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal


@dataclass(frozen=True)
class EngineArgs:
    source: str
    gguf_file: str | None = None
    revision: str | None = None
    device: str = "auto"
    device_map: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    max_batch_size: int = 16
    max_queue: int = 64
    max_wait_ms: float = 5.0
    prefill_chunk_tokens: int = 256
    max_total_tokens: int | None = None
    fused: bool = True
    compile: bool = False  # the fused path's decode step through torch.compile (compiled at load)
    prefix_cache: bool = True  # reuse the keys and values of prompt prefixes computed before
    prefix_cache_tokens: int | None = None  # its size; default a quarter of max_batch_size x max_total_tokens
    pooling: Literal["auto", "mean", "cls", "max", "last"] = "auto"
    normalize: bool | None = None
    adapter: str | None = None  # a PEFT LoRA folder merged into the base's weights at load

    @classmethod
    def of(cls, spec: object) -> EngineArgs:
        """The fields of the same names read from `spec` (a LocalBackendSpec, or anything alike)."""
        return cls(**{f.name: getattr(spec, f.name) for f in fields(cls)})
