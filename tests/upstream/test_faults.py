"""Our gateway in front of a fault-injecting upstream: what the client sees, and how often we retried."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.helpers import free_port
from tests.upstream.conftest import front, sdk, upstream

CHAT = [{"role": "user", "content": "hi"}]


def serve(url: str, **extra):
    return front([{"name": "m", "task": "text-generation", "backend": upstream(url, **extra)}])


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def hung_up(fault, pooled: int = 0) -> bool:
    """No connection left hanging: no stream still open upstream, and at most `pooled` connections
    (idle keep-alive ones in the gateway's pool; a connection that failed mid-way must be closed)."""
    # A guard, not a measure: a connection the gateway leaves open stays so for >= 30 s (the upstream
    # sleeping on a stalled stream, or the pool's keep-alive), a closed one goes at once.
    return wait_until(lambda: fault.active_streams == 0 and fault.open_connections() <= pooled, timeout=10)


def test_429_with_retry_after_is_retried_after_the_wait(fault) -> None:
    fault.retry_after = "0.3"
    fault.queue("/v1/chat/completions", "429")
    with serve(f"{fault.url}/v1") as gw:
        started = time.monotonic()
        reply = sdk(gw).chat.completions.create(model="m", messages=CHAT)
        elapsed = time.monotonic() - started
    assert reply.choices[0].message.content == "Hello from the upstream"
    assert fault.hits["/v1/chat/completions"] == 2
    assert elapsed >= 0.3  # the upstream's Retry-After was honoured, not our 10 ms backoff


def test_429_exhausted_gives_the_client_429_with_retry_after(fault) -> None:
    fault.retry_after = "0.1"
    fault.queue("/v1/chat/completions", "429", "429", "429")
    with serve(f"{fault.url}/v1") as gw:
        with pytest.raises(openai.RateLimitError) as info:
            sdk(gw).chat.completions.create(model="m", messages=CHAT)
        assert hung_up(fault, pooled=1)  # the three tries reused one keep-alive connection
    assert fault.hits["/v1/chat/completions"] == 3  # first try + max_retries=2
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.type == "rate_limit_error"


def test_retry_after_beyond_the_cap_is_passed_to_the_client_at_once(fault) -> None:
    fault.retry_after = "30"
    fault.queue("/v1/chat/completions", "429")
    with serve(f"{fault.url}/v1") as gw:
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as info:
            sdk(gw).chat.completions.create(model="m", messages=CHAT)
        assert time.monotonic() - started < 2
    assert fault.hits["/v1/chat/completions"] == 1
    assert info.value.response.headers["retry-after"] == "30"


@pytest.mark.parametrize("value", ["inf", "1e999", "99999999999999999999", "-5", "nan", "soon"])
def test_unreadable_or_endless_retry_after_is_a_long_wait_passed_on_capped(fault, value) -> None:
    """Not retried (the upstream asked for a long wait), and the client hears of it with a
    Retry-After it can use, never a 500."""
    fault.retry_after = value
    fault.queue("/v1/chat/completions", "429")
    fault.queue("/v1/completions", "429")  # where an HF text-generation call goes
    with serve(f"{fault.url}/v1") as gw:
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as info:
            sdk(gw).chat.completions.create(model="m", messages=CHAT)
        assert time.monotonic() - started < 2
        hf = httpx.post(f"{gw.url}/models/m", json={"inputs": "hi"}, timeout=10)
    assert fault.hits["/v1/chat/completions"] == 1 and fault.hits["/v1/completions"] == 1  # not retried
    assert info.value.response.headers["retry-after"] == "3600"
    assert hf.status_code == 429 and hf.headers["retry-after"] == "3600"
    assert hf.json()["error_type"] == "overloaded"


def test_503_exhausted_is_503_with_retry_after(fault) -> None:
    fault.queue("/v1/chat/completions", "503", "503", "503")
    with serve(f"{fault.url}/v1") as gw:
        with pytest.raises(openai.InternalServerError) as info:
            sdk(gw).chat.completions.create(model="m", messages=CHAT)
        assert hung_up(fault, pooled=1)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "1"
    assert fault.hits["/v1/chat/completions"] == 3


@pytest.mark.parametrize("status", ["502", "503", "504"])
def test_gateway_errors_are_retried(fault, status) -> None:
    fault.queue("/v1/chat/completions", status)
    with serve(f"{fault.url}/v1") as gw:
        reply = sdk(gw).chat.completions.create(model="m", messages=CHAT)
    assert reply.choices[0].message.content == "Hello from the upstream"
    assert fault.hits["/v1/chat/completions"] == 2


def test_slow_upstream_times_out_per_try_and_retries(fault) -> None:
    fault.queue("/v1/chat/completions", "hang", "hang")
    with serve(f"{fault.url}/v1", timeouts={"per_try": 0.3}, retry={"max_retries": 1}) as gw:
        client = sdk(gw)
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="m", messages=CHAT)
        elapsed = time.monotonic() - started
        # Both timed-out connections were closed by the gateway: the upstream waits on them until then.
        assert hung_up(fault)
    assert info.value.status_code == 504
    assert fault.hits["/v1/chat/completions"] == 2
    # Two tries of 0.3 s; a try bounded by the total deadline alone would take 5 s.
    assert elapsed < 2.5


