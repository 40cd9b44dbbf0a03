"""The engine: host staging of ragged batches, the compiled step, and the loops that drive it.

    sequences -> staging.stage_batch (numpy, padded to a bucket) -> step.make_forward (jit,
    KV donated) -> logits -> tokens -> back to the sequences
"""
