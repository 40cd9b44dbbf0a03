"""The pure-Python parts of a steady decode step, without JAX's device calls: schedule, apply,
stage, record, update, outputs (DELTA, no tokenizer), R rows. Medians of thread CPU time (us).

    PYTHONPATH=$PWD .venv/bin/python docs/results/2026-12-07-host/micro_host.py 256
"""

import statistics
import sys
import time

import numpy as np

from jaxserve.engine.core import EngineCoreOutput
from jaxserve.engine.input_batch import InputBatch
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.engine.packing import Packing
from jaxserve.engine.step import step_input_spec
from jaxserve.sampling_params import RequestOutputKind, SamplingParams
from jaxserve.scheduler import KVPageManager, Request, Scheduler, SchedulerConfig

R = int(sys.argv[1]) if len(sys.argv) > 1 else 256
WARM, STEPS, V, PAGE = 30, 300, 101, 16
sched = Scheduler(SchedulerConfig(R, max(R, 16), 4096), KVPageManager(R * 40, PAGE))
proc = OutputProcessor(None)
batch = InputBatch(
    max_rows=R,
    max_model_len=4096,
    page_size=PAGE,
    pages_per_seq=256,
    num_pages=R * 40,
    vocab_size=V,
    processor_names=[],
)
buffer, views = Packing(step_input_spec(max(R, 16), R, max(R, 16) // PAGE + R + 1, 0)).new()
params = SamplingParams(max_tokens=2000, ignore_eos=True, temperature=0.0, output_kind=RequestOutputKind.DELTA)
for i in range(R):
    rid = f"decode-{i}"
    sched.add_request(Request(rid, [(i + j) % V for j in range(8)], params, max_model_len=4096))
    proc.add(rid, None, [], params, [rid])
times: dict[str, list[float]] = {k: [] for k in ("schedule", "apply", "stage", "record", "update", "outputs")}
for step in range(WARM + STEPS):
    t = [time.thread_time_ns()]
    out = sched.schedule()
    t.append(time.thread_time_ns())
    batch.apply(out)
    t.append(time.thread_time_ns())
    buffer.fill(0)
    staged = batch.stage(out, views)
    t.append(time.thread_time_ns())
    sampled = np.arange(out.num_rows, dtype=np.int32) % V
    batch.record(staged, sampled)
    tokens = sampled.tolist()
    t.append(time.thread_time_ns())
    update = sched.update(out, tokens)
    ids = [out.request_ids[i] for i in update.advanced]
    core_out = EngineCoreOutput(ids, [tokens[i] for i in update.advanced], update.finished, {}, {})
    t.append(time.thread_time_ns())
    proc.process(core_out)
    t.append(time.thread_time_ns())
    if step >= WARM:
        for k, a, b in zip(times, t, t[1:]):
            times[k].append((b - a) / 1e3)
medians = {k: statistics.median(v) for k, v in times.items()}
print(f"R={R}: " + "  ".join(f"{k} {v:.0f}" for k, v in medians.items()) + f"  total {sum(medians.values()):.0f} us")
