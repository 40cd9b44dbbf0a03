"""Output processing with the real tokenizer (SmolLM2's), DELTA: R requests, each given one token
a step, with the stop strings given after R and L (none by default); the median thread CPU time
of the last 100 of L steps (us). Shows how the cost grows with the text already emitted.

    PYTHONPATH=$PWD .venv/bin/python docs/results/2026-12-07-host/micro_detok.py 64 3000 [STOP ...]
"""

import statistics
import sys
import time

from jaxserve.default_model import default_model_folder
from jaxserve.engine.core import EngineCoreOutput
from jaxserve.engine.output_processor import OutputProcessor
from jaxserve.sampling_params import RequestOutputKind, SamplingParams
from jaxserve.tokenizer import load_tokenizer

R, L, STOP = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
tokenizer = load_tokenizer(default_model_folder(progress=False))
proc = OutputProcessor(tokenizer)
ids = [f"r{i}" for i in range(R)]
for rid in ids:
    proc.add(rid, None, [], SamplingParams(max_tokens=100_000, stop=STOP, output_kind=RequestOutputKind.DELTA), [rid])
text = " the quick brown fox jumps over the lazy dog and keeps running far away"
words = tokenizer(text, add_special_tokens=False)["input_ids"]
times = []
for step in range(L):
    out = EngineCoreOutput(ids, [words[step % len(words)]] * R, {}, {}, {})
    t0 = time.thread_time_ns()
    proc.process(out)
    if step >= L - 100:
        times.append((time.thread_time_ns() - t0) / 1e3)
print(f"R={R}, after {L} tokens, stop strings {STOP}: {statistics.median(times):.0f} us a step")
