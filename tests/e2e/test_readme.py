"""Every README example runs as written against the default configuration and prints what it shows.

Python blocks are run and their stdout compared with the ```text block after them. curl blocks are
run; when a ```json block follows, the answer must match it except for ids and timestamps.
"""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("lang, code, following", EXAMPLES, ids=[f"{e[0]}-{i}" for i, e in enumerate(EXAMPLES)])
def test_readme_example(server_url: str, lang: str, code: str, following: tuple[str, str] | None) -> None:
    code = code.replace("http://localhost:8000", server_url)
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-c", code]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    if following is None:
        return
    kind, shown = following
    if lang == "python" and kind == "text":
        assert run.stdout.strip() == shown.strip()
    elif kind == "json":
        assert strip_volatile(json.loads(run.stdout)) == strip_volatile(json.loads(shown))
