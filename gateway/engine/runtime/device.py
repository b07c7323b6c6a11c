"""Where local compute runs: one thread per device, shared by every local model on it.

torch on a CPU parallelises each operation over an OpenMP thread team. libgomp lets
idle team threads spin (cheap hand-offs between the hundreds of small operations of
a decode step) only while it manages no more threads than there are cores; a second
long-lived thread running torch operations adds a second team, and from then on
every operation of both pays a futex wake-up. Measured here (2 cores, SmolLM2-135M
bf16, 16 sequences, plain weights): 26 ms a decode step from one compute thread, 38 ms when another
thread had run torch work before. So all compute for a device (generation steps,
encoder batches, prompt scoring) is queued on one worker thread, where it also
interleaves fairly instead of fighting for the same cores, and model loading runs
in short-lived threads limited to one OpenMP thread.

The worker is per process, not per app: the OpenMP runtime it works around is too.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_workers: dict[str, ThreadPoolExecutor] = {}
_workers_lock = threading.Lock()


def device_worker(device: str) -> ThreadPoolExecutor:
    """The single compute thread of `device` ("cpu", "cuda:0", ...), created on first use."""
    key = "cpu" if device.startswith("cpu") else device
    with _workers_lock:
        if key not in _workers:
            import torch

            _workers[key] = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"compute-{key}",
                initializer=torch.set_num_threads,
                initargs=(compute_threads(),),
            )
        return _workers[key]


def compute_threads() -> int:
    """Threads for a device worker's operations: OMP_NUM_THREADS, else every core this process may use
    (the thread asking may itself be limited to one, so its own setting is no guide)."""
    configured = os.environ.get("OMP_NUM_THREADS", "")
    return int(configured) if configured.isdigit() and int(configured) > 0 else len(os.sched_getaffinity(0))


async def in_fresh_thread(work: Callable[[], T]) -> T:
    """Run `work` in a new thread that ends with it, with one OpenMP thread, so that it
    leaves no thread team behind to slow the device workers down (see the module doc)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(outcome: T | BaseException, failed: bool) -> None:
        if done.cancelled():
            return
        if failed:
            done.set_exception(outcome)  # type: ignore[arg-type]
        else:
            done.set_result(outcome)  # type: ignore[arg-type]

    def run() -> None:
        import torch

        torch.set_num_threads(1)
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, exc, True)
        else:
            loop.call_soon_threadsafe(settle, result, False)

    threading.Thread(target=run, name="load", daemon=True).start()
    return await done
