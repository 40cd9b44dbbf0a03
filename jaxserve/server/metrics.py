"""Prometheus metrics (prometheus-client) with vLLM's names under the `jaxserve:` prefix.

    engine state, read at scrape time (a collector): num_requests_running, num_requests_waiting,
        kv_cache_usage_perc (a fraction in [0, 1], as vLLM's), num_preemptions_total,
        prefix_cache_queries_total and prefix_cache_hits_total (tokens, as vLLM v1's)
    per request, observed by the server as outputs arrive: time_to_first_token_seconds,
        inter_token_latency_seconds, e2e_request_latency_seconds, prompt_tokens_total,
        generation_tokens_total, request_success_total{finished_reason}

Scrapes read a few integers the engine thread writes (list lengths, a free-page count): atomic
under the GIL, at worst one step stale. Each app owns its registry, so several apps (tests) can
live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "jaxserve:"

# vLLM's bucket edges, so that dashboards written for it read ours the same way
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


class _EngineCollector:
    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        engine = self.engine
        values = (
            ("num_requests_running", "Sequences in the running batch.", engine.num_requests_running),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", engine.num_requests_waiting),
            ("kv_cache_usage_perc", "Fraction of KV cache pages in use (1 = full).", engine.kv_cache_usage),
        )
        for name, doc, value in values:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric([self.model_name], value)
            yield g
        c = CounterMetricFamily(
            PREFIX + "num_preemptions", "Sequences preempted (pages freed, recomputed later).", labels=["model_name"]
        )
        c.add_metric([self.model_name], engine.num_preemptions)
        yield c
        counters = (
            ("prefix_cache_queries", "Prefix cache queries, in queried tokens.", engine.prefix_cache_queries),
            ("prefix_cache_hits", "Prefix cache hits, in cached tokens.", engine.prefix_cache_hits),
        )
        for name, doc, value in counters:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric([self.model_name], value)
            yield c


class Metrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        label = ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(PREFIX + name, doc, label, buckets=buckets, registry=self.registry).labels(model_name)

        def counter(name, doc):
            return Counter(PREFIX + name, doc, label, registry=self.registry).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to the first output token.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Between successive outputs of a request.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to the last output token.", E2E_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._success = Counter(
            PREFIX + "request_success",
            "Finished sequences, by finish reason.",
            label + ["finished_reason"],
            registry=self.registry,
        )
        self._model_name = model_name

    def success(self, finished_reason: str) -> None:
        self._success.labels(self._model_name, finished_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
