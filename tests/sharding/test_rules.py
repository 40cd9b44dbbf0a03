"""Logical-axis rules and a model loaded onto a tensor-parallel mesh of CPU devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from models.loading import load_model
from sharding import logical_sharding, make_mesh
from tests.conftest import FIXTURES
from tests.models.runner import packed_logits, relative_error


def test_rules_megatron_and_replicate_when_indivisible():
    mesh = make_mesh(4)
    assert logical_sharding(mesh, ("embed", "heads", "head_dim"), (64, 8, 16)).spec == PartitionSpec(None, "tp", None)
    assert logical_sharding(mesh, ("mlp", "embed"), (128, 64)).spec == PartitionSpec("tp", None)
    assert logical_sharding(mesh, ("embed", "kv_heads", "head_dim"), (64, 2, 16)).spec == PartitionSpec(
        None, None, None
    )
    assert logical_sharding(mesh, ("batch", "vocab"), (4, 256)).spec == PartitionSpec(None, "tp")
    with pytest.raises(ValueError, match="no sharding rule"):
        logical_sharding(mesh, ("experts",))
    with pytest.raises(ValueError, match="tensor_parallel_size=16"):
        make_mesh(16)


@pytest.mark.skipif(jax.device_count() < 2, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count")
def test_model_sharded_over_two_devices_gives_same_logits():
    folder = FIXTURES / "tiny" / "llama_gqa_llama3rope"
    mesh = make_mesh(2)
    sharded = load_model(folder, progress=False, mesh=mesh)
    q = sharded.model.layers[0].self_attn.q_proj.weight[...]
    assert q.sharding.spec == PartitionSpec(None, "tp", None) and len(q.devices()) == 2
    prompt = [np.arange(2, 40).tolist()]
    assert (
        relative_error(packed_logits(sharded, prompt), packed_logits(load_model(folder, progress=False), prompt))
        <= 1e-5
    )
