"""/metrics in vLLM's terms: the Grafana dashboard in docs/grafana reads only series a live server
exports (every query parsed with a PromQL parser), and the per-request families hold the right
values, counting a request once whatever its n."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxserve.outputs import CompletionOutput
from jaxserve.server.metrics import buckets_1_2_5, request_finish_reason
from tests.server.conftest import ENGINE_ENV, MAX_MODEL_LEN, MODEL_NAME, ROOT, metric_values, wait_idle

DASHBOARD = ROOT / "docs" / "grafana" / "jaxserve-dashboard.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def random_prompt(n: int) -> list[int]:
    """Token ids no earlier request sent: nothing is found in the prefix cache."""
    rng = random.Random()
    return [rng.randrange(100, 49000) for _ in range(n)]


def greedy(max_tokens: int) -> dict:
    return dict(temperature=0, max_tokens=max_tokens, extra_body={"ignore_eos": True})


def delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items()}


# -- the dashboard ------------------------------------------------------------------------------
def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of the dashboard: the panels' targets and the template variables'
    label_values(<selector>, label) queries (their selector)."""
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
            assert match, variable["definition"]
            queries.append(match.group(1))
    return queries


def selected_series(query: str) -> list[tuple[str, dict[str, str]]]:
    """(series name, label matchers) of each selector in a query, Grafana's variables filled in."""
    expr = promql_parser.parse(query.replace("$__rate_interval", "1m").replace("$model_name", MODEL_NAME))
    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {m.name: m.value for m in node.matchers.matchers}))

    promql_parser.walk(expr, visit)
    assert found, f"no series in {query!r}"
    return found


def family_of(series: str, types: dict[str, str]) -> str | None:
    """The metric family a series belongs to: a histogram's <name>_bucket/_sum/_count, a counter's
    <name>_total, a gauge's <name> (a histogram may itself end in _total: iteration_tokens_total)."""
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix) and types.get(series.removesuffix(suffix)) == "histogram":
            return series.removesuffix(suffix)
    if series.endswith("_total") and types.get(series.removesuffix("_total")) == "counter":
        return series.removesuffix("_total")
    return series if types.get(series) == "gauge" else None


def test_dashboard_is_the_scripts_output(tmp_path):
    out = tmp_path / "dashboard.json"
    subprocess.run([sys.executable, "scripts/make_grafana_dashboard.py", "--out", str(out)], cwd=ROOT, check=True)
    assert DASHBOARD.read_text() == out.read_text(), "run scripts/make_grafana_dashboard.py and commit its output"


def test_every_dashboard_query_resolves_against_a_live_scrape(client, http):
    for n in (1, 2):
        client.completions.create(model=MODEL_NAME, prompt="a few requests first", n=n, **greedy(3))
    families = list(text_string_to_metric_families(http.get("/metrics").text))
    types = {f.name: f.type for f in families}
    samples = {(s.name, s.labels.get("model_name")) for f in families for s in f.samples}

    dashboard = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"model_name", "DS_PROMETHEUS"}
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 30 and not any("vllm:" in q for q in queries)
    names = set()
    for query in queries:
        for name, matchers in selected_series(query):
            assert name.startswith("jaxserve:"), (name, query)
            assert family_of(name, types) is not None, f"{name} is no series of /metrics ({query!r})"
            if "model_name" in matchers:
                assert (name, MODEL_NAME) in samples, (name, query)
            else:  # only the model variable's own query may select every model
                assert query.startswith("jaxserve:num_requests_running"), query
            names.add(name)
    for family in (  # what vLLM's reference dashboard reads, after the prefix rename
        "e2e_request_latency_seconds_bucket",
        "time_per_output_token_seconds_bucket",
        "time_to_first_token_seconds_bucket",
        "prompt_tokens_total",
        "generation_tokens_total",
        "num_requests_running",
        "num_requests_waiting",
        "request_prompt_tokens_bucket",
        "request_generation_tokens_bucket",
        "request_success_total",
        "request_queue_time_seconds_sum",
        "request_prefill_time_seconds_sum",
        "request_decode_time_seconds_sum",
        "request_max_num_generation_tokens_sum",
    ):
        assert ("jaxserve:" + family, MODEL_NAME) in samples, family
    assert "jaxserve:gpu_cache_usage_perc" in types and "jaxserve:kv_cache_usage_perc" in names


def test_cache_config_info_names_the_kv_plan(http):
    (info,) = [f for f in text_string_to_metric_families(http.get("/metrics").text) if f.name.endswith("_info")]
    (sample,) = info.samples
    assert info.name == "jaxserve:cache_config_info" and sample.value == 1
    assert (
        sample.labels["block_size"] == "16" and sample.labels["num_gpu_blocks"] == ENGINE_ENV["JAXSERVE_NUM_KV_PAGES"]
    )
    assert sample.labels["enable_prefix_caching"] == "True" and sample.labels["cache_dtype"] == "auto"


