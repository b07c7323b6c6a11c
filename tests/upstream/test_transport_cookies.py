"""One upstream session serves every client of the gateway: a cookie an upstream sets while
answering one request must not go out with the next (gateway/upstream/transport.py)."""

from __future__ import annotations

from tests.upstream.conftest import front, sdk, upstream

CHAT = [{"role": "user", "content": "hi"}]


def test_a_cookie_set_by_the_upstream_is_never_sent_back(fault) -> None:
    # named by host name: the jar of a general-purpose client (aiohttp's) keeps cookies from a name, not from an IP address
    fault.queue("/v1/chat/completions", "set_cookie", "ok", "ok")
    with front(
        [
            {
                "name": "m",
                "task": "text-generation",
                "backend": upstream(f"{fault.url.replace('127.0.0.1', 'localhost')}/v1"),
            }
        ]
    ) as gw:
        client = sdk(gw)
        for _ in range(3):
            answer = client.chat.completions.with_raw_response.create(model="m", messages=CHAT, max_tokens=5)
            assert "set-cookie" not in answer.headers  # nor passed on to our client
    assert fault.hits["/v1/chat/completions"] == 3
    assert all("cookie" not in headers for headers in fault.headers), fault.headers
