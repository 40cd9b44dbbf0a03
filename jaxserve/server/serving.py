"""Serving: what one OpenAI request needs from the engine, on the event loop's side.

    open(id, prompts, params) -> admit: 503 if the queue would pass max_num_seqs + max_waiting_requests
                                 sequences; prepare in a worker thread: tokenize, check the context
                                 length (ValueError -> 400)             -> OpenRequest
    OpenRequest.stream()      -> one AsyncLLM.generate per prompt, merged into (prompt index,
                                 RequestOutput), metrics observed on the way; closing it aborts
                                 whatever is unfinished and gives back the queue share

The queue limit counts sequences the server has admitted and not yet finished: those beyond
max_num_seqs cannot all be running, so they wait. It is decided here, before any work is queued.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from jaxserve.api.errors import bad_request, from_value_error, overloaded
from jaxserve.engine.async_engine import AsyncLLM
from jaxserve.engine.llm_engine import PreparedRequest
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.metrics import Metrics
from jaxserve.server.settings import ServerSettings

_DONE = object()


class Serving:
    def __init__(self, llm: AsyncLLM, settings: ServerSettings, metrics: Metrics):
        self.llm, self.settings, self.metrics = llm, settings, metrics
        self.engine = llm.engine
        self.capacity = settings.engine.max_num_seqs + settings.max_waiting_requests
        self.admitted = 0  # sequences admitted and not finished; touched only on the event loop

    async def open(self, request_id: str, prompts: list, params: SamplingParams, arrival: float) -> OpenRequest:
        """Admits (or 503) and prepares (or 400) a request; the caller must close() what it gets."""
        sequences = len(prompts) * params.n
        if sequences > self.capacity:  # would never fit: the request's fault, not a busy server
            raise bad_request(
                f"{len(prompts)} prompt(s) x n={params.n} = {sequences} sequences exceed the server's "
                f"queue of {self.capacity}",
                param="n",
            )
        if self.admitted + sequences > self.capacity:
            raise overloaded(self.settings.retry_after_s)
        self.admitted += sequences
        req = OpenRequest(self, request_id, sequences, arrival)
        try:
            req.prepared = await self._prepare(prompts, params)
        except BaseException:
            req.close()
            raise
        return req

    async def _prepare(self, prompts: list, params: SamplingParams) -> list[PreparedRequest]:
        """Tokenizes and validates every prompt in a worker thread (CPU work off the event loop)."""

        def work():  # a prompt may come as a function that renders it (a chat template): run here too
            return [self.engine.prepare(p() if callable(p) else p, params) for p in prompts]

        try:
            return await asyncio.to_thread(work)
        except ValueError as e:
            raise from_value_error(e) from None

    async def observed(self, engine_id: str, prep: PreparedRequest, arrival: float) -> AsyncIterator[RequestOutput]:
        """One engine request's outputs, with its latencies and token counts recorded."""
        observer = self.metrics.observer(prep.params, arrival)
        prompt = {"prompt": prep.prompt, "prompt_token_ids": prep.prompt_token_ids}
        async for out in self.llm.generate(prompt, prep.params, engine_id):
            observer.output(out, time.perf_counter())
            yield out


class OpenRequest:
    """An admitted, prepared request: its prompts (token ids) and its share of the queue."""

    def __init__(self, serving: Serving, request_id: str, sequences: int, arrival: float):
        self.serving, self.request_id, self.sequences, self.arrival = serving, request_id, sequences, arrival
        self.prepared: list[PreparedRequest] = []
        self._closed = False

    def close(self) -> None:
        """Gives back the queue share (idempotent)."""
        if not self._closed:
            self._closed = True
            self.serving.admitted -= self.sequences

    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative RequestOutput) as they come, all prompts interleaved.
        An engine failure on any prompt raises here; leaving early aborts the rest."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p: int, prep: PreparedRequest):
            try:
                async for out in self.serving.observed(f"{self.request_id}-{p}", prep, self.arrival):
                    queue.put_nowait((p, out))
                queue.put_nowait((p, _DONE))
            except Exception as e:  # handed to the consumer, who fails the whole request
                queue.put_nowait((p, e))

        tasks = [asyncio.create_task(pump(p, prep)) for p, prep in enumerate(self.prepared)]
        try:
            remaining = len(tasks)
            while remaining:
                p, item = await queue.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield p, item
        finally:
            # No await here: this also runs inside a cancelled scope (client gone). Cancelling a
            # pump unwinds its AsyncLLM.generate, whose finally sends the abort synchronously.
            for t in tasks:
                t.cancel()
            self.close()
