"""Host staging: the sequences of one step -> one flat ragged batch of numpy arrays, padded.

    chunks: (new token ids, first position, page ids) per sequence
        -> tokens [T], RaggedBatch(positions [T], slot_mapping [T], cu_q_lens [R+1], kv_lens [R],
           page_table [R, P_max], num_seqs [1]), logits_rows [R]  (numpy, int32)

Padding tokens get slot `num_pages * page_size` (out of range: their K/V is dropped) and padding
rows repeat the last cu_q_len (zero query tokens), so the device skips both.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from models import RaggedBatch


@dataclasses.dataclass(frozen=True)
class SequenceChunk:
    token_ids: Sequence[int]  # this step's tokens of the sequence (q_len = len)
    start: int  # tokens of the sequence already in the cache (position of token_ids[0])
    page_ids: Sequence[int]  # the sequence's pages, enough for start + q_len tokens


def stage_batch(
    chunks: Sequence[SequenceChunk],
    *,
    num_tokens: int,  # T, the padded token count (a bucket)
    num_rows: int,  # R, the padded sequence count (a bucket)
    pages_per_seq: int,  # P_max
    page_size: int,  # S
    num_pages: int,  # P, pages in the cache
) -> tuple[np.ndarray, RaggedBatch, np.ndarray]:
    n = len(chunks)
    q_lens = np.fromiter((len(c.token_ids) for c in chunks), np.int32, n)
    total = int(q_lens.sum())
    if total > num_tokens or n > num_rows:
        raise ValueError(f"{total} tokens in {n} sequences do not fit the bucket ({num_tokens}, {num_rows})")
    starts = np.fromiter((c.start for c in chunks), np.int32, n)
    page_table = np.zeros((num_rows, pages_per_seq), np.int32)
    for r, c in enumerate(chunks):  # one row copy each; everything else is vectorised
        if len(c.page_ids) > pages_per_seq or len(c.page_ids) * page_size < c.start + q_lens[r]:
            raise ValueError(f"sequence {r}: {len(c.page_ids)} pages cannot hold {c.start + q_lens[r]} tokens "
                             f"(max {pages_per_seq} pages)")
        page_table[r, : len(c.page_ids)] = c.page_ids
    cu_q_lens = np.full(num_rows + 1, total, np.int32)
    cu_q_lens[0] = 0
    np.cumsum(q_lens, out=cu_q_lens[1 : n + 1])
    row = np.repeat(np.arange(n, dtype=np.int32), q_lens)  # [total] the row of each token
    pos = starts[row] + np.arange(total, dtype=np.int32) - cu_q_lens[row]
    tokens = np.zeros(num_tokens, np.int32)
    tokens[:total] = list(itertools.chain.from_iterable(c.token_ids for c in chunks))
    positions = np.zeros(num_tokens, np.int32)
    positions[:total] = pos
    slot_mapping = np.full(num_tokens, num_pages * page_size, np.int32)
    slot_mapping[:total] = page_table[row, pos // page_size] * page_size + pos % page_size
    kv_lens = np.zeros(num_rows, np.int32)
    kv_lens[:n] = starts + q_lens
    logits_rows = np.zeros(num_rows, np.int32)
    logits_rows[:n] = cu_q_lens[1 : n + 1] - 1
    batch = RaggedBatch(
        positions=positions,
        slot_mapping=slot_mapping,
        cu_q_lens=cu_q_lens,
        kv_lens=kv_lens,
        page_table=page_table,
        num_seqs=np.array([n], np.int32),
    )
    return tokens, batch, logits_rows
