"""The forward pass over the paged cache across steps: chunked prefill and decode rows mixed in one
batch give the logits of a one-shot prefill."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from jaxserve.engine.step import make_forward
from jaxserve.testing.fixed_batch import SequenceChunk, stage_batch
from models.loading import load_model
from tests.conftest import FIXTURES
from tests.models.runner import new_cache, packed_logits, relative_error


@pytest.fixture(scope="module")
def model():
    return load_model(FIXTURES / "tiny" / "llama_gqa_llama3rope", dtype="float32", progress=False)


def test_chunked_prefill_and_decode_mixed(model):
    rng = np.random.default_rng(0)
    a = rng.integers(2, 256, 45).tolist()  # prefilled in chunks of 20, 20, 5
    b = rng.integers(2, 256, 12).tolist()  # prefilled whole, then decoded token by token
    page_size, pages_per_seq = 8, 8
    pages = {"a": [9, 3, 14, 0, 7, 11, 2, 5], "b": [1, 4, 6, 8, 10, 12, 13, 15]}
    graphdef, state = nnx.split(model)
    forward = make_forward(graphdef)
    cache = new_cache(model, 16, page_size)
    shape = dict(num_tokens=32, num_rows=2, pages_per_seq=pages_per_seq, page_size=page_size, num_pages=16)

    steps = [
        [SequenceChunk(a[:20], 0, pages["a"]), SequenceChunk(b, 0, pages["b"])],
        [SequenceChunk(a[20:40], 20, pages["a"]), SequenceChunk([b[0]], 12, pages["b"])],
        [SequenceChunk(a[40:], 40, pages["a"]), SequenceChunk([b[1]], 13, pages["b"])],
    ]
    last = []
    for chunks in steps:
        tokens, batch, rows = stage_batch(chunks, **shape)
        cache, logits = forward(state, cache, tokens, batch, rows)
        last.append(np.asarray(logits))
    whole_a = packed_logits(model, [a], page_size=page_size)
    whole_b = packed_logits(model, [b + [b[0], b[1]]], page_size=page_size)
    assert relative_error(last[0][0], whole_a[19]) <= 1e-5
    assert relative_error(last[1][0], whole_a[39]) <= 1e-5
    assert relative_error(last[2][0], whole_a[44]) <= 1e-5
    assert relative_error(last[0][1], whole_b[11]) <= 1e-5
    assert relative_error(last[1][1], whole_b[12]) <= 1e-5
    assert relative_error(last[2][1], whole_b[13]) <= 1e-5


def test_bfloat16_model_tracks_float32(model):
    prompt = np.random.default_rng(1).integers(2, 256, 30).tolist()
    full = packed_logits(model, [prompt])
    half = packed_logits(
        load_model(FIXTURES / "tiny" / "llama_gqa_llama3rope", dtype="bfloat16", progress=False), [prompt]
    )
    assert relative_error(half, full) <= 5e-2
    assert (half.argmax(-1) == full.argmax(-1)).mean() >= 0.9
