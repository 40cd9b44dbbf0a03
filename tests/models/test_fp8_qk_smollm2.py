"""Q.K^T in fp8, the Pallas kernel's default for decode on fp8 pages (FP8_DECODE_CONFIG.fp8_qk), on
the real SmolLM2 (fp32 weights, CPU). The kernel runs only on a GPU (or, far too slowly for a
model, interpreted), so this holds the XLA attention to the same rounding: wherever the kernel would
take the batch's shape with fp8_qk (`default_config`: decode-shaped batches), q is rounded to e4m3
with the kernel's one scale (`kv_quant.quantize_q`) before attending. Both runs use the same fp8
e4m3 pages; 16 held-out prompts x 32 greedy tokens, each against transformers' greedy tokens
(fp32 KV, tests/fixtures/reference/smollm2.npz).

Measured (CPU, 2026-12-07), tokens agreeing with transformers' up to each prompt's first difference
/ prompts identical throughout:
    fp8 e4m3 pages, q in 32 bits           54.7%   6/16   (the engine's fp8 run, test_fp8_kv_smollm2: the same)
    fp8 e4m3 pages, q rounded as fp8_qk    54.7%   6/16
    the two fp8 runs against each other    87.9%  10/16
Rounding q moves some tokens but costs nothing measurable beside what fp8 pages already cost. (A
fixed q scale of 1.0, vLLM's default, measured 51.8% (5/16), and 66.2% against the run keeping q:
the per-call scale is worth its two small kernels a layer.) Asserted: the q-rounded run agrees with
transformers within 10 points of the run that keeps q, and each fp8 run agrees >= 40%.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxserve.testing.greedy import greedy_generate
from models.attention import ATTENTION_IMPLS
from models.loading import load_model
from pallas_kernels import config_for
from pallas_kernels.kv_quant import dequantize, quantize_q
from tests.conftest import load_reference

STEPS = 32
MIN_AGREEMENT = 0.4
MAX_COST = 0.10  # of agreement with transformers, for rounding q


def xla_with_q_rounded_as_the_kernel(q, k, v, cache, batch, *, sm_scale):
    if config_for(q, cache.k, batch.kv_lens).fp8_qk:
        valid = jnp.arange(q.shape[0]) < batch.cu_q_lens[batch.num_seqs[0]]
        q8, q_scale = quantize_q(q, valid)
        q = dequantize(q8, q_scale).astype(q.dtype)
    return ATTENTION_IMPLS["xla"](q, k, v, cache, batch, sm_scale=sm_scale)


def agreement(ref: list[list[int]], test: list[list[int]]) -> tuple[float, int]:
    """(share of tokens before each prompt's first difference, prompts identical throughout)."""
    agreed = [next((i for i, (a, b) in enumerate(zip(r, t)) if a != b), len(r)) for r, t in zip(ref, test)]
    return sum(agreed) / sum(map(len, ref)), sum(n == len(r) for n, r in zip(agreed, ref))


def test_q_rounded_to_fp8_costs_little_beside_fp8_pages(smollm2_folder, monkeypatch):
    monkeypatch.setitem(ATTENTION_IMPLS, "xla_q_fp8", xla_with_q_rounded_as_the_kernel)
    reference = load_reference("smollm2")
    prompts = [p.tolist() for p in reference["prompts"]]
    transformers_tokens = [list(map(int, row[:STEPS])) for row in reference["greedy"]]
    runs = {}
    for impl in ("xla", "xla_q_fp8"):
        model = load_model(smollm2_folder, dtype="float32", attention_impl=impl, progress=False)
        runs[impl] = greedy_generate(model, prompts, STEPS, kv_cache_dtype=jnp.float8_e4m3fn)
    keep, keep_identical = agreement(transformers_tokens, runs["xla"])
    rounded, rounded_identical = agreement(transformers_tokens, runs["xla_q_fp8"])
    between, between_identical = agreement(runs["xla"], runs["xla_q_fp8"])
    print(
        f"vs transformers: q kept {keep:.1%} ({keep_identical}/16), q rounded {rounded:.1%} "
        f"({rounded_identical}/16); the two fp8 runs {between:.1%} ({between_identical}/16)"
    )
    assert keep >= MIN_AGREEMENT and rounded >= MIN_AGREEMENT
    assert rounded >= keep - MAX_COST
    assert runs["xla"] != runs["xla_q_fp8"], "q was never rounded: the decode batches were not decode-shaped"
