"""The benchmark prompts (jaxserve/benchmarks/datasets.py) as vLLM's benchmarks make them: lengths
within the range ratio, text that re-encodes to its count, no special tokens, ShareGPT's filters."""

from __future__ import annotations

import json

import pytest

from jaxserve.benchmarks.datasets import length_range, load_client_tokenizer, random_requests, sharegpt_requests


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return load_client_tokenizer(None, None)  # the embedded default model's


def test_length_range_matches_vllms_bounds():
    assert length_range(100, 0.0) == (100, 100)
    assert length_range(100, 0.25) == (75, 125)
    assert length_range(3, 0.5, minimum=1) == (1, 5)
    with pytest.raises(ValueError):
        length_range(10, 1.0)


def test_random_text_prompts_reencode_to_their_count(tokenizer):
    reqs = random_requests(6, 64, 16, tokenizer=tokenizer, range_ratio=0.5, prefix_len=8, seed=1)
    special = set(tokenizer.all_special_ids)
    for r in reqs:
        ids = tokenizer.encode(r.prompt, add_special_tokens=False)
        assert len(ids) == r.prompt_len and not special & set(ids)
        assert 8 + 32 <= r.prompt_len <= 8 + 96 and 8 <= r.expected_output_len <= 24
    prefix = tokenizer.encode(reqs[0].prompt, add_special_tokens=False)[:6]
    assert all(tokenizer.encode(r.prompt, add_special_tokens=False)[:6] == prefix for r in reqs)  # a shared prefix
    assert random_requests(6, 64, 16, tokenizer=tokenizer, range_ratio=0.5, prefix_len=8, seed=1) == reqs
    assert len({r.prompt_len for r in reqs}) > 1


def test_token_id_prompts_without_a_tokenizer():
    reqs = random_requests(3, 20, 5, vocab_size=1000, seed=0)
    assert all(isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len == 20 for r in reqs)
    assert all(100 <= t < 900 for r in reqs for t in r.prompt)


def test_sharegpt_pairs_filtered_and_shuffled(tokenizer, tmp_path):
    long = "word " * 1500
    convs = [
        {
            "conversations": [
                {"from": "human", "value": f"Question number {i} about the sea?"},
                {"from": "gpt", "value": f"An answer, number {i}, about the sea."},
            ]
        }
        for i in range(5)
    ]
    convs += [
        {
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "A reply long enough."}]
        },  # short
        {"conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": "A reply long enough."}]},  # long
        {"conversations": [{"from": "human", "value": "A lonely turn without any reply."}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(convs))
    reqs = sharegpt_requests(path, tokenizer, 5, seed=0)
    assert sorted(r.prompt for r in reqs) == sorted(c["conversations"][0]["value"] for c in convs[:5])
    assert all(
        r.expected_output_len == len(tokenizer.encode(f"An answer, number {r.prompt.split()[2]}, about the sea."))
        for r in reqs
    )
    assert {r.expected_output_len for r in sharegpt_requests(path, tokenizer, 2, output_len=7)} == {7}
    with pytest.raises(SystemExit, match="only 5 usable"):
        sharegpt_requests(path, tokenizer, 6)