def test_total_deadline_bounds_all_retries(fault) -> None:
    fault.queue("/v1/chat/completions", *["hang"] * 10)
    with serve(f"{fault.url}/v1", timeouts={"per_try": 0.4, "total": 1.0}, retry={"max_retries": 10}) as gw:
        client = sdk(gw)
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=CHAT)
        elapsed = time.monotonic() - started
    # 0.4 + 0.4 + what is left (0.2) of the 1 s: at most three tries. Unbounded by the total, the
    # eleven tries allowed would take >= 4.4 s.
    assert elapsed < 2.6
    assert 2 <= fault.hits["/v1/chat/completions"] <= 3


def test_unreachable_upstream_is_502_after_retries() -> None:
    with serve(f"http://127.0.0.1:{free_port()}/v1") as gw:
        with pytest.raises(openai.InternalServerError) as info:
            sdk(gw).chat.completions.create(model="m", messages=CHAT)
    assert info.value.status_code == 502
    assert "could not be reached" in info.value.message


def test_malformed_json_is_502_and_not_retried(fault) -> None:
    fault.queue("/v1/chat/completions", "malformed")
    with serve(f"{fault.url}/v1") as gw:
        with pytest.raises(openai.InternalServerError) as info:
            sdk(gw).chat.completions.create(model="m", messages=CHAT)
        assert hung_up(fault, pooled=1)
    assert info.value.status_code == 502
    assert info.value.code == "upstream_error"
    assert fault.hits["/v1/chat/completions"] == 1


def test_upstream_400_is_the_clients_400_with_its_reason(fault) -> None:
    fault.queue("/v1/chat/completions", "400")
    with serve(f"{fault.url}/v1") as gw:
        with pytest.raises(openai.BadRequestError) as info:
            sdk(gw).chat.completions.create(model="m", messages=CHAT)
    assert "upstream says 400" in info.value.message
    assert fault.hits["/v1/chat/completions"] == 1


def test_upstream_401_is_a_502_that_does_not_blame_the_client(fault) -> None:
    fault.queue("/v1/chat/completions", "401")
    with serve(f"{fault.url}/v1") as gw:
        with pytest.raises(openai.InternalServerError) as info:
            sdk(gw).chat.completions.create(model="m", messages=CHAT)
    assert info.value.status_code == 502
    assert "upstream says" not in info.value.message  # details stay in the log
    assert fault.hits["/v1/chat/completions"] == 1


