"""The models against Hugging Face transformers on the same weights (fixtures from
scripts/make_reference_fixtures.py): fp32 logits within 1e-4 relative error, identical greedy
continuations, and a ragged batch equal to each sequence alone."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve.testing.greedy import greedy_generate
from models.loading import load_model
from tests.conftest import FIXTURES, TINY_NAMES, load_reference
from tests.models.runner import packed_logits, relative_error

CASES = TINY_NAMES + ["smollm2"]


@pytest.fixture(scope="module")
def loaded(request, smollm2_folder):
    cache = {}

    def get(name):
        if name not in cache:
            folder = smollm2_folder if name == "smollm2" else FIXTURES / "tiny" / name
            cache[name] = (load_model(folder, dtype="float32", progress=False), load_reference(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(loaded, name):
    model, ref = loaded(name)
    prompts = ref["prompts"][: int(ref["logits_prompts"])]
    logits = packed_logits(model, prompts, page_size=8)
    ours = logits[ref["logits_rows"], ref["logits_cols"]]
    assert relative_error(ours, ref["logits"]) <= 1e-4


@pytest.mark.parametrize("name", CASES)
def test_greedy_matches_transformers(loaded, name):
    model, ref = loaded(name)
    out = greedy_generate(model, [p.tolist() for p in ref["prompts"]], ref["greedy"].shape[1], page_size=16)
    np.testing.assert_array_equal(np.asarray(out), ref["greedy"])


@pytest.mark.parametrize("name", ["llama_gqa_llama3rope", "qwen2_qkvbias_tied", "smollm2"])
def test_packed_batch_equals_each_alone(loaded, name):
    model, ref = loaded(name)
    prompts = ref["prompts"][:4]
    order = np.random.default_rng(1).permutation(4 * 8)  # scattered pages, padding tokens after the last
    packed = packed_logits(model, prompts, page_size=8, num_tokens=sum(map(len, prompts)) + 5, page_order=order)
    alone = np.concatenate([packed_logits(model, [p], page_size=8) for p in prompts])
    assert relative_error(packed, alone) <= 1e-5
