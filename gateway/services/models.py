"""What the gateway serves: one summary per configured model, in domain terms (no wire format)."""

from __future__ import annotations

from typing import TypedDict

from gateway.backends.registry import Entry
from gateway.context import RequestContext
from gateway.services.resolve import resolve_entry
from gateway.state import AppState


class ModelSummary(TypedDict):
    name: str
    aliases: list[str]
    task: str | None
    backend: str  # the backend kind; "routed" for a model with several deployments
    deployments: list[tuple[str, str]] | None  # (name, backend kind) of each deployment
    state: str
    max_total_tokens: int | None
    error: str | None


def summary(entry: Entry) -> ModelSummary:
    backend = entry.backend
    spec = entry.spec
    deployments: list[tuple[str, str]] | None = None
    if spec.deployments is not None:
        deployments = [(d.name, d.backend.kind) for d in spec.deployments]
    return ModelSummary(
        name=spec.name,
        aliases=spec.aliases,
        task=entry.task.value if entry.task else None,
        # A model with several deployments has no single backend kind.
        backend=spec.backend.kind if spec.backend is not None else "routed",
        deployments=deployments,
        state=backend.state.value,
        max_total_tokens=backend.info().max_total_tokens,
        error=backend.error,
    )


def all_models(state: AppState, ctx: RequestContext | None = None) -> list[ModelSummary]:
    """Every configured model the caller's key may use."""
    key = None if ctx is None else ctx.key
    return [summary(entry) for entry in state.registry.entries if key is None or key.may_use(entry.spec.name)]


def one_model(state: AppState, name: str, ctx: RequestContext | None = None) -> ModelSummary:
    """The model `name` means (a name or an alias); ModelNotFound lists the served ones (those the
    caller's key may use: a model outside its list is not found)."""
    if ctx is None:
        return summary(state.registry.lookup(name))
    return summary(resolve_entry(state, ctx, name, placeholders=False))
