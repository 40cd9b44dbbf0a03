"""ModelConfig: the architecture of one Llama-family checkpoint, read from its config.json.

Llama 2/3/3.1 (and SmolLM2), Mistral and Qwen2 share one decoder; they differ only in the
options recorded here (GQA, head_dim, biases, tied embeddings, rope scaling).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
PRESETS_DIR = Path(__file__).parent / "presets"


class ModelConfigError(ValueError):
    """A config.json that jaxserve cannot serve; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (HF `rope_scaling` / `rope_parameters`)."""

    rope_type: str  # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2, and Llama with attention_bias
    o_bias: bool  # Llama with attention_bias
    mlp_bias: bool
    max_position_embeddings: int
    sliding_window: int | None  # not implemented by the attention yet: the engine caps max_model_len at it
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    dtype: str  # the checkpoint's own dtype ("bfloat16", "float32", ...), used for dtype="auto"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = d.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(
                f"{source}: unsupported architecture {arch!r}; jaxserve serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")

        def need(key: str):
            if key not in d:
                raise ModelConfigError(f"{source}: missing required field {key!r}")
            return d[key]

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = d.get("head_dim") or hidden // num_heads
        rope_theta, rope_scaling = _parse_rope(d, source)
        is_qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(d.get("attention_bias", False))
        sliding_window = d.get("sliding_window")
        if is_qwen2 and not d.get("use_sliding_window", False):
            sliding_window = None
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(d.get("mlp_bias", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            sliding_window=int(sliding_window) if sliding_window else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=str(dtype),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{folder}: no config.json (expected a Hugging Face model folder)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=str(path))


def _parse_rope(d: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """Reads both the transformers<5 keys (rope_theta, rope_scaling) and v5's rope_parameters."""
    params = dict(d.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = dict(d.get("rope_scaling") or params)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(scaling["factor"]))
    if rope_type == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    raise ModelConfigError(f"{source}: rope scaling type {rope_type!r} is not supported (default, linear, llama3)")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def preset_path(name: str) -> Path | None:
    """The shipped config.json of a named random-weight preset, or None if `name` is not one."""
    path = PRESETS_DIR / f"{name}.json"
    return path if path.is_file() else None
