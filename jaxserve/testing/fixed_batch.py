"""Host staging: the sequences of one step -> one flat ragged batch of numpy arrays, padded.

    chunks: (new token ids, first position, page ids) per sequence
        -> tokens [T], positions [T], slot_mapping [T], cu_q_lens [R+1], kv_lens [R],
           num_seqs [1], logits_rows [R]  (int32, written into given arrays: fill_ragged)
        (+ page_table [R, P_max] and a RaggedBatch for fixed-batch drivers: stage_batch)

Padding tokens get slot `num_pages * page_size` (out of range: their K/V is dropped) and padding
rows repeat the last cu_q_len (zero query tokens), so the device skips both. Only the pages this
step writes are looked at, so staging costs O(tokens), not O(context).
"""

from __future__ import annotations

import dataclasses
import itertools
import types
from collections.abc import Sequence

import numpy as np

from models import RaggedBatch


@dataclasses.dataclass(frozen=True)
class SequenceChunk:
    token_ids: Sequence[int]  # this step's tokens of the sequence (q_len = len)
    start: int  # tokens of the sequence already in the cache (position of token_ids[0])
    page_ids: Sequence[int]  # the sequence's pages, enough for start + q_len tokens


def fill_ragged(
    chunks: Sequence[SequenceChunk], out, *, page_size: int, num_pages: int, pages_per_seq: int
) -> np.ndarray:
    """Writes the step's layout into out.tokens, .positions, .slot_mapping [T] and .cu_q_lens,
    .kv_lens, .num_seqs, .logits_rows [R]: int32 arrays, zeroed, their shapes the bucket's.
    Returns the row of each real token ([total] int32)."""
    num_tokens, num_rows = out.tokens.shape[0], out.kv_lens.shape[0]
    n = len(chunks)
    q_lens = np.fromiter((len(c.token_ids) for c in chunks), np.int32, n)
    total = int(q_lens.sum())
    if total > num_tokens or n > num_rows:
        raise ValueError(f"{total} tokens in {n} sequences do not fit the bucket ({num_tokens}, {num_rows})")
    starts = np.fromiter((c.start for c in chunks), np.int32, n)
    first_page = starts // page_size
    last_page = (starts + q_lens - 1) // page_size  # q_len >= 1
    for r, c in enumerate(chunks):
        if len(c.page_ids) > pages_per_seq or len(c.page_ids) <= last_page[r]:
            raise ValueError(
                f"sequence {r}: {len(c.page_ids)} pages cannot hold {c.start + q_lens[r]} tokens "
                f"(max {pages_per_seq} pages)"
            )
    # The pages this step writes, back to back: a decode row touches one.
    touched = np.fromiter(
        itertools.chain.from_iterable(c.page_ids[first_page[r] : last_page[r] + 1] for r, c in enumerate(chunks)),
        np.int32,
    )
    touched_offset = np.zeros(n, np.int32)
    np.cumsum((last_page - first_page + 1)[:-1], out=touched_offset[1:])
    cu_q_lens = out.cu_q_lens
    cu_q_lens[:] = total
    cu_q_lens[0] = 0
    np.cumsum(q_lens, out=cu_q_lens[1 : n + 1])
    row = np.repeat(np.arange(n, dtype=np.int32), q_lens)  # [total] the row of each token
    pos = starts[row] + np.arange(total, dtype=np.int32) - cu_q_lens[row]
    out.tokens[:total] = list(itertools.chain.from_iterable(c.token_ids for c in chunks))
    out.positions[:total] = pos
    out.slot_mapping[:] = num_pages * page_size
    page = touched[touched_offset[row] + pos // page_size - first_page[row]]
    out.slot_mapping[:total] = page * page_size + pos % page_size
    out.kv_lens[:n] = starts + q_lens
    out.logits_rows[:n] = cu_q_lens[1 : n + 1] - 1
    out.num_seqs[0] = n
    return row


def stage_batch(
    chunks: Sequence[SequenceChunk],
    *,
    num_tokens: int,  # T, the padded token count (a bucket)
    num_rows: int,  # R, the padded sequence count (a bucket)
    pages_per_seq: int,  # P_max
    page_size: int,  # S
    num_pages: int,  # P, pages in the cache
) -> tuple[np.ndarray, RaggedBatch, np.ndarray]:
    """The whole batch with a dense page table, for drivers of a fixed batch (greedy, tests)."""
    zeros = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    out = types.SimpleNamespace(
        tokens=zeros(num_tokens),
        positions=zeros(num_tokens),
        slot_mapping=zeros(num_tokens),
        cu_q_lens=zeros(num_rows + 1),
        kv_lens=zeros(num_rows),
        num_seqs=zeros(1),
        logits_rows=zeros(num_rows),
    )
    fill_ragged(chunks, out, page_size=page_size, num_pages=num_pages, pages_per_seq=pages_per_seq)
    page_table = zeros(num_rows, pages_per_seq)
    for r, c in enumerate(chunks):
        page_table[r, : len(c.page_ids)] = c.page_ids
    batch = RaggedBatch(
        positions=out.positions,
        slot_mapping=out.slot_mapping,
        cu_q_lens=out.cu_q_lens,
        kv_lens=out.kv_lens,
        page_table=page_table,
        num_seqs=out.num_seqs,
    )
    return out.tokens, batch, out.logits_rows
