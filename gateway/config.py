"""The one settings model: YAML config file, environment variables and CLI flags.

Precedence, highest first: CLI flags, environment (`GATEWAY_...`, nested
fields joined by `__`, e.g. `GATEWAY_SERVER__PORT=9000`), the config file,
then the defaults below. Nothing here is instantiated at import time.
"""

from __future__ import annotations

import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from gateway.domain import Task
from gateway.errors import ConfigError
from gateway.validation import format_errors


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive: seconds as a number, or `30s`, `5m`, `1h`; a negative value keeps the
    model loaded for ever (math.inf), 0 unloads it as soon as it is idle."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("keep_alive must be a number of seconds or a duration such as '5m'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError("keep_alive must be a number of seconds or a duration such as '30s', '5m', '1h'")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return math.inf if seconds < 0 else seconds


def parse_size(value: Any) -> int | None:
    """Bytes as an integer or `512MiB`, `4GiB`, `2GB` (powers of 1024 either way)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.match(str(value))
    if match is None:
        raise ValueError("a size is a number of bytes or e.g. '512MiB', '4GiB'")
    unit = (match.group(2) or "B")[0].upper()
    return int(float(match.group(1)) * 1024 ** "BKMGT".index(unit))


KeepAlive = Annotated[float | None, BeforeValidator(parse_keep_alive)]
ByteSize = Annotated[int | None, BeforeValidator(parse_size)]


class LocalBackendSpec(_Strict):
    """A model run in this process with transformers and torch."""

    kind: Literal["local"] = "local"
    source: str = Field(
        description=(
            "Where the weights are: a Hugging Face Hub id (`org/name`), a local folder, a path to a "
            "`.gguf` file, or `pkg:<python package>/<path inside it>` for weights shipped in an "
            "installed Python package."
        )
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `source` when `source` is a folder.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    device_map: str | None = Field(
        None, description="Passed to accelerate (e.g. `auto`) to spread a large model over several GPUs."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="`auto` picks bfloat16 where the hardware runs it fast, float32 otherwise."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint. Off unless set.")
    max_batch_size: int = Field(
        16,
        ge=1,
        description="Generation: sequences decoded together (KV cache slots); other tasks: inputs per forward pass.",
    )
    max_queue: int = Field(
        64, ge=1, description="Requests waiting for the batch; more get 429 (HF: `overloaded`) with a Retry-After."
    )
    max_wait_ms: float = Field(
        5.0, ge=0, description="Encoder tasks: how long a request may wait for others to share its batch."
    )
    prefill_chunk_tokens: int = Field(
        256, ge=16, description="Generation: most prompt tokens prefilled per step, so running streams keep flowing."
    )
    max_total_tokens: int | None = Field(
        None,
        ge=16,
        description=(
            "Generation: longest sequence (prompt + output) a batch slot holds; default the model's context, "
            "at most 8192. The KV cache never exceeds max_batch_size x this."
        ),
    )
    fused: bool = Field(
        True,
        description=(
            "Generation: run Llama-family models (Llama, Mistral, Qwen2/3, SmolLM) on the gateway's fused forward "
            "pass; false, or another architecture, uses the model's own transformers forward."
        ),
    )
    compile: bool = Field(
        False,
        description=(
            "Generation, fused path: run decode steps through torch.compile (inductor; needs a C++ compiler), "
            "compiled when the model loads; if compiling fails the model serves with the eager step."
        ),
    )
    prefix_cache: bool = Field(
        True,
        description=(
            "Generation: keep the keys and values of computed prompt prefixes and reuse them for later prompts "
            "that start with the same tokens (multi-turn chats, shared system prompts)."
        ),
    )
    prefix_cache_tokens: int | None = Field(
        None,
        ge=16,
        description=(
            "Generation: tokens the prefix cache holds (least recently used go first); default a quarter of "
            "max_batch_size x max_total_tokens. Counted in the model's memory like the KV cache."
        ),
    )
    max_input_tokens: int | None = Field(None, ge=1, description="Longest prompt accepted (default: model limit).")
    default_max_tokens: int = Field(
        512, ge=1, description="Tokens generated when a request does not say (capped by the context length)."
    )
    pooling: Literal["auto", "mean", "cls", "max", "last"] = Field(
        "auto", description="Embeddings: pooling; `auto` reads the sentence-transformers config."
    )
    normalize: bool | None = Field(
        None, description="Embeddings: L2-normalise; unset reads the sentence-transformers config."
    )
    adapter: str | None = Field(
        None,
        description=(
            "A PEFT LoRA adapter folder applied to `source` (the base model): the model is the base with the "
            "adapter merged into its weights, served under this model's own name."
        ),
    )


class FakeBackendSpec(_Strict):
    """A deterministic backend with no model, for tests and dry runs."""

    kind: Literal["fake"] = "fake"
    delay_ms: float = Field(0.0, ge=0, description="Sleep between streamed tokens.")
    dimensions: int = Field(8, ge=1, description="Embedding size.")


class UpstreamTimeouts(_Strict):
    connect: float = Field(5.0, gt=0, description="Seconds to open a connection.")
    per_try: float = Field(
        60.0, gt=0, description="Seconds one attempt may take; for streams, the longest gap between two chunks."
    )
    total: float = Field(120.0, gt=0, description="Deadline for a request including every retry, backoff and fallback.")


class UpstreamRetry(_Strict):
    max_retries: int = Field(
        2, ge=0, description="Retries after the first attempt (connect errors, timeouts, 429, 502-504)."
    )
    backoff_base: float = Field(0.1, ge=0, description="First backoff in seconds; doubles each retry, with jitter.")
    backoff_max: float = Field(5.0, ge=0, description="Longest backoff between two attempts.")
    max_retry_after: float = Field(
        10.0, ge=0, description="A Retry-After longer than this is not waited for: the client gets it instead."
    )


class UpstreamBackendSpec(_Strict):
    """Another server reached over HTTP: OpenAI-compatible, TGI's native API, or an HF per-task endpoint."""

    kind: Literal["upstream"] = "upstream"
    url: str = Field(
        description=(
            "openai: the base URL ending in `/v1`; tgi: the server root (`/generate` is appended); "
            "hf: the model URL itself (requests are posted to it)."
        )
    )
    dialect: Literal["openai", "tgi", "hf"] = Field("openai", description="The API the upstream speaks.")
    model: str | None = Field(None, description="Model name sent upstream (openai dialect); default: the public name.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the upstream's bearer token (never put the token here)."
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Extra non-secret headers sent upstream.")
    timeouts: UpstreamTimeouts = Field(default_factory=UpstreamTimeouts)
    retry: UpstreamRetry = Field(default_factory=UpstreamRetry)
    max_connections: int = Field(100, ge=1, description="Pooled keep-alive connections to this upstream.")
    health_path: str | None = Field(
        None,
        description="GET path probed while cooled down; default `/models` (openai), `/health` (tgi), a small real POST (hf).",
    )

    @field_validator("url")
    @classmethod
    def _plain_http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http:// or https:// URL with a host")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("url must not hold credentials, a query or a fragment (use api_key_env for the key)")
        return url.rstrip("/")


BackendSpec = Annotated[LocalBackendSpec | FakeBackendSpec | UpstreamBackendSpec, Field(discriminator="kind")]


class DeploymentSpec(_Strict):
    """One way to serve a public model name: a local model or an upstream."""

    name: str = Field(min_length=1, description="Names the deployment in `fallback`, logs and metrics.")
    backend: BackendSpec


class CooldownSpec(_Strict):
    failures: int = Field(3, ge=1, description="Consecutive failures that take a deployment out of rotation.")
    seconds: float = Field(30.0, ge=0, description="Least time a failing deployment stays out.")
    probe_interval: float = Field(5.0, gt=0, description="After `seconds`, how often it is probed until it answers.")


class RoutingSpec(_Strict):
    strategy: Literal["round_robin", "least_outstanding"] = Field(
        "round_robin", description="How requests are spread over the deployments not listed in `fallback`."
    )
    fallback: list[str] = Field(
        default_factory=list, description="Deployments tried in this order once the balanced ones have failed."
    )
    cooldown: CooldownSpec = Field(default_factory=CooldownSpec)


class ModelSpec(_Strict):
    name: str = Field(description="Public model name clients use.")
    aliases: list[str] = Field(default_factory=list, description="Other names for the same model.")
    task: Task | None = Field(
        None, description="What the model does; inferred from its config when unset (as `pipeline` does)."
    )
    backend: BackendSpec | None = Field(None, description="How the model is served (or give `deployments`).")
    deployments: list[DeploymentSpec] | None = Field(
        None, min_length=1, description="Several ways to serve this name, balanced and with fallback."
    )
    routing: RoutingSpec = Field(default_factory=RoutingSpec, description="Used with `deployments`.")
    preload: bool = Field(True, description="Load at start-up (and gate /ready on it); false loads on first use.")
    default: bool = Field(
        False, description="Serve requests that name no known model (TGI-style routes, `model: tgi`)."
    )
    keep_alive: KeepAlive = Field(
        None,
        description=(
            "Local models: unload after this long unused (seconds or `30s`, `5m`, `1h`; negative: never); "
            "unset takes `runtime.keep_alive`. A request's own `keep_alive` overrides it, as in Ollama."
        ),
    )

    @model_validator(mode="after")
    def _backend_or_deployments(self) -> ModelSpec:
        if (self.backend is None) == (self.deployments is None):
            raise ValueError(f"model '{self.name}': give exactly one of `backend` or `deployments`")
        names = [d.name for d in self.deployments or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"model '{self.name}': deployment names must be unique")
        unknown = [n for n in self.routing.fallback if n not in names]
        if unknown:
            raise ValueError(f"model '{self.name}': fallback names unknown deployments {unknown}")
        return self


class ServerSettings(_Strict):
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Logging level.")
    api_keys: list[str] = Field(
        default_factory=list, description="Bearer tokens accepted; empty means no authentication."
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    sse_ping_seconds: float = Field(
        0.0, ge=0, description="Interval of SSE comment pings on idle streams; 0 disables them."
    )
    access_log: bool = Field(
        True,
        description="One log line per request from uvicorn; costs about a sixth of the throughput in front of a fast upstream.",
    )
    # Teams (docs/security.md): keys, limits, host check, CORS, drain, logs, cache.
    key_db: str | None = Field(
        None,
        description="SQLite file of the keys managed by /admin/keys (created if missing); unset: config keys only.",
    )
    redis_url: str | None = Field(
        None, description="Redis for per-key limits and the response cache shared by replicas (`redis://host:6379/0`)."
    )
    metrics_public: bool = Field(False, description="Serve /metrics without a key (else it needs the `metrics` scope).")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="`Host` names answered (`*`: any); unset: loopback names when bound to loopback, any otherwise.",
    )
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS (`*`: any); unset: off.")
    cors_methods: list[str] = Field(default_factory=lambda: ["GET", "POST"], description="Methods CORS allows.")
    cors_headers: list[str] = Field(
        default_factory=lambda: ["authorization", "content-type", "x-request-id"], description="Headers CORS allows."
    )
    drain_timeout: float = Field(
        30.0, ge=0, description="On SIGTERM: seconds in-flight requests and streams get to finish."
    )
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="Largest total size of the request headers.")
    max_json_depth: int = Field(64, ge=2, description="Deepest nesting of the JSON body.")
    max_messages: int = Field(2048, ge=1, description="Most chat messages in one request.")
    max_n: int = Field(16, ge=1, description="Largest `n` (choices per prompt; the OpenAI schema allows 16).")
    max_stop: int = Field(4, ge=1, description="Most stop sequences (OpenAI and TGI allow 4).")
    max_logit_bias: int = Field(1024, ge=1, description="Most `logit_bias` entries.")
    json_logs: bool = Field(False, description="Logs as JSON lines, one per request with its figures.")
    log_content: bool = Field(False, description="Also log prompts and outputs (JSON logs); off: never logged.")
    response_cache: bool = Field(
        False, description="Cache answers to deterministic requests (temperature 0, a seed, HF tasks)."
    )
    response_cache_entries: int = Field(1024, ge=1, description="Answers kept by the in-memory cache (LRU).")
    response_cache_ttl: float = Field(600.0, gt=0, description="Seconds a cached answer is served.")
    otel: bool = Field(False, description="OpenTelemetry traces (needs the `otel` extra; exporter from OTEL_* env).")


