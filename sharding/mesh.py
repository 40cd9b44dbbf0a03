"""The device mesh: one axis, "tp", over the local devices used for tensor parallelism."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

TP_AXIS = "tp"


def make_mesh(tensor_parallel_size: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if not 1 <= tensor_parallel_size <= len(devices):
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} needs that many devices; {len(devices)} are visible"
        )
    return Mesh(np.asarray(devices[:tensor_parallel_size]), (TP_AXIS,))
