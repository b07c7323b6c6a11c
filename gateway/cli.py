"""`gateway serve` / `gateway config`: flags are generated from the settings model, so every flag is a setting."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, get_args

from gateway.config import ServerSettings, Settings, load_settings
from gateway.errors import ConfigError, GatewayError


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f"server.{name}", "default": None, "help": field.description}
        annotation = field.annotation
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif annotation in (int, float, str):
            kwargs.update(type=annotation, metavar=name.upper())
        elif annotation in (int | None, float | None, str | None):
            kwargs.update(type=next(a for a in get_args(annotation) if a is not type(None)), metavar=name.upper())
        elif get_args(annotation) and all(isinstance(a, str) for a in get_args(annotation)):
            kwargs["choices"] = list(get_args(annotation))
        elif getattr(annotation, "__origin__", None) is list:
            kwargs.update(action="append", metavar=name.upper())
            kwargs["help"] += " Repeat the flag for several."
        else:
            # Every server setting must have a flag (README); a new kind of field needs a case here.
            raise TypeError(f"no CLI flag for server.{name} of type {annotation}")
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="OpenAI- and Hugging Face-compatible inference gateway."
    )
    # `config` takes the same flags as `serve`, so it shows what that `serve` would run with.
    settings = argparse.ArgumentParser(add_help=False)
    settings.add_argument("--config", help="YAML config file; the embedded default config when omitted.")
    settings.add_argument("--cache-dir", dest="cache_dir", default=None, help="Where converted checkpoints are kept.")
    _add_server_flags(settings)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", parents=[settings], help="Start the HTTP server.")
    commands.add_parser("config", parents=[settings], help="Print the effective configuration and exit.")
    commands.add_parser(
        "warmup",
        parents=[settings],
        help="Load every configured model once and exit: converts GGUF checkpoints into the cache (image builds).",
    )
    return parser


def reload_on_hangup(app: Any) -> None:
    """SIGHUP reloads the configuration (as POST /admin/config/reload). A plain signal handler, not
    the loop's: uvicorn installs its own for SIGINT and SIGTERM only, and this one only hands the
    reload to the event loop that runs the app (known once it has started)."""
    import asyncio
    import signal

    from gateway.services.admin_models import reload_on_signal

    state = app.state.gateway

    def on_hangup(signum: int, frame: Any) -> None:
        loop = state.loop
        if loop is None:
            logging.getLogger(__name__).warning("SIGHUP before the server started: ignored")
            return
        try:
            loop.call_soon_threadsafe(lambda: state.background(asyncio.ensure_future(reload_on_signal(state))))
        except RuntimeError:  # the loop has closed: the server is stopping
            logging.getLogger(__name__).warning("SIGHUP while the server stops: ignored")

    signal.signal(signal.SIGHUP, on_hangup)


def warmup(settings: Settings) -> int:
    """Import the serving code and load every model, as a start would, then exit: what a start
    converts (GGUF) lands in the cache, and an image build compiles the bytecode that serving imports."""
    import asyncio

    from gateway.app import create_app
    from gateway.backends.registry import Registry

    create_app(settings)

    async def load_all() -> None:
        registry = Registry(settings)
        try:
            for entry in registry.entries:
                await registry.ensure_loaded(entry)
        finally:
            await registry.close()

    try:
        asyncio.run(load_all())
    except GatewayError as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    config_path = args.pop("config", None)
    try:
        settings = load_settings(config_path, **args)
    except ConfigError as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 2
    if command == "config":
        import yaml

        print(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
        return 0
    if command == "warmup":
        from gateway import logs

        logs.configure(settings.server.log_level, json_lines=settings.server.json_logs)
        return warmup(settings)

    import uvicorn

    from gateway import logs
    from gateway.app import create_app
    from gateway.server import GatewayServer

    server = settings.server
    logs.configure(server.log_level, json_lines=server.json_logs)
    try:
        app = create_app(settings, settings_source=lambda: load_settings(config_path, **args))
    except ConfigError as exc:  # e.g. --otel without the otel extra
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 2
    reload_on_hangup(app)
    uvicorn_config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        access_log=server.access_log,
        log_config=None,  # our handlers (gateway.logs): request ids, JSON lines
        # after the drain (gateway.server) only connections that ended already remain
        timeout_graceful_shutdown=5,
        h11_max_incomplete_event_size=server.max_header_bytes + 1024,
    )
    GatewayServer(uvicorn_config, app.state.gateway.drain, server.drain_timeout).run()
    logs.flush()  # JSON lines are written in batches: the last ones now
    return 0
