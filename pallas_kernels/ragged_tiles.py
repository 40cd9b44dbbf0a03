"""Work planning for the ragged attention kernel: which query rows each program owns.

The kernel sees the queries of one kv head as rows (token-major, then the G query heads that
share the kv head): row = t * G + g. A work tile is `rows_per_tile` consecutive rows of ONE
sequence, so a sequence with q_len tokens owns ceil(q_len * G / rows_per_tile) tiles:

    rows of head k:  |-- seq 0 (decode) --|----------- seq 1 (prefill) -----------|-- seq 2 --|
    tiles:           [ t0 (G rows used)  ][ t1 (full)    ][ t2 (full) ][ t3 (tail) ][ t4      ]

Padding sequences (r >= num_seqs) own no tile. The number of tiles is bounded statically by
ceil(T * G / rows_per_tile) + R, the grid size; programs past the live count return at once.
"""

from __future__ import annotations

import jax.numpy as jnp


def max_tiles(num_tokens: int, num_rows: int, group: int, rows_per_tile: int) -> int:
    return -(-num_tokens * group // rows_per_tile) + num_rows


def plan_tiles(cu_q_lens, num_seqs, *, group: int, rows_per_tile: int, num_tiles: int, num_tokens: int):
    """-> (tile_seq [W], tile_row0 [W], tile_row_end [W], live_tiles [1], row_slot [T*G]), int32.

    Tile w covers rows tile_row0[w] : min(tile_row0[w] + rows_per_tile, tile_row_end[w]) of
    sequence tile_seq[w]; tile_row_end is that sequence's end row. Tiles w >= live_tiles are
    unused (their fields are clamped to valid values and ignored). The kernel writes tile w's
    output to rows w * rows_per_tile + i of a tile-padded buffer: row_slot maps each row back."""
    num_rows = cu_q_lens.shape[0] - 1
    live = jnp.arange(num_rows, dtype=jnp.int32) < num_seqs[0]
    rows = jnp.where(live, (cu_q_lens[1:] - cu_q_lens[:-1]) * group, 0)
    tiles = -(-rows // rows_per_tile)
    ends = jnp.cumsum(tiles, dtype=jnp.int32)  # tiles of sequences 0..r
    w = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, w, side="right").astype(jnp.int32), num_rows - 1)
    first = ends[seq] - tiles[seq]
    row0 = cu_q_lens[seq] * group + (w - first) * rows_per_tile
    row_end = cu_q_lens[seq + 1] * group
    # Where each row's output lands: row t*G+g -> its tile's slot (padding tokens -> slot 0, masked later).
    row = jnp.arange(num_tokens * group, dtype=jnp.int32)
    row_seq = jnp.clip(jnp.searchsorted(cu_q_lens, row // group, side="right").astype(jnp.int32) - 1, 0, num_rows - 1)
    j = row - cu_q_lens[row_seq] * group
    tile = ends[row_seq] - tiles[row_seq] + j // rows_per_tile
    row_slot = jnp.where(tile < num_tiles, tile * rows_per_tile + j % rows_per_tile, 0)
    return seq, row0, row_end, ends[-1:], row_slot

