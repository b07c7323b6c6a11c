"""Several deployments behind one name: fallback both ways, balancing, and the circuit breaker."""

from __future__ import annotations

import re
import time
from contextlib import ExitStack

import httpx
import openai
import pytest

from gateway.config import ModelSpec
from gateway.errors import Overloaded
from tests.upstream.conftest import front, sdk, upstream
from tests.upstream.fault_server import FaultUpstream
from tests.upstream.test_faults import CHAT, wait_until

FAKE = {"kind": "fake"}
ECHO = [{"role": "user", "content": "served locally"}]


def routed(deployments: list[dict], **routing) -> dict:
    return {"name": "m", "task": "text-generation", "deployments": deployments, "routing": routing}


def metric(gw, name: str, **labels: str) -> float:
    text = httpx.get(f"{gw.url}/metrics").text
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(selector)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_upstream_falls_back_to_local(fault) -> None:
    fault.queue("/v1/chat/completions", "503", "503", "503")
    model = routed(
        [{"name": "remote", "backend": upstream(f"{fault.url}/v1")}, {"name": "local", "backend": FAKE}],
        fallback=["local"],
    )
    with front([model]) as gw:
        gw.wait_ready(10)
        reply = sdk(gw).chat.completions.create(model="m", messages=ECHO, temperature=0)
        assert reply.choices[0].message.content == "served locally"
        assert fault.hits["/v1/chat/completions"] == 3  # its own retries first, then the fallback
        assert metric(gw, "gateway_upstream_fallbacks_total", deployment="m/local", model="m") == 1
        assert metric(gw, "gateway_upstream_retries_total", deployment="m/remote") == 2
        assert metric(gw, "gateway_upstream_requests_total", deployment="m/remote", outcome="status_5xx") == 3


def _failing_local(gw) -> None:
    """Make the fake 'local' deployment answer every request as overloaded."""
    local = gw.state.registry.lookup("m").backend.deployments[0].backend

    async def overloaded(*_args, **_kwargs):
        raise Overloaded("local queue full", retry_after=1)
        yield  # an async generator, like the real generate_stream

    local.generate_stream = overloaded


@pytest.mark.parametrize("stream", [False, True])
def test_local_falls_back_to_upstream(fault, stream) -> None:
    model = routed(
        [{"name": "local", "backend": FAKE}, {"name": "remote", "backend": upstream(f"{fault.url}/v1")}],
        fallback=["remote"],
    )
    with front([model]) as gw:
        gw.wait_ready(10)
        _failing_local(gw)
        result = sdk(gw).chat.completions.create(model="m", messages=CHAT, stream=stream)
        text = (
            "".join(c.choices[0].delta.content or "" for c in result if c.choices)
            if stream
            else (result.choices[0].message.content)
        )
    assert text == "Hello from the upstream"
    assert fault.hits["/v1/chat/completions"] == 1


def test_every_deployment_exhausted_gives_the_last_status(fault) -> None:
    fault.retry_after = "0.05"
    fault.queue("/v1/chat/completions", *["429"] * 3)
    model = routed(
        [{"name": "local", "backend": FAKE}, {"name": "remote", "backend": upstream(f"{fault.url}/v1")}],
        fallback=["remote"],
    )
    with front([model]) as gw:
        gw.wait_ready(10)
        _failing_local(gw)
        with pytest.raises(openai.RateLimitError) as info:
            list(sdk(gw).chat.completions.create(model="m", messages=CHAT, stream=True))
    assert info.value.response.headers["retry-after"] == "1"


def test_round_robin_spreads_over_balanced_deployments() -> None:
    with ExitStack() as stack:
        a, b = stack.enter_context(FaultUpstream()), stack.enter_context(FaultUpstream())
        model = routed(
            [{"name": "a", "backend": upstream(f"{a.url}/v1")}, {"name": "b", "backend": upstream(f"{b.url}/v1")}]
        )
        with front([model]) as gw:
            gw.wait_ready(10)
            for _ in range(6):
                sdk(gw).chat.completions.create(model="m", messages=CHAT)
        assert a.hits["/v1/chat/completions"] == b.hits["/v1/chat/completions"] == 3


