"""The persistent input batch: the runner's host copy of every running request, one row each.

    SchedulerOutput --apply()--> rows freed (removed_ids), rows filled (new_requests), pages
                                 appended (new_page_ids); a row stays where it is until freed
                    --stage()--> the step's packed inputs, gathered from the rows with numpy

    row r:  token_ids[r, :num_known[r]]   prompt, then outputs read back from the device
            page_table[r, :num_pages[r]]   the request's pages (the device holds the same table)
            sampling columns               temperature, top_k, ..., written once when filled
            logit bias                     a row with logit_bias or min_tokens is listed in
                                           bias_writes when filled: the runner writes its
                                           device LogitBias row before the step

A *row* is a request's place here, and also its row of the device page table and penalty
counts. A step gathers the rows it grants, in the SchedulerOutput's order: sequence i of the step
is row rows[i]. The Python work of a step is a dict lookup per granted row plus work per change
(a new request, a new page, a row with logit bias); everything else is numpy over the step.

A decode token that the previous step sampled and that has not been read back yet is left on the
device: the step's prev_seq points at the sequence that sampled it (last_seq), and the device
takes it from there.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from jaxserve.scheduler.output import NewRequestData, SchedulerOutput


class InputBatch:
    def __init__(
        self,
        *,
        max_rows: int,
        max_model_len: int,
        page_size: int,
        pages_per_seq: int,
        num_pages: int,
        vocab_size: int,
        processor_names: list[str],
    ):
        self.max_rows, self.page_size, self.num_pages = max_rows, page_size, num_pages
        self.vocab_size, self.processor_names = vocab_size, processor_names
        self.bias_writes: list[int] = []  # rows filled since the last take_bias_writes() that need their bias written
        self.row_of: dict[str, int] = {}
        # The last step's (request ids, rows): a step that grants the same requests, with no row
        # freed or filled since, reuses its rows (comparing the id lists is C work: the same str
        # objects, compared by identity; looking each up was ~35 ns a row).
        self._step_rows: tuple[list[str], np.ndarray] | None = None
        self._arange = np.arange(max_rows, dtype=np.int32)
        self._ones, self._true = np.ones(max_rows, np.int32), np.ones(max_rows, bool)
        for constant in (self._arange, self._ones, self._true):
            constant.flags.writeable = False
        self._free = list(range(max_rows - 1, -1, -1))  # pop() hands out row 0 first
        i32 = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        self.token_ids = i32(max_rows, max_model_len + 1)  # +1: the token sampled at the last position
        self.num_known = i32(max_rows)
        self.num_prompt = i32(max_rows)
        self.page_table = i32(max_rows, pages_per_seq)
        self.num_pages_of = i32(max_rows)
        self.generation = i32(max_rows)  # bumped when a row changes hands: stale results are dropped
        self.last_seq = np.full(max_rows, -1, np.int32)  # its sequence in the step launched last, if it sampled
        self.params: list = [None] * max_rows
        # Sampling columns, written once per request.
        f32 = lambda: np.zeros(max_rows, np.float32)  # noqa: E731
        b = lambda: np.zeros(max_rows, bool)  # noqa: E731
        self.temperature, self.top_p, self.min_p = f32(), f32(), f32()
        self.top_k = i32(max_rows)
        self.min_tokens = i32(max_rows)
        self.repetition_penalty, self.presence_penalty, self.frequency_penalty = f32(), f32(), f32()
        self.seed = np.zeros(max_rows, np.uint32)
        self.wants_logprobs, self.has_penalties, self.needs_bias, self.needs_sort = b(), b(), b(), b()
        self.wants_prompt_logprobs = b()
        self.processor_mask = np.zeros((len(processor_names), max_rows), bool)

    @property
    def num_free(self) -> int:
        return len(self._free)

    # -- the SchedulerOutput's changes ----------------------------------------------------------
    def apply(self, out: SchedulerOutput) -> list[tuple[int, int, Sequence[int]]]:
        """Frees, fills and grows rows; returns the page-table changes for the device as
        (row, first page index, pages) runs: page_table[row, first:first+len(pages)] = pages."""
        if out.removed_ids or out.new_requests:
            self._step_rows = None
        for request_id in out.removed_ids:
            row = self.row_of.pop(request_id, None)
            if row is not None:
                self.params[row] = None
                self._free.append(row)
        changes = []
        for new in out.new_requests:
            row = self._fill(new)
            changes.append((row, 0, new.page_ids))
        row_of, table, count = self.row_of, self.page_table, self.num_pages_of
        new_page_ids = out.new_page_ids
        for i in itertools.compress(range(len(new_page_ids)), new_page_ids):  # grants with new pages: C skips the rest
            pages, row = new_page_ids[i], row_of[out.request_ids[i]]
            first = int(count[row])
            if len(pages) == 1:  # a decode row entering its next page: a scalar write (~0.05 us, a slice ~0.6)
                table[row, first] = pages[0]
            else:
                table[row, first : first + len(pages)] = pages
            count[row] = first + len(pages)
            changes.append((row, first, pages))
        return changes

    def _fill(self, new: NewRequestData) -> int:
        if new.request_id in self.row_of:
            raise RuntimeError(f"request {new.request_id!r} already has a row")
        if not self._free:
            raise RuntimeError("no free row: more running requests than max_num_seqs")
        row = self.row_of[new.request_id] = self._free.pop()
        self.generation[row] += 1
        self.last_seq[row] = -1
        n = len(new.token_ids)
        self.token_ids[row, :n] = new.token_ids
        self.num_known[row], self.num_prompt[row] = n, new.num_prompt_tokens
        self.page_table[row, : len(new.page_ids)] = new.page_ids
        self.num_pages_of[row] = len(new.page_ids)
        p = self.params[row] = new.sampling_params
        self.temperature[row], self.top_p[row], self.min_p[row] = p.temperature, p.top_p, p.min_p
        self.top_k[row] = self.vocab_size if p.top_k == -1 else min(p.top_k, self.vocab_size)
        self.repetition_penalty[row] = p.repetition_penalty
        self.presence_penalty[row], self.frequency_penalty[row] = p.presence_penalty, p.frequency_penalty
        self.seed[row] = new.seed
        self.wants_logprobs[row] = p.logprobs is not None
        self.wants_prompt_logprobs[row] = p.prompt_logprobs is not None
        self.has_penalties[row] = p.has_penalties
        self.needs_bias[row] = bool(p.logit_bias) or p.min_tokens > 0
        self.min_tokens[row] = p.min_tokens
        if self.needs_bias[row]:
            self.bias_writes.append(row)
        cuts = -1 < p.top_k < self.vocab_size or p.top_p < 1 or p.min_p > 0
        self.needs_sort[row] = (p.temperature > 0 and cuts) or bool(p.logprobs)
        for j, name in enumerate(self.processor_names):
            self.processor_mask[j, row] = name in p.logits_processors
        return row

    # -- one step's inputs ----------------------------------------------------------------------
    def stage(self, out: SchedulerOutput, x) -> StagedStep:
        """Writes the step's inputs into x (the packed buffer's views, zeroed; shapes of the
        step's bucket) and returns what reading its result back needs."""
        n = out.num_rows
        rows = self._rows(out.request_ids)
        # Reading a list of Python ints costs ~15 ns an item (np.fromiter; np.asarray ~25): a
        # decode step's q_lens (all 1) and samples (all True) are recognized by C loops instead.
        decode = out.num_scheduled_tokens.count(1) == n  # one token a sequence
        if decode:
            q_lens, total = self._ones[:n], n
        else:
            q_lens = np.fromiter(out.num_scheduled_tokens, np.int32, n)
            total = int(q_lens.sum())
        starts = np.fromiter(out.num_computed_tokens, np.int32, n)
        all_sample = all(out.samples)
        samples = self._true[:n] if all_sample else np.fromiter(out.samples, bool, n)
        num_tokens, num_seqs = x.tokens.shape[0], x.kv_lens.shape[0]
        if total > num_tokens or n > num_seqs:
            raise ValueError(f"{total} tokens in {n} sequences do not fit the bucket ({num_tokens}, {num_seqs})")
        cu = x.cu_q_lens
        cu[:] = total
        cu[0] = 0
        q_lens.cumsum(out=cu[1 : n + 1])  # (the method: np.cumsum's wrapper cost ~2 us more)
        if decode:  # token i is sequence i's (not total == n: q_lens [0, 2] has it too)
            seq, pos, row = self._arange[:n], starts, rows
        else:
            seq = np.repeat(self._arange[:n], q_lens)  # [total] the sequence of each token
            pos = starts[seq] + np.arange(total, dtype=np.int32) - cu[seq]
            row = rows[seq]
        page_of = pos // self.page_size  # [total] each token's page, by its index in the row's table
        if (page_of >= self.num_pages_of[row]).any():
            raise ValueError("a granted token has no page")
        x.tokens[:total] = self.token_ids[row, pos]
        # Tokens not read back yet: the previous step sampled them, the device has them.
        pending = pos >= self.num_known[row]
        x.prev_seq[:] = -1
        x.prev_seq[:total][pending] = self.last_seq[row[pending]]
        if pending.any() and (x.prev_seq[:total][pending] < 0).any():
            raise RuntimeError("a granted token is neither known nor sampled by the previous step")
        x.positions[:total] = pos
        x.slot_mapping[:] = self.num_pages * self.page_size  # padding: out of range, dropped
        x.slot_mapping[:total] = self.page_table[row, page_of] * self.page_size + pos % self.page_size
        x.kv_lens[:n] = starts + q_lens
        x.logits_rows[:n] = cu[1 : n + 1] - 1
        x.num_seqs[0] = n
        x.table_rows[:] = self.max_rows  # the device table's last row: all zeros
        x.table_rows[:n] = rows
        self._stage_sampling(x.sampling, rows, starts, q_lens, seq, pos, total)
        # The sequences that sample this step are where the next step finds their tokens.
        self.last_seq[:] = -1
        sampling_seqs = self._arange[:n] if all_sample else np.flatnonzero(samples).astype(np.int32)
        self.last_seq[rows[sampling_seqs]] = sampling_seqs
        return StagedStep(
            rows=rows,
            generations=self.generation[rows],
            sample_positions=starts + q_lens,
            samples=samples,
            wants_logprobs=samples & self.wants_logprobs[rows],
            wants_prompt_logprobs=self.wants_prompt_logprobs[rows],
            needs_sort=bool(self.needs_sort[rows].any()),
        )

    def _rows(self, request_ids: list[str]) -> np.ndarray:
        """[n] the row of each request (read-only: the next step may reuse it)."""
        last = self._step_rows
        if last is not None and last[0] == request_ids:
            return last[1]
        rows = np.fromiter(map(self.row_of.__getitem__, request_ids), np.int32, len(request_ids))  # no frame a row
        rows.flags.writeable = False
        self._step_rows = (request_ids, rows)
        return rows

    def _stage_sampling(self, sb, rows, starts, q_lens, seq, pos, total) -> None:
        """Sampling inputs gathered from the rows; padding sequences greedy with nothing to apply."""
        n, no_row = len(rows), self.max_rows
        # ndarray.take(out=) gathers into the buffer without a temporary (~0.3 us less a column)
        for column, into in (
            (self.temperature, sb.temperature),
            (self.top_p, sb.top_p),
            (self.min_p, sb.min_p),
            (self.top_k, sb.top_k),
            (self.repetition_penalty, sb.repetition_penalty),
            (self.presence_penalty, sb.presence_penalty),
            (self.frequency_penalty, sb.frequency_penalty),
            (self.seed, sb.seeds),
        ):
            column.take(rows, out=into[:n])
        sb.top_p[n:] = 1
        sb.top_k[n:] = self.vocab_size
        sb.repetition_penalty[n:] = 1
        counters = starts + q_lens - self.num_prompt[rows]  # the output index of the token sampled
        sb.counters[:n] = counters
        sb.wants_logprobs[:n] = self.wants_logprobs[rows]
        sb.processor_mask[:, :n] = self.processor_mask[:, rows]
        sb.penalty_row[:] = no_row
        sb.reset_rows[:] = no_row
        sb.token_row[:] = no_row
        penalized = self.has_penalties[rows]
        if penalized.any():  # (none: every sequence keeps no_row, as the padding does)
            sb.penalty_row[:n] = np.where(penalized, rows, no_row)
            sb.reset_rows[:n] = np.where(penalized & (starts == 0), rows, no_row)
            sb.token_row[:total] = np.where(penalized[seq], rows[seq], no_row)
        sb.token_is_output[:total] = pos >= self.num_prompt[rows][seq]
        sb.bias_row[:] = no_row
        biased = self.needs_bias[rows]
        if biased.any():
            sb.bias_row[:n] = np.where(biased, rows, no_row)
        sb.ban_stops[:n] = counters < self.min_tokens[rows]

    def take_bias_writes(self, eos_token_ids: frozenset[int]) -> list[tuple[int, list, list, list]]:
        """(row, logit_bias ids, their values, the ids banned before min_tokens) for each row
        filled since the last call whose request has a logit_bias or min_tokens."""
        writes = []
        for row in self.bias_writes:
            p = self.params[row]
            if p is None:  # freed again before its first step
                continue
            banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            writes.append((row, list(p.logit_bias), list(p.logit_bias.values()), sorted(banned)))
        self.bias_writes = []
        return writes

    # -- results --------------------------------------------------------------------------------
    def record(self, staged: StagedStep, tokens: np.ndarray) -> None:
        """The step's sampled tokens, read back: kept in their rows (rows that changed hands
        since the step was staged are skipped)."""
        keep = staged.samples & staged.current(self.generation)
        rows, positions = staged.rows[keep], staged.sample_positions[keep]
        self.token_ids[rows, positions] = tokens[: len(keep)][keep]
        self.num_known[rows] = np.maximum(self.num_known[rows], positions + 1)  # rows are distinct


class StagedStep:
    """What a launched step needs when its result comes back."""

    __slots__ = (
        "rows",
        "generations",
        "sample_positions",
        "samples",
        "wants_logprobs",
        "wants_prompt_logprobs",
        "needs_sort",
    )

    def __init__(self, rows, generations, sample_positions, samples, wants_logprobs, wants_prompt_logprobs, needs_sort):
        self.rows = rows  # [n] each sequence's row
        self.generations = generations  # [n] the rows' generation when staged
        self.sample_positions = sample_positions  # [n] where a sampled token goes in its row
        self.samples = samples  # [n] bool
        self.wants_logprobs = wants_logprobs  # [n] bool: samples, and its request asked for logprobs
        self.wants_prompt_logprobs = wants_prompt_logprobs  # [n] bool
        self.needs_sort = needs_sort  # some row needs the sampler that sorts the vocabulary

    def current(self, generation: np.ndarray) -> np.ndarray:
        """[n] bool: the rows still hold the requests they held when staged."""
        return generation[self.rows] == self.generations
