"""Every README example runs as written against the default configuration and prints what it shows.

Python blocks are run and their stdout compared with the ```text block after them. curl blocks are
run with a curl config that makes an HTTP error fail the command (the README's `curl -s` alone
would print an error body and succeed); when a ```json block follows, the answer must match it
except for ids and timestamps, and a ```text block, which elides with `…`, must match line by line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, gateway_process, strip_volatile

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def readme_blocks(path: Path = ROOT / "README.md") -> list[tuple[str, str, tuple[str, str] | None]]:
    # Sections run against their own example configs are tested elsewhere (tests/hf/test_docs.py).
    text = re.sub(r"<!-- (\S+):start.*?<!-- \1:end -->", "", path.read_text(), flags=re.S)
    blocks = [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]
    out = []
    for i, (lang, code) in enumerate(blocks):
        following = blocks[i + 1] if i + 1 < len(blocks) else None
        if lang == "python" or (lang == "bash" and code.lstrip().startswith("curl")):
            out.append((lang, code, following))
    return out


EXAMPLES = readme_blocks()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with gateway_process(tmp_path=tmp_path_factory.mktemp("readme")) as url:
        yield url


@pytest.fixture(scope="module")
def curl_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """curl reads $CURL_HOME/.curlrc first: a 4xx/5xx then exits 22, so the commands stay as shown."""
    home = tmp_path_factory.mktemp("curl")
    (home / ".curlrc").write_text("fail-with-body\nshow-error\n")
    return {**os.environ, "CURL_HOME": str(home)}


VOLATILE = ((re.compile(r'"id":"[^"]*"'), '"id":""'), (re.compile(r'"created":\d+'), '"created":0'))
FLOAT = re.compile(r"-?\d+\.\d+(?:[eE][-+]?\d+)?")


def _normalise(text: str) -> list[str]:
    for pattern, fixed in VOLATILE:
        text = pattern.sub(fixed, text)
    # Four decimals: the last bits of a float differ between CPUs, the digits shown do not.
    return FLOAT.sub(lambda m: f"{float(m.group()):.4f}", text).strip().splitlines()


def assert_matches_elided(actual: str, shown: str) -> None:
    """Line by line, `…` in the README standing for anything."""
    got, want = _normalise(actual), _normalise(shown)
    assert len(got) == len(want), f"{len(got)} lines, the README shows {len(want)}:\n{actual}"
    for line, expected in zip(got, want, strict=True):
        pattern = ".*?".join(re.escape(part) for part in expected.split("…"))
        assert re.fullmatch(pattern, line), f"README shows\n{expected}\ngot\n{line}"


def check_sse(stdout: str) -> None:
    events = stdout.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", stdout[-200:]
    assert len(events) > 2
    for event in events[:-2]:
        assert event.startswith("data: {") and "\n" not in event, event  # one line of JSON per event
        assert json.loads(event.removeprefix("data: "))["object"] == "chat.completion.chunk"


def check_json(stdout: str) -> None:
    answer = json.loads(stdout)
    assert "error" not in answer
    for item in answer.get("data", []):
        if item.get("object") == "embedding":
            assert len(item["embedding"]) == 384  # all-minilm-l6-v2
            assert abs(sum(x * x for x in item["embedding"]) - 1) < 1e-3  # normalised, as its config says


@pytest.mark.parametrize("lang, code, following", EXAMPLES, ids=[f"{e[0]}-{i}" for i, e in enumerate(EXAMPLES)])
def test_readme_example(
    server_url: str, curl_env: dict[str, str], lang: str, code: str, following: tuple[str, str] | None
) -> None:
    code = code.replace("http://localhost:8000", server_url)
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-c", code]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=curl_env)
    assert run.returncode == 0, run.stderr + run.stdout
    assert run.stdout.strip()
    if lang == "bash" and run.stdout.startswith("data:"):
        check_sse(run.stdout)
    elif lang == "bash":
        check_json(run.stdout)
    if following is None:
        return
    kind, shown = following
    if lang == "python" and kind == "text":
        assert run.stdout.strip() == shown.strip()
    elif kind == "json":
        assert strip_volatile(json.loads(run.stdout)) == strip_volatile(json.loads(shown))
    elif kind == "text":
        assert_matches_elided(run.stdout, shown)
