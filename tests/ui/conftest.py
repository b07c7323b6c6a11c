"""Browser tests of /ui and /ui/dashboard: Playwright driving Debian's chromium, headless.

The browser is the `chromium` Debian package (/usr/bin/chromium, installed by .ci/run); Playwright
never downloads one. Every page a test opens records console errors and uncaught exceptions, which
fail the test; screenshots go to $GATEWAY_UI_ARTIFACTS (default: a pytest temporary folder).
axe-core (axe.min.js, MPL-2.0, bundled in the axe-playwright-python wheel) is run in the page.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import gateway
from tests.helpers import gateway_process
from tests.hf import tiny_models

CHROMIUM = os.environ.get("GATEWAY_CHROMIUM", "/usr/bin/chromium")
CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"

sync_api = pytest.importorskip("playwright.sync_api")


def _chromium_or_skip() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install -y chromium)")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("GATEWAY_UI_ARTIFACTS")
    folder = Path(configured) if configured else tmp_path_factory.mktemp("ui-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots: {folder}")
    return folder


# package scope: the browser and the models' server go away before the suite's other packages run
@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    path = _chromium_or_skip()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True)
        yield browser
        browser.close()


class Page:
    """A browser tab that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, base_url: str, artifacts: Path, width: int = 1280, height: int = 900) -> None:
        self.context = browser.new_context(base_url=base_url, viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.base_url = base_url
        self.artifacts = artifacts
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.set_default_timeout(90_000)  # generous: CI machines may be busy

    def shot(self, name: str, full_page: bool = True) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def axe(self) -> None:
        """axe-core in the page: no serious or critical violations."""
        self.page.add_script_tag(path=str(_axe_path()))
        result = self.page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
        bad = [
            f"{v['id']} ({v['impact']}): {v['help']} at {[n['target'] for n in v['nodes']][:3]}"
            for v in result["violations"]
            if v["impact"] in ("serious", "critical")
        ]
        assert not bad, "accessibility violations:\n" + "\n".join(bad)

    def close(self, allowed: tuple[str, ...] = ()) -> None:
        self.context.close()
        errors = [e for e in self.errors if not any(a in e for a in allowed)]
        assert not errors, f"errors in the browser: {errors}"


def _axe_path() -> Path:
    spec = importlib.util.find_spec("axe_playwright_python")
    if spec is None or spec.origin is None:
        pytest.skip("axe-playwright-python is not installed (the dev extra)")
    return Path(spec.origin).parent / "axe.min.js"


@pytest.fixture()
def open_page(browser: Any, artifacts: Path) -> Iterator[Any]:
    """open_page(base_url, width=...) -> Page; each page must end without browser errors."""
    pages: list[tuple[Page, tuple[str, ...]]] = []

    def make(base_url: str, *, width: int = 1280, height: int = 900, allowed: tuple[str, ...] = ()) -> Page:
        page = Page(browser, base_url, artifacts, width, height)
        pages.append((page, allowed))
        return page

    yield make
    for page, allowed in pages:
        page.close(allowed)


@pytest.fixture(scope="package")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`gateway serve` with the default models (SmolLM2 chat, MiniLM embeddings) and tiny task models.
    GATEWAY_UI_URL names one already running with those models instead (to iterate on the UI)."""
    if os.environ.get("GATEWAY_UI_URL"):
        yield os.environ["GATEWAY_UI_URL"]
        return
    root = tmp_path_factory.mktemp("ui-models")
    default = yaml.safe_load((Path(gateway.__file__).parent / "default_config.yaml").read_text())
    tiny = {
        "tiny-sentiment": tiny_models.build_bert("sentiment", root / "sentiment"),
        "tiny-ner": tiny_models.build_bert("ner", root / "ner"),
        "tiny-qa": tiny_models.build_bert("qa", root / "qa"),
        "tiny-nli": tiny_models.build_bert("nli", root / "nli"),
        "tiny-mlm": tiny_models.build_bert("mlm", root / "mlm"),
        "tiny-vit": tiny_models.build_vit(root / "vit"),
    }
    models = default["models"] + [
        {"name": name, "backend": {"kind": "local", "source": str(folder), "dtype": "float32"}}
        for name, folder in tiny.items()
    ]
    config = {"server": {"host": "127.0.0.1"}, "models": models}
    with gateway_process(config, tmp_path=tmp_path_factory.mktemp("ui-serve")) as url:
        yield url
    shutil.rmtree(root, ignore_errors=True)
