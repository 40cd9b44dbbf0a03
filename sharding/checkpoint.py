"""Orbax checkpoints of model weights, one tensor at a time, restorable onto any mesh.

    <folder>/jaxserve_checkpoint.json   {"format": 1, "dtype", "saved_mesh": {"tp": n}, "tensors": [...]}
    <folder>/params/<name>/             one orbax (tensorstore) checkpoint per tensor
    <folder>/config.json, tokenizer     copied from the source, so the folder is a model folder

Tensors are stored in the checkpoint's own head layout (as Hugging Face has them) and split
over the saving mesh where its axes divide. Saving and restoring go tensor by tensor, so the
host never holds more than one tensor; restoring onto another mesh lets tensorstore read each
device's slice straight from the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

MARKER = "jaxserve_checkpoint.json"


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / MARKER).is_file()


class CheckpointWriter:
    def __init__(self, folder: str | Path, *, dtype: str, tp: int):
        self.folder = Path(folder)
        (self.folder / "params").mkdir(parents=True, exist_ok=True)
        self.meta = {"format": 1, "dtype": dtype, "saved_mesh": {"tp": tp}, "tensors": []}
        self._checkpointer = ocp.StandardCheckpointer()

    def save(self, name: str, array: jax.Array) -> None:
        self._checkpointer.save(self.folder / "params" / name, {"value": array})
        self._checkpointer.wait_until_finished()  # one tensor in flight at a time
        self.meta["tensors"].append(name)

    def close(self) -> None:
        self._checkpointer.close()
        (self.folder / MARKER).write_text(json.dumps(self.meta, indent=1) + "\n")


class CheckpointRestorer:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / MARKER).read_text())
        self._names = set(self.meta["tensors"])
        self._checkpointer = ocp.StandardCheckpointer()

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def restore(self, name: str, target: jax.ShapeDtypeStruct) -> jax.Array:
        """The tensor, placed as `target.sharding` says (any mesh)."""
        return self._checkpointer.restore(self.folder / "params" / name, {"value": target})["value"]

    def close(self) -> None:
        self._checkpointer.close()