def test_least_outstanding_prefers_the_idle_deployment() -> None:
    from gateway.backends.registry import default_backend_factory
    from tests.helpers import settings_for

    spec = ModelSpec.model_validate(
        routed(
            [{"name": "a", "backend": FAKE}, {"name": "b", "backend": FAKE}, {"name": "c", "backend": FAKE}],
            strategy="least_outstanding",
            fallback=["c"],
        )
    )
    router = default_backend_factory(spec, settings_for([]))
    for d in router.deployments:
        d.backend.state = d.backend.state.READY
    a, b, c = router.deployments
    a.outstanding, b.outstanding = 3, 1
    assert [d.name for d in router.candidates()] == ["b", "a", "c"]
    b.outstanding = 5
    assert [d.name for d in router.candidates()] == ["a", "b", "c"]


def test_breaker_cools_down_then_a_probe_brings_the_deployment_back(fault) -> None:
    fault.healthy = False
    fault.queue("/v1/chat/completions", "503", "503")
    model = routed(
        [
            {"name": "remote", "backend": upstream(f"{fault.url}/v1", retry={"max_retries": 0})},
            {"name": "local", "backend": FAKE},
        ],
        fallback=["local"],
        cooldown={"failures": 2, "seconds": 0.3, "probe_interval": 0.1},
    )
    with front([model]) as gw:
        gw.wait_ready(10)
        client = sdk(gw)
        for _ in range(2):
            assert client.chat.completions.create(model="m", messages=ECHO, temperature=0).choices[0].message.content
        assert fault.hits["/v1/chat/completions"] == 2
        assert metric(gw, "gateway_upstream_cooldown", deployment="m/remote") == 1
        # Cooled down: traffic skips it entirely, and failing probes keep it out.
        client.chat.completions.create(model="m", messages=ECHO)
        assert fault.hits["/v1/chat/completions"] == 2
        assert wait_until(lambda: fault.hits["/v1/models"] >= 2)
        assert metric(gw, "gateway_upstream_cooldown", deployment="m/remote") == 1
        fault.healthy = True
        assert wait_until(lambda: metric(gw, "gateway_upstream_cooldown", deployment="m/remote") == 0)
        reply = client.chat.completions.create(model="m", messages=CHAT)
        assert reply.choices[0].message.content == "Hello from the upstream"
        assert fault.hits["/v1/chat/completions"] == 3


def test_single_deployment_cooled_down_answers_503_at_once(fault) -> None:
    fault.healthy = False
    fault.queue("/v1/chat/completions", "503")
    model = routed(
        [{"name": "remote", "backend": upstream(f"{fault.url}/v1", retry={"max_retries": 0})}],
        cooldown={"failures": 1, "seconds": 10, "probe_interval": 5},
    )
    with front([model]) as gw:
        gw.wait_ready(10)
        client = sdk(gw)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=CHAT)
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="m", messages=CHAT)
        # At once: waiting for the cooldown (10 s) or a probe (5 s apart) would take >= 5 s; the upstream
        # itself was not tried (it would have answered: only one 503 was queued).
        assert time.monotonic() - started < 2.5
    assert info.value.status_code == 503
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 10
    assert "cooling down" in info.value.message
    assert fault.hits["/v1/chat/completions"] == 1


def test_client_errors_do_not_fall_back_or_count_against_the_deployment(fault) -> None:
    fault.queue("/v1/chat/completions", "400")
    model = routed(
        [{"name": "remote", "backend": upstream(f"{fault.url}/v1")}, {"name": "local", "backend": FAKE}],
        fallback=["local"],
        cooldown={"failures": 1},
    )
    with front([model]) as gw:
        gw.wait_ready(10)
        with pytest.raises(openai.BadRequestError):
            sdk(gw).chat.completions.create(model="m", messages=CHAT)
        assert metric(gw, "gateway_upstream_cooldown", deployment="m/remote") == 0
        assert sdk(gw).chat.completions.create(model="m", messages=CHAT).choices[0].message.content == (
            "Hello from the upstream"
        )


