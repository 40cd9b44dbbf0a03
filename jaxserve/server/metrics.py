"""Prometheus metrics (prometheus-client) with vLLM's names, types, buckets and `model_name` label,
under the `jaxserve:` prefix: a dashboard written for vLLM reads ours once `vllm:` becomes `jaxserve:`.

    engine state, read at scrape time (_EngineCollector): num_requests_running, num_requests_waiting,
        kv_cache_usage_perc (a fraction in [0, 1]; also as vLLM's older gpu_cache_usage_perc),
        num_preemptions_total, prefix_cache_queries_total and prefix_cache_hits_total (tokens),
        cache_config_info (1, the KV plan in its labels: page size, pages, prefix caching, KV dtype)
    per step (AsyncLLM's on_step): iteration_tokens_total (tokens the step computed)
    per output, as the server receives it (RequestObserver): time_to_first_token_seconds,
        inter_token_latency_seconds (also as vLLM's older time_per_output_token_seconds),
        prompt_tokens_total, generation_tokens_total
    per request, once it finished (Metrics.finished): e2e_request_latency_seconds,
        request_success_total{finished_reason}, request_prompt_tokens, request_generation_tokens,
        request_max_num_generation_tokens, request_params_n, request_params_max_tokens, and from the
        engine's timeline (RequestMetrics) request_queue_time_seconds, request_prefill_time_seconds,
        request_decode_time_seconds, request_inference_time_seconds,
        request_time_per_output_token_seconds

A request is one engine request (one prompt), whatever its n: it counts once in every per-request
family, so that success, TTFT and e2e counts agree. (vLLM v1 fans n out into child requests and
counts each child in those, and the parent once only in request_params_n and
request_max_num_generation_tokens.) Scrapes read a few numbers of the engine's state: with the
engine in its own process, those the last step message brought (core_client.RemoteEngine); on a
thread, the integers it writes (list lengths, a free-page count), atomic under the GIL. Either way
at worst one step stale. Each app owns its registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from jaxserve.engine.core import EngineCoreOutput
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams

PREFIX = "jaxserve:"
LABELS = ["model_name"]

# vLLM's bucket edges, so that dashboards written for it read ours the same way
TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
ITL_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5),
    *(0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
REQUEST_LATENCY_BUCKETS = (  # e2e, and the queue / prefill / decode / inference parts of it
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0),
    *(30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to limit: vLLM's edges for token counts (limit: max_model_len)."""
    edges, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > limit:
                return edges
            edges.append(mantissa * scale)
        scale *= 10


def request_finish_reason(outputs: list[CompletionOutput]) -> str:
    """One reason per request, whatever its n: "length" if any sample was cut at a length limit,
    else its first sample's."""
    reasons = [c.finish_reason for c in outputs]
    return "length" if "length" in reasons else str(reasons[0])


