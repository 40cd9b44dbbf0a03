"""GGUF (llama.cpp) -> a Hugging Face folder: config.json, tokenizer files, model.safetensors.
Also `shrink_gguf`: a GGUF that keeps some of the layers.

    GGUF metadata -> config.json
    GGUF tensors  -> dequantize (gguf package) -> HF names, q/k rows un-permuted -> safetensors (fp32)
    GGUF tokenizer metadata (tokens, merges, specials, chat template) -> `tokenizers` BPE
                  -> transformers' fast tokenizer files

No torch: transformers' own GGUF reader needs it; this path uses only gguf, tokenizers and numpy.
Only the Llama architecture with a GPT-2-style byte-level BPE vocabulary is handled (that is
what SmolLM2 and the Llama 3 family ship).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

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
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# llama.cpp's pre-tokenizer names -> whether digits are split one by one before byte-level BPE
_PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}


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


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Writes the Hugging Face folder for `gguf_path` into `out_dir` and returns it."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    config = _hf_config(meta, tensor_names={t.name for t in reader.tensors})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    tensors = {}
    for t in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress):
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        if t.name.endswith("attn_q.weight"):
            w = unpermute_rows(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_rows(w, config["num_key_value_heads"])
        tensors[hf_tensor_name(t.name)] = np.ascontiguousarray(w)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    _hf_tokenizer(meta, gguf_path).save_pretrained(str(out))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2) + "\n"
    )
    return out


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


def _hf_config(meta: dict, tensor_names: set[str]) -> dict:
    heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": int(
            meta.get("llama.attention.key_length", meta.get("llama.rope.dimension_count", hidden // heads))
        ),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta["llama.context_length"]),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": int(meta["tokenizer.ggml.eos_token_id"]),
        "pad_token_id": int(meta.get("tokenizer.ggml.padding_token_id", meta["tokenizer.ggml.eos_token_id"])),
        "torch_dtype": "float32",
    }


def _hf_tokenizer(meta: dict, source):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"{source}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported (only 'gpt2' BPE)"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{source}: pre-tokenizer {pre!r} is not supported ({', '.join(_PRE_TOKENIZERS)})")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if _PRE_TOKENIZERS[pre]:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control = gguf_control_token_ids(meta)
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=int(meta.get("llama.context_length", 2048)),
        clean_up_tokenization_spaces=False,
    )


def gguf_control_token_ids(meta: dict) -> list[int]:
    CONTROL = 3  # llama.cpp's token type for special tokens
    return [i for i, kind in enumerate(meta["tokenizer.ggml.token_type"]) if int(kind) == CONTROL]
