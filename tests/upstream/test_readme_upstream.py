"""The README's upstream section works as written: its YAML is `examples/upstream-fallback.yaml`, its
two `gateway serve` commands start the servers (on free ports instead of 9000 and 8000), its curl and
Python blocks print what it shows, and with the upstream stopped the same calls give the same answers
through the local fallback, as the metrics block shows."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, free_port, strip_volatile, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SECTION = re.compile(r"<!-- upstream:start.*?-->(.*?)<!-- upstream:end -->", re.DOTALL)
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


def blocks() -> list[tuple[str, str]]:
    found = SECTION.search((ROOT / "README.md").read_text())
    assert found, "README.md lost its upstream section markers"
    return BLOCK.findall(found.group(1))


def _start(line: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    words = shlex.split(line.rstrip("& "))
    extra = {}
    while "=" in words[0]:  # VAR=value prefixes
        name, _, value = words.pop(0).partition("=")
        extra[name] = value
    with open(log, "wb") as out:
        return subprocess.Popen(words, stdout=out, stderr=subprocess.STDOUT, env={**env, **extra}, cwd=ROOT)


def _run(kind: str, code: str, env: dict[str, str]) -> str:
    cmd = ["bash", "-c", "set -eo pipefail\n" + code] if kind == "bash" else [sys.executable, "-c", code]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert run.returncode == 0, f"{code}\n{run.stdout}\n{run.stderr}"
    return run.stdout.strip()


def _check(kind: str, code: str, shown: tuple[str, str], env: dict[str, str]) -> None:
    out = _run(kind, code, env)
    if shown[0] == "json":
        assert strip_volatile(json.loads(out)) == strip_volatile(json.loads(shown[1]))
    else:
        assert out == shown[1].strip()


def test_upstream_section_works_as_written(tmp_path: Path) -> None:
    (_, config_block), (_, serve), curl, curl_out, python, python_out, metrics, metrics_out = blocks()
    example = yaml.safe_load((ROOT / "examples" / "upstream-fallback.yaml").read_text())
    assert yaml.safe_load(config_block) == {"models": example["models"]}

    upstream_port, front_port = free_port(), free_port()
    config = (ROOT / "examples" / "upstream-fallback.yaml").read_text()
    config = config.replace("127.0.0.1:9000", f"127.0.0.1:{upstream_port}").replace("port: 8000", f"port: {front_port}")
    (tmp_path / "front.yaml").write_text(config)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the venv is "activated"
    upstream_line, front_line = serve.strip().splitlines()
    upstream = _start(upstream_line.replace("--port 9000", f"--port {upstream_port}"), env, tmp_path / "up.log")
    front = _start(
        front_line.replace("examples/upstream-fallback.yaml", str(tmp_path / "front.yaml")), env, tmp_path / "front.log"
    )

    def at_front(code: str) -> str:
        return code.replace("localhost:8000", f"127.0.0.1:{front_port}")

    try:
        wait_ready(f"http://127.0.0.1:{upstream_port}", proc=upstream)
        wait_ready(f"http://127.0.0.1:{front_port}", proc=front)
        _check("bash", at_front(curl[1]), curl_out, env)
        _check("python", at_front(python[1]), python_out, env)

        upstream.terminate()  # the upstream goes away: the same calls, answered by the local deployment
        upstream.wait(timeout=30)
        _check("python", at_front(python[1]), python_out, env)
        _check("bash", at_front(metrics[1]), metrics_out, env)
    finally:
        for proc in (upstream, front):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
