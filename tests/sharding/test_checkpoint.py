"""Orbax checkpoints: HF -> checkpoint for a tp=2 mesh (scripts/shard_checkpoint.py) -> restored
bit for bit, at tp=2 and onto other meshes (tp=4, and tp=8 where heads must be padded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from models.loading import load_model
from sharding import make_mesh
from tests.conftest import FIXTURES

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
)
ROOT = Path(__file__).resolve().parents[2]
TINY = FIXTURES / "tiny" / "qwen2_qkvbias_tied"  # 4 query / 2 kv heads: tp=8 pads to 16 / 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tp2"
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "shard_checkpoint.py"),
            str(TINY),
            str(out),
            "--tensor-parallel-size",
            "2",
            "--dtype",
            "float32",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "peak host memory" in done.stdout
    return out


def weights(model) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_restore_is_bit_exact_on_any_mesh(checkpoint, tp):
    mesh = make_mesh(tp)
    restored = load_model(checkpoint, dtype="float32", mesh=mesh, progress=False)
    direct = load_model(TINY, dtype="float32", mesh=mesh, progress=False)
    a, b = weights(restored), weights(direct)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
    q = restored.model.layers[0].self_attn.q_proj.weight[...]
    assert len(q.devices()) == tp
    if tp == 8:
        assert restored.config.num_heads == 16 and restored.config.num_kv_heads == 8


def test_checkpoint_folder_serves_through_the_engine(checkpoint):
    from jaxserve import LLM, SamplingParams
    from tests.conftest import load_reference

    ref = load_reference("qwen2_qkvbias_tied")
    llm = LLM(
        str(checkpoint),
        dtype="float32",
        tensor_parallel_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=256,
        num_kv_pages=64,
        progress=False,
    )
    outs = llm.generate(
        [{"prompt_token_ids": p.tolist()} for p in ref["prompts"]],
        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in outs] == ref["greedy"].tolist()


def test_missing_tensor_in_checkpoint_is_named(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    shutil.rmtree(broken / "params" / "model.norm.weight")
    meta = (
        (broken / "jaxserve_checkpoint.json")
        .read_text()
        .replace('"model.norm.weight",', "")
        .replace(',\n  "model.norm.weight"', "")
    )
    (broken / "jaxserve_checkpoint.json").write_text(meta)
    with pytest.raises(ValueError, match="'model.norm.weight' is missing"):
        load_model(broken, dtype="float32", progress=False)
