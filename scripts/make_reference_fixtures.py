"""Regenerates tests/fixtures/: Hugging Face transformers' outputs that the model tests match.

Runs transformers (PyTorch, fp32, eager attention) — never needed at jaxserve's run time. On
these machines, under python3.11, a CPU torch is on disk:

    python3.11 -m venv .venv-ref
    .venv-ref/bin/pip install torch==2.13.0 transformers==5.17.0 safetensors numpy psutil
    .venv/bin/python -c "from jaxserve.default_model import default_model_folder as f; print(f())"
    .venv-ref/bin/python scripts/make_reference_fixtures.py --smollm2 ~/.cache/jaxserve/models/SmolLM2-135M-Instruct

Writes, for SmolLM2 (converted from the bundled GGUF) and for tiny random configs of every
supported architecture and option:
    tests/fixtures/tiny/<name>/      config.json + model.safetensors (the tiny models themselves)
    tests/fixtures/reference/<name>.npz
        prompt_ids, prompt_lens      the prompts, concatenated
        logits_rows, logits_cols     which logits were kept ([positions] x [vocab ids])
        logits                       float32 logits at those rows and columns
        greedy                       [num_prompts, 32] greedy continuation (eos not special)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
GREEDY_TOKENS = 32

SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "1, 1, 2, 3, 5, 8,",
    "Water boils at",
    "The three primary colors are",
    "Translate to French: good morning",
    "Q: What is 12 times 12?\nA:",
    "Hi",
    "The following is a list of the planets of the solar system, ordered by their distance from the sun:",
    "import numpy as np\nimport matplotlib.pyplot as plt\n\nx = np.linspace(0, 10, 100)\ny = np.sin(x)\n",
    "My favourite recipe for a quick weeknight dinner starts with",
    "In 1969, Neil Armstrong",
    (
        "The history of the printing press begins long before Gutenberg. Woodblock printing was used in China "
        "as early as the ninth century, and movable type made of clay appeared around 1040. In Korea, metal "
        "movable type was used to print books in the thirteenth century. In Europe, Johannes Gutenberg developed "
        "a printing system around 1440 that combined an oil-based ink, a hand mould for casting type, and a "
        "press adapted from those used to make wine. His most famous work"
    ),
    "Roses are red,\nViolets are blue,\n",
    "The best way to learn a new programming language is",
]

_BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
)
TINY_CONFIGS = {
    # GQA 4:1... with llama3 rope scaling (original context 64 so the scaling bands are all exercised), untied
    "llama_gqa_llama3rope": LlamaConfig(
        **_BASE,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    # multi-head attention, head_dim 32 != hidden/heads (16), tied embeddings, linear rope scaling
    "llama_tied_headdim_linearrope": LlamaConfig(
        **_BASE,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=32,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
    ),
    # multi-query attention with attention (q, k, v, o) and MLP biases
    "llama_mqa_biases": LlamaConfig(
        **_BASE,
        num_attention_heads=4,
        num_key_value_heads=1,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    ),
    "mistral_gqa": MistralConfig(
        **_BASE,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=None,
        tie_word_embeddings=False,
    ),
    # Qwen2: q/k/v biases (no o bias), tied embeddings
    "qwen2_qkvbias_tied": Qwen2Config(
        **_BASE, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=False
    ),
}
TINY_PROMPT_LENS = [1, 5, 16, 17, 33, 40, 7, 64]


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> list[int]:
    out, past = [], None
    inp = torch.tensor([ids])
    for _ in range(n):
        res = model(input_ids=inp, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = int(res.logits[0, -1].argmax())
        out.append(nxt)
        inp = torch.tensor([[nxt]])
    return out


@torch.no_grad()
def reference(model, prompts: list[list[int]], logits_prompts: int, cols: np.ndarray | None) -> dict:
    """Logits (each prompt alone, no padding) of the first `logits_prompts` prompts, and greedy
    continuations of all. cols None keeps the whole vocabulary at every position; otherwise
    every position keeps `cols` and each prompt's last position keeps everything."""
    vocab = model.config.vocab_size
    rows, col_sets, values = [], [], []
    offset = 0
    for ids in prompts[:logits_prompts]:
        logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()  # [L, V]
        for i in range(len(ids)):
            keep = np.arange(vocab) if cols is None or i == len(ids) - 1 else cols
            rows.append(np.full(len(keep), offset + i))
            col_sets.append(keep)
            values.append(logits[i, keep])
        offset += len(ids)
    return dict(
        prompt_ids=np.concatenate([np.asarray(p, np.int32) for p in prompts]),
        prompt_lens=np.asarray([len(p) for p in prompts], np.int32),
        logits_prompts=np.int32(logits_prompts),
        logits_rows=np.concatenate(rows).astype(np.int32),
        logits_cols=np.concatenate(col_sets).astype(np.int32),
        logits=np.concatenate(values).astype(np.float32),
        greedy=np.asarray([greedy(model, p, GREEDY_TOKENS) for p in prompts], np.int32),
    )


def randomize(model, seed: int) -> None:
    """HF initialises biases to zero and norms to one; make every tensor matter."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1
        p.data = (1.0 + noise) if "norm" in name else noise * (2.0 if "embed" in name or "lm_head" in name else 1.0)


def make_tiny(out_ref: Path) -> None:
    rng = np.random.default_rng(0)
    for seed, (name, config) in enumerate(TINY_CONFIGS.items()):
        config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
        randomize(model, seed)
        folder = FIXTURES / "tiny" / name
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder, safe_serialization=True)
        prompts = [rng.integers(2, config.vocab_size, n).tolist() for n in TINY_PROMPT_LENS]
        np.savez(out_ref / f"{name}.npz", **reference(model, prompts, logits_prompts=4, cols=None))
        print("wrote", name)


def make_smollm2(folder: Path, out_ref: Path) -> None:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in SMOLLM2_PROMPTS]
    cols = np.random.default_rng(0).choice(model.config.vocab_size, 2048, replace=False)
    np.savez(out_ref / "smollm2.npz", **reference(model, prompts, logits_prompts=4, cols=np.sort(cols)))
    (out_ref / "smollm2_prompts.json").write_text(json.dumps(SMOLLM2_PROMPTS, indent=1) + "\n")
    print("wrote smollm2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm2", type=Path, required=True, help="SmolLM2 folder converted from the bundled GGUF")
    args = parser.parse_args()
    out_ref = FIXTURES / "reference"
    out_ref.mkdir(parents=True, exist_ok=True)
    make_tiny(out_ref)
    make_smollm2(args.smollm2.expanduser(), out_ref)


if __name__ == "__main__":
    main()