def test_stream_retried_before_the_first_byte(fault) -> None:
    fault.queue("/v1/chat/completions", "503")
    with serve(f"{fault.url}/v1") as gw:
        chunks = list(sdk(gw).chat.completions.create(model="m", messages=CHAT, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the upstream"
    assert fault.hits["/v1/chat/completions"] == 2


def test_stream_broken_before_its_first_event_is_retried(fault) -> None:
    fault.queue("/v1/chat/completions", "reset_early")
    with serve(f"{fault.url}/v1") as gw:
        chunks = list(sdk(gw).chat.completions.create(model="m", messages=CHAT, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the upstream"
    assert fault.hits["/v1/chat/completions"] == 2


BREAKS = ["reset", "malformed_stream", "error_event", "stall"]  # stall: past the idle timeout (per_try)
# What the client gets of the answer before each break: once, never again from a retry.
BEFORE_BREAK = {
    "reset": ["Hello", " from"],
    "malformed_stream": ["Hello"],
    "error_event": ["Hello"],
    "stall": ["Hello", " from"],
}


def queue_break(fault, behaviour: str) -> None:
    """The break for every try the gateway may make (1 + max_retries): `per_try` also bounds the wait
    for the first event, and on a loaded machine that wait once ran out, so a retry before any output
    answered cleanly and hid the break. Now a retry before the first event meets the same break."""
    fault.queue("/v1/chat/completions", *[behaviour] * 3)


@pytest.mark.parametrize("behaviour", BREAKS)
def test_stream_broken_midway_gives_an_in_band_error(fault, behaviour) -> None:
    queue_break(fault, behaviour)
    with serve(f"{fault.url}/v1", timeouts={"per_try": 1.0}) as gw:
        client = sdk(gw)
        received, first_at = [], None
        with pytest.raises(openai.APIError) as info:
            for chunk in client.chat.completions.create(model="m", messages=CHAT, stream=True):
                first_at = first_at or time.monotonic()
                received.append(chunk.choices[0].delta.content)
        assert not isinstance(info.value, openai.APIStatusError)  # in-band, after the 200
        assert received == BEFORE_BREAK[behaviour]  # what came before the break, and nothing twice
        assert info.value.code == "upstream_error"
        # The upstream keeps a broken stream open: only the gateway hanging up ends it.
        assert hung_up(fault)
    # Never retried once output went out: every try the upstream saw came before the client's first
    # chunk (tries before the first event may have timed out and been retried; those are allowed).
    assert first_at is not None
    assert [t for t in fault.arrivals["/v1/chat/completions"] if t > first_at] == []


@pytest.mark.parametrize("behaviour", BREAKS)
def test_stream_broken_midway_ends_cleanly_on_the_wire(fault, behaviour) -> None:
    queue_break(fault, behaviour)
    body = {"model": "m", "messages": CHAT, "stream": True}
    # total 20 s: only the 1 s idle timeout (per_try) can end a stall soon; the upstream sleeps 30 s.
    with serve(f"{fault.url}/v1", timeouts={"per_try": 1.0, "total": 20.0}) as gw:
        started = time.monotonic()
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=40) as response:
            assert response.status_code == 200
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
        # iter_lines ran out: the gateway ended the response itself (for a stall, after the 1 s idle
        # timeout; at most ~4 s with two tries timed out before their first event). Left to the total
        # deadline or the upstream, it would take 20-30 s.
        assert time.monotonic() - started < 10
        assert hung_up(fault)
    *chunks, error, done = events
    assert [json.loads(c)["choices"][0]["delta"]["content"] for c in chunks] == BEFORE_BREAK[behaviour]
    assert json.loads(error)["error"]["code"] == "upstream_error"
    assert done == "[DONE]"


def test_idle_timeout_not_total_deadline_bounds_a_flowing_stream(fault) -> None:
    fault.stream_gap = 0.6
    fault.queue("/v1/chat/completions", "trickle")
    # A total deadline shorter than the stream: once tokens flow, only the gaps between them count.
    # The total (1 s) also bounds the wait for the first event, sent at once: room on a loaded machine.
    with serve(f"{fault.url}/v1", timeouts={"per_try": 1.5, "total": 1.0}) as gw:
        client = sdk(gw)
        started = time.monotonic()
        chunks = list(client.chat.completions.create(model="m", messages=CHAT, stream=True))
        elapsed = time.monotonic() - started
    # Were the total to bound the stream, it would break off after 1 s, before the last word (1.8 s).
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the upstream"
    assert elapsed > 2.4  # four gaps of 0.6 s: well past the 1 s total


def test_stream_without_done_marker_is_complete_once_every_choice_finished(fault) -> None:
    fault.queue("/v1/chat/completions", "no_done")
    with serve(f"{fault.url}/v1") as gw:
        chunks = list(sdk(gw).chat.completions.create(model="m", messages=CHAT, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the upstream"


def test_stream_ending_cleanly_but_unfinished_is_an_in_band_error(fault) -> None:
    fault.queue("/v1/chat/completions", "truncated")
    with serve(f"{fault.url}/v1") as gw:
        received = []
        with pytest.raises(openai.APIError) as info:
            for chunk in sdk(gw).chat.completions.create(model="m", messages=CHAT, stream=True):
                received.append(chunk.choices[0].delta.content)
    assert received == ["Hello", " from"]
    assert "before it was complete" in info.value.message


def test_client_disconnect_closes_the_upstream_stream(fault) -> None:
    fault.queue("/v1/chat/completions", "slow_stream")
    with serve(f"{fault.url}/v1") as gw:
        stream = sdk(gw).chat.completions.create(model="m", messages=CHAT, stream=True)
        next(iter(stream))
        assert fault.active_streams == 1
        stream.close()
        # The upstream handler ends long before its 40 slow tokens would have.
        assert wait_until(lambda: fault.active_streams == 0, timeout=5)
        # And the gateway still serves.
        assert sdk(gw).chat.completions.create(model="m", messages=CHAT).choices[0].message.content


def test_request_cannot_redirect_the_upstream_or_its_credentials(fault, monkeypatch) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-configured")
    with serve(f"{fault.url}/v1", api_key_env="TEST_UPSTREAM_KEY", model="served-name") as gw:
        with pytest.raises(openai.BadRequestError) as info:
            sdk(gw).chat.completions.create(
                model="m", messages=CHAT, extra_body={"api_base": "http://169.254.169.254/"}
            )
        assert info.value.param == "api_base"
        assert fault.hits["/v1/chat/completions"] == 0
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-client", max_retries=0)
        client.chat.completions.create(model="m", messages=CHAT, user="u1", temperature=0.5)
    sent, headers = fault.bodies[-1], fault.headers[-1]
    assert sent["model"] == "served-name"
    assert "user" not in sent  # only allowlisted fields go upstream
    assert sent["temperature"] == 0.5
    assert headers["authorization"] == "Bearer sk-configured"  # never the client's key


def test_missing_key_variable_fails_the_model_clearly(fault, monkeypatch) -> None:
    monkeypatch.delenv("TEST_UPSTREAM_KEY", raising=False)
    with serve(f"{fault.url}/v1", api_key_env="TEST_UPSTREAM_KEY") as gw:
        ready = httpx.get(f"{gw.url}/ready")
        assert ready.status_code == 503
        with pytest.raises(openai.InternalServerError) as info:
            sdk(gw).chat.completions.create(model="m", messages=CHAT)
        assert info.value.status_code == 503
        assert "TEST_UPSTREAM_KEY" in info.value.message
