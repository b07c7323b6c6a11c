"""JSON logs (one line per request, the request id in every line of it, no prompt text) on a real
`gateway serve` process; the request id and W3C trace context sent to upstreams; OpenTelemetry
spans (request, queue, generation, upstream attempts) collected by the SDK's in-memory exporter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway import tracing
from tests.conftest import FAKE_MODELS
from tests.helpers import LiveServer, free_port, gateway_process, settings_for
from tests.upstream.conftest import upstream
from tests.upstream.fault_server import FaultUpstream

SECRET = "the-prompt-must-never-be-logged"


def _lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for raw in path.read_text().splitlines():
        assert raw.startswith("{"), f"not a JSON line: {raw!r}"
        out.append(json.loads(raw))
    return out


def test_json_log_lines(tmp_path: Path) -> None:
    with FaultUpstream() as fault:
        _json_log_lines(tmp_path, fault)


def _json_log_lines(tmp_path: Path, fault: FaultUpstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: retries, then a 502
    config = {
        "server": {"json_logs": True, "access_log": False, "api_keys": ["k-logs"]},
        "models": [
            {"name": "chat", "task": "text-generation", "backend": {"kind": "fake"}},
            {"name": "gone", "task": "text-generation",
             "backend": upstream(dead, retry={"max_retries": 1}, timeouts={"connect": 0.2})},
            {"name": "routed", "task": "text-generation", "deployments": [
                {"name": "east", "backend": upstream(fault.url + "/v1")}]},
        ],
    }  # fmt: skip
    with gateway_process(config, tmp_path) as url:
        port = url.rsplit(":", 1)[1]
        auth = {"Authorization": "Bearer k-logs"}
        body = {"model": "chat", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 3}
        ok = httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth)
        failed = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "gone"}, headers=auth)
        routed = httpx.post(f"{url}/v1/chat/completions", json={**body, "model": "routed"}, headers=auth)
        assert ok.status_code == 200 and failed.status_code == 502 and routed.status_code == 200
    lines = _lines(tmp_path / f"gateway-{port}.log")
    assert all(SECRET not in json.dumps(line) for line in lines)
    line = next(x for x in lines if x["msg"] == "request" and x["request_id"] == ok.headers["x-request-id"])
    assert line["model"] == "chat" and line["status"] == 200 and line["route"] == "/v1/chat/completions"
    assert line["key"] == "config-0" and line["prompt_tokens"] > 0 and line["completion_tokens"] == 3
    assert line["total_ms"] > 0 and line["ttft_ms"] is not None and line["queue_ms"] is not None
    # every line of the failing request carries its id: the retry, the error, the request line
    mine = [x for x in lines if x["request_id"] == failed.headers["x-request-id"]]
    assert {x["logger"] for x in mine} >= {"gateway.backends.upstream", "gateway.error_handlers", "gateway.access"}
    assert all(x["request_id"] == "-" for x in lines if "Started server" in x["msg"])
    east = next(x for x in lines if x["msg"] == "request" and x["request_id"] == routed.headers["x-request-id"])
    assert east["deployment"] == "routed/east" and east["model"] == "routed" and line["deployment"] is None


def test_content_logged_only_when_switched_on(caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": "fake-chat", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 2}
    for content in (False, True):
        caplog.clear()
        with LiveServer(settings_for(FAKE_MODELS, json_logs=True, log_content=content)) as server:
            with caplog.at_level("INFO", logger="gateway.access"):
                resp = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        record = next(
            r
            for r in caplog.records
            if getattr(r, "request_id", None) == resp.headers["x-request-id"]
            or r.__dict__.get("path") == "/v1/chat/completions"
        )
        logged = json.dumps({k: str(v) for k, v in record.__dict__.items()})
        assert (SECRET in logged) is content
        if content:
            assert resp.json()["choices"][0]["message"]["content"] in record.__dict__["response_body"]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    try:
        yield exporter
    finally:
        tracing.disable()
        processor.shutdown()


def test_spans_and_propagation(spans: InMemorySpanExporter) -> None:
    caller_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with FaultUpstream() as fault:
        models = [{"name": "up", "task": "text-generation", "backend": upstream(fault.url + "/v1")}]
        with LiveServer(settings_for(models, otel=True)) as server:
            server.wait_ready()
            fault.queue("/v1/chat/completions", "503")  # one failed attempt, then a good one
            headers = {"traceparent": f"00-{caller_trace}-{caller_span}-01"}
            body = {"model": "up", "messages": [{"role": "user", "content": "hi"}]}
            resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=20)
            assert resp.status_code == 200
    finished = {s.name: s for s in spans.get_finished_spans()}
    request = finished["POST /v1/chat/completions"]
    assert format(request.context.trace_id, "032x") == caller_trace
    assert request.parent is not None and format(request.parent.span_id, "016x") == caller_span
    attempts = [s for s in spans.get_finished_spans() if s.name == "upstream.attempt"]
    assert len(attempts) == 2
    for name in ("queue", "generation"):
        assert finished[name].parent.span_id == request.context.span_id
    for attempt in attempts:
        assert attempt.context.trace_id == request.context.trace_id
    # the upstream got the request id and a traceparent naming the attempt that called it
    sent = fault.headers[-1]
    assert sent["x-request-id"] == resp.headers["x-request-id"]
    version, trace_id, parent, _ = sent["traceparent"].split("-")
    assert trace_id == caller_trace and parent == format(attempts[-1].context.span_id, "016x")
