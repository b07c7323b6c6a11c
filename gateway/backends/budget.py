"""How much memory local models may use, per device: the `runtime` settings, else a share of what
the machine (or its cgroup) has."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gateway.config import RuntimeSettings


def machine_ram() -> int:
    """Physical RAM, or the cgroup's memory limit when that is lower (a container's real budget)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def gpu_memory(device: str) -> int:
    torch = sys.modules.get("torch")  # a GPU model has imported it; none loaded means no GPU budget asked
    if torch is None or not torch.cuda.is_available():
        return 0
    index = int(device.partition(":")[2] or 0)
    return int(torch.cuda.get_device_properties(index).total_memory)


class MemoryBudget:
    def __init__(self, runtime: RuntimeSettings) -> None:
        self.runtime = runtime
        self._limits: dict[str, int] = {}

    def limit(self, device: str) -> int:
        """Bytes local models on `device` ("cpu", "cuda:N") may hold together."""
        if device not in self._limits:
            runtime = self.runtime
            if device == "cpu":
                configured, total = runtime.cpu_memory, machine_ram
            else:
                configured, total = runtime.gpu_memory, lambda: gpu_memory(device)
            self._limits[device] = configured if configured is not None else int(runtime.memory_share * total())
        return self._limits[device]

    def devices(self) -> dict[str, int]:
        """The budgets asked for so far (the CPU's always), for the metrics."""
        self.limit("cpu")
        return dict(self._limits)