class _EngineCollector:
    """Engine state, read at scrape time: nothing is written per step for these."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self.cache_config = engine.cache_config  # fixed at start-up

    def collect(self):
        engine = self.engine
        # vLLM's info gauge: no model_name label, the configuration in the labels
        info = GaugeMetricFamily(PREFIX + "cache_config_info", "The KV cache plan.", labels=list(self.cache_config))
        info.add_metric(list(self.cache_config.values()), 1)
        yield info
        gauges = (
            ("num_requests_running", "Sequences in the running batch.", engine.num_requests_running),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", engine.num_requests_waiting),
            ("kv_cache_usage_perc", "Fraction of KV cache pages in use (1 = full).", engine.kv_cache_usage),
            # vLLM's name before 0.9, which its reference dashboard still reads
            ("gpu_cache_usage_perc", "Fraction of KV cache pages in use (1 = full).", engine.kv_cache_usage),
        )
        for name, doc, value in gauges:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
            g.add_metric([self.model_name], value)
            yield g
        counters = (
            ("num_preemptions", "Sequences preempted (pages freed, recomputed later).", engine.num_preemptions),
            ("prefix_cache_queries", "Prefix cache queries, in queried tokens.", engine.prefix_cache_queries),
            ("prefix_cache_hits", "Prefix cache hits, in cached tokens.", engine.prefix_cache_hits),
        )
        for name, doc, value in counters:
            c = CounterMetricFamily(PREFIX + name, doc, labels=LABELS)
            c.add_metric([self.model_name], value)
            yield c


class _Renamed:
    """A metric exported once more under another name, at scrape time: vLLM's older names that
    dashboards still query, without a second observation per token."""

    def __init__(self, metric, name: str, documentation: str):
        self.metric, self.name, self.documentation = metric, name, documentation

    def collect(self):
        for family in self.metric.collect():
            renamed = Metric(self.name, self.documentation, family.type)
            renamed.samples = [s._replace(name=self.name + s.name[len(family.name) :]) for s in family.samples]
            yield renamed


class Metrics:
    def __init__(self, engine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, model_name))
        self.max_model_len = engine.max_model_len
        token_buckets = buckets_1_2_5(engine.max_model_len)

        def hist(name, doc, buckets):
            return Histogram(PREFIX + name, doc, LABELS, buckets=buckets, registry=self.registry).labels(model_name)

        def counter(name, doc):
            return Counter(PREFIX + name, doc, LABELS, registry=self.registry).labels(model_name)

        # per output
        self.ttft = hist("time_to_first_token_seconds", "Arrival to the first output token.", TTFT_BUCKETS)
        itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Between successive outputs of a request.",
            LABELS,
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.itl = itl.labels(model_name)
        self.registry.register(
            _Renamed(itl, PREFIX + "time_per_output_token_seconds", "Deprecated: inter_token_latency_seconds.")
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        # per step
        self.iteration_tokens = hist(
            "iteration_tokens_total", "Tokens computed per engine step.", ITERATION_TOKENS_BUCKETS
        )
        # per finished request
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to the last output token.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist(
            "request_queue_time_seconds", "Handed to the engine to first scheduled.", REQUEST_LATENCY_BUCKETS
        )
        self.prefill_time = hist(
            "request_prefill_time_seconds", "First scheduled to its first token.", REQUEST_LATENCY_BUCKETS
        )
        self.decode_time = hist("request_decode_time_seconds", "First token to last token.", REQUEST_LATENCY_BUCKETS)
        self.inference_time = hist(
            "request_inference_time_seconds", "First scheduled to last token.", REQUEST_LATENCY_BUCKETS
        )
        self.request_tpot = hist(
            "request_time_per_output_token_seconds",
            "Decode time per output token after the first, per request (its longest sample's).",
            ITL_BUCKETS,
        )
        self.request_prompt_tokens = hist("request_prompt_tokens", "Prompt tokens per request.", token_buckets)
        self.request_generation_tokens = hist(
            "request_generation_tokens", "Tokens generated per request (all its samples).", token_buckets
        )
        self.request_max_generation_tokens = hist(
            "request_max_num_generation_tokens", "Tokens of a request's longest sample.", token_buckets
        )
        self.request_n = hist("request_params_n", "The n request parameter.", PARAMS_N_BUCKETS)
        self.request_max_tokens = hist(
            "request_params_max_tokens",
            "The max_tokens request parameter (unset: the room left in the context).",
            token_buckets,
        )
        self._success = Counter(
            PREFIX + "request_success",
            "Finished requests, by finish reason.",
            LABELS + ["finished_reason"],
            registry=self.registry,
        )
        self._model_name = model_name

    def observer(self, params: SamplingParams, arrival: float) -> RequestObserver:
        return RequestObserver(self, params, arrival)

    def step(self, step: EngineCoreOutput) -> None:
        """One engine step's output (AsyncLLM's on_step, on the event loop)."""
        self.iteration_tokens.observe(step.num_tokens)

    def finished(self, out: RequestOutput, params: SamplingParams, e2e: float) -> None:
        """A request the engine finished (its final output), once whatever its n."""
        self._success.labels(self._model_name, request_finish_reason(out.outputs)).inc()
        self.e2e.observe(e2e)
        lengths = [len(c.token_ids) for c in out.outputs]
        num_prompt = len(out.prompt_token_ids)
        self.request_prompt_tokens.observe(num_prompt)
        self.request_generation_tokens.observe(sum(lengths))
        self.request_max_generation_tokens.observe(max(lengths))
        self.request_n.observe(params.n)
        self.request_max_tokens.observe(
            params.max_tokens if params.max_tokens is not None else self.max_model_len - num_prompt
        )
        times = out.metrics
        if times is not None:
            self.queue_time.observe(times.queue_time)
            self.prefill_time.observe(times.prefill_time)
            self.decode_time.observe(times.decode_time)
            self.inference_time.observe(times.inference_time)
            if max(lengths) > 1:  # a request of one token has no decode to divide
                self.request_tpot.observe(times.decode_time / (max(lengths) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestObserver:
    """One engine request's latencies and token counts, observed as its outputs reach the server
    (cumulative RequestOutputs: tokens are counted by difference)."""

    def __init__(self, metrics: Metrics, params: SamplingParams, arrival: float):
        self.metrics, self.params, self.arrival = metrics, params, arrival
        self.tokens = 0
        self.last: float | None = None  # when the last output that brought tokens arrived

    def output(self, out: RequestOutput, now: float) -> None:
        m = self.metrics
        n = sum(len(c.token_ids) for c in out.outputs)
        if n > self.tokens:
            if self.last is None:
                m.ttft.observe(now - self.arrival)
                m.prompt_tokens.inc(len(out.prompt_token_ids))
            else:
                m.itl.observe(now - self.last)
            m.generation_tokens.inc(n - self.tokens)
            self.tokens, self.last = n, now
        if out.finished:
            m.finished(out, self.params, now - self.arrival)
