"""A routed model's deployments added and removed at run time: the others keep their routing state
(breaker, cooldown), traffic reaches the new one at once and leaves the removed one."""

from __future__ import annotations

from contextlib import ExitStack

import httpx

from tests.upstream.conftest import front, sdk, upstream
from tests.upstream.fault_server import FaultUpstream
from tests.upstream.test_faults import CHAT

PATH = "/v1/chat/completions"


def test_add_and_remove_a_deployment_keeping_the_others_state() -> None:
    with ExitStack() as stack:
        a, b, c = (stack.enter_context(FaultUpstream()) for _ in range(3))
        b.healthy = False
        b.queue(PATH, "503")
        no_retry = {"retry": {"max_retries": 0}}
        model = {
            "name": "m",
            "task": "text-generation",
            "deployments": [
                {"name": "a", "backend": upstream(f"{a.url}/v1", **no_retry)},
                {"name": "b", "backend": upstream(f"{b.url}/v1", **no_retry)},
            ],
            "routing": {"cooldown": {"failures": 1, "seconds": 60}},
        }
        with front([model]) as gw:
            gw.wait_ready(10)
            client = sdk(gw)
            for _ in range(3):  # b fails once and is cooled down for a minute
                client.chat.completions.create(model="m", messages=CHAT)
            router = gw.state.registry.lookup("m").backend
            kept = {d.name: d for d in router.deployments}
            assert kept["b"].breaker.open
            added = httpx.post(
                f"{gw.url}/admin/models/m/deployments", json={"name": "c", "backend": upstream(f"{c.url}/v1")}
            )
            assert added.status_code == 201, added.text
            assert added.json()["deployments"] == ["a", "b", "c"]
            assert (
                httpx.post(
                    f"{gw.url}/admin/models/m/deployments", json={"name": "c", "backend": upstream(c.url)}
                ).status_code
                == 409
            )
            for _ in range(4):
                client.chat.completions.create(model="m", messages=CHAT)
            assert c.hits[PATH] == 2 and b.hits[PATH] == 1  # b is still cooled down: its state was kept
            assert all(kept[d.name] is d for d in router.deployments if d.name in kept)
            removed = httpx.delete(f"{gw.url}/admin/models/m/deployments/a")
            assert removed.status_code == 200 and removed.json()["deployments"] == ["b", "c"]
            hits_a = a.hits[PATH]
            for _ in range(3):
                client.chat.completions.create(model="m", messages=CHAT)
            assert a.hits[PATH] == hits_a and c.hits[PATH] == 5
            assert kept["b"].breaker.open and router.deployments[0] is kept["b"]
            assert httpx.delete(f"{gw.url}/admin/models/m/deployments/zz").status_code == 404
