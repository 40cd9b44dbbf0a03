"""Work planning for the ragged attention kernel: which query rows each program owns.

The kernel sees the queries of one kv head as rows (token-major, then the G query heads that
share the kv head): row = t * G + g. A work tile is `rows_per_tile` consecutive rows of ONE
sequence, so a sequence with q_len tokens owns ceil(q_len * G / rows_per_tile) tiles:

    rows of head k:  |-- seq 0 (decode) --|----------- seq 1 (prefill) -----------|-- seq 2 --|
    tiles:           [ t0 (G rows used)  ][ t1 (full)    ][ t2 (full) ][ t3 (tail) ][ t4      ]

The kernel reads q and writes its output through [K, cells, H] buffers laid out by tile: a *cell*
is one q row's place there. Tile w owns the cells tile_base[w] + i (bases 8-aligned, gaps left for
power-of-two stores); cell_src maps each cell to its row (q gathered in), row_cell each row to its
cell (output gathered back). Cells are not slots: a slot is only a KV entry's place in the cache.

Padding sequences (r >= num_seqs) own no tile. The number of tiles is bounded statically by
ceil(T * G / rows_per_tile) + R; only the first live_tiles are real. `tile_order` lists the live
tiles in the order the kernel's persistent programs take them: heaviest first (most KV blocks), so
that the round-robin hand-out ends with the light ones and the programs finish together.

Binary searches use jnp.searchsorted's unrolled method: its default is a while loop, which XLA on
the GPU runs as a loop of tiny kernels.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def max_tiles(num_tokens: int, num_rows: int, group: int, rows_per_tile: int) -> int:
    return -(-num_tokens * group // rows_per_tile) + num_rows


def num_cells(num_tokens: int, group: int, tiles: int, rows_per_tile: int) -> int:
    """Cells of the q/out buffers: each tile's rows, rounded up per 64-row warpgroup chunk to a power
    of two >= 8 (the kernel's TMA stores have static sizes 8/16/32/64), at most 2 n + 8 for n rows;
    plus a tile of slack at the end (a 64-row load may run past a short tile); a multiple of 8, the
    row tiling of the buffers' TMA transfers (an odd T * G would not lower)."""
    return -(-2 * num_tokens * group // 8) * 8 + 8 * tiles + rows_per_tile


def _pow2_rows(n):
    """Rows a store of n (0..64) rows covers: 0, or the next power of two from 8 to 64."""
    return jnp.where(n == 0, 0, jnp.where(n <= 8, 8, jnp.where(n <= 16, 16, jnp.where(n <= 32, 32, 64))))


def _search(sorted_values, queries):
    return jnp.searchsorted(sorted_values, queries, side="right", method="scan_unrolled").astype(jnp.int32)


def plan_tiles(cu_q_lens, num_seqs, *, group: int, rows_per_tile: int, num_tiles: int, num_tokens: int, kv_lens=None):
    """The tiles of a batch and the gathers that move rows into and out of their cells.

    -> tile_seq, tile_row0, tile_row_end, tile_base, tile_order [W], live_tiles [1],
       cell_src [num_cells], row_cell [T*G]; all int32.

    tile_order: with kv_lens given, the live tiles sorted by the keys their last row sees, most
    first (an argsort); without, the live tiles backwards (the last tiles of a sequence see the most
    keys). Entries past live_tiles are 0 and never read.

    Tile w covers rows tile_row0[w] : min(tile_row0[w] + rows_per_tile, tile_row_end[w]) of
    sequence tile_seq[w] (tile_row_end is that sequence's end row). Tiles w >= live_tiles are
    unused. Tile w reads and writes its rows at cells tile_base[w] + i, bases multiples of 8 (TMA
    boxes start on whole 8-row tiles of shared memory) and far enough apart for the kernel's
    power-of-two stores; cell_src gives each cell's row (q in) and row_cell each row's cell (out).
    """
    num_rows = cu_q_lens.shape[0] - 1
    live = jnp.arange(num_rows, dtype=jnp.int32) < num_seqs[0]
    rows = jnp.where(live, (cu_q_lens[1:] - cu_q_lens[:-1]) * group, 0)
    tiles = -(-rows // rows_per_tile)
    ends = jnp.cumsum(tiles, dtype=jnp.int32)  # tiles of sequences 0..r
    w = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(_search(ends, w), num_rows - 1)
    first = ends[seq] - tiles[seq]
    row0 = cu_q_lens[seq] * group + (w - first) * rows_per_tile
    row_end = cu_q_lens[seq + 1] * group
    live_tiles = ends[-1]
    n = jnp.where(w < live_tiles, jnp.minimum(row_end - row0, rows_per_tile), 0)
    size = jnp.where(n > 64, 64 + _pow2_rows(jnp.maximum(n - 64, 0)), _pow2_rows(n))  # 64: one warpgroup's rows
    base_end = jnp.cumsum(size, dtype=jnp.int32)
    base = base_end - size

    cell = jnp.arange(num_cells(num_tokens, group, num_tiles, rows_per_tile), dtype=jnp.int32)
    cell_tile = jnp.minimum(_search(base_end, cell), num_tiles - 1)
    cell_src = jnp.clip(row0[cell_tile] + cell - base[cell_tile], 0, num_tokens * group - 1)

    row = jnp.arange(num_tokens * group, dtype=jnp.int32)
    row_seq = jnp.clip(_search(cu_q_lens, row // group) - 1, 0, num_rows - 1)
    j = row - cu_q_lens[row_seq] * group
    row_tile = jnp.clip(ends[row_seq] - tiles[row_seq] + j // rows_per_tile, 0, num_tiles - 1)
    row_cell = base[row_tile] + j % rows_per_tile  # rows of padding tokens land anywhere: masked later
    if kv_lens is None:
        order = jnp.maximum(live_tiles - 1 - w, 0)
    else:  # keys seen by the tile's last row: kv_len - (rows after the tile) / group
        last_row = jnp.minimum(row0 + rows_per_tile, row_end)
        work = jnp.where(w < live_tiles, kv_lens[seq] - (row_end - last_row) // group, -1)
        order = jnp.argsort(-work, stable=True).astype(jnp.int32)
    # Materialise the cell maps. Fused into the gathers that read them, every element would redo
    # their binary searches, a chain of dependent loads: 9 us per layer for a 1-token decode (trace).
    cell_src, row_cell = lax.optimization_barrier((cell_src, row_cell))
    return seq, row0, row_end, base, order, live_tiles[None], cell_src, row_cell


def rows_into_cells(q, cell_src, num_kv_heads: int):
    """q [T, N, H] -> [K, cells, H]: the rows of kv head k (its G query heads per token,
    token-major), each at its tile's cell."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    rows = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    return rows.reshape(num_kv_heads, num_tokens * group, head_dim)[:, cell_src]


def rows_to_tokens(rows, num_tokens: int, num_heads: int):
    """[K, T*G, H] rows (cells already gathered back with row_cell) -> [T, N, H]."""
    num_kv_heads, _, head_dim = rows.shape
    group = num_heads // num_kv_heads
    return (
        rows.reshape(num_kv_heads, num_tokens, group, head_dim)
        .transpose(1, 0, 2, 3)
        .reshape(num_tokens, num_heads, head_dim)
    )
