"""Structured outputs in the engine: the bitmask on the device, grammars compiled and cached, and
constrained generation with the embedded SmolLM2 through LLM (json schema, regex, choice, n > 1,
preemption), compiling nothing after warm-up."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams, StructuredOutputsParams
from jaxserve.engine.sampler import apply_bitmask
from jaxserve.engine.structured_outputs import GrammarCompiler, Matchers

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_bitmask_unpacks_on_device_and_masks_the_padding():
    vocab = 70  # 3 words; bits 70..95 of the last word are not tokens
    logits = jnp.zeros((3, vocab))
    words = np.full((3, 3), -1, np.int32)
    words[1] = 0
    words[1, 1] = 1 << 3  # token 35 only
    words[2, 0] = 0b101  # tokens 0 and 2, and every token of words 1 and 2
    out = np.asarray(apply_bitmask(logits, jnp.asarray(words)))
    assert np.isfinite(out[0]).all()
    assert np.flatnonzero(np.isfinite(out[1])).tolist() == [35]
    assert np.flatnonzero(np.isfinite(out[2])).tolist() == [0, 2, *range(32, 70)]


def test_spec_needs_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs.kind == "regex"


@pytest.fixture(scope="module")
def compiler(smollm2_folder):
    from jaxserve.tokenizer import load_tokenizer

    return GrammarCompiler(load_tokenizer(smollm2_folder), vocab_size=49152 + 64)  # padded logits


@pytest.mark.parametrize(
    "spec, problem",
    [
        (StructuredOutputsParams(json={"type": "nonsense"}), "nonsense"),
        (StructuredOutputsParams(json="{not json"), "not valid JSON"),
        (StructuredOutputsParams(regex="[a-"), "regex"),
        (StructuredOutputsParams(grammar="start: undefined_rule"), "undefined_rule"),
    ],
)
def test_invalid_grammars_name_the_problem(compiler, spec, problem):
    with pytest.raises(ValueError, match=problem):
        compiler.compile(spec)


def test_grammars_are_cached_and_masks_cover_the_padded_vocabulary(compiler):
    spec = StructuredOutputsParams(choice=["yes", "no"])
    before = compiler.cache_size
    compiler.compile(StructuredOutputsParams(choice=["yes", "no"]))
    compiler.compile(spec)
    assert compiler.cache_size == before + 1
    matchers = Matchers(compiler)
    matchers.add(["a", "b"], spec)
    mask = matchers.bitmask(["x", "a", "b"], [True, True, False])  # b does not sample this step
    assert mask.seqs.tolist() == [1] and mask.words.shape == (1, (49152 + 64) // 32)
    allowed = [t for t in range(49152 + 64) if mask.words[0, t // 32] >> (t % 32) & 1]
    assert allowed and max(allowed) < 49152
    tok = compiler._hf_tokenizer
    ids = tok("yes", add_special_tokens=False)["input_ids"]
    assert matchers.accept(["a"] * len(ids), ids, list(range(len(ids)))) == ["a"]  # complete: ends it


@pytest.fixture(scope="module")
def llm(smollm2_folder):
    return LLM(
        str(smollm2_folder),
        dtype="float32",
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=512,
        num_kv_pages=160,
        progress=False,
    )


def _prompt(llm, text):
    tok = llm.get_tokenizer()
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


def test_constrained_outputs_match_and_compile_nothing(llm):
    p = _prompt(llm, "Describe a person as JSON.")
    greedy = dict(temperature=0, max_tokens=60)
    params = [
        SamplingParams(**greedy, structured_outputs=StructuredOutputsParams(json=PERSON)),
        SamplingParams(temperature=1.0, seed=3, max_tokens=60, structured_outputs=StructuredOutputsParams(json=PERSON)),
        SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=40, structured_outputs={"regex": r"[0-9]{3}-[a-z]{2}"}),
        SamplingParams(temperature=1.0, seed=5, max_tokens=8, structured_outputs={"choice": ["red", "green", "blue"]}),
        SamplingParams(**greedy, structured_outputs={"json_object": True}),
        SamplingParams(temperature=0, max_tokens=10),  # unconstrained beside them
    ]
    outs = llm.generate([p] * len(params), params, use_tqdm=False)
    for out in outs[:2]:
        jsonschema.validate(json.loads(out.outputs[0].text), PERSON)
        assert out.outputs[0].finish_reason == "stop"
    assert len(outs[2].outputs) == 2
    for c in outs[2].outputs:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", c.text), c.text
    assert outs[3].outputs[0].text in {"red", "green", "blue"}
    obj = outs[4].outputs[0]  # any object: free strings may run past max_tokens
    assert obj.text.startswith("{") and (obj.finish_reason == "length" or isinstance(json.loads(obj.text), dict))
    assert llm.engine.num_compilations_since_warmup == 0


def test_invalid_schema_raises_before_queueing(llm):
    with pytest.raises(ValueError, match="invalid structured output"):
        llm.generate(["hi"], SamplingParams(structured_outputs={"json": {"type": "nonsense"}}), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_preempted_request_resumes_its_grammar_once(llm):
    """A constrained request preempted mid-way recomputes its tokens without advancing its
    matcher again: the output is the one it gives when left alone."""
    p = _prompt(llm, "Describe a person as JSON.")
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=PERSON))
    (alone,) = llm.generate([p], params, use_tqdm=False)
    engine = llm.engine
    engine.add_request("pre", p, params)
    final, steps = None, 0
    while final is None:
        for out in engine.step():
            if out.finished:
                final = out
        steps += 1
        if steps == 8:  # a few tokens out: preempt it (its pages freed, recomputed later)
            sched = engine.scheduler
            (victim,) = sched.running
            sched.running.remove(victim)
            sched._preempt(victim)
            # As after a preemption inside schedule(): the step in flight is read back before the
            # request is admitted again (with the token it had pending).
            engine.block_until_idle()
    assert victim.num_preemptions == 1
    assert final.outputs[0].text == alone.outputs[0].text
    engine.block_until_idle()


def test_a_failed_sampler_launch_recomputes_and_the_grammar_holds(llm):
    """The sampler launched after the masks fails once (its model program ran): every request
    recomputes, and the constrained one ends as it does undisturbed."""
    from jaxserve.engine.recovery import StepFailed

    p = _prompt(llm, "Describe a person as JSON.")
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=PERSON))
    (alone,) = llm.generate([p], params, use_tqdm=False)
    engine = llm.engine
    launch, fired = engine.runner.launch_sampler, []

    def failing(step, bitmask):
        if len(fired) == 0 and engine.scheduler.requests["f"].output_token_ids:
            fired.append(1)
            raise RuntimeError("injected: sampler launch failed")
        return launch(step, bitmask)

    engine.runner.launch_sampler = failing
    try:
        engine.add_request("f", p, params)
        final = None
        while final is None:
            try:
                outs = engine.step()
            except StepFailed as e:
                assert e.failed == []
                continue
            final = next((o for o in outs if o.finished), None)
    finally:
        engine.runner.launch_sampler = launch
    assert fired and final.outputs[0].text == alone.outputs[0].text
    engine.block_until_idle()