class RuntimeSettings(_Strict):
    """Models at run time: how long idle local models stay loaded, and the memory they may use."""

    keep_alive: KeepAlive = Field(
        math.inf,
        description="Default `keep_alive` of local models (negative or unset: loaded until unloaded or evicted).",
    )
    memory_share: float = Field(
        0.8, gt=0, le=1, description="Share of the machine's RAM (and of each GPU's memory) local models may use."
    )
    cpu_memory: ByteSize = Field(
        None, description="Memory local models on the CPU may use; default memory_share of RAM."
    )
    gpu_memory: ByteSize = Field(
        None, description="Memory local models may use on each GPU; default memory_share of its memory."
    )
    unload_timeout: float = Field(
        60.0, ge=0, description="Longest wait for a model's in-flight requests before it is unloaded anyway."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid")

    server: ServerSettings = Field(default_factory=ServerSettings)
    models: list[ModelSpec] = Field(default_factory=list, description="The models this gateway serves.")
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    cache_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gateway",
        description="Where converted checkpoints (e.g. from GGUF) are kept between restarts.",
    )

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        seen: set[str] = set()
        for spec in models:
            for name in (spec.name, *spec.aliases):
                if name in seen:
                    raise ValueError(f"model name or alias '{name}' is used twice")
                seen.add(name)
        return models

    @model_validator(mode="after")
    def _one_default_per_task(self) -> Settings:
        defaults = [m.name for m in self.models if m.default]
        if len(defaults) > 1:
            raise ValueError(f"only one model may be `default: true`, got {defaults}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings merges file, environment and CLI itself, so that the environment
        # overrides the file field by field; the merged result arrives as init kwargs.
        return (init_settings,)


def default_config_text() -> str:
    return resources.files("gateway").joinpath("default_config.yaml").read_text()


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _env_overrides() -> dict[str, Any]:
    """`GATEWAY_...` environment values as a nested dict.

    Variables that name no setting are left alone rather than refused: Kubernetes injects
    `GATEWAY_PORT=tcp://...` and friends into every pod next to a Service called `gateway`.
    """
    try:
        return EnvSettingsSource(Settings)()
    except SettingsError as exc:
        raise ConfigError(
            f"invalid configuration: {exc} (GATEWAY_* environment); lists and mappings are JSON, "
            "e.g. GATEWAY_SERVER__API_KEYS='[\"k1\"]'"
        ) from None


def _describe(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    issues = format_errors(errors, root=None, unknown_msg="unknown setting", strip_value_error=False, brackets=True)
    lines = []
    for error, issue in zip(errors, issues, strict=True):
        got = "" if issue.kind == "missing" else f" (got {error['input']!r:.80})"
        lines.append(f"  {issue.param or '(top level)'}: {issue.message}{got}")
    return "\n".join(lines)


def load_settings(config_file: str | Path | None = None, **cli: Any) -> Settings:
    """Build settings from a YAML file (or the embedded default), env and CLI overrides.

    `cli` keys are dotted paths (`server.port`), values of None are skipped.
    Any invalid input is a ConfigError whose message names the setting, never a traceback.
    """
    origin = f"config file {config_file}" if config_file else "the embedded default config"
    try:
        if config_file:
            with open(config_file) as stream:  # a stream, so YAML errors name the file
                data = yaml.safe_load(stream) or {}
        else:
            data = yaml.safe_load(default_config_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read the config file: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin} must hold a mapping at its top level")
    data = _deep_merge(data, _env_overrides())
    for dotted, value in cli.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(
            f"invalid configuration ({origin}, GATEWAY_* environment and flags):\n{_describe(exc)}"
        ) from None
