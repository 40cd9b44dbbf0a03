"""Host staging: the sequences of one step -> one flat ragged batch of numpy arrays, padded.

    chunks: (new token ids, first position, page ids) per sequence
        -> tokens [T], RaggedBatch(positions [T], slot_mapping [T], cu_q_lens [R+1], kv_lens [R],
           page_table [R, P_max], num_seqs [1]), logits_rows [R]  (numpy, int32)

Padding tokens get slot `num_pages * page_size` (out of range: their K/V is dropped) and padding
rows repeat the last cu_q_len (zero query tokens), so the device skips both.
"""

from __future__ import annotations

import dataclasses
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
    total = sum(len(c.token_ids) for c in chunks)
    if total > num_tokens or len(chunks) > num_rows:
        raise ValueError(f"{total} tokens in {len(chunks)} sequences do not fit the bucket ({num_tokens}, {num_rows})")
    tokens = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slot_mapping = np.full(num_tokens, num_pages * page_size, np.int32)
    cu_q_lens = np.full(num_rows + 1, total, np.int32)
    kv_lens = np.zeros(num_rows, np.int32)
    page_table = np.zeros((num_rows, pages_per_seq), np.int32)
    logits_rows = np.zeros(num_rows, np.int32)
    offset = 0
    for r, c in enumerate(chunks):
        q_len, end = len(c.token_ids), c.start + len(c.token_ids)
        if len(c.page_ids) * page_size < end or len(c.page_ids) > pages_per_seq:
            raise ValueError(f"sequence {r}: {len(c.page_ids)} pages cannot hold {end} tokens (max {pages_per_seq} pages)")
        pos = np.arange(c.start, end, dtype=np.int32)
        pages = np.asarray(c.page_ids, np.int32)
        tokens[offset : offset + q_len] = c.token_ids
        positions[offset : offset + q_len] = pos
        slot_mapping[offset : offset + q_len] = pages[pos // page_size] * page_size + pos % page_size
        cu_q_lens[r] = offset
        kv_lens[r] = end
        page_table[r, : len(pages)] = pages
        offset += q_len
        logits_rows[r] = offset - 1
    batch = RaggedBatch(
        positions=positions,
        slot_mapping=slot_mapping,
        cu_q_lens=cu_q_lens,
        kv_lens=kv_lens,
        page_table=page_table,
        num_seqs=np.array([len(chunks)], np.int32),
    )
    return tokens, batch, logits_rows
