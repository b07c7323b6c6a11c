"""Every Prometheus metric the gateway exports, declared in one place.

Each app owns its registry (two apps in one process, as in tests, do not
collide). Labels are bounded: routes are route templates, models are
configured names or "unknown". What the request path writes, on the event
loop's thread, is a LoopCounter or LoopHistogram (gateway.loop_metrics: no
lock per increment); what compute threads write is prometheus_client's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from gateway.domain import Usage
from gateway.loop_metrics import LoopCounter, LoopHistogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30)
# Between two tokens of one stream: a decode step, from under a millisecond (a fast upstream) to seconds.
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_SMALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self._models: dict[str, ModelMetrics] = {}
        self.registry = CollectorRegistry()
        self._http_and_models(self.registry)
        self._local_engine(self.registry)
        self._upstreams(self.registry)
        self._keys(self.registry)

    def _http_and_models(self, r: CollectorRegistry) -> None:
        self.requests = LoopCounter(
            "gateway_requests",
            "HTTP requests by route, model and status code.",
            ["route", "model", "status"],
            registry=r,
        )
        self.request_latency = LoopHistogram(
            "gateway_request_duration_seconds",
            "Time from request received to response complete.",
            ["route", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = LoopHistogram(
            "gateway_time_to_first_token_seconds",
            "Time from request received to the first generated token.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = LoopHistogram(
            "gateway_inter_token_latency_seconds",
            "Time between two successive tokens of one choice, as the backend hands them over.",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = LoopCounter("gateway_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generated_tokens = LoopCounter("gateway_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.model_state = Gauge(
            "gateway_model_state", "1 for the state each model is in.", ["model", "state"], registry=r
        )
        self.model_memory = Gauge(
            "gateway_model_memory_bytes",
            "A loaded local model's memory: `measured` (parameters, buffers, KV cache reservation) and "
            "`rss_delta` (the process's resident-size growth while it loaded, a cross-check).",
            ["model", "device", "kind"],
            registry=r,
        )
        self.memory_budget = Gauge(
            "gateway_memory_budget_bytes", "Memory local models may use, per device.", ["device"], registry=r
        )
        self.model_unloads = Counter(
            "gateway_model_unloads",
            "Models unloaded, by why: idle (keep_alive), room (evicted for another), admin, config.",
            ["model", "reason"],
            registry=r,
        )

    def _keys(self, r: CollectorRegistry) -> None:
        """Usage per API key (its name) and model, and the response cache."""
        self.cache_lookups = LoopCounter(
            "gateway_cache_lookups",
            "Response cache lookups by model and result (hit, miss, bypass).",
            ["model", "result"],
            registry=r,
        )

    def count_key_usage(self, totals: Callable[[], dict[tuple[str, str], list[int]]]) -> None:
        """Usage per key and model, read from `totals` ({(key, model): [requests, prompt, completion]})
        at scrape time rather than counted per request (no lock or counter call on the request path)."""
        self.registry.register(_KeyUsage(totals))

    def _local_engine(self, r: CollectorRegistry) -> None:
        """Filled by the local engines (queue and running gauges are read at scrape time, routes/ops.py)."""
        self.queue_depth = Gauge("gateway_queue_depth", "Requests waiting for a batch slot.", ["model"], registry=r)
        self.queue_capacity = Gauge(
            "gateway_queue_capacity", "Most requests that may wait; more are refused.", ["model"], registry=r
        )
        self.running_requests = Gauge(
            "gateway_running_requests", "Requests in the running batch.", ["model"], registry=r
        )
        self.queue_time = Histogram(
            "gateway_queue_time_seconds",
            "Time a request waited for the batch before its compute started.",
            ["model"],
            buckets=_SMALL_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "gateway_batch_duration_seconds",
            "Time of one forward pass: a generation step (with its sampling) or an encoder batch.",
            ["model"],
            buckets=_SMALL_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "gateway_batch_size",
            "Sequences (generation) or inputs (encoder tasks) per forward pass.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        # hit rate: rate(..._hits) / rate(..._lookups), or cached_tokens / prompt_tokens
        self.prefix_lookups = Counter(
            "gateway_prefix_cache_lookups", "Prompts looked up in the prefix cache.", ["model"], registry=r
        )
        self.prefix_hits = Counter(
            "gateway_prefix_cache_hits", "Prompts that started from a cached prefix.", ["model"], registry=r
        )
        self.prefix_prompt_tokens = Counter(
            "gateway_prefix_cache_prompt_tokens", "Prompt tokens of the prompts looked up.", ["model"], registry=r
        )
        self.prefix_cached_tokens = Counter(
            "gateway_prefix_cache_cached_tokens", "Prompt tokens served from the prefix cache.", ["model"], registry=r
        )
        self.prefix_blocks = Gauge(  # read at scrape time (services/gauges.py); occupancy = used / capacity
            "gateway_prefix_cache_blocks",
            "The prefix cache's blocks of 16 tokens: held now (used), the most it may hold (capacity).",
            ["model", "state"],
            registry=r,
        )

    def _upstreams(self, r: CollectorRegistry) -> None:
        """Filled by the upstream and routing backends, per deployment."""
        self.upstream_requests = LoopCounter(
            "gateway_upstream_requests", "Requests sent to upstream deployments.", ["deployment", "outcome"], registry=r
        )
        self.upstream_retries = LoopCounter(
            "gateway_upstream_retries", "Retries per deployment.", ["deployment"], registry=r
        )
        self.upstream_fallbacks = LoopCounter(
            "gateway_upstream_fallbacks",
            "Requests moved on to another deployment, by the one they moved to.",
            ["model", "deployment"],
            registry=r,
        )
        self.upstream_cooldown = Gauge(
            "gateway_upstream_cooldown", "1 while a deployment is cooled down.", ["deployment"], registry=r
        )
        self.upstream_latency = LoopHistogram(
            "gateway_upstream_duration_seconds",
            "Upstream response time.",
            ["deployment"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_ttfb = LoopHistogram(
            "gateway_upstream_time_to_first_byte_seconds",
            "Upstream time to first byte.",
            ["deployment"],
            buckets=_SMALL_BUCKETS,
            registry=r,
        )

    def of_model(self, model: str) -> ModelMetrics:
        """One model's per-request metrics, bound once: labels() takes a lock and builds a tuple."""
        bound = self._models.get(model)
        if bound is None:
            bound = self._models[model] = ModelMetrics(
                self.time_to_first_token.labels(model),
                self.inter_token_latency.labels(model),
                self.prompt_tokens.labels(model),
                self.generated_tokens.labels(model),
            )
        return bound

    def engine_observer(self, model: str) -> EngineMetrics:
        prefix = (self.prefix_lookups, self.prefix_hits, self.prefix_prompt_tokens, self.prefix_cached_tokens)
        return EngineMetrics(
            self.queue_time.labels(model),
            self.batch_size.labels(model),
            self.batch_duration.labels(model),
            tuple(counter.labels(model) for counter in prefix),
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ModelMetrics:
    def __init__(
        self, time_to_first_token: Any, inter_token_latency: Any, prompt_tokens: Any, generated_tokens: Any
    ) -> None:
        self.time_to_first_token = time_to_first_token
        self.inter_token_latency = inter_token_latency
        self._prompt_tokens, self._generated_tokens = prompt_tokens, generated_tokens

    def count_tokens(self, usage: Usage) -> None:
        self._prompt_tokens.inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self._generated_tokens.inc(usage.completion_tokens)


class EngineMetrics:
    """A local engine's observer (gateway.engine.runtime.observer), writing to one model's metrics.
    Called from compute threads: prometheus_client's metrics are thread-safe."""

    def __init__(self, queue_time: Any, batch_size: Any, batch_duration: Any, prefix: tuple[Any, ...]) -> None:
        self._queue_time, self._batch_size, self._batch_duration = queue_time, batch_size, batch_duration
        self._lookups, self._hits, self._prompt_tokens, self._cached_tokens = prefix

    def queued(self, seconds: float) -> None:
        self._queue_time.observe(seconds)

    def stepped(self, sequences: int, seconds: float) -> None:
        self._batch_size.observe(sequences)
        self._batch_duration.observe(seconds)

    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        self._lookups.inc()
        self._prompt_tokens.inc(prompt_tokens)
        if cached_tokens:
            self._hits.inc()
            self._cached_tokens.inc(cached_tokens)


class _KeyUsage:
    """`gateway_key_requests_total` and `gateway_key_tokens_total`, from the usage totals."""

    def __init__(self, totals: Callable[[], dict[tuple[str, str], list[int]]]) -> None:
        self.totals = totals

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        return self._families(self.totals())

    @staticmethod
    def _families(totals: dict[tuple[str, str], list[int]]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gateway_key_requests", "Requests per API key and model.", labels=["key", "model"]
        )
        tokens = CounterMetricFamily(
            "gateway_key_tokens",
            "Tokens per API key, model and kind (prompt, completion).",
            labels=["key", "model", "kind"],
        )
        for (key, model), (count, prompt, completion) in list(totals.items()):
            requests.add_metric([key, model], count)
            tokens.add_metric([key, model, "prompt"], prompt)
            tokens.add_metric([key, model, "completion"], completion)
        yield requests
        yield tokens
