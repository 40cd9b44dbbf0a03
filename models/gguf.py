"""GGUF (llama.cpp) -> a Hugging Face folder: config.json, tokenizer files, safetensors.
Also `shrink_gguf`: a GGUF that keeps some of the layers.

    GGUF metadata (+ rope_freqs) -> config.json            (llama -> LlamaForCausalLM, qwen2 -> Qwen2ForCausalLM)
    GGUF tensors  -> dequantize (gguf package) -> HF names, llama's q/k rows un-permuted
                  -> fp32 safetensors (shards of <= 2 GiB, with an index when there are several)
    GGUF tokenizer metadata (tokens, merges, token types, pre-tokenizer, chat template)
                  -> `tokenizers` byte-level BPE -> transformers' fast tokenizer files

No torch: transformers' own GGUF reader needs it; this path uses only gguf, tokenizers and numpy.
Every type gguf.quants.dequantize knows is read (Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0, F16, BF16, ...).

Llama 3.1/3.2 files carry their rope scaling as a tensor, `rope_freqs` (one divisor per rotary
frequency, from llama.cpp's converter), not as metadata; it is read back into the llama3 rope
parameters of config.json (`llama3_rope_scaling`), and refused if no parameters reproduce it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from models.config import RopeScaling
from models.rope import inverse_frequencies

# GGUF's general.architecture -> the Hugging Face class that serves it
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# llama.cpp's tensor names -> Hugging Face's (per layer: "blk.{i}." -> "model.layers.{i}.")
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
ROPE_FREQS = "rope_freqs.weight"  # not a weight: read into config.json's rope_scaling
_SHARD_BYTES = 2 << 30

# Pre-tokenizers: the regexes are llama.cpp's (llama-vocab.cpp) and the same as the Hugging Face
# tokenizer.json of each family.
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# name -> (split regex before byte-level (None: GPT-2's own), digits one by one, NFC first,
#          BPE ignores merges for whole words found in the vocabulary, add BOS when metadata is silent)
_PRE_TOKENIZERS = {
    "default": (None, False, False, False, False),
    "gpt2": (None, False, False, False, False),
    "gpt-2": (None, False, False, False, False),
    "smollm": (None, True, False, False, False),
    "llama-bpe": (_LLAMA3_REGEX, False, False, True, True),
    "llama3": (_LLAMA3_REGEX, False, False, True, True),
    "llama-v3": (_LLAMA3_REGEX, False, False, True, True),
    "qwen2": (_QWEN2_REGEX, False, True, False, False),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp's token types: special tokens, added (non-special) tokens


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows of each head as interleaved rotary pairs; HF uses halves."""
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_metadata(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Writes the Hugging Face folder for `gguf_path` into `out_dir` and returns it."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported ({', '.join(repr(a) for a in ARCHITECTURES)})"
        )
    tensors_by_name = {t.name: t for t in reader.tensors}
    rope_freqs = None
    if ROPE_FREQS in tensors_by_name:
        t = tensors_by_name[ROPE_FREQS]
        rope_freqs = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64).reshape(-1)
    config = hf_config(meta, tensors_by_name, rope_freqs=rope_freqs, source=gguf_path)
    tokenizer = hf_tokenizer(meta, gguf_path)  # refuses an unsupported vocabulary before the weights
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    writer = _ShardWriter(out)
    for t in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress):
        if t.name == ROPE_FREQS:
            continue
        name = hf_tensor_name(t.name)
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        if arch == "llama" and ".attn_q." in t.name:
            w = unpermute_rows(w, config["num_attention_heads"])
        elif arch == "llama" and ".attn_k." in t.name:
            w = unpermute_rows(w, config["num_key_value_heads"])
        writer.add(name, np.ascontiguousarray(w))
    writer.close()

    tokenizer.save_pretrained(str(out))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


