"""The engine: turns the scheduler's grants into compiled steps and the steps into outputs.

    LLMEngine.step():  scheduler.schedule() -> runner.dispatch: staging.stage_batch (numpy, padded
    to a bucket of buckets.BucketPlan) -> step.make_step (one jit: model forward + sampler, KV cache
    donated) -> emit the previous step (detokenizer, stop strings, RequestOutputs) while the device
    works -> wait -> scheduler.update(sampled tokens)

    setup: model, tokenizer, KV sizing     async_engine.AsyncLLM: the loop on its own thread
    greedy: a minimal fixed-batch driver   compile_counter: proves nothing compiles after warm-up
"""
