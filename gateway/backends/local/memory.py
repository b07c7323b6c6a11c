"""What a local model holds in memory, measured once it has loaded, and giving memory back after an unload."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
from typing import Any

from gateway.backends.base import MemoryUse


def rss_bytes() -> int:
    """This process's resident set size."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def give_back_memory() -> None:
    """Collect the unloaded model's cycles and hand freed heap pages back to the OS (glibc keeps
    them otherwise, and the RSS would not show the unload)."""
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def device_key(device: Any) -> str:
    """A budget's device: "cpu", or "cuda:N" (an index-less "cuda" is the current one, 0)."""
    text = str(device)
    if text.startswith("cuda"):
        return text if ":" in text else "cuda:0"
    return "cpu"


def expected_device(device: str, device_map: str | None) -> str:
    """The device a spec will load on, before it loads (`auto` is a GPU when there is one)."""
    if device == "auto" or device_map is not None:
        import torch

        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device_key(device)


def tensor_bytes(module: Any) -> int:
    """Parameters and buffers, each storage once (tied weights are shared)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def measure(model: Any, device: Any, engine: Any | None, rss_before: int) -> MemoryUse:
    kv = engine.kv_cache_bytes() if engine is not None else 0
    return MemoryUse(device_key(device), tensor_bytes(model) + kv, max(0, rss_bytes() - rss_before))
