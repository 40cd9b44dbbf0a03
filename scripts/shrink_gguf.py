"""A smaller GGUF that keeps some of a model's decoder layers, their weights untouched.

Why: a GPU-machine call carries at most 64 MiB, and the embedded SmolLM2-135M GGUF is 98 MB. Real
weights, even of half the layers, give logits with clear winners, so "the same greedy tokens with
either attention" means something there; random weights give near-ties everywhere.

    python scripts/shrink_gguf.py OUT.gguf --layers 0-5,24-29   # the embedded model by default

Kept layers are renumbered from 0; llama.block_count follows. Quantized tensors are copied as
their raw blocks (no requantization).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_layers(spec: str) -> list[int]:
    """"0-5,24-29" -> [0, 1, 2, 3, 4, 5, 24, ..., 29]."""
    layers = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        layers.extend(range(int(lo), int(hi or lo) + 1))
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer listed twice in {spec!r}")
    return layers


def shrink_gguf(source: str | Path, out: str | Path, layers: list[int]) -> Path:
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    count_key = f"{arch}.block_count"
    total = reader.fields[count_key].contents()
    if not layers or min(layers) < 0 or max(layers) >= total:
        raise ValueError(f"layers {layers} are not all within the model's {total}")
    writer = gguf.GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the writer sets these itself
            continue
        value = len(layers) if key == count_key else field.contents()
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
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