class _ShardWriter:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index past _SHARD_BYTES, so that
    at most one shard is in host memory."""

    def __init__(self, out: Path):
        self.out, self.pending, self.pending_bytes, self.files = out, {}, 0, []

    def add(self, name: str, w: np.ndarray):
        if self.pending and self.pending_bytes + w.nbytes > _SHARD_BYTES:
            self._flush()
        self.pending[name] = w
        self.pending_bytes += w.nbytes

    def _flush(self):
        path = self.out / f".shard-{len(self.files)}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self):
        if self.pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            self.files[0][0].rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (path, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            path.rename(self.out / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def shrink_gguf(source: str | Path, out: str | Path, layers: list[int]) -> Path:
    """A copy of `source` that keeps the decoder layers listed, renumbered from 0, their tensors'
    raw (quantized) blocks untouched; the block count follows (per-layer metadata arrays, which
    SmolLM2 and Llama 3 have none of, are not cut). For scripts/shrink_gguf.py."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    count_key = f"{arch}.block_count"
    total = reader.fields[count_key].contents()
    if not layers or len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) >= total:
        raise ValueError(f"layers {layers} must be distinct and within the model's {total}")
    if "general.alignment" in reader.fields:  # the writer would lay the data out at its default
        raise ValueError(f"{source}: a custom general.alignment is not handled")
    writer = gguf.GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the writer sets these itself
            continue
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(
            key, len(layers) if key == count_key else field.contents(), field.types[0], sub_type=sub_type
        )
    renumber = {old: new for new, old in enumerate(layers)}
    for tensor in reader.tensors:
        name = tensor.name
        if name.startswith("blk."):
            _, index, rest = name.split(".", 2)
            if int(index) not in renumber:
                continue
            name = f"blk.{renumber[int(index)]}.{rest}"
        # tensor.data holds quantized tensors as rows of raw blocks; the writer derives the shape.
        writer.add_tensor(name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out)


def hf_config(meta: dict, tensors: dict, *, rope_freqs: np.ndarray | None = None, source="GGUF") -> dict:
    """config.json of a llama or qwen2 GGUF. `tensors`: name -> tensor (anything with .shape, GGUF order)."""
    arch = meta["general.architecture"]

    def need(key: str):
        if f"{arch}.{key}" not in meta:
            raise ValueError(f"{source}: GGUF metadata {arch}.{key} is missing")
        return meta[f"{arch}.{key}"]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count", hidden // heads)))
    rope_theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    embed = tensors.get("token_embd.weight")
    vocab_size = int(embed.shape[-1]) if embed is not None else len(meta["tokenizer.ggml.tokens"])
    eos_ids = [
        int(meta[f"tokenizer.ggml.{k}_token_id"])
        for k in ("eos", "eot", "eom")
        if f"tokenizer.ggml.{k}_token_id" in meta
    ]
    eos_ids = list(dict.fromkeys(eos_ids))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(need("context_length")),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    rope_scaling = _rope_scaling(meta, arch, head_dim, rope_theta, rope_freqs, source)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if arch == "llama":
        config.update(attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias="blk.0.ffn_up.bias" in tensors)
    else:  # qwen2: q/k/v biases always, no sliding window in the GGUF
        config.update(use_sliding_window=False, sliding_window=None)
    return config


