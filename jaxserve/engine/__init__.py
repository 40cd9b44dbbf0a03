"""The engine: requests in, compiled steps on the device, RequestOutputs out.

input_processor   prompt -> token ids, validated                       (any thread)
core.EngineCore   one step: scheduler.schedule() -> SchedulerOutput -> runner.execute
                  (input_batch.apply + stage -> one packed buffer (packing.py) padded to a
                  bucket (buckets.py) -> model and sampler programs (step.py, sampler.py))
                  -> wait for the step before -> scheduler.update -> EngineCoreOutput
output_processor  EngineCoreOutput -> detokenized RequestOutputs, stop strings  (off the
                  engine thread in AsyncLLM)
recovery          a failed step: its requests retried alone, only a repeat offender fails
startup           model, memory plan (memory_plan.py), runner, warm-up, executable cache

llm_engine.LLMEngine   all of it on the caller's thread (LLM, tests, benchmarks)
async_engine.AsyncLLM  outputs on the event loop (server); the core elsewhere: EngineThread (a
                       thread here) or core_client.EngineCoreClient (the engine process,
                       core_process.py); both run core_loop.CoreLoop on messages.py's messages
multihost              several processes (hosts), one mesh: process 0's core broadcasts each
                       turn's inputs, the others apply them and step (jaxserve serve --process-id)
compile_counter        proves nothing compiles after warm-up
"""
