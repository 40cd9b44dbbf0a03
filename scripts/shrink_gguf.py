"""A smaller GGUF that keeps some of a model's decoder layers, their weights untouched.

Why: a GPU-machine call carries at most 64 MiB, and the embedded SmolLM2-135M GGUF is 98 MB. Real
weights, even of a few layers, give logits with clear winners, so "the same greedy tokens with
either attention" means something there; random weights give near-ties everywhere.

    python scripts/shrink_gguf.py OUT.gguf --layers 0-5,24-29   # the embedded model by default

Kept layers are renumbered from 0 (models.gguf.shrink_gguf); convert the result with
scripts/convert_gguf.py or models.gguf.convert_gguf.
"""

from __future__ import annotations

import argparse

from models.gguf import shrink_gguf


def parse_layers(spec: str) -> list[int]:
    """ "0-5,24-29" -> [0, 1, 2, 3, 4, 5, 24, ..., 29]."""
    layers = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        layers.extend(range(int(lo), int(hi or lo) + 1))
    return layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--source", default=None, help="a .gguf file (default: the embedded model's)")
    p.add_argument("--layers", required=True, help="kept layers, e.g. 0-5,24-29")
    args = p.parse_args()
    if args.source is None:
        from jaxserve.default_model import bundled_gguf

        args.source = bundled_gguf()
    out = shrink_gguf(args.source, args.out, parse_layers(args.layers))
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
