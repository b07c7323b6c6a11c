"""Layering rules, read from the source (docs/architecture.md): each test is one rule, parametrised
by file (ids are paths under gateway/), so `-k routes/tgi.py` or `-k backends` selects a part.

A rule a file does not meet yet is listed in TODO with the work package of issue 11 that fixes it;
those ids are strict xfails, so the package that fixes one must also delete its line here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "gateway"

# (rule, file) -> the work that brings the file in line (empty: every rule holds)
TODO: dict[tuple[str, str], str] = {}

WEB_PACKAGES = ("fastapi", "starlette", "sse_starlette")
MAX_ROUTE_LINES = 80
MAX_FUNCTION_LINES = 60


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def files(*patterns: str) -> list[Path]:
    return sorted({p for pattern in patterns for p in ROOT.glob(pattern)})


def cases(rule: str, paths: list[Path]) -> list[object]:
    params = []
    for path in paths:
        package = TODO.get((rule, rel(path)))
        marks = [pytest.mark.xfail(strict=True, reason=f"issue 11 package {package}")] if package else []
        params.append(pytest.param(path, id=rel(path), marks=marks))
    return params


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_modules(module: ast.Module) -> Iterator[tuple[int, str]]:
    """(line, dotted module) of every import, including `from package import submodule` names."""
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


ROUTE_MODULES = [p for p in files("routes/*.py") if p.name != "__init__.py"]
GATEWAY = files("**/*.py")


@pytest.mark.parametrize("path", cases("route_size", ROUTE_MODULES))
def test_route_size(path: Path) -> None:
    """A route module parses, calls a service and renders: a screenful at most."""
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_ROUTE_LINES, f"{rel(path)} has {lines} lines (at most {MAX_ROUTE_LINES})"


@pytest.mark.parametrize("path", cases("route_imports", ROUTE_MODULES))
def test_route_imports(path: Path) -> None:
    """Route modules share code through routes/common and services, never through each other."""
    bad = [
        f"{line}: {name}"
        for line, name in imported_modules(tree(path))
        if (under(name, "gateway.routes") and not under(name, "gateway.routes.common") and name != "gateway.routes")
        or under(name, "gateway.error_handlers")
        or under(name, "gateway.middleware")
        or under(name, "gateway.app")
    ]
    assert not bad, f"{rel(path)} imports other route-level modules: {bad}"


@pytest.mark.parametrize("path", cases("function_size", GATEWAY))
def test_function_size(path: Path) -> None:
    long = [
        f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(tree(path))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in {rel(path)}: {long}"


WEB_LAYER = ("routes/", "app.py", "middleware.py", "error_handlers.py")


@pytest.mark.parametrize("path", cases("web_imports", [p for p in GATEWAY if not rel(p).startswith(WEB_LAYER)]))
def test_web_imports(path: Path) -> None:
    """The web framework stays at the HTTP edge: services, protocol, backends and engine never see it."""
    bad = [f"{line}: {name}" for line, name in imported_modules(tree(path)) if name.split(".")[0] in WEB_PACKAGES]
    assert not bad, f"{rel(path)} imports the web framework: {bad}"


def _contract_breaches(module: ast.Module) -> Iterator[str]:
    for node in ast.walk(module):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id == "getattr" and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and name.value in ("attach_metrics", "probe"):
                yield f"{node.lineno}: getattr(..., {name.value!r})"
        if node.func.id == "isinstance" and len(node.args) == 2:
            names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            if "UpstreamBackend" in names:
                yield f"{node.lineno}: isinstance(..., UpstreamBackend)"


@pytest.mark.parametrize("path", cases("backend_contract", GATEWAY))
def test_backend_contract(path: Path) -> None:
    """What a backend can do is declared by the Backend ABC, not discovered by probing it."""
    bad = list(_contract_breaches(tree(path)))
    assert not bad, f"{rel(path)} probes backends instead of using the Backend ABC: {bad}"


# engine/'s own modules and packages: `from gateway.engine import loader` names a module, not a facade name
ENGINE_SUBMODULES = {
    p.name.removesuffix(".py")
    for p in (ROOT / "engine").iterdir()
    if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").exists()
}
ENGINE = [p for p in files("engine/**/*.py") if rel(p) != "engine/__init__.py"]


@pytest.mark.parametrize("path", cases("engine_config", ENGINE))
def test_engine_config(path: Path) -> None:
    """The engine takes EngineArgs; the gateway's configuration stays above it."""
    bad = [f"{line}: {name}" for line, name in imported_modules(tree(path)) if under(name, "gateway.config")]
    assert not bad, f"{rel(path)} imports gateway.config: {bad}"


@pytest.mark.parametrize("path", cases("engine_facade", ENGINE))
def test_engine_no_facade(path: Path) -> None:
    """Inside engine/, modules import each other directly, never the facade's names."""
    bad = [
        f"{node.lineno}: {alias.name}"
        for node in ast.walk(tree(path))
        if isinstance(node, ast.ImportFrom) and node.module == "gateway.engine"
        for alias in node.names
        if alias.name not in ENGINE_SUBMODULES
    ]
    assert not bad, f"{rel(path)} imports names from the gateway.engine facade: {bad}"


@pytest.mark.parametrize("path", cases("upstream_engine", files("upstream/**/*.py")))
def test_upstream_engine(path: Path) -> None:
    """Talking to another server never needs the local engine (nor torch)."""
    bad = [f"{line}: {name}" for line, name in imported_modules(tree(path)) if under(name, "gateway.engine")]
    assert not bad, f"{rel(path)} imports the engine: {bad}"


def test_generation_event_defined_once() -> None:
    where = [
        f"{rel(path)}:{node.lineno}"
        for path in GATEWAY
        for node in ast.walk(tree(path))
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "GenerationEvent" for t in node.targets)
        )
        or (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "GenerationEvent"
        )
    ]
    assert len(where) == 1 and where[0].startswith("domain.py:"), f"GenerationEvent defined at {where}"


LOCAL = files("backends/local/**/*.py")


@pytest.mark.parametrize("path", cases("local_fields", LOCAL))
def test_local_fields(path: Path) -> None:
    """Local backends hold typed parts, not optional `Any` fields checked for None everywhere."""
    bad = [
        f"{node.lineno}: {ast.unparse(node.target)}"
        for node in ast.walk(tree(path))
        if isinstance(node, ast.AnnAssign)
        and ast.unparse(node.annotation) == "Any"
        and isinstance(node.value, ast.Constant)
        and node.value.value is None
    ]
    assert not bad, f"{rel(path)} has `Any = None` fields: {bad}"


@pytest.mark.parametrize("path", cases("local_facade", LOCAL))
def test_local_facade(path: Path) -> None:
    """backends/local reaches the engine through its facade only, so engine/ can move inside."""
    bad = [
        f"{line}: {name}"
        for line, name in imported_modules(tree(path))
        if under(name, "gateway.engine")
        and name != "gateway.engine"
        and not (name.count(".") == 2 and name.rsplit(".", 1)[1] not in ENGINE_SUBMODULES)
    ]
    assert not bad, f"{rel(path)} imports engine modules instead of the gateway.engine facade: {bad}"
