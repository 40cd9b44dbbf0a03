"""The engine on the real SmolLM2 in fp32 against transformers (fixtures), one warm-up for all:
16 prompts arriving at staggered steps, chunked and batched, give transformers' greedy tokens;
nothing compiles after warm-up; seeded sampling does not depend on the crowd; logprobs match
the model's own; stop strings and UTF-8 hold across token boundaries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.llm import LLM
from jaxserve.sampling_params import SamplingParams
from tests.conftest import load_reference
from tests.models.runner import packed_logits


def force_token_7(logits):
    return jnp.full_like(logits, -1e9).at[:, 7].set(0.0)


@pytest.fixture(scope="module")
def llm(smollm2_folder):
    return LLM(
        str(smollm2_folder),
        dtype="float32",
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=512,
        num_kv_pages=160,
        logits_processors={"force7": force_token_7},
        progress=False,
    )


@pytest.fixture(autouse=True)
def no_leaks(llm):
    yield
    e = llm.engine
    assert not e.has_unfinished_requests() and e.scheduler.kv.num_free_pages == e.scheduler.kv.num_pages


def test_staggered_greedy_matches_transformers_and_compiles_nothing(llm):
    ref = load_reference("smollm2")
    engine: LLMEngine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=ref["greedy"].shape[1], ignore_eos=True)
    final, step = {}, 0
    while len(final) < len(ref["prompts"]):
        if step < 16:  # one new prompt per step while others decode (long ones prefill in chunks)
            engine.add_request(f"p{step}", {"prompt_token_ids": ref["prompts"][step].tolist()}, params)
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
        step += 1
    for i in range(16):
        assert final[f"p{i}"].outputs[0].token_ids == ref["greedy"][i].tolist(), f"prompt {i}"
    assert engine.num_compilations_since_warmup == 0


def test_seeded_request_alone_and_in_a_crowd(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = llm.generate("Once upon a time", seeded, use_tqdm=False)[0].outputs[0].token_ids
    crowd_prompts = ["The weather today", "List three fruits:", "Once upon a time", "def add(a, b):", "Hello"]
    crowd_params = [SamplingParams(temperature=0.8, max_tokens=30)] * 2 + [seeded] + [SamplingParams(temperature=0)] * 2
    crowd = llm.generate(crowd_prompts, crowd_params, use_tqdm=False)[2].outputs[0].token_ids
    assert alone == crowd
    assert llm.engine.num_compilations_since_warmup == 0


def test_logprobs_and_prompt_logprobs_are_the_models(llm):
    prompt = "The capital of France is"
    out = llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=3, logprobs=5, prompt_logprobs=2), use_tqdm=False
    )[0]
    ids = out.prompt_token_ids
    runner = llm.engine.runner
    logits = packed_logits(nnx.merge(runner.graphdef, runner.state), [ids + out.outputs[0].token_ids[:2]])
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        assert entry[ids[pos]].logprob == pytest.approx(logp[pos - 1, ids[pos]], abs=1e-4)
        assert len(entry) in (2, 3)  # the prompt token plus the top 2 (which may include it)
    first = out.outputs[0].logprobs[0]
    chosen = out.outputs[0].token_ids[0]
    assert first[chosen].rank == 1 and first[chosen].logprob == pytest.approx(logp[len(ids) - 1].max(), abs=1e-4)
    assert len(first) == 5 and out.outputs[0].cumulative_logprob < 0


def test_stop_strings_across_token_boundaries(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0]
    text = full.text
    stop = text[3:9]  # a stop string likely to span tokens
    out = llm.generate(
        "The capital of France is",
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.text == text[: text.index(stop)] and out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < len(full.token_ids)


def test_n_samples_logit_bias_min_tokens_and_processors(llm):
    tok = llm.get_tokenizer()
    outs = llm.generate("Once upon a time", SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12), use_tqdm=False)
    texts = [c.text for c in outs[0].outputs]
    assert len(texts) == 3 and len(set(texts)) > 1
    comma = tok.convert_tokens_to_ids(",")
    biased = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, logit_bias={comma: 100}), use_tqdm=False)
    assert biased[0].outputs[0].token_ids == [comma] * 4
    eos = tok.eos_token_id
    forced_eos = SamplingParams(temperature=0, max_tokens=6, min_tokens=3, logit_bias={eos: 100})
    out = llm.generate("Hi", forced_eos, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:3] != [eos] * 3 and out.token_ids[3] == eos and len(out.token_ids) == 4
    mixed = llm.generate(
        ["a", "b"],
        [
            SamplingParams(temperature=0, max_tokens=3, logits_processors=["force7"]),
            SamplingParams(temperature=0, max_tokens=3),
        ],
        use_tqdm=False,
    )
    assert mixed[0].outputs[0].token_ids == [7, 7, 7] and mixed[1].outputs[0].token_ids != [7, 7, 7]
    chat = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=16),
        use_tqdm=False,
    )
    assert "Paris" in chat[0].outputs[0].text


def test_detokenizer_never_breaks_utf8(smollm2_folder):
    from jaxserve.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_folder)
    text = "naïve 🙂 café — 日本語 done"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, stop=["日本"])
    shown = []
    for t in ids:
        if detok.push(t):
            break
        shown.append(detok.visible_text(False))
    assert all("\ufffd" not in s for s in shown)
    assert all(text.startswith(s) for s in shown)
    assert detok.text == "naïve 🙂 café — "


def test_bad_requests_raise_and_queue_nothing(llm):
    with pytest.raises(ValueError, match="maximum context length is 512 tokens"):
        llm.generate(["fine", "x " * 600], SamplingParams(max_tokens=8), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_a_request_on_a_cached_500_token_prefix_gives_the_cold_runs_tokens(llm):
    # fp32: the prefix's KV computed for another request (other chunks, other batch) gives the
    # tokens of a run that computes it all.
    tok, engine = llm.get_tokenizer(), llm.engine
    text = " ".join(f"Fact {i}: {i} times {i} is {i * i}." for i in range(80))
    prefix = tok(text)["input_ids"][:500]
    first = prefix + tok(" Why?")["input_ids"]
    second = prefix + tok(" So, in short")["input_ids"][:4]
    assert first[500] != second[500] and len(second) + 8 <= 512
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.reset_prefix_cache()
    cold = llm.generate({"prompt_token_ids": second}, params, use_tqdm=False)[0]
    engine.reset_prefix_cache()
    llm.generate({"prompt_token_ids": first}, params, use_tqdm=False)
    warm = llm.generate({"prompt_token_ids": second}, params, use_tqdm=False)[0]
    assert cold.num_cached_tokens == 0 and warm.num_cached_tokens == 496  # 31 pages of 16
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
