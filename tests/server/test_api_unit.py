"""The protocol layer without a server: request translation, stream deltas that add up to the
whole response, and the environment entry point's parsing."""

from __future__ import annotations

import pytest

from jaxserve.api.errors import APIError
from jaxserve.api.protocol import ChatCompletionRequest, CompletionRequest
from jaxserve.api.responses import ChatBuilder, CompletionBuilder
from jaxserve.api.translate import chat_params, completion_params, completion_prompts
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput


def test_prompt_forms():
    def prompts(p):
        return completion_prompts(CompletionRequest(prompt=p))

    assert prompts("hi") == ["hi"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]
    with pytest.raises(APIError):
        prompts([])


def test_params_translation():
    p = completion_params(CompletionRequest(prompt="x", logit_bias={"7": 2.5}, top_k=0, logprobs=2, echo=True))
    assert p.logit_bias == {7: 2.5} and p.top_k == -1 and p.logprobs == 2 and p.prompt_logprobs == 2
    c = chat_params(
        ChatCompletionRequest(
            messages=[{"role": "user", "content": "x"}],
            max_tokens=5,
            max_completion_tokens=9,
            logprobs=True,
            top_logprobs=3,
        )
    )
    assert c.max_tokens == 9 and c.logprobs == 3
    assert chat_params(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])).max_tokens is None
    with pytest.raises(APIError) as e:
        completion_params(CompletionRequest(prompt="x", temperature=-1.0))
    assert e.value.status == 400 and e.value.param == "temperature"


def _outputs(texts: list[str], finished_at: int) -> list[RequestOutput]:
    """Cumulative outputs of two samples, one token (and piece of text) per step."""
    outs = []
    for step in range(1, len(texts) + 1):
        done = step >= finished_at
        choices = []
        for i in range(2):
            ids = list(range(100 + i, 100 + i + step))
            lps = [{t: Logprob(-0.5, 1, texts[k])} for k, t in enumerate(ids)]
            choices.append(
                CompletionOutput(i, "".join(texts[:step]), ids, -0.5 * step, lps, "length" if done else None)
            )
        outs.append(RequestOutput("r", "p", [1, 2], None, choices, done))
    return outs


def test_stream_deltas_add_up_to_the_whole_response():
    outs = _outputs(["Hel", "lo", " world"], finished_at=3)
    b = CompletionBuilder("cmpl-1", "m", 2, 1, logprobs=0, include_usage=True)
    chunks = [c for out in outs for c in b.chunks(0, out)]
    whole = CompletionBuilder("cmpl-1", "m", 2, 1, logprobs=0).response([outs[-1]])
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert "".join(c.text for c in mine) == whole.choices[i].text == "Hello world"
        assert sum((c.logprobs.tokens for c in mine), []) == whole.choices[i].logprobs.tokens
        assert [c.finish_reason for c in mine][-1] == "length"
    assert b.usage_chunk([outs[-1]]).usage.completion_tokens == 6
    chat = ChatBuilder("chatcmpl-1", "m", 2)
    chat_chunks = [c.choices[0] for out in outs for c in chat.chunks(out)]
    for i in range(2):
        assert "".join(c.delta.content for c in chat_chunks if c.index == i) == "Hello world"


def test_a_model_without_tokenizer_streams_every_token():
    outs = _outputs(["", "", "", ""], finished_at=4)  # no text until the end, as with no tokenizer
    held = CompletionBuilder("cmpl-1", "m", 2, 1)
    assert len([c for out in outs for c in held.chunks(0, out)]) == 2  # only the final chunk of each sample
    each = CompletionBuilder("cmpl-1", "m", 2, 1, stream_each_token=True)
    chunks = [c.choices[0] for out in outs for c in each.chunks(0, out)]
    assert len(chunks) == 2 * 4 and [c.finish_reason for c in chunks[-2:]] == ["length", "length"]


def test_settings_from_env():
    from jaxserve.app import settings_from_env

    s = settings_from_env(
        {
            "JAXSERVE_MODEL": "/m",
            "JAXSERVE_MAX_NUM_SEQS": "8",
            "JAXSERVE_MAX_MODEL_LEN": "512",
            "JAXSERVE_GPU_MEMORY_UTILIZATION": "0.5",
            "JAXSERVE_SERVED_MODEL_NAME": "a, b",
            "JAXSERVE_API_KEY": "k",
            "JAXSERVE_MAX_WAITING_REQUESTS": "3",
            "JAXSERVE_MAX_REQUEST_BODY_BYTES": "4096",
        }
    )
    assert s.max_request_body_bytes == 4096
    assert (s.engine.model, s.engine.max_num_seqs, s.engine.max_model_len) == ("/m", 8, 512)
    assert s.engine.gpu_memory_utilization == 0.5 and s.max_waiting_requests == 3
    assert s.model_names == ("a", "b") and s.api_key == "k"
    with pytest.raises(ValueError, match="JAXSERVE_MAX_NUM_SEQS"):
        settings_from_env({"JAXSERVE_MAX_NUM_SEQS": "many"})
    with pytest.raises(ValueError, match="JAXSERVE_MAX_REQUEST_BODY_BYTES"):
        settings_from_env({"JAXSERVE_MAX_REQUEST_BODY_BYTES": "lots"})
