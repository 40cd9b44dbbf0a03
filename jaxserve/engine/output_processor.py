"""Output processing: EngineCoreOutputs (token ids, per step) -> RequestOutputs (text, per request).

    process(step output):  for each request that advanced: append its token, its logprobs
        (decoded), detokenize incrementally and look for stop strings
        -> a RequestOutput for each family touched (one per user request: n samples together),
           shaped by its params' output_kind: CUMULATIVE a snapshot of everything so far,
           DELTA what is new since its last output (the samples that changed), FINAL_ONLY one
           output when it finishes. Only CUMULATIVE costs work that grows with the output.
           A finished family's output carries its timeline (RequestMetrics: queued here,
           first admitted, first and last token, stamped once per request or per step).
        -> the samples a stop string ended, for the engine core to finish

It runs wherever its caller wants (LLMEngine: the engine's thread; AsyncLLM: the event loop),
never touches the scheduler or the device, and owns all per-family state of what was emitted.
"""

from __future__ import annotations

import dataclasses
import time

from jaxserve.engine.core import EngineCoreOutput
from jaxserve.engine.detokenizer import IncrementalDetokenizer
from jaxserve.engine.runner import TokenLogprobs
from jaxserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams

CUMULATIVE, DELTA, FINAL_ONLY = RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY


@dataclasses.dataclass(slots=True)
class _Sample:
    """One of a family's n samples, as emitted so far. DELTA keeps only what it has not sent:
    each output takes the token and logprob lists, and the sample starts new ones."""

    index: int
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # DELTA: what earlier outputs carried
    sent_chars: int = 0
    sent_finish: bool = False


