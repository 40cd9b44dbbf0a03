"""Writes docs/grafana/jaxserve-dashboard.json: a Grafana dashboard over jaxserve's /metrics.

    python scripts/make_grafana_dashboard.py [--out docs/grafana/jaxserve-dashboard.json]

The panels follow what vLLM's reference dashboard shows (latency percentiles, throughput,
scheduler state, KV cache, request lengths, finish reasons, queue / prefill / decode time) and add
the prefix cache, preemptions, step sizes and request parameters. Every query reads `jaxserve:`
families filtered by the `model_name` template variable (one value per served model); the
`DS_PROMETHEUS` variable picks the Prometheus data source. tests/server/test_metrics.py checks that
the JSON in the repo is this script's output and that every query resolves against a live /metrics.
Edit the panels here, run the script, commit both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "grafana" / "jaxserve-dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
WINDOW = "[$__rate_interval]"


def series(name: str) -> str:
    return f'jaxserve:{name}{{model_name="$model_name"}}'


def rate(name: str) -> str:
    return f"rate({series(name)}{WINDOW})"


def ratio(numerator: str, denominator: str) -> str:
    return f"{rate(numerator)}\n/\n{rate(denominator)}"


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, sum by(le) (rate({series(histogram + '_bucket')}{WINDOW})))"


def mean(histogram: str) -> str:
    return ratio(histogram + "_sum", histogram + "_count")


def percentiles(histogram: str, qs=(0.99, 0.95, 0.9, 0.5)) -> list[tuple[str, str]]:
    return [(quantile(q, histogram), f"P{round(q * 100)}") for q in qs] + [(mean(histogram), "Mean")]


def buckets(histogram: str) -> list[tuple[str, str]]:
    """A heatmap's query: requests per bucket over each interval."""
    return [(f"sum by(le) (increase({series(histogram + '_bucket')}{WINDOW}))", "{{le}}")]


# (title, kind, unit, description, [(query, legend)])
PANELS = [
    ("E2E request latency", "timeseries", "s", "Request arrival to its last token.",
     percentiles("e2e_request_latency_seconds")),
    ("Token throughput", "timeseries", "short", "Prompt tokens (of requests that started generating) and tokens generated, per second.",
     [(rate("prompt_tokens_total"), "Prompt tokens/s"), (rate("generation_tokens_total"), "Generation tokens/s")]),
    ("Inter-token latency", "timeseries", "s", "Between successive outputs of a request, as the server sends them.",
     percentiles("inter_token_latency_seconds")),
    ("Scheduler state", "timeseries", "short", "Sequences running in the batch, and waiting to be admitted.",
     [(series("num_requests_running"), "Running"), (series("num_requests_waiting"), "Waiting")]),
    ("Time to first token", "timeseries", "s", "Request arrival to its first token.",
     percentiles("time_to_first_token_seconds")),
    ("KV cache usage", "timeseries", "percentunit", "Fraction of KV cache pages in use.",
     [(series("kv_cache_usage_perc"), "KV cache pages in use")]),
    ("Request prompt length", "heatmap", "short", "Prompt tokens per finished request.",
     buckets("request_prompt_tokens")),
    ("Request generation length", "heatmap", "short", "Tokens generated per finished request (all its samples).",
     buckets("request_generation_tokens")),
    ("Finish reason", "timeseries", "short", "Finished requests per interval: stop (eos, stop token or string) or length.",
     [(f"sum by(finished_reason) (increase({series('request_success_total')}{WINDOW}))", "{{finished_reason}}")]),
    ("Queue time", "timeseries", "s", "Handed to the engine to first admitted by the scheduler.",
     percentiles("request_queue_time_seconds", (0.99, 0.5))),
    ("Prefill and decode time", "timeseries", "s", "Mean per request: first admitted to first token (prefill), first to last token (decode), and both (inference).",
     [(mean("request_prefill_time_seconds"), "Prefill"), (mean("request_decode_time_seconds"), "Decode"),
      (mean("request_inference_time_seconds"), "Inference")]),
    ("Max generation tokens per request", "timeseries", "short", "Tokens of each finished request's longest sample.",
     [(mean("request_max_num_generation_tokens"), "Mean"), (quantile(0.99, "request_max_num_generation_tokens"), "P99")]),
    ("Prefix cache hit rate", "timeseries", "percentunit", "Prompt tokens found in the prefix cache, of those looked up.",
     [(ratio("prefix_cache_hits_total", "prefix_cache_queries_total"), "Hit rate")]),
    ("Preemptions", "timeseries", "short", "Sequences preempted per second (pages freed, recomputed later).",
     [(rate("num_preemptions_total"), "Preemptions/s")]),
    ("Tokens per engine step", "timeseries", "short", "Tokens each engine step computed (prompt chunks and decode inputs).",
     [(mean("iteration_tokens_total"), "Mean"), (quantile(0.5, "iteration_tokens_total"), "P50"),
      (quantile(0.99, "iteration_tokens_total"), "P99")]),
    ("Request time per output token", "timeseries", "s", "Per request: decode time over its tokens after the first.",
     percentiles("request_time_per_output_token_seconds", (0.99, 0.5))),
    ("Request parameters", "timeseries", "short", "Mean n and max_tokens of finished requests.",
     [(mean("request_params_n"), "n"), (mean("request_params_max_tokens"), "max_tokens")]),
    ("Request rate", "timeseries", "reqps", "Finished requests per second.",
     [(f"sum(rate({series('request_success_total')}{WINDOW}))", "Finished")]),
]  # fmt: skip


def panel(i: int, title: str, kind: str, unit: str, description: str, queries) -> dict:
    targets = []
    for ref, (expr, legend) in zip("ABCDEFGH", queries):
        target = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "range": True, "refId": ref}
        if kind == "heatmap":
            target["format"] = "heatmap"
        targets.append(target)
    out = {
        "id": i + 1,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": targets,
    }
    if kind == "heatmap":  # the buckets are Prometheus's: Grafana should not re-bucket them
        out["options"] = {"calculate": False, "yAxis": {"unit": unit}, "cellGap": 1}
    else:
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
    return out


def dashboard() -> dict:
    model_query = "label_values(jaxserve:num_requests_running, model_name)"
    return {
        "title": "jaxserve",
        "uid": "jaxserve",
        "description": "jaxserve: an OpenAI-compatible LLM server on JAX (metrics with vLLM's names under jaxserve:)",
        "tags": ["jaxserve", "llm"],
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "templating": {
            "list": [
                {"name": "DS_PROMETHEUS", "label": "Data source", "type": "datasource", "query": "prometheus"},
                {
                    "name": "model_name",
                    "label": "Model",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "definition": model_query,
                    "query": {"query": model_query, "refId": "model_name"},
                    "refresh": 2,
                },
            ]
        },
        "panels": [panel(i, *p) for i, p in enumerate(PANELS)],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render())
    print(f"wrote {args.out} ({len(PANELS)} panels)")


if __name__ == "__main__":
    main()