# -- values -------------------------------------------------------------------------------------
def test_one_request_fills_each_family_once_with_its_sizes(client, http):
    prompt, max_tokens = random_prompt(20), 7
    before = wait_idle(http)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, **greedy(max_tokens))
    d = delta(before, metric_values(http))
    assert r.usage.prompt_tokens == 20 and r.usage.completion_tokens == max_tokens

    def hist(name: str, total: float, below: float, at_or_above: float) -> None:
        """One observation of `total`: the bucket under it did not move, the one holding it did."""
        name = "jaxserve:" + name
        assert (d[name + "_count"], d[name + "_sum"]) == (1, total), name
        assert d[f"{name}_bucket{{le={below}}}"] == 0 and d[f"{name}_bucket{{le={at_or_above}}}"] == 1, name

    hist("request_prompt_tokens", 20, 10.0, 20.0)
    hist("request_generation_tokens", 7, 5.0, 10.0)
    hist("request_max_num_generation_tokens", 7, 5.0, 10.0)
    hist("request_params_max_tokens", 7, 5.0, 10.0)
    assert (d["jaxserve:request_params_n_count"], d["jaxserve:request_params_n_sum"]) == (1, 1)
    assert d["jaxserve:request_params_n_bucket{le=1.0}"] == 1
    assert d["jaxserve:request_success_total{finished_reason=length}"] == 1
    assert d["jaxserve:prompt_tokens_total"] == 20 and d["jaxserve:generation_tokens_total"] == 7
    # one request alone: its prompt in one step (budget 32), then a step per token but the last
    assert d["jaxserve:iteration_tokens_total_sum"] == 20 + 7 - 1 and d["jaxserve:iteration_tokens_total_count"] == 7
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_time_per_output_token_seconds"):
        assert d[f"jaxserve:{name}_count"] == 1, name
    for name in ("inter_token_latency_seconds", "time_per_output_token_seconds"):
        assert d[f"jaxserve:{name}_count"] == max_tokens - 1, name

    t = {p: d[f"jaxserve:request_{p}_time_seconds_sum"] for p in ("queue", "prefill", "decode", "inference")}
    for p in t:
        assert d[f"jaxserve:request_{p}_time_seconds_count"] == 1 and t[p] >= 0, p
    assert t["inference"] == pytest.approx(t["prefill"] + t["decode"])
    # the engine's timeline lies within the server's: queue and prefill before the first token
    # reached the server, all of it before the last did
    assert t["queue"] + t["prefill"] <= d["jaxserve:time_to_first_token_seconds_sum"]
    assert t["queue"] + t["inference"] <= d["jaxserve:e2e_request_latency_seconds_sum"]
    assert d["jaxserve:request_time_per_output_token_seconds_sum"] == pytest.approx(t["decode"] / (max_tokens - 1))


def test_a_request_with_n_2_counts_once(client, http):
    prompt, max_tokens = random_prompt(24), 5
    before = wait_idle(http)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, n=2, **greedy(max_tokens))
    d = delta(before, metric_values(http))
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    assert sum(v for k, v in d.items() if k.startswith("jaxserve:request_success_total")) == 1
    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_inference_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
        "request_params_n",
    ):
        assert d[f"jaxserve:{name}_count"] == 1, name
    assert d["jaxserve:request_params_n_sum"] == 2
    assert d["jaxserve:request_prompt_tokens_sum"] == 24 and d["jaxserve:prompt_tokens_total"] == 24
    assert d["jaxserve:request_generation_tokens_sum"] == 2 * max_tokens  # both samples' tokens
    assert d["jaxserve:generation_tokens_total"] == 2 * max_tokens
    assert d["jaxserve:request_max_num_generation_tokens_sum"] == max_tokens  # the longest sample's


# -- pieces -------------------------------------------------------------------------------------
def test_token_buckets_are_vllms_1_2_5_series_up_to_the_context():
    assert buckets_1_2_5(MAX_MODEL_LEN) == [1, 2, 5, 10, 20, 50, 100, 200]
    assert buckets_1_2_5(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


def test_a_request_has_one_finish_reason_length_if_any_sample_was_cut():
    def outs(*reasons):
        return [CompletionOutput(i, "", [], None, None, finish_reason=r) for i, r in enumerate(reasons)]

    assert request_finish_reason(outs("stop")) == "stop"
    assert request_finish_reason(outs("stop", "length")) == "length"
    assert request_finish_reason(outs("length", "stop")) == "length"
