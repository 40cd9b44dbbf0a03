"""Host staging of a ragged batch: slots, padding rows and tokens, bucket overflow."""

import numpy as np
import pytest

from jaxserve.testing.fixed_batch import SequenceChunk, stage_batch

SHAPE = dict(pages_per_seq=3, page_size=4, num_pages=10)


def test_layout_of_a_mixed_batch():
    chunks = [SequenceChunk([11, 12, 13], 0, [7, 2]), SequenceChunk([21], 5, [3, 9])]
    tokens, b, rows = stage_batch(chunks, num_tokens=8, num_rows=4, **SHAPE)
    np.testing.assert_array_equal(tokens, [11, 12, 13, 21, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.positions[:4], [0, 1, 2, 5])
    np.testing.assert_array_equal(b.slot_mapping, [28, 29, 30, 9 * 4 + 1, 40, 40, 40, 40])  # padding -> P * S
    np.testing.assert_array_equal(b.cu_q_lens, [0, 3, 4, 4, 4])
    np.testing.assert_array_equal(b.kv_lens, [3, 6, 0, 0])
    np.testing.assert_array_equal(b.page_table[:2], [[7, 2, 0], [3, 9, 0]])
    np.testing.assert_array_equal(b.num_seqs, [2])
    np.testing.assert_array_equal(rows[:2], [2, 3])
    assert all(a.dtype == np.int32 for a in (tokens, b.positions, b.slot_mapping, b.cu_q_lens, b.page_table))


def test_overflow_and_missing_pages_raise():
    with pytest.raises(ValueError, match="do not fit"):
        stage_batch([SequenceChunk([1] * 9, 0, [0, 1, 2])], num_tokens=8, num_rows=1, **SHAPE)
    with pytest.raises(ValueError, match="cannot hold"):
        stage_batch([SequenceChunk([1] * 5, 0, [0])], num_tokens=8, num_rows=1, **SHAPE)