def _rope_scaling(meta, arch, head_dim, theta, rope_freqs, source) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise ValueError(f"{source}: GGUF rope scaling {kind!r} is not supported (none, linear, llama3 rope_freqs)")
    if kind == "linear":
        if rope_freqs is not None:
            raise ValueError(f"{source}: both linear rope scaling and rope_freqs; not supported")
        return {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    if rope_freqs is None:
        return None
    original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
    return llama3_rope_scaling(rope_freqs, head_dim, theta, original, source=source)


def llama3_rope_scaling(
    rope_freqs: np.ndarray, head_dim: int, theta: float, original_max_position_embeddings: int = 8192, source="GGUF"
) -> dict | None:
    """HF rope_scaling whose frequencies equal llama.cpp's `base frequency / rope_freqs`.

    llama.cpp's converter writes, per frequency f (wavelength w = 2 pi / f, with L the original
    context): 1 where w < L / high_freq_factor, `factor` where w > L / low_freq_factor, and in
    between 1 / ((1 - s) / factor + s), s = (L / w - low) / (high - low). So 1/rope_freqs is linear
    in 1/w across the band: a line fit gives low and high (for the L given; only low/L and high/L
    matter), and with fewer than two points in the band any low/high that keeps the points on
    their sides reproduces the same frequencies. The result is checked against models.rope.
    """
    rf = np.asarray(rope_freqs, np.float64).reshape(-1)
    if rf.shape != (head_dim // 2,):
        raise ValueError(f"{source}: rope_freqs has {rf.size} values; expected head_dim / 2 = {head_dim // 2}")
    factor = float(rf.max())
    if np.allclose(rf, 1.0, rtol=1e-6):
        return None
    if np.allclose(rf, factor, rtol=1e-6):
        return {"rope_type": "linear", "factor": factor}
    x = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)) / (2 * math.pi)  # 1 / wavelength
    unit, full = np.isclose(rf, 1.0, rtol=1e-6), np.isclose(rf, factor, rtol=1e-6)
    mid = ~(unit | full)
    s = (1.0 / rf - 1.0 / factor) / (1.0 - 1.0 / factor)  # 0 where slowed by `factor`, 1 where kept
    x_full = float(x[full].max())  # the band starts above the fastest slowed frequency...
    x_unit = float(x[unit].min()) if unit.any() else math.inf  # ...and ends below the slowest kept one
    if mid.sum() >= 2:
        slope, intercept = np.polyfit(x[mid], s[mid], 1)
        x_lo, x_hi = -intercept / slope, (1.0 - intercept) / slope
    elif mid.sum() == 1:
        xm, sm = float(x[mid][0]), float(s[mid][0])
        width = 0.5 * min((xm - x_full) / sm, (x_unit - xm) / (1.0 - sm))
        x_lo, x_hi = xm - sm * width, xm + (1.0 - sm) * width
    else:
        x_lo, x_hi = x_full + (x_unit - x_full) / 3, x_full + 2 * (x_unit - x_full) / 3
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(x_lo * original_max_position_embeddings),
        "high_freq_factor": float(x_hi * original_max_position_embeddings),
        "original_max_position_embeddings": int(original_max_position_embeddings),
    }
    ours = inverse_frequencies(head_dim, theta, RopeScaling(**scaling))
    theirs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)) / rf
    if not (scaling["low_freq_factor"] > 0 and np.allclose(ours, theirs, rtol=1e-4, atol=0)):
        raise ValueError(f"{source}: rope_freqs {rf.tolist()} do not follow Llama 3's rope scaling; not supported")
    return scaling


def hf_tokenizer(meta: dict, source="GGUF"):
    """transformers' fast tokenizer for a GGUF's byte-level BPE vocabulary (tokenizer.ggml.*)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"{source}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported (only 'gpt2' BPE)"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{source}: pre-tokenizer {pre!r} is not supported ({', '.join(_PRE_TOKENIZERS)})")
    regex, split_digits, nfc, ignore_merges, add_bos_default = _PRE_TOKENIZERS[pre]
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, ignore_merges=ignore_merges
    )
    tokenizer = Tokenizer(bpe)
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    if regex is None:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        parts = [pre_tokenizers.Digits(individual_digits=True), byte_level] if split_digits else [byte_level]
    else:
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        parts = [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tokenizer.pre_tokenizer = parts[0] if len(parts) == 1 else pre_tokenizers.Sequence(parts)
    tokenizer.decoder = decoders.ByteLevel()

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    byte_level_post = processors.ByteLevel(trim_offsets=False)
    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        first, last = ([f"{bos}:0"] if add_bos else []), ([f"{eos}:0"] if add_eos else [])
        specials = [
            (t, tokens.index(t)) for t in dict.fromkeys(([bos] if add_bos else []) + ([eos] if add_eos else []))
        ]
        template = processors.TemplateProcessing(
            single=[*first, "$A:0", *last],
            pair=[
                *first,
                "$A:0",
                *last,
                *(s.replace(":0", ":1") for s in first),
                "$B:1",
                *(s.replace(":0", ":1") for s in last),
            ],
            special_tokens=specials,
        )
        tokenizer.post_processor = processors.Sequence([byte_level_post, template])
    else:
        tokenizer.post_processor = byte_level_post
    types = meta.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in gguf_control_token_ids(meta)]
    )
    user = [
        AddedToken(tokens[i], special=False, normalized=False) for i, k in enumerate(types) if int(k) == _USER_DEFINED
    ]
    if user:
        tokenizer.add_tokens(user)

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=int(meta.get(f"{meta.get('general.architecture', 'llama')}.context_length", 2048)),
        clean_up_tokenization_spaces=False,
    )


def gguf_control_token_ids(meta: dict) -> list[int]:
    return [i for i, kind in enumerate(meta["tokenizer.ggml.token_type"]) if int(kind) == _CONTROL]
