"""The engine process's messages survive msgpack: SamplingParams as plain data (every field),
step outputs with logprobs, and failures keep their exception's name (and ValueError its 400)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.engine.core import EngineCoreOutput
from jaxserve.engine.core_client import RemoteEngine
from jaxserve.engine.messages import (
    Abort,
    AddRequest,
    EngineStats,
    Failed,
    FinishStopped,
    Ready,
    ResetPrefixCache,
    Shutdown,
    Steps,
    TokenLogprobs,
    encoder,
    input_decoder,
    message_decoder,
    remote_error,
)
from jaxserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams


def test_inputs_round_trip_with_every_sampling_parameter():
    params = SamplingParams(
        n=3,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={7: -100.0, 9: 2.5},
        seed=123,
        max_tokens=50,
        min_tokens=2,
        stop=["\n\n", "END"],
        stop_token_ids=[2, 3],
        ignore_eos=True,
        logprobs=5,
        prompt_logprobs=1,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
        logits_processors=["no_digits"],
        cache_salt="tenant-a",
        output_kind=RequestOutputKind.DELTA,
    )
    for message in (
        AddRequest("cmpl-1-0", [1, 2, 3], params),
        Abort("cmpl-1-0"),
        FinishStopped("cmpl-1-0-2", "END"),
        ResetPrefixCache(7),
        Shutdown(),
    ):
        assert input_decoder.decode(encoder.encode(message)) == message


@pytest.mark.parametrize(
    "spec",
    [
        dict(json={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
        dict(json='{"type": "string"}'),
        dict(regex="[0-9]{3}"),
        dict(choice=["yes", "no"]),
        dict(grammar='start: "a" | "b"'),
        dict(json_object=True),
    ],
)
def test_structured_outputs_cross_as_their_spec(spec):
    """The engine process compiles the grammar itself: the spec travels, whole."""
    message = AddRequest("cmpl-2-0", [1, 2], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)))
    assert input_decoder.decode(encoder.encode(message)) == message


def test_a_step_round_trips_with_logprobs_and_stats():
    lp = TokenLogprobs(5, -0.25, 1, np.array([5, 6, -1], np.int32), np.array([-0.25, -1.5, -np.inf], np.float32))
    output = EngineCoreOutput(
        ["a-0", "b-0"],
        [5, 9],
        {"b-0": ("length", None)},
        {"a-0": lp},
        {"a-0": [(0, lp)]},
        {"a": 16},
        {"a": 12.5},
        num_tokens=40,
        timestamp=13.0,
    )
    message = Steps([output], EngineStats(2, 1, 0.25, 3, 100, 16))
    got = message_decoder.decode(encoder.encode(message))
    assert got.stats == message.stats
    out = got.outputs[0]
    assert (out.request_ids, out.token_ids, out.finished) == (["a-0", "b-0"], [5, 9], {"b-0": ("length", None)})
    assert (out.num_cached_tokens, out.scheduled_at, out.num_tokens, out.timestamp) == (
        {"a": 16},
        {"a": 12.5},
        40,
        13.0,
    )
    for got_lp in (out.logprobs["a-0"], out.prompt_logprobs["a-0"][0][1]):
        assert (got_lp.token_id, got_lp.logprob, got_lp.rank) == (5, -0.25, 1)
        assert got_lp.top_ids.tolist() == [5, 6, -1] and got_lp.top_logprobs.tolist() == [-0.25, -1.5, -np.inf]
    assert out.prompt_logprobs["a-0"][0][0] == 0


def test_failures_keep_their_name():
    error = remote_error(message_decoder.decode(encoder.encode(Failed(["x"], "InjectedFault", "boom"))))
    assert type(error).__name__ == "InjectedFault" and str(error) == "boom"
    assert type(remote_error(Failed(["x"], "ValueError", "bad"))) is ValueError


def test_parameters_that_cannot_cross_are_a_value_error_when_prepared():
    ready = Ready(None, 100, 64, [], {}, "clock_gettime(CLOCK_MONOTONIC)", 1)
    remote = RemoteEngine(ready, None, client=None)
    assert remote.prepare([1, 2, 3], SamplingParams(top_k=5)).prompt_token_ids == [1, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        remote.prepare([1, 2, 3], SamplingParams(top_k=2**64))
