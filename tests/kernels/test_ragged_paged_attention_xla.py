"""The plain-XLA implementation against the reference on random ragged batches."""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels import ragged_paged_attention_reference
from pallas_kernels.ragged_paged_attention_xla import ragged_paged_attention_xla
from tests.kernels.test_ragged_paged_attention_reference import random_batch


@pytest.mark.parametrize(
    "group,page_size,dtype,tol", [(1, 16, np.float32, 1e-5), (4, 32, np.float32, 1e-5), (8, 16, "bfloat16", 1e-2)]
)
def test_xla_matches_reference(group, page_size, dtype, tol):
    import ml_dtypes

    rng = np.random.default_rng(group)
    args, _, _ = random_batch(
        rng,
        q_lens=[1, 37, 5, 1, 128, 1],
        kv_lens=[1, 37, 2048, 300, 640, 17],
        num_heads=2 * group,
        num_kv_heads=2,
        head_dim=64,
        page_size=page_size,
    )
    if dtype == "bfloat16":
        args = {k: (v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v) for k, v in args.items()}
    want = np.asarray(ragged_paged_attention_reference(**args, sm_scale=0.125)).astype(np.float32)
    got = np.asarray(ragged_paged_attention_xla(**args, sm_scale=0.125)).astype(np.float32)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= tol
    total = args["cu_q_lens"][-1]
    assert np.all(got[total:] == 0)
