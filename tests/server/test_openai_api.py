"""The official `openai` client against the running server: completions and chat, streaming and
not, n > 1, logprobs, stop, seed, echo, several prompts, token-id prompts; the small endpoints."""

from __future__ import annotations

import math

from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME

GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def stream_text(stream) -> tuple[dict[int, str], dict[int, str], object]:
    """Concatenated text and finish reason per choice index, and the usage chunk's usage."""
    texts, reasons, usage = {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def test_completion_stream_equals_whole(client):
    whole = client.completions.create(model=MODEL_NAME, prompt="Hello, my name is", max_tokens=12, **GREEDY)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-") and whole.model == MODEL_NAME
    (choice,) = whole.choices
    assert choice.finish_reason == "length" and choice.text
    assert whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt="Hello, my name is",
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    texts, reasons, usage = stream_text(stream)
    assert texts == {0: choice.text} and reasons == {0: "length"}
    assert usage.model_dump() == whole.usage.model_dump()


def test_completion_n_and_seed(client):
    def sample(seed):
        r = client.completions.create(
            model=MODEL_NAME,
            prompt="Once upon a time",
            max_tokens=8,
            n=3,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert r.usage.completion_tokens == 24
        return [c.text for c in r.choices]

    first = sample(7)
    assert sample(7) == first  # a seed makes sampling reproducible
    assert len(set(first)) > 1  # the n samples differ from each other
    assert sample(8) != first


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt="The sky is", max_tokens=6, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 3 <= len(top) <= 4
        assert math.isclose(value, max(top.values()), abs_tol=1e-5)  # greedy picks the most likely


def test_completion_stop_strings_and_stop_token_ids(client, http):
    base = client.completions.create(model=MODEL_NAME, prompt="A B C", max_tokens=16, logprobs=0, **GREEDY).choices[0]
    tokens = base.logprobs.tokens
    stop = next(t for t in tokens[3:] if t.strip())  # a token's text, cut where it first appears
    r = client.completions.create(model=MODEL_NAME, prompt="A B C", max_tokens=16, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base.text[: base.text.index(stop)]
    ids = http.post("/tokenize", json={"prompt": base.text, "add_special_tokens": False}).json()["tokens"]
    r = client.completions.create(
        model=MODEL_NAME,
        prompt="A B C",
        max_tokens=16,
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [ids[2]]},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= 3


def test_several_prompts_token_ids_and_echo(client, http):
    r = client.completions.create(model=MODEL_NAME, prompt=["one", "two three"], n=2, max_tokens=4, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: the n samples of a prompt agree
    ids = http.post("/tokenize", json={"prompt": "two three"}).json()
    assert r.usage.prompt_tokens == ids["count"] + http.post("/tokenize", json={"prompt": "one"}).json()["count"]
    by_ids = client.completions.create(model=MODEL_NAME, prompt=[ids["tokens"]], max_tokens=4, **GREEDY)
    assert by_ids.choices[0].text == r.choices[2].text
    echoed = client.completions.create(model=MODEL_NAME, prompt="two three", max_tokens=4, echo=True, **GREEDY)
    assert echoed.choices[0].text == "two three" + r.choices[2].text


def test_chat_whole_stream_and_n(client, http):
    whole = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=10, **GREEDY)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    msg = whole.choices[0].message
    assert msg.role == "assistant" and msg.content and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"])
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    texts, reasons, usage = stream_text(iter(chunks))
    assert texts == {0: msg.content} and reasons == {0: "length"}
    assert usage.completion_tokens == 10
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=6, n=2, stream=True, temperature=1.0, seed=3
    )
    texts, reasons, _ = stream_text(stream)
    assert set(texts) == {0, 1} and set(reasons) == {0, 1}


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
        assert t.bytes == list(t.token.encode())


def test_models_tokenize_detokenize_version_health(client, http):
    (card,) = client.models.list().data
    assert card.id == MODEL_NAME and card.model_extra["max_model_len"] == MAX_MODEL_LEN
    tokens = http.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    assert http.get("/version").json()["version"]
    assert http.get("/health").status_code == 200
