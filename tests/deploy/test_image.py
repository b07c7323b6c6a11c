"""The container image, really built and run (`make test-image`; skipped unless GATEWAY_TEST_IMAGE=1).

Runs the README's container commands (its `docker build`, `docker run`, `docker stop`) with podman
through ../shared/tools/container-env.sh, which adds the flags our sandbox needs: a local Debian 12 +
Python 3.11 base standing in for python:3.11-slim (no image registry is reachable here), host
network, the machine's package index. Between run and stop: /ready, one chat and one embeddings
answer through the OpenAI SDK; the stop must be SIGTERM's clean exit (code 0) within the grace
period. Then the image's size and contents."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import ROOT, free_port, wait_ready

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(os.environ.get("GATEWAY_TEST_IMAGE") != "1", reason="GATEWAY_TEST_IMAGE=1 (make test-image)"),
]

CONTAINER_ENV = Path(os.environ.get("GATEWAY_CONTAINER_ENV", ROOT.parent / "shared" / "tools" / "container-env.sh"))
SIZE_BUDGET = 2_000_000_000  # bytes: the CPU image's budget (README, "Containers")
# Where torch comes from in our sandbox: the local CPU wheel (the default, PyTorch's CPU index, is
# not reachable here). Like the podman flags, this stays out of the README's commands.
LOCAL_TORCH = ["--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple", "--build-arg", "PIP_FIND_LINKS=/opt/wheels"]


def readme_commands() -> dict[str, list[str]]:
    """The README's container commands, by docker subcommand: {"build": [...], "run": [...], ...}."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- containers:start -->(.*?)<!-- containers:end -->", text, re.S)
    assert section, "README.md lost its container section markers"
    block = re.search(r"```bash\n(.*?)```", section.group(1), re.S)
    assert block
    commands = {}
    for line in block.group(1).splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["docker"]:
            commands[words[1]] = words[2:]
    return commands


README = readme_commands()
IMAGE = README["build"][README["build"].index("-t") + 1]
NAME = README["run"][README["run"].index("--name") + 1]
GRACE_SECONDS = int(README["stop"][README["stop"].index("-t") + 1])  # drain (30 s) + 5 s, as in Kubernetes


def without(args: list[str], flag: str) -> list[str]:
    """`args` less `flag` and its value."""
    i = args.index(flag)
    return args[:i] + args[i + 2 :]


def sandbox() -> dict[str, str]:
    """The variables container-env.sh exports: PODMAN, BUILD_FLAGS, RUN_FLAGS, BASE_IMAGE."""
    assert CONTAINER_ENV.is_file(), f"{CONTAINER_ENV} not found"
    names = ("PODMAN", "BUILD_FLAGS", "RUN_FLAGS", "BASE_IMAGE")
    script = f"source {shlex.quote(str(CONTAINER_ENV))} >&2 && " + " && ".join(f'echo "${n}"' for n in names)
    out = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True, timeout=900).stdout
    return dict(zip(names, out.splitlines(), strict=True))


@pytest.fixture(scope="module")
def podman() -> list[str]:
    return sandbox()["PODMAN"].split()


@pytest.fixture(scope="module")
def image(podman: list[str]) -> str:
    env = sandbox()
    torch = LOCAL_TORCH if Path("/opt/wheels").is_dir() else []
    cmd = [*podman, "build", *env["BUILD_FLAGS"].split(), "--from", env["BASE_IMAGE"], *torch, *README["build"]]
    assert "--target" in cmd and cmd[-1] == "."
    started = time.monotonic()
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=1800)
    print(f"image built in {time.monotonic() - started:.0f} s")
    return IMAGE


@pytest.fixture(scope="module")
def container(podman: list[str], image: str) -> Iterator[tuple[str, str]]:
    port, name = free_port(), NAME
    # The README's run, with the sandbox's host network (and a free port) instead of its -p.
    cmd = [*podman, "run", *sandbox()["RUN_FLAGS"].split(), *without(README["run"], "-p")]
    assert cmd[-1] == image
    subprocess.run([*podman, "rm", "-f", name], check=False, capture_output=True)
    subprocess.run([*cmd, "--port", str(port)], check=True, capture_output=True, timeout=60)
    try:
        started = time.monotonic()
        wait_ready(f"http://127.0.0.1:{port}", timeout=180)
        print(f"ready in {time.monotonic() - started:.1f} s")
        logs = subprocess.run([*podman, "logs", name], capture_output=True, text=True)
        assert "converting" not in logs.stdout + logs.stderr, (
            "the start converted the GGUF again: the image's conversion was not found"
        )
        yield name, f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([*podman, "logs", "--tail", "30", name], check=False)
        subprocess.run([*podman, "rm", "-f", "-t", "0", name], check=False, capture_output=True)


def test_container_serves_and_stops_cleanly(podman: list[str], container: tuple[str, str]) -> None:
    name, url = container
    ready = httpx.get(f"{url}/ready", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    chat = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens > 0
    embedding = client.embeddings.create(model="all-minilm-l6-v2", input="a sentence to embed")
    assert len(embedding.data[0].embedding) == 384

    started = time.monotonic()
    assert README["stop"][-1] == name
    subprocess.run([*podman, "stop", *README["stop"]], check=True, capture_output=True, timeout=60)
    stopped_in = time.monotonic() - started
    state = subprocess.run(
        [*podman, "inspect", "--format", "{{.State.ExitCode}} {{.State.Status}}", name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert state == ["0", "exited"], f"SIGTERM did not stop it cleanly: {state}"
    assert stopped_in < GRACE_SECONDS, f"took {stopped_in:.1f} s: it was killed, not stopped"


def test_image_size_and_contents(podman: list[str], image: str) -> None:
    size = int(subprocess.check_output([*podman, "image", "inspect", "--format", "{{.Size}}", image], text=True))
    print(f"image size {size / 1e9:.2f} GB")
    assert size <= SIZE_BUDGET, f"{size / 1e9:.2f} GB is over the 2 GB budget"

    def inside(*command: str) -> str:
        run = [*podman, "run", "--rm", "--network", "none", "--entrypoint", command[0], image, *command[1:]]
        return subprocess.run(run, check=True, capture_output=True, text=True, timeout=120).stdout

    packages = inside("pip", "list", "--format=freeze").lower().splitlines()
    assert not [p for p in packages if p.startswith(("nvidia", "triton"))], "CUDA packages in the CPU image"
    assert any(p.startswith("torch==") for p in packages)
    assert inside("id").startswith("uid=10001(gateway) gid=10001(gateway)")
    # No compiler, no pip cache, no apt lists in the final image.
    leftovers = inside(
        "sh", "-c", "command -v gcc cc g++ make; ls /root/.cache/pip /var/lib/apt/lists/*.lz4 2>/dev/null; true"
    )
    assert leftovers.strip() == ""
    # The default GGUF model was converted at build time, once.
    converted = inside("sh", "-c", "ls -d /var/cache/gateway/gateway/gguf/*/config.json").split()
    assert len(converted) == 1, converted
