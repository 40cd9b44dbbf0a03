"""Building a model with weights: from a Hugging Face safetensors folder, or random ("dummy").

    folder | preset -> ModelConfig -> abstract model (no memory) -> for each parameter, in order:
        safetensors slice (mmap) -> our layout and dtype on the host    | orbax checkpoint: restored
        -> heads laid out for the mesh -> device_put (split over it)    | onto its devices directly
        -> host copy freed
    dummy: the whole init runs under jit, so the weights are born on the device(s).

At most one tensor is on the host at a time, so peak host memory stays near the largest tensor.
A missing, mis-shaped or unexpected tensor raises CheckpointError naming it and its file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open
from tqdm.auto import tqdm

from models.config import ModelConfig, ModelConfigError, preset_path
from models.llama import LlamaForCausalLM, abstract_model
from sharding import TP_AXIS, HeadLayout, head_layout, logical_sharding
from sharding.checkpoint import CheckpointRestorer, is_checkpoint

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed here


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the tensor and file."""


def resolve_config(model: str | Path) -> ModelConfig:
    """A model folder, or the name of a shipped preset (`models/presets/<name>.json`)."""
    if str(model).lower().endswith(".gguf"):  # the engine resolves these first (jaxserve.default_model)
        raise ModelConfigError(
            f"{model}: a GGUF file, not a folder; convert it with models.gguf.convert_gguf, or let "
            "jaxserve.default_model.resolve_model convert it once into the cache"
        )
    preset = preset_path(str(model))
    if preset is not None and not Path(model).exists():
        return ModelConfig.from_hf_dict(json.loads(preset.read_text()), source=str(preset))
    return ModelConfig.from_folder(model)


