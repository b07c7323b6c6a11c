"""The README's team-setup section runs as written (bash, against the default models) and shows
what it says: a created key with its limit headers, the cache, usage, revoking, the JSON log line,
and a drained exit with status 0."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def team_script(port: int) -> str:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- team:start.*?<!-- team:end -->", text, re.S)
    assert section is not None
    blocks = re.findall(r"```bash\n(.*?)```", section.group(0), re.S)
    script = "\n".join(blocks)
    assert "export GW=http://127.0.0.1:8000" in script and "gateway serve" in script
    script = script.replace("127.0.0.1:8000", f"127.0.0.1:{port}").replace(
        "gateway serve", f"gateway serve --port {port}"
    )
    return "set -euo pipefail\n" + script


def test_team_section_runs(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        ["bash", "-c", team_script(free_port())], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "gateway.log").read_text()[-3000:]
    out = run.stdout
    assert re.search(r"(?im)^x-ratelimit-remaining-requests: 59\r?$", out), out
    assert re.search(r"(?im)^x-cache: miss\r?$", out), out
    usage = json.loads(next(x for x in out.splitlines() if x.startswith('{"object":"list"')))
    assert any(row["key"] == "alice" and row["requests"] == 1 for row in usage["data"]), out
    assert "('alice', ['inference'], False)" in out
    assert '"revoked":true' in out.replace(" ", "") and "\n401\n" in out
    line = json.loads(out.strip().splitlines()[-1])
    assert line["msg"] == "request" and line["status"] == 401 and line["key"] is None  # the revoked key's call
    assert (tmp_path / "keys.db").exists()