@dataclasses.dataclass(slots=True)
class _Family:
    """One user request: its n samples and its prompt's logprobs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sample_ids: list[str]
    samples: list[_Sample]
    prompt_logprobs: list[PositionLogprobs | None] | None
    num_unfinished: int = 0  # 0: every sample finished (read per family and step: no property call)
    num_cached_tokens: int = 0
    sent_prompt_logprobs: bool = False  # DELTA: the first output carries them
    # Shortcuts of process() for a family of one sample, once its first token is out (its first
    # output sent, its prompt's logprobs with it): streams (DELTA, no logprobs): each token's
    # output is that token and its text alone; quiet (FINAL_ONLY): no output until it finishes.
    streams: bool = False
    quiet: bool = False
    # its timeline (time.perf_counter): added here, first admitted, first token read back
    queued_at: float = 0.0
    scheduled_at: float | None = None
    first_token_at: float | None = None

    def finish(self, sample: _Sample, reason: str, stop_reason: int | str | None = None) -> None:
        if sample.finish_reason is None:
            self.num_unfinished -= 1
        sample.finish_reason, sample.stop_reason = reason, stop_reason


class OutputProcessor:
    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._families: dict[str, _Family] = {}
        self._sample_of: dict[str, tuple[_Family, _Sample]] = {}  # sample request id -> its family

    def add(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams, sample_ids
    ) -> None:
        if request_id in self._families:
            raise ValueError(f"request id {request_id!r} is already in use")
        samples = []
        for i in range(len(sample_ids)):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop=params.include_stop_str_in_output,
                )
            samples.append(_Sample(i, detok, logprobs=[] if params.logprobs is not None else None))
        wants_prompt_lp = params.prompt_logprobs is not None
        family = _Family(
            request_id,
            prompt,
            prompt_token_ids,
            params,
            list(sample_ids),
            samples,
            [None] * len(prompt_token_ids) if wants_prompt_lp else None,
            num_unfinished=len(samples),
            queued_at=time.perf_counter(),
        )
        self._families[request_id] = family
        for sample_id, sample in zip(sample_ids, samples):
            self._sample_of[sample_id] = (family, sample)

    def process(self, step: EngineCoreOutput) -> tuple[list[RequestOutput], list]:
        """Returns the RequestOutputs of the families this step touched (FINAL_ONLY ones: if it
        finished them), in the order of their first sample in the step, and the (sample id, stop
        string) pairs of samples a stop string ended."""
        stopped = []
        for request_id, cached in step.num_cached_tokens.items():
            if request_id in self._families:
                self._families[request_id].num_cached_tokens = cached
        for request_id, at in step.scheduled_at.items():
            family = self._families.get(request_id)
            if family is not None and family.scheduled_at is None:  # a later sibling's is not the family's
                family.scheduled_at = at
        for sample_id, entries in step.prompt_logprobs.items():
            family, sample = self._sample_of.get(sample_id, (None, None))
            if family is None or family.prompt_logprobs is None or sample.index != 0:
                continue  # each sample computed the prompt: the first one's logprobs are kept
            k = family.params.prompt_logprobs
            for pos, lp in entries:
                family.prompt_logprobs[pos] = self._position_logprobs(lp, k)
        # A streaming family's output is built as its row is read (the hot loop of a step, once per
        # row: it stays lean); any other family's once the loop has seen all its samples, then put
        # where its first sample was: after as many streamed outputs as `places` says (0 if absent).
        outputs: list[RequestOutput] = []
        touched: dict[str, _Family] = {}
        places: dict[str, int] = {}
        logprobs, finishes, sample_of = step.logprobs, step.finished, self._sample_of
        for sample_id, token in zip(step.request_ids, step.token_ids):
            family, sample = sample_of.get(sample_id, (None, None))
            if sample is None or sample.finish_reason is not None:  # aborted, or a stop string ended it
                continue
            sample.token_ids.append(token)
            lp = logprobs.get(sample_id) if logprobs else None
            if lp is not None and sample.logprobs is not None:
                sample.logprobs.append(self._position_logprobs(lp, family.params.logprobs))
                sample.cumulative += lp.logprob
            finished = finishes.get(sample_id) if finishes else None
            detok = sample.detok
            stop = None if detok is None else detok.push(token)
            if stop is not None:
                family.finish(sample, "stop", stop)
                if finished is None:  # the engine does not know yet
                    stopped.append((sample_id, stop))
            elif finished is not None:
                family.finish(sample, *finished)
            elif family.streams:  # _output(family) by hand
                token_ids, sample.token_ids = sample.token_ids, []
                if detok is None:
                    text = ""
                else:
                    text = detok.text[sample.sent_chars : detok.visible_len(False)]
                    sample.sent_chars += len(text)
                completion = CompletionOutput(sample.index, text, token_ids, None, None)
                outputs.append(
                    RequestOutput(
                        family.request_id,
                        family.prompt,
                        family.prompt_token_ids,
                        None,
                        [completion],
                        False,
                        family.num_cached_tokens,
                    )
                )
                continue
            elif family.quiet:
                continue
            if outputs and family.request_id not in touched:
                places[family.request_id] = len(outputs)
            touched[family.request_id] = family
        emitted = []
        for family in touched.values():
            if family.first_token_at is None:
                family.first_token_at = step.timestamp
                if len(family.samples) == 1:
                    kind = family.params.output_kind
                    family.streams = kind is DELTA and family.samples[0].logprobs is None
                    family.quiet = kind is FINAL_ONLY
            if not family.num_unfinished:
                emitted.append(self._output(family, finished_at=step.timestamp))
                self._forget(family)
            elif family.params.output_kind is not FINAL_ONLY:
                emitted.append(self._output(family))
        if not outputs:
            return emitted, stopped
        for i, out in enumerate(emitted):  # among the streamed ones (an output's id is its family's)
            outputs.insert(places.get(out.request_id, 0) + i, out)
        return outputs, stopped

    def abort(self, request_id: str) -> RequestOutput | None:
        """The family's final output, its unfinished samples marked aborted (None if unknown)."""
        family = self._families.get(request_id)
        if family is None:
            return None
        for sample in family.samples:
            if sample.finish_reason is None:
                family.finish(sample, "abort")
        self._forget(family)
        return self._output(family)

    def drop(self, request_id: str) -> None:
        """Forgets a family without an output (it failed)."""
        family = self._families.get(request_id)
        if family is not None:
            self._forget(family)

    def _forget(self, family: _Family) -> None:
        self._families.pop(family.request_id, None)
        for sample_id in family.sample_ids:
            self._sample_of.pop(sample_id, None)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._families)

    def has(self, request_id: str) -> bool:
        return request_id in self._families

    @property
    def request_ids(self) -> list[str]:
        return list(self._families)

    def _position_logprobs(self, lp: TokenLogprobs, k: int) -> PositionLogprobs:
        out = {lp.token_id: Logprob(lp.logprob, lp.rank, self._decode_one(lp.token_id))}
        for rank, (tid, val) in enumerate(zip(lp.top_ids[:k], lp.top_logprobs[:k]), start=1):
            if tid >= 0:  # -1 pads a vocabulary smaller than k
                out.setdefault(int(tid), Logprob(float(val), rank, self._decode_one(int(tid))))
        return out

    def _decode_one(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _output(self, family: _Family, finished_at: float | None = None) -> RequestOutput:
        """finished_at: when the engine finished it (its last token read back), for its metrics."""
        if family.params.output_kind is DELTA:
            outs = [out for s in family.samples if (out := self._delta(s)) is not None]
            prompt_logprobs = None if family.sent_prompt_logprobs else family.prompt_logprobs
            family.sent_prompt_logprobs = True
        else:
            outs, prompt_logprobs = self._snapshot(family)
        return RequestOutput(
            family.request_id,
            family.prompt,
            family.prompt_token_ids,
            prompt_logprobs,
            outs,
            family.num_unfinished == 0,
            family.num_cached_tokens,
            None if finished_at is None else self._metrics(family, finished_at),
        )

    @staticmethod
    def _snapshot(family: _Family) -> tuple[list[CompletionOutput], list | None]:
        """CUMULATIVE and FINAL_ONLY: every sample in full, and the prompt's logprobs. A
        FINAL_ONLY output is the family's last: its lists are handed over, not copied."""
        copy = list if family.params.output_kind is CUMULATIVE else _same
        outs = [
            CompletionOutput(
                index=s.index,
                text="" if s.detok is None else s.detok.visible_text(s.finish_reason is not None),
                token_ids=copy(s.token_ids),
                cumulative_logprob=s.cumulative if s.logprobs is not None else None,
                logprobs=copy(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in family.samples
        ]
        prompt_logprobs = family.prompt_logprobs
        return outs, None if prompt_logprobs is None else copy(prompt_logprobs)

    @staticmethod
    def _metrics(family: _Family, finished_at: float) -> RequestMetrics:
        first_token = family.first_token_at if family.first_token_at is not None else finished_at
        # no admission seen (its report was lost with a failed step): its queue ended by its first token
        scheduled = family.scheduled_at if family.scheduled_at is not None else first_token
        return RequestMetrics(family.queued_at, scheduled, first_token, finished_at)

    @staticmethod
    def _delta(s: _Sample) -> CompletionOutput | None:
        """What the sample has that its earlier outputs did not carry (None: nothing); the
        output takes its lists of unsent tokens and logprobs."""
        finished = s.finish_reason is not None
        detok = s.detok
        text = "" if detok is None else detok.text[s.sent_chars : detok.visible_len(finished)]  # the new part alone
        if not s.token_ids and not text and (s.sent_finish or not finished):
            return None
        has_logprobs = s.logprobs is not None
        out = CompletionOutput(
            s.index,
            text,
            s.token_ids,
            s.cumulative if has_logprobs else None,
            s.logprobs,
            s.finish_reason,
            s.stop_reason,
        )
        s.token_ids = []
        if has_logprobs:
            s.logprobs = []
        s.sent_chars += len(text)
        s.sent_finish = finished
        return out


def _same(x):
    return x
