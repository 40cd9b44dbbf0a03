"""Tensor parallelism on 8 CPU devices: the same greedy tokens at tp = 1, 2, 4 and 8, for a tiny
GQA config (kv heads repeated past tp = 2) and for SmolLM2 (9 query / 3 kv heads: zero heads
appended), through the model and through the whole engine."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.benchmarks.collectives import collectives
from jaxserve.testing.greedy import greedy_generate
from models.loading import lay_out_heads, load_model
from sharding import head_layout, make_mesh
from tests.conftest import FIXTURES, load_reference

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)
TINY = FIXTURES / "tiny" / "llama_gqa_llama3rope"


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tiny_greedy_same_at_every_tp(tp):
    ref = load_reference("llama_gqa_llama3rope")
    prompts = [p.tolist() for p in ref["prompts"]]
    model = load_model(TINY, dtype="float32", attention_impl="xla", mesh=make_mesh(tp), progress=False)
    k_proj = model.model.layers[0].self_attn.k_proj.weight[...]
    assert tuple(k_proj.sharding.spec)[:2] == (None, "tp") and len(k_proj.devices()) == tp
    assert greedy_generate(model, prompts, 32) == ref["greedy"].tolist()


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_smollm2_greedy_same_at_every_tp(tp, smollm2_folder):
    ref = load_reference("smollm2")
    prompts = [p.tolist() for p in ref["prompts"][:6]]
    model = load_model(smollm2_folder, dtype="float32", attention_impl="xla", mesh=make_mesh(tp), progress=False)
    assert (model.config.num_heads, model.config.num_kv_heads) == {2: (12, 4), 4: (12, 4), 8: (24, 8)}[tp]
    assert greedy_generate(model, prompts, 32) == ref["greedy"][:6].tolist()


def test_engine_at_tp4_serves_the_same_tokens():
    ref = load_reference("llama_gqa_llama3rope")
    llm = LLM(
        str(TINY),
        dtype="float32",
        tensor_parallel_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=256,
        num_kv_pages=64,
        progress=False,
    )
    cache = llm.engine.runner.kv_cache[0].k
    assert tuple(cache.sharding.spec)[:3] == (None, None, "tp") and len(cache.devices()) == 4
    outs = llm.generate(
        [{"prompt_token_ids": p.tolist()} for p in ref["prompts"]],
        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in outs] == ref["greedy"].tolist()
    assert llm.engine.num_compilations_since_warmup == 0


def test_estimated_fp8_scales_are_those_of_tp1_on_every_device():
    """--calculate-kv-scales under TP 4: the first prefill's amax covers every kv head (the estimate
    runs before the per-shard attention map), so each device holds the scales a TP-1 engine finds."""
    ref = load_reference("llama_gqa_llama3rope")

    def scales(tp: int) -> list[set[float]]:
        llm = LLM(
            str(TINY),
            dtype="float32",
            tensor_parallel_size=tp,
            kv_cache_dtype="fp8",
            calculate_kv_scales=True,
            max_num_seqs=8,
            max_num_batched_tokens=64,
            max_model_len=256,
            num_kv_pages=64,
            progress=False,
        )
        llm.generate([{"prompt_token_ids": ref["prompts"][0].tolist()}], SamplingParams(max_tokens=2), use_tqdm=False)
        return [
            {float(np.asarray(s.data)) for s in scale.addressable_shards}
            for layer in llm.engine.runner.kv_cache
            for scale in (layer.k_scale, layer.v_scale)
        ]

    tp4, tp1 = scales(4), scales(1)
    assert all(len(per_device) == 1 for per_device in tp4)  # one value on all 4 devices
    np.testing.assert_allclose([min(s) for s in tp4], [min(s) for s in tp1], rtol=1e-5)
    assert all(min(s) > 0 for s in tp1)


@pytest.mark.parametrize("name", ["llama_gqa_llama3rope", "llama_tied_headdim_linearrope"])  # lm_head / tied
def test_no_step_gathers_a_weight(name):
    """At tp = 2 the logits are computed split by vocabulary and then gathered ([R, V]), never the
    [D, V] weight; what a step sends between devices is bounded by its activations."""
    llm = LLM(
        str(FIXTURES / "tiny" / name),
        dtype="float32",
        tensor_parallel_size=2,
        max_num_seqs=2,
        max_num_batched_tokens=16,
        max_model_len=64,
        num_kv_pages=16,
        progress=False,
    )
    runner = llm.engine.runner
    vocab, hidden = runner.config.vocab_size, runner.config.hidden_size
    for (t, r), compiled in runner.compiled_steps.items():
        sent = collectives(compiled.model.as_text())
        assert any(c.kind == "all-reduce" for c in sent)  # the layers' row-split matmuls
        largest = max(c.nbytes for c in sent)
        assert largest <= 4 * max(t * hidden, r * vocab), [c for c in sent if c.nbytes == largest]


def test_head_layout_keeps_groups_whole():
    layout = head_layout(9, 3, 4)  # 3 query heads per kv head; pad to 4 kv heads, 12 query heads
    assert layout.q_index == tuple(range(9)) + (-1, -1, -1) and layout.kv_index == (0, 1, 2, -1)
    w = np.arange(2 * 9 * 2).reshape(2, 9, 2).astype(np.float32)
    out = lay_out_heads(w, ("embed", "heads", "head_dim"), layout)
    assert out.shape == (2, 12, 2) and np.all(out[:, 9:] == 0) and np.array_equal(out[:, :9], w)
    repeat = head_layout(32, 8, 16)
    assert repeat.kv_index == tuple(k // 2 for k in range(16))
