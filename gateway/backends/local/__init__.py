"""Models loaded in this process: one backend, and one serving class per kind of model."""

from gateway.backends.local.backend import LocalBackend
from gateway.backends.local.task import infer_task

__all__ = ["LocalBackend", "infer_task"]
