"""Loading from folders and presets, and the clear errors that bad checkpoints raise."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxserve.tokenizer import TokenizerError, load_tokenizer
from models import ModelConfig, ModelConfigError, preset_names
from models.config import preset_path
from models.loading import CheckpointError, load_model, resolve_config
from tests.conftest import FIXTURES
from tests.models.runner import packed_logits

TINY = FIXTURES / "tiny" / "llama_mqa_biases"


@pytest.fixture
def tiny_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    return folder


def edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelConfigError, match="no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="config.json: unsupported architecture 'GPT2LMHeadModel'"):
        load_model(tiny_copy)


def test_unsupported_rope_scaling(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="rope scaling type 'yarn'"):
        load_model(tiny_copy)


def test_missing_tensor(tiny_copy):
    edit_tensors(tiny_copy, lambda t: t.pop("model.layers.1.self_attn.o_proj.bias"))
    with pytest.raises(CheckpointError, match="'model.layers.1.self_attn.o_proj.bias' is missing"):
        load_model(tiny_copy, progress=False)


def test_misshaped_tensor(tiny_copy):
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:, :10].copy()

    edit_tensors(tiny_copy, edit)
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' has shape \(128, 10\)"
    ):
        load_model(tiny_copy, progress=False)


def test_unexpected_tensor(tiny_copy):
    edit_tensors(tiny_copy, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="not used by LlamaForCausalLM: model.layers.0.mlp.extra.weight"):
        load_model(tiny_copy, progress=False)


def test_sharded_index_loads_the_same(tiny_copy):
    tensors = load_file(tiny_copy / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    (tiny_copy / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[:half]}, tiny_copy / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[half:]}, tiny_copy / "model-00002-of-00002.safetensors")
    weight_map = {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    prompt = [[5, 6, 7, 8]]
    np.testing.assert_array_equal(
        packed_logits(load_model(tiny_copy, progress=False), prompt),
        packed_logits(load_model(TINY, progress=False), prompt),
    )


def test_tokenizer_that_fails_to_load(tmp_path, smollm2_folder):
    folder = tmp_path / "tok"
    shutil.copytree(smollm2_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "tokenizer.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match=str(folder)):
        load_tokenizer(folder)


@pytest.mark.parametrize("name", preset_names())
def test_presets_parse(name):
    cfg = resolve_config(name)
    assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.dtype == "bfloat16"


def test_preset_sizes():
    assert resolve_config("llama-3.1-8b").num_layers == 32
    assert resolve_config("llama-3.1-70b").hidden_size == 8192
    assert resolve_config("llama-3.2-1b").tie_word_embeddings


def test_dummy_preset_runs_and_is_born_on_device():
    model = load_model("smollm2-135m", load_format="dummy", dtype="float32")
    weight = model.model.layers[3].mlp.down_proj.weight[...]
    assert isinstance(weight, jax.Array) and weight.shape == (1536, 576)
    assert float(np.std(np.asarray(weight))) > 0.01  # random, not zeros
    logits = packed_logits(model, [[1, 2, 3]])
    assert logits.shape == (3, 49152) and np.all(np.isfinite(logits))


def test_preset_needs_dummy_format():
    with pytest.raises(ValueError, match="load_format='dummy'"):
        load_model("llama-3.1-8b")


def test_config_reads_transformers_4_keys():
    cfg = ModelConfig.from_hf_dict(json.loads(preset_path("llama-3.1-8b").read_text()))
    assert (
        cfg.rope_scaling.rope_type == "llama3"
        and cfg.rope_theta == 500000.0
        and cfg.eos_token_ids == (128001, 128008, 128009)
    )
