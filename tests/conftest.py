"""Shared fixtures: the embedded SmolLM2 (converted once per machine), the tiny HF checkpoints and
their transformers reference outputs (made by scripts/make_reference_fixtures.py)."""

from __future__ import annotations

import os
from pathlib import Path

# Eight CPU devices for the sharding tests; set before anything imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY_NAMES = sorted(p.name for p in (FIXTURES / "tiny").iterdir() if p.is_dir())


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    from jaxserve.default_model import default_model_folder

    return default_model_folder(progress=False)


def load_reference(name: str) -> dict:
    with np.load(FIXTURES / "reference" / f"{name}.npz") as data:
        ref = {k: data[k] for k in data.files}
    lens = ref["prompt_lens"]
    ref["prompts"] = np.split(ref["prompt_ids"], np.cumsum(lens)[:-1])
    return ref
