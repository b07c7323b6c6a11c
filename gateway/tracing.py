"""OpenTelemetry traces, optional (`pip install gateway[otel]`, `server.otel: true`).

A span per request (the middleware), child spans for the wait before generation ("queue"),
the generation and each upstream attempt; W3C `traceparent` goes to upstreams. The exporter and
sampler come from the SDK's standard `OTEL_*` environment, or from whatever TracerProvider the
embedding code installed (tests install an in-memory exporter). Off, every call here is a cheap
no-op: nothing of OpenTelemetry is imported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from gateway.errors import ConfigError

_tracer: Any = None


def enable() -> None:
    """Trace from now on (the app calls this when server.otel is set)."""
    global _tracer
    try:
        from opentelemetry import trace

        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            _default_provider()
    except ImportError:
        raise ConfigError("server.otel needs OpenTelemetry: pip install 'gateway[otel]'") from None
    _tracer = trace.get_tracer("gateway")


def _default_provider() -> None:
    """No provider installed: the SDK's, exporting with OTLP when its exporter is installed."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    except ImportError:  # the SDK alone: spans are made (ids in logs) but not exported
        pass
    trace.set_tracer_provider(provider)


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def request_span(method: str, path: str, headers: Mapping[bytes, bytes]) -> Iterator[Any]:
    """The request's span, continuing a trace the caller's `traceparent` names."""
    from opentelemetry.propagate import extract

    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()}
    with _tracer.start_as_current_span(
        f"{method} {path}", context=extract(carrier), kind=_server_kind(), attributes={"http.request.method": method}
    ) as span:
        yield span


def _server_kind() -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind.SERVER


_NO_SPAN = contextlib.nullcontext()  # reusable: one for every span while tracing is off


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one (a no-op when tracing is off)."""
    if _tracer is None:
        return _NO_SPAN
    return _tracer.start_as_current_span(name, attributes={k: v for k, v in attributes.items() if v is not None})


def start(name: str, **attributes: Any) -> Any:
    """A child span ended by the caller (`end`), for async generators, whose code runs across
    several contexts (a `with` there could not detach the context it attached)."""
    if _tracer is None:
        return None
    return _tracer.start_span(name, attributes={k: v for k, v in attributes.items() if v is not None})


def end(span: Any) -> None:
    if span is not None:
        span.end()


def inject(headers: dict[str, str]) -> None:
    """Add `traceparent` (and `tracestate`) for the current span to outgoing headers."""
    if _tracer is not None:
        from opentelemetry.propagate import inject as _inject

        _inject(headers)


def disable() -> None:
    """Stop tracing (tests; the provider stays installed)."""
    global _tracer
    _tracer = None