def test_models_list_shows_the_deployments(fault) -> None:
    model = routed(
        [{"name": "remote", "backend": upstream(f"{fault.url}/v1")}, {"name": "local", "backend": FAKE}],
        fallback=["local"],
    )
    with front([model]) as gw:
        gw.wait_ready(10)
        card = httpx.get(f"{gw.url}/v1/models/m").json()
        listed = sdk(gw).models.list().data
    assert card["backend"] == "routed" and card["state"] == "ready"
    assert card["deployments"] == [{"name": "remote", "backend": "upstream"}, {"name": "local", "backend": "fake"}]
    assert [m.id for m in listed] == ["m"]


def test_client_disconnect_closes_a_routed_upstream_stream(fault) -> None:
    fault.queue("/v1/chat/completions", "slow_stream")
    model = routed(
        [{"name": "remote", "backend": upstream(f"{fault.url}/v1")}, {"name": "local", "backend": FAKE}],
        fallback=["local"],
    )
    with front([model]) as gw:
        gw.wait_ready(10)
        stream = sdk(gw).chat.completions.create(model="m", messages=CHAT, stream=True)
        next(iter(stream))
        stream.close()
        assert wait_until(lambda: fault.active_streams == 0, timeout=5)
        router = gw.state.registry.lookup("m").backend
        assert wait_until(lambda: router.deployments[0].outstanding == 0)
        assert metric(gw, "gateway_upstream_requests_total", deployment="m/remote", outcome="client_closed") == 1
        assert metric(gw, "gateway_upstream_fallbacks_total", deployment="m/local", model="m") == 0


@pytest.mark.parametrize("stream", [False, True])
def test_one_deadline_per_request_across_upstream_fallbacks(stream) -> None:
    # Every upstream hangs until the gateway gives up on it. The request's deadline is 4 s (each
    # upstream's total); a gives up after its one 2.5 s try, b has what is left of the 4 s (1.5 s),
    # and c is not tried. With a deadline of its own b would wait 4 s (6.5 s in all), and c too (10.5 s).
    def limits(per_try: float) -> dict:
        return {"timeouts": {"per_try": per_try, "total": 4.0}, "retry": {"max_retries": 0}}

    with ExitStack() as stack:
        a, b, c = (stack.enter_context(FaultUpstream()) for _ in range(3))
        for server in (a, b, c):
            server.queue("/v1/chat/completions", *["hang"] * 10)
        model = routed(
            [
                {"name": "a", "backend": upstream(f"{a.url}/v1", **limits(2.5))},
                {"name": "b", "backend": upstream(f"{b.url}/v1", **limits(4.0))},
                {"name": "c", "backend": upstream(f"{c.url}/v1", **limits(4.0))},
            ],
            fallback=["b", "c"],
        )
        with front([model]) as gw:
            gw.wait_ready(10)
            with pytest.raises(openai.InternalServerError) as info:
                result = sdk(gw).chat.completions.create(model="m", messages=CHAT, stream=stream)
                list(result) if stream else None
            # b is tried unless a's 2.5 s try overran by 1.5 s
            assert metric(gw, "gateway_upstream_fallbacks_total", deployment="m/b", model="m") == 1
            assert metric(gw, "gateway_upstream_fallbacks_total", deployment="m/c", model="m") == 0
        assert info.value.status_code == 504
        assert a.hits["/v1/chat/completions"] == 1 and b.hits["/v1/chat/completions"] == 1
        assert c.hits["/v1/chat/completions"] == 0
        # Timed by the upstreams (no client overhead): from a's request to when the gateway gave up on
        # b, the one 4 s deadline (it began just before a's request), not 6.5 s.
        assert wait_until(lambda: len(b.hung_up) == 1, timeout=10)
        assert b.hung_up[0] - a.arrivals["/v1/chat/completions"][0] < 5.0


