"""The engine: turns the scheduler's grants into compiled steps and the steps into outputs.

LLMEngine.step():  scheduler.schedule() step n+1 -> runner.dispatch: staging.fill_ragged into
one packed buffer (wire.Packing; padded to a bucket of buckets.BucketPlan) -> step.make_step
(the model) then step.make_sampler (with or without the vocabulary sort, as the rows need;
KV cache and device state donated; decode tokens of step n read on the device) -> wait for
step n -> scheduler.update(its tokens) -> emit it (detokenizer, stop strings, RequestOutputs)
while the device runs step n+1

slots: each running request's device row (page table, penalty counts)

setup: model, tokenizer, KV sizing     async_engine.AsyncLLM: the loop on its own thread
greedy: a minimal fixed-batch driver   compile_counter: proves nothing compiles after warm-up
executable_cache: compiled steps kept on disk, so a warm start lowers nothing
"""
