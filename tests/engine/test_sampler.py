"""On-device sampling, row by row: greedy and sampled rows mixed, truncation, bias, penalties,
logprobs, and a sampled distribution that follows the softmax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.engine.sampler import (
    SamplingBatch,
    new_logit_bias,
    new_penalty_state,
    sample,
    update_penalty_state,
    write_logit_bias_row,
)

V = 8
NO_ROW = 4  # the tables below have rows 0-3, and row 4 empty


def bias_table(vocab=V, **rows):
    """A LogitBias table; rows: row{i}=(({id: value}, [banned ids]))."""
    table = new_logit_bias(NO_ROW, vocab, 2, 2)
    for name, (bias, banned) in rows.items():
        ids, values = np.full(2, vocab, np.int32), np.zeros(2, np.float32)
        ids[: len(bias)], values[: len(bias)] = list(bias), list(bias.values())
        stops = np.full(2, vocab, np.int32)
        stops[: len(banned)] = banned
        table = write_logit_bias_row(table, int(name.removeprefix("row")), ids, values, stops)
    return table


NO_BIAS = bias_table()


def batch(rows, **overrides):
    base = dict(
        temperature=np.zeros(rows, np.float32),
        top_k=np.full(rows, V, np.int32),
        top_p=np.ones(rows, np.float32),
        min_p=np.zeros(rows, np.float32),
        repetition_penalty=np.ones(rows, np.float32),
        presence_penalty=np.zeros(rows, np.float32),
        frequency_penalty=np.zeros(rows, np.float32),
        bias_row=np.full(rows, NO_ROW, np.int32),
        ban_stops=np.zeros(rows, bool),
        seeds=np.arange(rows, dtype=np.uint32),
        counters=np.zeros(rows, np.int32),
        wants_logprobs=np.ones(rows, bool),
        processor_mask=np.zeros((0, rows), bool),
        penalty_row=np.full(rows, 4, np.int32),
        reset_rows=np.full(rows, 4, np.int32),
        token_row=np.full(1, 4, np.int32),
        token_is_output=np.zeros(1, bool),
    )
    base.update({k: np.asarray(v, base[k].dtype) for k, v in overrides.items()})
    return SamplingBatch(**base)


LOGITS = jnp.asarray(np.log(np.array([[0.05, 0.4, 0.3, 0.1, 0.05, 0.05, 0.03, 0.02]] * 3, np.float32)))


def test_greedy_truncations_and_bias():
    penalties = new_penalty_state(4, V)
    sb = batch(3, temperature=[0, 1.0, 1.0], top_k=[V, 1, V], top_p=[1, 1, 0.01])
    out = sample(LOGITS, sb, penalties, NO_BIAS)
    assert out.tokens.tolist() == [1, 1, 1]  # greedy; top_k=1; a nucleus of one token
    table = bias_table(row0=({1: -np.inf}, []), row2=({1: -np.inf, 2: -np.inf}, []))
    sb = batch(3, bias_row=[0, 2, NO_ROW])
    assert sample(LOGITS, sb, penalties, table).tokens.tolist() == [2, 3, 1]
    sb = batch(1, temperature=[1.0], min_p=[0.9])
    assert sample(LOGITS[:1], sb, penalties, NO_BIAS).tokens.tolist() == [1]


def test_banned_stop_ids_before_min_tokens_and_bias_together():
    # row 1: a bias that favours token 3, and tokens 1 and 3 banned while ban_stops
    table = bias_table(row1=({3: 5.0}, [1, 3]))
    penalties = new_penalty_state(4, V)
    out = sample(LOGITS, batch(3, bias_row=[1, 1, NO_ROW], ban_stops=[True, False, True]), penalties, table)
    assert out.tokens.tolist() == [2, 3, 1]  # banned: the next best; not banned: the bias wins; no row


def test_logprobs_ranks_and_top_alternatives():
    out = sample(
        LOGITS,
        batch(3, bias_row=[0, NO_ROW, NO_ROW]),
        new_penalty_state(4, V),
        bias_table(row0=({1: -np.inf}, [])),
    )
    raw = np.asarray(jax.nn.log_softmax(LOGITS, -1))
    assert out.tokens.tolist()[0] == 2 and int(out.ranks[0]) == 2  # logprobs are the model's, bias aside
    np.testing.assert_allclose(out.logprobs, raw[np.arange(3), out.tokens], rtol=1e-6)
    assert out.top_ids[0, :3].tolist() == [1, 2, 3]


def test_sampled_frequencies_follow_softmax():
    draws = 4000
    logits = jnp.broadcast_to(LOGITS[0], (draws, V))
    sb = batch(draws, temperature=np.ones(draws), seeds=np.full(draws, 3), counters=np.arange(draws))
    tokens = np.asarray(sample(logits, sb, new_penalty_state(4, V), NO_BIAS).tokens)
    freq = np.bincount(tokens, minlength=V) / draws
    np.testing.assert_allclose(freq, np.exp(np.asarray(LOGITS[0])), atol=0.03)


def test_penalties_from_counted_tokens():
    state = new_penalty_state(2, V)
    # row 0: prompt [1], outputs [2, 2]; row 1 untouched
    tokens = jnp.asarray([1, 2, 2], jnp.int32)
    sb = batch(1, token_row=[0, 0, 0], token_is_output=[False, True, True], reset_rows=[0], penalty_row=[0])
    state = update_penalty_state(state, tokens, sb)
    assert np.asarray(state.output_counts)[0].tolist() == [0, 0, 2, 0, 0, 0, 0, 0]
    assert np.asarray(state.prompt_mask)[0].tolist()[:3] == [False, True, False]
    flat = jnp.zeros((1, V)).at[0, 1].set(1.0).at[0, 2].set(1.2)
    freq = batch(1, frequency_penalty=[0.5], penalty_row=[0])  # token 2: 1.2 - 2 * 0.5 < token 1
    assert sample(flat, freq, state, NO_BIAS).tokens.tolist() == [1]
    rep = batch(1, repetition_penalty=[2.0], penalty_row=[0])  # both seen: 0.5 vs 0.6
    assert sample(flat, rep, state, NO_BIAS).tokens.tolist() == [2]
    no_row = batch(1, frequency_penalty=[0.5], penalty_row=[2])  # no row: no penalty
    assert sample(flat, no_row, state, NO_BIAS).tokens.tolist() == [2]
    cleared = update_penalty_state(
        state, jnp.asarray([5], jnp.int32), batch(1, reset_rows=[0], token_row=[0], token_is_output=[True])
    )
    assert np.asarray(cleared.output_counts)[0].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]


def test_draws_across_blocks_follow_softmax_and_skip_masked_tokens():
    # A vocabulary of several draw blocks (256 tokens each, the last one partial): frequencies
    # still follow the softmax, and a token masked to -inf is never drawn.
    vocab, draws = 600, 6000
    probs = np.zeros(vocab, np.float32)
    probs[[3, 255, 256, 400, 599]] = [0.1, 0.3, 0.2, 0.25, 0.15]
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (draws, vocab))
    sb = batch(
        draws,
        temperature=np.ones(draws),
        seeds=np.full(draws, 5),
        counters=np.arange(draws),
        top_k=np.full(draws, vocab),
    )
    tokens = np.asarray(sample(logits, sb, new_penalty_state(4, vocab), bias_table(vocab), full=False).tokens)
    assert set(tokens.tolist()) <= {3, 255, 256, 400, 599}
    np.testing.assert_allclose(
        np.bincount(tokens, minlength=vocab)[[3, 255, 256, 400, 599]] / draws, probs[[3, 255, 256, 400, 599]], atol=0.03
    )


def test_the_sampler_without_sorting_matches_the_full_one_where_no_row_cuts():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, V)) * 2, jnp.float32)
    sb = batch(6, temperature=[0, 0.7, 1.0, 1.3, 0, 1.0], seeds=np.arange(6) + 11, counters=[0, 1, 2, 3, 4, 5])
    full, plain = (sample(logits, sb, new_penalty_state(4, V), NO_BIAS, full=f) for f in (True, False))
    assert plain.tokens.tolist() == full.tokens.tolist()
    np.testing.assert_array_equal(plain.ranks, full.ranks)
    np.testing.assert_allclose(plain.logprobs, full.logprobs)
    assert not np.asarray(plain.top_ids).any()  # left out


def test_the_sampler_has_no_device_conditional():
    # XLA on the GPU runs a conditional by waiting on the host for its predicate: one in the
    # sampler would stall every step's launch until the device reached it.
    sb = batch(3, temperature=[0, 1.0, 1.0], top_k=[V, 2, V])
    for full in (False, True):
        hlo = (
            jax.jit(sample, static_argnames="full")
            .lower(LOGITS, sb, new_penalty_state(4, V), NO_BIAS, full=full)
            .as_text()
        )
        assert "case" not in hlo and "conditional" not in hlo, hlo


def test_every_filter_keeps_the_most_likely_token():
    # top_p=1e-50 is 0 in float32: without a floor the nucleus held no token and every row drew id 0.
    rows = 6
    sb = batch(
        rows,
        temperature=np.ones(rows),
        top_p=[1e-50, 1e-45, 1.0, 1.0, 1e-50, 1.0],
        top_k=[V, V, 1, V, 1, V],
        min_p=[0.0, 0.0, 0.0, 1.0, 1.0, 0.0],
        seeds=np.arange(rows),
    )
    logits = jnp.asarray(np.vstack([np.asarray(LOGITS)] * 2)[:rows])
    tokens = sample(logits, sb, new_penalty_state(4, V), NO_BIAS).tokens.tolist()
    assert tokens[:5] == [1] * 5  # each cut alone and together keeps only the argmax, 1
    assert tokens[5] in range(V)  # no cut: an ordinary draw
