"""The one settings model: config file, `GATEWAY_*` environment, CLI flags, `gateway config`, and its docs."""

from __future__ import annotations

import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from gateway.cli import build_parser, main
from gateway.config import ServerSettings, Settings, load_settings
from gateway.errors import ConfigError
from tests.helpers import ROOT

GATEWAY = str(Path(sys.executable).with_name("gateway"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No GATEWAY_* variable from the surrounding shell leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    return monkeypatch


def write(tmp_path: Path, data: Any, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def run_config(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """`gateway config ...` in process: the effective settings it prints."""
    assert main(["config", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_defaults_fill_what_the_file_leaves_out(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"models": []}))
    assert settings.server == ServerSettings()
    assert settings.server.port == 8000 and settings.server.host == "127.0.0.1" and settings.server.access_log


def test_precedence_cli_then_env_then_file_then_defaults(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    config = write(tmp_path, {"server": {"port": 7000, "host": "0.0.0.0", "log_level": "warning"}, "models": []})
    clean_env.setenv("GATEWAY_SERVER__PORT", "9000")
    clean_env.setenv("GATEWAY_SERVER__LOG_LEVEL", "debug")
    settings = load_settings(config, **{"server.port": 9100, "server.host": None})
    assert settings.server.port == 9100  # flag over environment and file
    assert settings.server.log_level == "debug"  # environment over file
    assert settings.server.host == "0.0.0.0"  # file over default; a flag left unset (None) changes nothing
    assert settings.server.max_body_bytes == 16 * 1024 * 1024  # default


def test_nested_environment_variables(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("GATEWAY_SERVER__PORT", "9000")
    clean_env.setenv("GATEWAY_SERVER__API_KEYS", '["k1"]')
    clean_env.setenv("GATEWAY_SERVER__ACCESS_LOG", "false")
    clean_env.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    settings = load_settings(write(tmp_path, {"server": {"host": "0.0.0.0"}, "models": []}))
    assert settings.server.port == 9000 and settings.server.api_keys == ["k1"]
    assert settings.server.access_log is False
    assert settings.cache_dir == tmp_path / "cache"
    assert settings.server.host == "0.0.0.0"  # the environment overrides field by field, not the whole section


def test_environment_variables_naming_no_setting_are_left_alone(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    # What Kubernetes puts into every pod next to a Service named `gateway`.
    clean_env.setenv("GATEWAY_PORT", "tcp://10.0.0.1:8000")
    clean_env.setenv("GATEWAY_SERVICE_HOST", "10.0.0.1")
    assert load_settings(write(tmp_path, {"models": []})).server.port == 8000


def test_every_server_setting_is_a_flag_of_both_commands() -> None:
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[attr-defined]
    for name in ("serve", "config"):
        dests = {action.dest for action in commands[name]._actions}
        assert {f"server.{field}" for field in ServerSettings.model_fields} <= dests
        assert {"config", "cache_dir"} <= dests


def test_flags_reach_the_effective_config(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("GATEWAY_SERVER__PORT", "9000")
    config = write(tmp_path, {"server": {"api_keys": ["from-file"]}, "models": []})
    shown = run_config(
        capsys,
        "--config", str(config),
        "--port", "9001",
        "--host", "0.0.0.0",
        "--api-keys", "k1",
        "--api-keys", "k2",
        "--no-access-log",
        "--log-level", "debug",
        "--sse-ping-seconds", "2.5",
        "--max-body-bytes", "2048",
        "--redis-url", "redis://127.0.0.1:6390/0",
        "--drain-timeout", "12",
        "--cache-dir", str(tmp_path / "c"),
    )  # fmt: skip
    assert shown["server"]["redis_url"] == "redis://127.0.0.1:6390/0"
    assert shown["server"]["drain_timeout"] == 12.0
    assert (
        shown["server"].items()
        >= {
            "host": "0.0.0.0",
            "port": 9001,
            "log_level": "debug",
            "api_keys": ["k1", "k2"],
            "max_body_bytes": 2048,
            "sse_ping_seconds": 2.5,
            "access_log": False,
        }.items()
    )
    assert shown["cache_dir"] == str(tmp_path / "c")
    # Without the flags, the environment and the file show through.
    shown = run_config(capsys, "--config", str(config))
    assert shown["server"]["port"] == 9000 and shown["server"]["api_keys"] == ["from-file"]
    assert shown["server"]["access_log"] is True
    assert run_config(capsys, "--config", str(config), "--access-log")["server"]["access_log"] is True


def test_gateway_config_command_prints_the_file_it_was_given(tmp_path: Path) -> None:
    models = [
        {"name": "m", "aliases": ["org/m"], "task": "text-generation", "backend": {"kind": "fake", "delay_ms": 3}}
    ]
    config = write(tmp_path, {"server": {"port": 8123}, "models": models})
    run = subprocess.run([GATEWAY, "config", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    shown = yaml.safe_load(run.stdout)
    assert shown["server"]["port"] == 8123
    assert shown["models"][0]["backend"] == {"kind": "fake", "delay_ms": 3.0, "dimensions": 8}
    # Round trip: what it prints is itself a valid config giving the same settings.
    assert load_settings(write(tmp_path, run.stdout, "printed.yaml")) == load_settings(config)


def test_without_config_the_embedded_default_is_used(capsys: pytest.CaptureFixture[str]) -> None:
    names = [m["name"] for m in run_config(capsys)["models"]]
    assert names == ["smollm2-135m-instruct", "all-minilm-l6-v2"]


@pytest.mark.parametrize(
    "content, env, expected",
    [
        ({"server": {"prot": 7000}}, {}, "server.prot: unknown setting"),
        ({"server": {"port": "abc"}}, {}, "server.port: Input should be a valid integer"),
        ({"models": [{"name": "m", "backend": {"kind": "fake", "dimension": 3}}]}, {}, "unknown setting"),
        ({"cache_dirr": "/x"}, {}, "cache_dirr: unknown setting"),
        ("server: [1\n", {}, "is not valid YAML"),
        ("- just\n- a list\n", {}, "must hold a mapping"),
        ({"models": []}, {"GATEWAY_SERVER__PORT": "abc"}, "server.port: Input should be a valid integer"),
        ({"models": []}, {"GATEWAY_SERVER__API_KEYS": "k1"}, "lists and mappings are JSON"),
    ],
    ids=[
        "unknown-field",
        "bad-type",
        "unknown-nested-field",
        "unknown-top-level",
        "bad-yaml",
        "not-a-mapping",
        "bad-env-type",
        "env-not-json",
    ],
)
def test_bad_config_is_a_readable_error(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    content: Any, env: dict[str, str], expected: str,
) -> None:  # fmt: skip
    for name, value in env.items():
        clean_env.setenv(name, value)
    config = write(tmp_path, content)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_settings(config)
    for command in ("serve", "config"):
        assert main([command, "--config", str(config)]) == 2  # `serve` stops before binding anything
        err = capsys.readouterr().err
        assert err.startswith("gateway: ") and expected in err


def test_bad_config_exits_2_without_a_traceback(tmp_path: Path) -> None:
    config = write(tmp_path, {"server": {"prot": 7000}})
    missing = tmp_path / "missing.yaml"
    runs = {
        "module": [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        "script": [GATEWAY, "config", "--config", str(config)],
        "missing": [GATEWAY, "config", "--config", str(missing)],
    }
    for name, cmd in runs.items():
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert run.returncode == 2, name
        assert "Traceback" not in run.stderr and run.stdout == "", name
        if name == "missing":
            assert f"cannot read the config file: [Errno 2] No such file or directory: '{missing}'" in run.stderr
        else:
            assert "server.prot: unknown setting (got 7000)" in run.stderr


# --- every setting is documented in the README's settings table ------------------------------------


def _models_in(annotation: Any) -> tuple[bool, list[type[BaseModel]]]:
    """(is a list, the settings models inside) for a field's annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return False, [annotation]
    if origin is list:
        return True, _models_in(args[0])[1]
    if origin is typing.Annotated:
        return _models_in(args[0])
    if origin in (typing.Union, types.UnionType):  # `X | None`, or the backend kinds
        found = [_models_in(a) for a in args]
        return any(is_list for is_list, _ in found), [m for _, models in found for m in models]
    return False, []


def setting_paths() -> dict[str, list[Any]]:
    """Every leaf setting as the README spells it (`models[].backend.source`), with its defaults.

    Backend kinds share `models[].backend`; a model met a second time (a deployment's backend) is one row.
    """
    paths: dict[str, list[Any]] = {}
    walked: set[type[BaseModel]] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        walked.add(model)
        for name, field in model.model_fields.items():
            path = prefix + name
            is_list, nested = _models_in(field.annotation)
            if nested and not set(nested) <= walked:
                for inner in nested:
                    if inner not in walked:
                        walk(inner, path + ("[]." if is_list else "."))
                continue
            default = None if field.default is PydanticUndefined else field.default  # required or a factory
            if default not in paths.setdefault(path, []):
                paths[path].append(default)

    walk(Settings, "")
    return paths


def readme_settings_table() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Configuration") :]
    section = section[: section.index("\n## ", 1)]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]*) \|", section, re.M)
    return {path: default.strip() for path, default in rows}


def test_every_setting_is_in_the_readme_table() -> None:
    documented = readme_settings_table()
    missing = sorted(set(setting_paths()) - set(documented))
    assert not missing, f"settings missing from the README's Configuration table: {missing}"


def test_readme_defaults_match_the_model() -> None:
    documented = readme_settings_table()
    for path, defaults in setting_paths().items():
        cell = documented.get(path, "")
        literal = re.fullmatch(r"`([^`]*)`", cell)
        if len(defaults) != 1 or defaults[0] is None or literal is None:
            continue  # required, a prose default ("model limit"), or one that differs by backend kind
        default, shown = defaults[0], yaml.safe_load(literal.group(1))
        assert shown == default, f"{path}: README says {cell}, the settings model says {default!r}"