def resolve_dtype(dtype: str, cfg: ModelConfig):
    name = cfg.dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ModelConfigError(f"unsupported dtype {name!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def load_model(
    model: str | Path,
    *,
    dtype: str = "auto",
    load_format: str = "auto",
    attention_impl: str = "reference",
    seed: int = 0,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> LlamaForCausalLM:
    """The model of a folder or preset, weights on the device(s). load_format: "auto" | "safetensors" | "dummy".
    With a mesh, weights are split over its "tp" axis and heads laid out by sharding.head_layout
    (the returned model's config holds the served head counts)."""
    cfg = resolve_config(model)
    jdtype = resolve_dtype(dtype, cfg)
    tp = 1 if mesh is None else mesh.shape[TP_AXIS]
    layout = head_layout(cfg.num_heads, cfg.num_kv_heads, tp)
    served = dataclasses.replace(cfg, num_heads=len(layout.q_index), num_kv_heads=len(layout.kv_index))
    place = (lambda axes, shape: None) if mesh is None else functools.partial(logical_sharding, mesh)  # noqa: E731
    if load_format == "dummy":
        return _dummy_model(served, jdtype, attention_impl, seed, mesh, place)
    if load_format not in ("auto", "safetensors"):
        raise ValueError(f"unknown load_format {load_format!r}; choose 'auto', 'safetensors' or 'dummy'")
    if preset_path(str(model)) is not None and not Path(model).exists():
        raise ValueError(f"{model!r} is a random-weight preset: load it with load_format='dummy'")
    graphdef, abstract_state = nnx.split(abstract_model(served, dtype=jdtype, attention_impl=attention_impl, mesh=mesh))
    checkpoint_shapes = dict(nnx.to_flat_state(nnx.state(abstract_model(cfg, dtype=jdtype))))
    source = OrbaxSource(Path(model)) if is_checkpoint(model) else CheckpointReader(Path(model))
    with source:
        loaded = []
        for path, variable in tqdm(
            list(nnx.to_flat_state(abstract_state)), desc="Loading weights", unit="tensor", disable=not progress
        ):
            name = ".".join(str(p) for p in path)
            stored = checkpoint_shapes[path]  # the checkpoint's own head layout
            array = source.read_as(name, stored, jdtype, place(variable.logical_axes, tuple(stored.shape)))
            if not layout.is_identity:  # heads change: one tensor through the host
                array = lay_out_heads(np.asarray(jax.device_get(array)), variable.logical_axes, layout)
            device = jax.device_put(array, place(variable.logical_axes, tuple(variable.shape)))
            loaded.append((path, variable.replace(device)))
            del array
        unused = source.unused(tied_lm_head=cfg.tie_word_embeddings)
        if unused:
            raise CheckpointError(f"{model}: tensors not used by {cfg.architecture}: {', '.join(unused[:10])}")
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def lay_out_heads(array: np.ndarray, logical_axes: tuple[str, ...], layout: HeadLayout) -> np.ndarray:
    """Reorders, repeats or zero-pads the head axes of one weight to the served head layout."""
    if layout.is_identity:
        return array
    for axis, name in enumerate(logical_axes):
        index = {"heads": layout.q_index, "kv_heads": layout.kv_index}.get(name)
        if index is not None:
            idx = np.asarray(index)
            taken = np.take(array, np.maximum(idx, 0), axis=axis)
            keep = (idx >= 0).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
            array = np.where(keep, taken, np.zeros((), array.dtype))
    return array


def _dummy_model(cfg, jdtype, attention_impl, seed, mesh, place) -> LlamaForCausalLM:
    """Random weights drawn on the device(s), tensor by tensor, as each parameter's `init_std`
    says (create_model's rule). One small jitted fill per distinct shape: a single jit of the
    whole init took 66 s to compile for Llama-3.1-8B on an H200."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, dtype=jdtype, attention_impl=attention_impl, mesh=mesh))
    key = jax.random.key(seed)
    drawn = []
    for i, (path, variable) in enumerate(nnx.to_flat_state(abstract_state)):
        shape = tuple(variable.shape)
        fill = _dummy_fill(shape, jnp.dtype(jdtype), variable.init_std, place(variable.logical_axes, shape))
        drawn.append((path, variable.replace(fill(jax.random.fold_in(key, i)))))
    return nnx.merge(graphdef, nnx.from_flat_state(drawn))


@functools.cache
def _dummy_fill(shape: tuple[int, ...], dtype, std: float | None, sharding):
    """key -> an array of N(0, std) (std None: ones), made on the device(s)."""

    def fill(key):
        return jnp.ones(shape, dtype) if std is None else std * jax.random.normal(key, shape, dtype)

    return jax.jit(fill, out_shardings=sharding)


class CheckpointReader:
    """The tensors of a safetensors folder (one file, a sharded index, or several files), by name."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: folder / f for name, f in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{folder}: no *.safetensors files (and no model.safetensors.index.json)")
            self.file_of = {}
            for f in files:
                with safe_open(f, framework="numpy") as handle:
                    self.file_of.update({name: f for name in handle.keys()})
        self.used: set[str] = set()
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _handle(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in the index but missing")
            self._handles[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
        return self._handles[file]

    def read_as(self, name: str, variable: nnx.Variable, dtype, sharding=None) -> np.ndarray:
        """Reads `name` and returns it in the variable's layout and `dtype` (Hugging Face keeps
        projections as [out, in]; ours are [*in_dims, *out_dims]). Placement is the caller's."""
        if name not in self.file_of:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        file = self.file_of[name]
        tensor = self._handle(file).get_tensor(name)
        shape = tuple(variable.shape)
        in_axes = variable.get_metadata().get("in_axes")
        if in_axes is not None:  # a 2-D [out, in] weight
            n_in, n_out = int(np.prod(shape[:in_axes])), int(np.prod(shape[in_axes:]))
            if tensor.shape != (n_out, n_in):
                raise CheckpointError(
                    f"{file.name}: tensor {name!r} has shape {tensor.shape}, expected {(n_out, n_in)}"
                )
            tensor = tensor.T.reshape(shape)
        elif tensor.size != int(np.prod(shape)) or tensor.shape not in (shape, (tensor.size,)):
            raise CheckpointError(f"{file.name}: tensor {name!r} has shape {tensor.shape}, expected {shape}")
        self.used.add(name)
        return np.ascontiguousarray(tensor.reshape(shape).astype(_numpy_dtype(dtype)))

    def unused(self, *, tied_lm_head: bool) -> list[str]:
        def ignorable(name):
            return name.endswith(IGNORED_SUFFIXES) or (tied_lm_head and name == "lm_head.weight")

        return sorted(n for n in self.file_of if n not in self.used and not ignorable(n))


class OrbaxSource:
    """The tensors of a jaxserve orbax checkpoint (sharding.checkpoint), restored straight onto
    their devices."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.restorer = CheckpointRestorer(folder)
        self.used: set[str] = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restorer.close()

    def read_as(self, name: str, variable: nnx.Variable, dtype, sharding=None) -> jax.Array:
        if name not in self.restorer:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.used.add(name)
        return self.restorer.restore(name, jax.ShapeDtypeStruct(tuple(variable.shape), dtype, sharding=sharding))

    def unused(self, *, tied_lm_head: bool) -> list[str]:
        return sorted(n for n in self.restorer.meta["tensors"] if n not in self.used)


def _numpy_dtype(dtype):
    return ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype)
