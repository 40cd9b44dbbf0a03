"""Test helper: small GGUF files written as llama.cpp's convert_hf_to_gguf.py writes them, from
Hugging Face tensors, with no download.

    HF config + tensors [out, in] (fp32)
      -> 2-D weights: quantized with gguf.quants.quantize, or, for the K-quants the gguf package
         cannot quantize, random blocks with scales set for a sane spread
      -> llama only: q/k rows permuted into llama.cpp's interleaved rotary pairs
      -> llama3 rope scaling: the rope_freqs tensor, by llama.cpp's own formula
      -> GGUF (gguf.GGUFWriter) + the HF tensors as the GGUF holds them, dequantized (the reference)

Everything here is written from llama.cpp's converter, apart from models/gguf.py, so that the
tests compare two independent readings of the same file.
"""

from __future__ import annotations

import dataclasses
import math
import re

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

QUANT_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "F16", "BF16")
# byte offsets of each K-quant block's f16 scales (d, and dmin where there is one)
_K_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
_GLOBAL["lm_head.weight"] = "output.weight"


def llama_cpp_name(hf: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf)
    return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rows of q or k; works on rows of raw blocks too)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors, for rope_type llama3."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(rope_factors, np.float32)


def encode(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """A 2-D HF weight [out, in] -> the GGUF's stored rows (raw blocks, or F16/F32 values)."""
    qt = Q[qtype]
    if qt in _K_SCALES:  # gguf.quants has no K-quant quantizer: random blocks, then the scales
        block, nbytes = gguf.GGML_QUANT_SIZES[qt]
        rows, cols = w.shape
        raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
        signs = rng.choice([-1.0, 1.0], (len(_K_SCALES[qt]), rows, cols // block, 1))

        def set_scales(v: float):
            for sign, offset in zip(signs, _K_SCALES[qt]):
                raw[..., offset : offset + 2] = (sign * v).astype(np.float16).view(np.uint8)

        set_scales(1.0)
        spread = float(np.std(gguf.quants.dequantize(raw.reshape(rows, -1), qt)))
        set_scales(float(np.std(w)) / spread)
        return raw.reshape(rows, -1)
    return gguf.quants.quantize(w, qt)


def decode(stored: np.ndarray, qtype: str, shape) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(stored, Q[qtype]), np.float32).reshape(shape)


@dataclasses.dataclass
class Vocab:
    """A byte-level BPE vocabulary in GGUF's terms."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None = None
    eos: int | None = None
    add_bos: bool | None = None
    chat_template: str | None = None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_vocab(pre: str, merges=(), specials=(), user_defined=(), words=(), **kw) -> Vocab:
    """256 byte tokens, a token per merge result, `words` (byte-level strings no merge makes),
    then control and user-defined tokens."""
    tokens = list(bytes_to_unicode().values())
    for merged in [m.replace(" ", "") for m in merges] + list(words):
        if merged not in tokens:
            tokens.append(merged)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for s in specials:
        tokens.append(s)
        types.append(gguf.TokenType.CONTROL)
    for s in user_defined:
        tokens.append(s)
        types.append(gguf.TokenType.USER_DEFINED)
    return Vocab(tokens, [int(t) for t in types], list(merges), pre, **kw)


def write_gguf(path, arch: str, config: dict, tensors: dict[str, np.ndarray], qtype: str, vocab: Vocab, *, seed=0):
    """Writes `tensors` (HF names, fp32) as a `qtype` GGUF; returns the HF tensors it holds, dequantized."""
    rng = np.random.default_rng(seed)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    theta = config["rope_parameters"]["rope_theta"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    _add_vocab(w, vocab)
    rope = config["rope_parameters"]
    if rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(head_dim, theta, rope))
    elif rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])

    held = {}
    for name, value in tensors.items():
        if value.ndim == 1:  # norms and biases stay F32, as llama.cpp keeps them
            stored, held[name] = value.astype(np.float32), value.astype(np.float32)
        else:
            stored = encode(value, qtype, rng)
            held[name] = decode(stored, qtype, value.shape)
        if arch == "llama" and ".q_proj." in name:
            stored = llama_cpp_permute(stored, heads)
        elif arch == "llama" and ".k_proj." in name:
            stored = llama_cpp_permute(stored, kv_heads)
        raw_dtype = Q[qtype] if stored.dtype == np.uint8 else None
        w.add_tensor(llama_cpp_name(name), stored, raw_dtype=raw_dtype)
    _finish(w)
    return held


def _add_vocab(w: gguf.GGUFWriter, vocab: Vocab):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    for value, add in ((vocab.bos, w.add_bos_token_id), (vocab.eos, w.add_eos_token_id)):
        if value is not None:
            add(value)
    if vocab.add_bos is not None:
        w.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def write_vocab_only(path, vocab: Vocab, arch: str = "llama"):
    """A GGUF with the tokenizer metadata and no tensors (llama.cpp's --vocab-only)."""
    w = gguf.GGUFWriter(str(path), arch)
    _add_vocab(w, vocab)
    _finish(w)


def _finish(w: gguf.GGUFWriter):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
