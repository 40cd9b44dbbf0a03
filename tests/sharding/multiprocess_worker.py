"""One process of the 2-process loopback test: JAX's multi-controller runtime on CPU devices.

    python multiprocess_worker.py PROCESS_ID PORT OUT_JSON     (2 CPU devices per process)

Every process runs the same program (SPMD): the same engine, the same requests, one global mesh.
"""

import json
import sys

import jax


def main() -> None:
    process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)

    from jaxserve import LLM, SamplingParams
    from tests.conftest import FIXTURES, load_reference

    ref = load_reference("llama_gqa_llama3rope")
    llm = LLM(
        str(FIXTURES / "tiny" / "llama_gqa_llama3rope"),
        dtype="float32",
        tensor_parallel_size=4,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        max_model_len=256,
        num_kv_pages=64,
        progress=False,
    )
    outs = llm.generate(
        [{"prompt_token_ids": p.tolist()} for p in ref["prompts"]],
        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True),
        use_tqdm=False,
    )
    with open(out, "w") as f:
        json.dump(
            {
                "process_count": jax.process_count(),
                "device_count": jax.device_count(),
                "tokens": [o.outputs[0].token_ids for o in outs],
            },
            f,
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
