"""Convert a Hugging Face safetensors folder into a jaxserve orbax checkpoint laid out for a mesh.

    python scripts/shard_checkpoint.py HF_FOLDER OUT_FOLDER --tensor-parallel-size 2 [--dtype bfloat16]

Streams tensor by tensor (read -> our layout -> split over the mesh -> saved by orbax), so peak
host memory stays near the largest tensor. The result is a model folder: `LLM(model=OUT_FOLDER)`
or `load_model(OUT_FOLDER, mesh=...)` restores it onto any mesh, each device reading its own
slice. Prints the time taken and the peak host memory (max RSS) of the conversion.
"""

from __future__ import annotations

import argparse
import functools
import resource
import shutil
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_folder", type=Path)
    p.add_argument("out_folder", type=Path)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    args = p.parse_args()

    import jax
    from flax import nnx
    from tqdm.auto import tqdm

    from models.llama import abstract_model
    from models.loading import CheckpointReader, resolve_config, resolve_dtype
    from sharding import logical_sharding, make_mesh
    from sharding.checkpoint import CheckpointWriter

    t0 = time.perf_counter()
    if args.out_folder.exists() and any(args.out_folder.iterdir()):
        raise SystemExit(f"{args.out_folder} exists and is not empty")
    cfg = resolve_config(args.hf_folder)
    dtype = resolve_dtype(args.dtype, cfg)
    place = functools.partial(logical_sharding, make_mesh(args.tensor_parallel_size))
    writer = CheckpointWriter(args.out_folder, dtype=str(jax.numpy.dtype(dtype)), tp=args.tensor_parallel_size)
    state = nnx.to_flat_state(nnx.state(abstract_model(cfg, dtype=dtype)))
    with CheckpointReader(args.hf_folder) as reader:
        for path, variable in tqdm(list(state), desc="Sharding checkpoint", unit="tensor"):
            name = ".".join(str(p) for p in path)
            host = reader.read_as(name, variable, dtype)
            writer.save(name, jax.device_put(host, place(variable.logical_axes, host.shape)))
            del host
        unused = reader.unused(tied_lm_head=cfg.tie_word_embeddings)
        if unused:
            raise SystemExit(f"tensors not used by {cfg.architecture}: {unused[:10]}")
    writer.close()
    for f in args.hf_folder.iterdir():  # config, tokenizer, generation config, chat template
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy2(f, args.out_folder / f.name)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"wrote {args.out_folder} for tp={args.tensor_parallel_size} in {time.perf_counter() - t0:.1f} s; "
        f"peak host memory (max RSS) {peak_mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