def test_a_local_fallback_is_still_tried_once_the_deadline_has_passed(fault) -> None:
    fault.queue("/v1/chat/completions", *["hang"] * 10)
    remote = upstream(f"{fault.url}/v1", timeouts={"per_try": 0.5, "total": 1.0}, retry={"max_retries": 10})
    model = routed([{"name": "remote", "backend": remote}, {"name": "local", "backend": FAKE}], fallback=["local"])
    with front([model]) as gw:
        gw.wait_ready(10)
        client = sdk(gw)
        started = time.monotonic()
        reply = client.chat.completions.create(model="m", messages=ECHO, temperature=0)
        # The remote's tries used up its 1 s deadline first; unbounded by it, its eleven 0.5 s tries
        # would take 5.5 s before the local fallback.
        assert 1.0 <= time.monotonic() - started < 3.5
        assert metric(gw, "gateway_upstream_fallbacks_total", deployment="m/local", model="m") == 1
    assert reply.choices[0].message.content == "served locally"


def test_upstream_latency_and_time_to_first_byte_are_observed(fault) -> None:
    with front([{"name": "m", "task": "text-generation", "backend": upstream(f"{fault.url}/v1")}]) as gw:
        client = sdk(gw)
        client.chat.completions.create(model="m", messages=CHAT)
        list(client.chat.completions.create(model="m", messages=CHAT, stream=True))
        for name in ("gateway_upstream_duration_seconds_count", "gateway_upstream_time_to_first_byte_seconds_count"):
            assert metric(gw, name, deployment="m") == 2


def test_an_answer_without_choices_counts_as_an_error(fault) -> None:
    fault.queue("/v1/chat/completions", "no_choices")
    with front([{"name": "m", "task": "text-generation", "backend": upstream(f"{fault.url}/v1")}]) as gw:
        with pytest.raises(openai.InternalServerError) as info:
            sdk(gw).chat.completions.create(model="m", messages=CHAT)
        assert info.value.status_code == 502
        assert metric(gw, "gateway_upstream_requests_total", deployment="m", outcome="error") == 1
        assert metric(gw, "gateway_upstream_requests_total", deployment="m", outcome="ok") == 0


def test_an_hf_endpoint_is_probed_with_a_real_request_before_it_comes_back(fault) -> None:
    # the failing call, then seven failing probes (0.1 s apart): the check after the fourth hit has
    # ~0.4 s before a probe can succeed, room for a loaded machine
    fault.queue("/hf/model", *["503"] * 8)
    remote = upstream(f"{fault.url}/hf/model", dialect="hf", retry={"max_retries": 0})
    model = routed(
        [{"name": "remote", "backend": remote}, {"name": "local", "backend": FAKE}],
        fallback=["local"],
        cooldown={"failures": 1, "seconds": 0.2, "probe_interval": 0.1},
    )
    with front([model]) as gw:
        gw.wait_ready(10)
        client = sdk(gw)
        assert client.completions.create(model="m", prompt="served locally", temperature=0).choices[0].text
        assert metric(gw, "gateway_upstream_cooldown", deployment="m/remote") == 1
        assert wait_until(lambda: fault.hits["/hf/model"] >= 4)
        assert metric(gw, "gateway_upstream_cooldown", deployment="m/remote") == 1  # failing probes keep it out
        assert wait_until(lambda: metric(gw, "gateway_upstream_cooldown", deployment="m/remote") == 0)
        probe = fault.bodies[-1]
        assert probe == {"inputs": "ping", "parameters": {"max_new_tokens": 1}}  # a real, one-token request
        assert (
            client.completions.create(model="m", prompt="x", max_tokens=4).choices[0].text == "Hello from the upstream"
        )
