"""Stop strings in the incremental detokenizer: the match that ends first in the text wins,
whatever the order of the list and however the text splits into tokens."""

from __future__ import annotations

import pytest

from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    return load_tokenizer(smollm2_folder)


def run(tokenizer, text: str, stop: list[str], include_stop: bool = False) -> tuple[str, str | None]:
    detok = IncrementalDetokenizer(tokenizer, stop=stop, include_stop=include_stop)
    for token_id in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if detok.push(token_id) is not None:
            break
    return detok.text, detok.stopped_by


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        # the case: "a" comes first in the list, "P" first in the text
        (" Paris is the capital of France.", [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["P"], (" ", "P")),
        (" Paris is the capital of France.", ["France", "capital", "is"], (" Par", "is")),
        # both end at the same character: the longer one, which starts earlier
        (" abc", ["bc", "abc"], (" ", "abc")),
        # one stop inside another ends first: a reader of the text sees it complete first
        (" Paris", ["Paris", "ar"], (" P", "ar")),
    ],
)
def test_the_stop_that_ends_first_in_the_text_wins(tokenizer, text, stop, expected):
    assert run(tokenizer, text, stop) == expected
    assert run(tokenizer, text, list(reversed(stop))) == expected


def test_the_winner_does_not_depend_on_how_the_text_splits_into_tokens(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, stop=["Paris", "ar"], include_stop=True)
    ids = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert len(ids) == 1  # one token holds both matches
    assert detok.push(ids[0]) == "ar" and detok.text == " Par"
