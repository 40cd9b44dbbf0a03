"""Output kinds (vLLM's RequestOutputKind): a request's outputs are snapshots (CUMULATIVE), what is
new since the last one (DELTA), or one final output (FINAL_ONLY); all three tell the same story."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from jaxserve.engine.core import EngineCoreOutput
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.engine.runner import TokenLogprobs
from jaxserve.sampling_params import RequestOutputKind, SamplingParams
from jaxserve.tokenizer import load_tokenizer

TEXTS = [" The capital of France is Paris. It is big.", " Hello world, héllo wörld! END and more"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return load_tokenizer(smollm2_folder)


def replay(tokenizer, kind: RequestOutputKind) -> list:
    """Two samples of one request (n=2, logprobs, a stop string) fed token by token, the second
    sample one step behind; returns every RequestOutput emitted."""
    params = SamplingParams(n=2, logprobs=1, prompt_logprobs=0, stop=["END"], max_tokens=100, output_kind=kind)
    proc = OutputProcessor(tokenizer)
    proc.add("req", "prompt", [1, 2, 3], params, ["req#0", "req#1"])
    streams = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    lp = lambda tok: TokenLogprobs(tok, -0.5, 1, np.array([tok]), np.array([-0.5]))  # noqa: E731
    emitted = []
    for step in range(max(map(len, streams)) + 1):
        ids, toks = [], []
        for i, stream in enumerate(streams):
            if 0 <= step - i < len(stream):
                ids.append(f"req#{i}")
                toks.append(stream[step - i])
        last = {f"req#{i}": ("length", None) for i, s in enumerate(streams) if step - i == len(s) - 1}
        prompt_lp = {"req#0": [(1, lp(2)), (2, lp(3))]} if step == 0 else {}
        out = EngineCoreOutput(ids, toks, last, {r: lp(t) for r, t in zip(ids, toks)}, prompt_lp)
        emitted += proc.process(out)[0]
    assert not proc.has_unfinished
    return emitted


def test_deltas_add_up_to_the_cumulative_and_final_only_is_the_last_snapshot(tokenizer):
    cumulative = replay(tokenizer, RequestOutputKind.CUMULATIVE)
    final = cumulative[-1]
    assert final.finished and len(cumulative) > 10
    assert [c.finish_reason for c in final.outputs] == ["length", "stop"]  # the second met "END"
    assert final.outputs[1].text.endswith("wörld! ")

    (only,) = replay(tokenizer, RequestOutputKind.FINAL_ONLY)
    assert msgspec.structs.replace(only, metrics=None) == msgspec.structs.replace(
        final, metrics=None
    )  # timestamps differ

    deltas = replay(tokenizer, RequestOutputKind.DELTA)
    assert len(deltas) == len(cumulative) and deltas[-1].finished
    assert deltas[0].prompt_logprobs == final.prompt_logprobs
    assert all(d.prompt_logprobs is None for d in deltas[1:])
    for c in final.outputs:
        parts = [o for d in deltas for o in d.outputs if o.index == c.index]
        assert "".join(o.text for o in parts) == c.text
        assert [t for o in parts for t in o.token_ids] == c.token_ids
        assert [p for o in parts for p in o.logprobs] == c.logprobs
        assert [o.finish_reason for o in parts] == [None] * (len(parts) - 1) + [c.finish_reason]
        assert parts[-1].cumulative_logprob == c.cumulative_logprob
    # a delta names only the samples with something new: the first step has sample 0 alone
    assert [o.index for o in deltas[0].outputs] == [0]


def test_cumulative_snapshots_do_not_change_after_they_are_emitted(tokenizer):
    outs = replay(tokenizer, RequestOutputKind.CUMULATIVE)
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and lengths[0] == 1


def test_output_kind_is_validated():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind=1)


def test_a_lone_delta_sample_streams_what_the_cumulative_snapshots_tell(tokenizer):
    """n=1, DELTA, no logprobs: after its first output each token's output is built on the spot
    (process's shortcut); its deltas still add up to the CUMULATIVE story, stop string included."""
    stream = tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]
    runs = {}
    for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA):
        proc = OutputProcessor(tokenizer)
        params = SamplingParams(prompt_logprobs=0, stop=["END"], max_tokens=100, output_kind=kind)
        proc.add("req", "prompt", [1, 2, 3], params, ["req"])
        lp = TokenLogprobs(2, -0.5, 1, np.array([2]), np.array([-0.5]))
        emitted = []
        for step, token in enumerate(stream):
            prompt_lp = {"req": [(1, lp)]} if step == 0 else {}
            outs, stopped = proc.process(EngineCoreOutput(["req"], [token], {}, {}, prompt_lp, {"req": 3}))
            emitted += outs
            if stopped:
                break
        runs[kind] = emitted
    final, deltas = runs[RequestOutputKind.CUMULATIVE][-1], runs[RequestOutputKind.DELTA]
    assert len(deltas) == len(runs[RequestOutputKind.CUMULATIVE]) > 5 and deltas[-1].finished
    assert (final.outputs[0].finish_reason, final.outputs[0].stop_reason) == ("stop", "END")
    assert "".join(d.outputs[0].text for d in deltas) == final.outputs[0].text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == final.outputs[0].token_ids
    assert deltas[0].prompt_logprobs == final.prompt_logprobs and all(d.prompt_logprobs is None for d in deltas[1:])
    for d in deltas[1:-1]:
        assert len(d.outputs[0].token_ids) == 1 and d.num_cached_tokens == 3 and d.metrics is None
        c = d.outputs[0]
        assert (c.cumulative_logprob, c.logprobs, c.finish_reason) == (None, None, None)


def test_outputs_come_in_the_order_of_each_familys_first_sample_in_the_step():
    """Streamed families (n=1 DELTA) are emitted as their rows are read, the others once all
    their samples are in: either way in the order of the family's first sample in the step."""
    proc = OutputProcessor()
    delta, final_only = RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY
    proc.add("a", None, [1], SamplingParams(max_tokens=9, output_kind=delta), ["a"])
    proc.add("b", None, [1], SamplingParams(n=2, max_tokens=9, output_kind=delta), ["b#0", "b#1"])
    proc.add("c", None, [1], SamplingParams(max_tokens=9, output_kind=final_only), ["c"])
    proc.add("d", None, [1], SamplingParams(max_tokens=9, output_kind=delta), ["d"])
    proc.add("e", None, [1], SamplingParams(max_tokens=9, output_kind=RequestOutputKind.CUMULATIVE), ["e"])

    def step(ids, finished=()):
        out = EngineCoreOutput(ids, list(range(len(ids))), {i: ("length", None) for i in finished}, {}, {})
        return [(o.request_id, [c.index for c in o.outputs], o.finished) for o in proc.process(out)[0]]

    assert step(["b#1", "a", "c", "d", "b#0", "e"]) == [
        ("b", [0, 1], False),
        ("a", [0], False),
        ("d", [0], False),
        ("e", [0], False),
    ]
    # a and d stream now; c finishes; d finishes (not streamed: its output carries the finish)
    assert step(["a", "b#1", "d", "c", "b#0", "e"], finished=["c", "d"]) == [
        ("a", [0], False),
        ("b", [0, 1], False),
        ("d", [0], True),
        ("c", [0], True),
        ("e", [0], False),
    ]
    assert step(["e", "b#0", "a"], finished=["b#0"]) == [("e", [0], False), ("b", [0], False), ("a", [0], False)]
    assert step(["b#1", "a"], finished=["b#1", "a"]) == [("b", [1], True), ("a", [0], True)]
    assert proc.request_ids == ["e"]
