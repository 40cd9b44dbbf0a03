"""Helpers for tests and benchmarks, not used by the engine: a fixed batch of prompts decoded
greedily through the compiled forward (greedy.py), staged as one ragged batch with a dense page
table (fixed_batch.py). The serving engine stages steps from its persistent input batch instead
(jaxserve.engine.input_batch). mock_model.py: a model whose next token is computable by hand
(the sum of the sequence mod V), for exact engine tests and scripts/bench_host.py."""
