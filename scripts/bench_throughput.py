"""Offline throughput, in the manner of `vllm bench throughput`: random-token prompts of a fixed
length, a fixed number of output tokens each (ignore_eos), all submitted at once.

    python scripts/bench_throughput.py --input-len 128 --output-len 64 --num-prompts 16
    python scripts/bench_throughput.py --model llama-3.1-8b --load-format dummy \
        --workloads 1024:1024,128:128,2048:128 --num-prompts 1000

--workloads runs several (input:output) workloads on one engine, one after the other. On a GPU
each is printed beside its roofline: the time no engine can beat on this device, from the copy
bandwidth and bf16 matmul rate measured in the same run (see `roofline`).

--backend transformers runs transformers' continuous batching (`model.generate_batch`) on the
same prompts for comparison; it needs torch (the GPU machine has it; on the CPU see
scripts/make_reference_fixtures.py for a venv). A preset with --load-format dummy is built from
its config with random weights on the GPU. Prints "Throughput: X requests/s, Y total tokens/s,
Z output tokens/s". The clock starts after start-up (loading, warm-up compilation) and stops when
the last request ends.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np


def random_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab - 100, size=(num, length)).tolist()  # clear of special ids at either end


def parse_workloads(args) -> list[tuple[int, int, int]]:
    """(input_len, output_len, num_prompts) of each workload: --workloads in:out[:n],... or the
    single --input-len/--output-len; n defaults to --num-prompts."""
    if not args.workloads:
        return [(args.input_len, args.output_len, args.num_prompts)]
    out = []
    for w in args.workloads.split(","):
        parts = [int(x) for x in w.split(":")]
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else args.num_prompts))
    return out


def roofline(
    cfg,
    *,
    num_prompts: int,
    input_len: int,
    output_len: int,
    concurrency: int,
    weight_bytes: int,
    copy_bandwidth: float,
    matmul_rate: float,
    dtype_bytes: int = 2,
) -> dict:
    """The least time any engine needs for the workload on this device: max(FLOPs / matmul rate,
    bytes / copy bandwidth). FLOPs: every linear layer for every token (lm_head only where a token
    is sampled) and causal attention (QK and PV). Bytes: the weights once per decode step (with
    `concurrency` sequences decoding together), every decode token reading its whole context's
    K/V, and every token's K/V written once. Prefill steps reading the weights are left out,
    which flatters the bound.

    serial_seconds: the least time when the linear layers and attention run one after the other,
    as they do in one XLA step on one stream: each kind of kernel takes at least the larger of its
    own FLOPs over the matmul rate and its own bytes over the copy bandwidth, and the two add up.
    With bf16 K/V, attention is all reading and the linear layers all computing, so this bound is
    the one that binds."""
    L, D, N, K, H, F, V = (
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.vocab_size,
    )
    linear = L * (2 * D * N * H + 2 * D * K * H + 3 * D * F)  # q, o; k, v; gate, up, down
    n, i, o = num_prompts, input_len, output_len
    tokens = n * (i + o)
    attended = n * (i * (i + 1) / 2 + o * i + o * (o + 1) / 2)  # sum of context lengths over tokens
    linear_flops = 2 * linear * tokens + 2 * D * V * n * o
    attention_flops = 4 * L * N * H * attended
    flops = linear_flops + attention_flops
    kv_per_token = 2 * L * K * H * dtype_bytes
    decode_steps = n * o / max(concurrency, 1)
    decode_context = n * (o * i + o * (o + 1) / 2)
    weight_reads, kv_bytes = decode_steps * weight_bytes, (decode_context + tokens) * kv_per_token
    nbytes = weight_reads + kv_bytes
    compute_s, memory_s = flops / matmul_rate, nbytes / copy_bandwidth
    seconds = max(compute_s, memory_s)
    serial = max(linear_flops / matmul_rate, weight_reads / copy_bandwidth) + max(
        attention_flops / matmul_rate, kv_bytes / copy_bandwidth
    )
    return dict(
        flops=flops,
        bytes=nbytes,
        compute_seconds=compute_s,
        memory_seconds=memory_s,
        seconds=seconds,
        concurrency=concurrency,
        output_tokens_per_second=n * o / seconds,
        serial_seconds=serial,
        serial_output_tokens_per_second=n * o / serial,
    )


def run_jaxserve(args) -> list[dict]:
    import dataclasses

    import jax

    from jaxserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(
        args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        attention_impl=args.attention_impl,
        num_kv_pages=args.num_kv_pages,
        seed=args.seed,
        page_size=args.page_size,
        row_bucket_growth=args.row_bucket_growth,
    )
    startup = time.perf_counter() - t0
    engine = llm.engine
    on_gpu = jax.default_backend() == "gpu"
    limits = {}
    if on_gpu:
        from device_limits import copy_bandwidth, matmul_rate  # scripts/device_limits.py

        limits = dict(copy_bandwidth=copy_bandwidth(), matmul_rate=matmul_rate())
        print(
            f"this run's ceilings: copy {limits['copy_bandwidth'] / 1e12:.2f} TB/s, "
            f"bf16 matmul {limits['matmul_rate'] / 1e12:.0f} TFLOP/s"
        )
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(engine.runner.weights))
    capacity = engine.runner.num_pages * engine.runner.page_size
    results = []
    for input_len, output_len, num_prompts in parse_workloads(args):
        prompts = random_prompts(num_prompts, input_len, engine.model_config.vocab_size, args.seed)
        params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len)
        before = dataclasses.replace(engine.stats)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        elapsed = time.perf_counter() - t0
        assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
        steps = engine.stats.steps - before.steps
        record = dict(
            input_len=input_len,
            output_len=output_len,
            num_prompts=num_prompts,
            elapsed=elapsed,
            output_tokens_per_second=num_prompts * output_len / elapsed,
            startup_seconds=startup,
            steps=steps,
            host_ms_per_step=1e3 * (engine.stats.host_seconds - before.host_seconds) / max(steps, 1),
            wait_ms_per_step=1e3 * (engine.stats.wait_seconds - before.wait_seconds) / max(steps, 1),
            compilations_after_warmup=engine.num_compilations_since_warmup,
            preemptions=engine.scheduler.num_preemptions,
            device=str(jax.devices()[0].device_kind),
        )
        line = f"{input_len}:{output_len} x {num_prompts}: {record['output_tokens_per_second']:.0f} output tokens/s"
        if limits:
            concurrency = min(args.max_num_seqs, num_prompts, capacity // (input_len + output_len))
            bound = roofline(
                engine.model_config,
                num_prompts=num_prompts,
                input_len=input_len,
                output_len=output_len,
                concurrency=concurrency,
                weight_bytes=weight_bytes,
                **limits,
            )
            record.update(
                limits,
                roofline=bound,
                fraction_of_roofline=bound["seconds"] / elapsed,
                fraction_of_serial_bound=bound["serial_seconds"] / elapsed,
            )
            line += (
                f"; roofline {bound['output_tokens_per_second']:.0f} (compute {bound['compute_seconds']:.1f} s, "
                f"memory {bound['memory_seconds']:.1f} s at {concurrency} sequences at once): "
                f"{100 * record['fraction_of_roofline']:.0f}% of it; serial bound "
                f"{bound['serial_output_tokens_per_second']:.0f}: {100 * record['fraction_of_serial_bound']:.0f}% of it"
            )
        print(
            line + f"; {steps} steps, host work {record['host_ms_per_step']:.2f} ms/step, blocked on the device "
            f"{record['wait_ms_per_step']:.2f} ms/step"
        )
        results.append(record)
    return results


def build_transformers_model(args):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from models.config import preset_path

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}[args.dtype]
    preset = preset_path(str(args.model)) if args.model else None
    if preset is not None and not Path(args.model).is_dir():
        if args.load_format != "dummy":
            raise SystemExit(f"{args.model} is a random-weight preset: pass --load-format dummy")
        d = json.loads(preset.read_text())
        config = CONFIG_MAPPING[d["model_type"]](**d)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            return AutoModelForCausalLM.from_config(
                config, dtype=dtype if dtype != "auto" else torch.bfloat16, attn_implementation="sdpa"
            ).eval()
    if args.model is None or not Path(args.model).is_dir():
        raise SystemExit(
            "--backend transformers needs --model: a Hugging Face folder, or a preset with --load-format dummy"
        )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").eval()
    return model.cuda() if torch.cuda.is_available() else model


def run_transformers(args) -> list[dict]:
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    t0 = time.perf_counter()
    model = build_transformers_model(args)
    startup = time.perf_counter() - t0
    on_gpu = torch.cuda.is_available()
    results = []
    for input_len, output_len, num_prompts in parse_workloads(args):
        prompts = random_prompts(num_prompts, input_len, model.config.vocab_size, args.seed)
        gen = GenerationConfig(
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            eos_token_id=None,
            pad_token_id=0,
        )
        if on_gpu:  # its own memory sizing; CUDA graphs as it decides unless told
            graphs = None if args.hf_cuda_graphs < 0 else bool(args.hf_cuda_graphs)
            async_batching = None if args.hf_async_batching < 0 else bool(args.hf_async_batching)
            cb = ContinuousBatchingConfig(
                max_requests_per_batch=args.max_num_seqs,
                max_batch_tokens=args.max_num_batched_tokens,
                use_cuda_graph=graphs,
                use_async_batching=async_batching,
                default_compile_level=args.hf_compile_level,
            )
        else:  # its memory auto-sizing reads GPU memory: on the CPU, give it room for every sequence
            per_seq = -(-(input_len + output_len) // args.hf_block_size)
            cb = ContinuousBatchingConfig(
                max_requests_per_batch=args.max_num_seqs,
                max_batch_tokens=args.max_num_batched_tokens,
                block_size=args.hf_block_size,
                num_blocks=per_seq * num_prompts + 1,
            )
        # (not under torch.inference_mode: generate_batch runs its loop on another thread)
        warm = GenerationConfig(
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            eos_token_id=None,
            pad_token_id=0,
        )
        model.generate_batch(inputs=prompts[:2], generation_config=warm, continuous_batching_config=cb)  # warm-up
        t0 = time.perf_counter()
        outs = model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=cb)
        elapsed = time.perf_counter() - t0
        lengths = [len(o.generated_tokens) for o in outs.values()]
        errors = [o.error for o in outs.values() if o.error]
        assert len(outs) == len(prompts) and all(n == output_len for n in lengths), (lengths[:8], errors[:2])
        record = dict(
            input_len=input_len,
            output_len=output_len,
            num_prompts=num_prompts,
            elapsed=elapsed,
            output_tokens_per_second=num_prompts * output_len / elapsed,
            startup_seconds=startup,
            torch_threads=torch.get_num_threads(),
            cuda_graphs=args.hf_cuda_graphs,
            async_batching=args.hf_async_batching,
            compile_level=args.hf_compile_level,
            device=torch.cuda.get_device_name() if on_gpu else "cpu",
        )
        print(
            f"transformers {input_len}:{output_len} x {num_prompts}: "
            f"{record['output_tokens_per_second']:.0f} output tokens/s"
        )
        results.append(record)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["jaxserve", "transformers"], default="jaxserve")
    p.add_argument("--model", default=None, help="HF folder or preset (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--workloads", default=None, help="input:output pairs, comma-separated (overrides the two above)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-kv-pages", type=int, default=None)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--row-bucket-growth", type=int, default=4)
    p.add_argument("--attention-impl", default="auto", choices=["auto", "xla", "pallas", "reference"])
    p.add_argument("--hf-block-size", type=int, default=256, help="transformers' KV block size (CPU)")
    p.add_argument(
        "--hf-cuda-graphs", type=int, default=-1, help="transformers on a GPU: 1/0 CUDA graphs on/off; -1 its choice"
    )
    p.add_argument(
        "--hf-async-batching",
        type=int,
        default=-1,
        help="transformers on a GPU: 1/0 async double-buffering; -1 its choice",
    )
    p.add_argument(
        "--hf-compile-level", type=int, default=0, help="transformers: torch.compile level of its steps (0-3)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    if args.backend == "transformers" and args.model is None:
        args.model = str(Path.home() / ".cache" / "jaxserve" / "models" / "SmolLM2-135M-Instruct")
    results = (run_jaxserve if args.backend == "jaxserve" else run_transformers)(args)
    for r in results:
        n, elapsed = r["num_prompts"], r["elapsed"]
        total_tokens = n * (r["input_len"] + r["output_len"])
        r.update(requests_per_second=n / elapsed, tokens_per_second=total_tokens / elapsed)
        print(
            f"Throughput ({r['input_len']}:{r['output_len']}): {n / elapsed:.2f} requests/s, "
            f"{total_tokens / elapsed:.2f} total tokens/s, {r['output_tokens_per_second']:.2f} output tokens/s"
        )
    if args.output_json:
        record = dict(vars(args), results=results, date=str(date.today()), host=platform.node())
        Path(args.output_json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
