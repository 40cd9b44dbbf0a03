"""Convert a llama.cpp GGUF (llama or qwen2 architecture, byte-level BPE vocabulary with the
gpt2, smollm, llama-bpe or qwen2 pre-tokenizer) into a Hugging Face folder.

    python scripts/convert_gguf.py MODEL.gguf OUT_DIR
    python scripts/convert_gguf.py --default      # the bundled SmolLM2 into jaxserve's cache

Writes config.json, tokenizer files with the chat template, and fp32 safetensors. No torch.
Serving needs no manual step: `jaxserve serve --model MODEL.gguf` / `LLM("MODEL.gguf")` convert
once into the cache (jaxserve.default_model.resolve_model).
"""

from __future__ import annotations

import argparse

from jaxserve.default_model import default_model_folder
from models.gguf import convert_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", nargs="?", help="the .gguf file")
    parser.add_argument("out_dir", nargs="?", help="the folder to write")
    parser.add_argument(
        "--default", action="store_true", help="convert the bundled SmolLM2-135M-Instruct into the cache"
    )
    args = parser.parse_args()
    if args.default:
        print(default_model_folder())
    elif args.gguf and args.out_dir:
        print(convert_gguf(args.gguf, args.out_dir))
    else:
        parser.error("give GGUF and OUT_DIR, or --default")


if __name__ == "__main__":
    main()
