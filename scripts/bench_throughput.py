"""Offline throughput with `vllm bench throughput`'s flags and result lines: prompts from vLLM's
random dataset (--input-len, --output-len, --random-range-ratio, --prefix-len) or a local ShareGPT
JSON (--dataset-name sharegpt --dataset-path FILE), all submitted at once, each generating its
output length (ignore_eos, temperature 1.0, --n samples); prints "Throughput: X requests/s, Y total
tokens/s, Z output tokens/s" and the prompt and output token totals. The engine flags are
`jaxserve serve`'s (jaxserve/engine_args.py); on a CPU without plan flags the plan is the small one.

    python scripts/bench_throughput.py --input-len 128 --output-len 64 --num-prompts 16
    python scripts/bench_throughput.py --model llama-3.1-8b --load-format dummy --dtype bfloat16 \
        --workloads 1024:1024,128:128,2048:128 --num-prompts 1000 --max-num-seqs 256

Prompts are text made with the engine's tokenizer, as vLLM's are; a model without one (a
random-weight preset) gets random token ids from its vocabulary. --workloads runs several
(input:output[:n]) random workloads on one engine, one after the other. On a GPU each is printed
beside its roofline: the time no engine can beat on this device, from the copy bandwidth and bf16
matmul rate measured in the same run (see `roofline`), and beside the serial bound for bf16 and for
fp8 KV pages (--kv-cache-dtype picks the engine's; the KV capacity in tokens is printed).

--backend hf (or transformers) runs transformers' continuous batching (`model.generate_batch`) on
the same prompts for comparison; it needs torch (the GPU machine has it; on the CPU see
scripts/make_reference_fixtures.py for a venv). A preset with --load-format dummy is built from
its config with random weights on the GPU. The clock starts after start-up (loading, warm-up
compilation) and stops when the last request ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

from jaxserve.benchmarks.datasets import SampleRequest, load_client_tokenizer, random_requests, sharegpt_requests
from jaxserve.engine_args import add_engine_args, engine_kwargs, multi_gpu_environment


def parse_workloads(args) -> list[tuple[int, int, int]]:
    """(input_len, output_len, num_prompts) of each random workload: --workloads in:out[:n],... or
    the single --input-len/--output-len; n defaults to --num-prompts."""
    if not args.workloads:
        if args.input_len is None:
            raise SystemExit("the random dataset needs --input-len (or --workloads, or --dataset-path)")
        return [(args.input_len, args.output_len or 128, args.num_prompts)]
    out = []
    for w in args.workloads.split(","):
        parts = [int(x) for x in w.split(":")]
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else args.num_prompts))
    return out


def workload_requests(args, tokenizer, vocab_size: int) -> list[tuple[str, list[SampleRequest]]]:
    """(name, requests) of each workload: the ShareGPT file, or each random workload."""
    if args.dataset_name == "sharegpt" or (args.dataset_name is None and args.dataset_path):
        if args.dataset_path is None or tokenizer is None:
            raise SystemExit("--dataset-name sharegpt needs --dataset-path and a model with a tokenizer")
        requests = sharegpt_requests(
            args.dataset_path, tokenizer, args.num_prompts, output_len=args.output_len, seed=args.seed
        )
        return [("sharegpt", requests)]
    return [
        (
            f"{i}:{o}",
            random_requests(
                n,
                i,
                o,
                tokenizer=tokenizer,
                vocab_size=vocab_size,
                range_ratio=args.random_range_ratio,
                prefix_len=args.prefix_len,
                seed=args.seed,
            ),
        )
        for i, o, n in parse_workloads(args)
    ]


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


def measure_ceilings() -> dict:
    """This run's copy bandwidth and bf16 matmul rate (jaxserve.benchmarks.device_limits), printed."""
    from jaxserve.benchmarks.device_limits import copy_bandwidth, matmul_rate

    limits = dict(copy_bandwidth=copy_bandwidth(), matmul_rate=matmul_rate())
    print(
        f"this run's ceilings: copy {limits['copy_bandwidth'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {limits['matmul_rate'] / 1e12:.0f} TFLOP/s"
    )
    return limits


def run_jaxserve(args) -> list[dict]:
    import dataclasses

    import jax

    from jaxserve import LLM, SamplingParams
    from jaxserve.benchmarks.device_limits import torch_sees_a_gpu

    # The ceilings, through PyTorch before JAX starts its GPU client, which takes 95% of the memory
    # (an 80 GB card has no room after); without PyTorch, through JAX inside its own pool.
    limits = measure_ceilings() if torch_sees_a_gpu() else {}
    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    startup = time.perf_counter() - t0
    engine = llm.engine
    if not limits and jax.default_backend() == "gpu":
        limits = measure_ceilings()
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(engine.runner.weights))
    capacity = engine.runner.num_pages * engine.runner.page_size
    kv_dtype = engine.runner.kv_cache_dtype
    print(f"KV cache: {engine.config.kv_cache_dtype} ({kv_dtype.name}), {capacity} tokens")
    results = []
    for name, requests in workload_requests(args, llm.get_tokenizer(), engine.model_config.vocab_size):
        prompts = [r.prompt if isinstance(r.prompt, str) else {"prompt_token_ids": r.prompt} for r in requests]
        params = [
            SamplingParams(n=args.n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=r.expected_output_len)
            for r in requests
        ]
        before = dataclasses.replace(engine.stats)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
        output_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        assert output_tokens == args.n * sum(r.expected_output_len for r in requests)
        steps = engine.stats.steps - before.steps
        input_len = round(prompt_tokens / len(requests))
        output_len = round(output_tokens / len(requests) / args.n)
        record = dict(
            workload=name,
            input_len=input_len,
            output_len=output_len,
            num_prompts=len(requests),
            elapsed=elapsed,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            output_tokens_per_second=output_tokens / elapsed,
            startup_seconds=startup,
            steps=steps,
            host_ms_per_step=1e3 * (engine.stats.host_seconds - before.host_seconds) / max(steps, 1),
            wait_ms_per_step=1e3 * (engine.stats.wait_seconds - before.wait_seconds) / max(steps, 1),
            compilations_after_warmup=engine.num_compilations_since_warmup,
            kv_cache_dtype=kv_dtype.name,
            kv_capacity_tokens=capacity,
            preemptions=engine.scheduler.num_preemptions,
            device=str(jax.devices()[0].device_kind),
        )
        line = f"{name} x {len(requests)}: {record['output_tokens_per_second']:.0f} output tokens/s"
        if limits:
            concurrency = min(engine.config.max_num_seqs, len(requests), capacity // (input_len + output_len))
            bound = roofline(
                engine.model_config,
                num_prompts=len(requests) * args.n,
                input_len=input_len,
                output_len=output_len,
                concurrency=concurrency,
                weight_bytes=weight_bytes,
                dtype_bytes=kv_dtype.itemsize,
                **limits,
            )
            # the serial bound with 2- and 1-byte K/V at this run's concurrency (fp8 KV fits more)
            serial_by_kv = {
                kv: roofline(
                    engine.model_config,
                    num_prompts=len(requests) * args.n,
                    input_len=input_len,
                    output_len=output_len,
                    concurrency=concurrency,
                    weight_bytes=weight_bytes,
                    dtype_bytes=nbytes,
                    **limits,
                )["serial_output_tokens_per_second"]
                for kv, nbytes in (("bf16", 2), ("fp8", 1))
            }
            record.update(
                limits,
                serial_bound_by_kv_dtype=serial_by_kv,
                roofline=bound,
                fraction_of_roofline=bound["seconds"] / elapsed,
                fraction_of_serial_bound=bound["serial_seconds"] / elapsed,
            )
            line += (
                f"; roofline {bound['output_tokens_per_second']:.0f} (compute {bound['compute_seconds']:.1f} s, "
                f"memory {bound['memory_seconds']:.1f} s at {concurrency} sequences at once): "
                f"{100 * record['fraction_of_roofline']:.0f}% of it; serial bound "
                f"{bound['serial_output_tokens_per_second']:.0f}: {100 * record['fraction_of_serial_bound']:.0f}% of it "
                f"(serial bound with bf16 KV {serial_by_kv['bf16']:.0f}, with fp8 KV {serial_by_kv['fp8']:.0f})"
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

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}[args.dtype]
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
        raise SystemExit("--backend hf needs --model: a Hugging Face folder, or a preset with --load-format dummy")
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
    folder = args.tokenizer or (args.model if Path(args.model).is_dir() else None)
    tokenizer = load_client_tokenizer(folder, None) if folder else None
    results = []
    for name, requests in workload_requests(args, tokenizer, model.config.vocab_size):
        lengths = {r.expected_output_len for r in requests}
        if len(lengths) > 1:  # one GenerationConfig for the whole batch
            raise SystemExit("--backend hf runs one output length per workload: leave --random-range-ratio at 0")
        output_len, num_prompts = lengths.pop(), len(requests)
        prompts = [r.prompt if isinstance(r.prompt, list) else tokenizer.encode(r.prompt) for r in requests]
        input_len = round(sum(map(len, prompts)) / num_prompts)
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
            workload=name,
            input_len=input_len,
            output_len=output_len,
            num_prompts=num_prompts,
            elapsed=elapsed,
            prompt_tokens=sum(map(len, prompts)),
            output_tokens=num_prompts * output_len,
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


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["jaxserve", "hf", "transformers"], default="jaxserve")
    p.add_argument(
        "--dataset-name",
        choices=["random", "sharegpt"],
        default=None,
        help="default: sharegpt with --dataset-path, else random",
    )
    p.add_argument("--dataset-path", default=None, help="a local ShareGPT JSON")
    p.add_argument("--input-len", type=int, default=None, help="prompt tokens (random dataset)")
    p.add_argument("--output-len", type=int, default=None, help="output tokens (default: 128, or ShareGPT's replies)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--prefix-len", type=int, default=0, help="a random prefix every prompt shares (random dataset)")
    p.add_argument("--workloads", default=None, help="random input:output[:n] workloads, comma-separated")
    p.add_argument("--output-json", default=None)
    hf = p.add_argument_group("--backend hf (transformers' continuous batching)")
    hf.add_argument("--hf-block-size", type=int, default=256, help="transformers' KV block size (CPU)")
    hf.add_argument("--hf-cuda-graphs", type=int, default=-1, help="on a GPU: 1/0 CUDA graphs on/off; -1 its choice")
    hf.add_argument(
        "--hf-async-batching", type=int, default=-1, help="on a GPU: 1/0 async double-buffering; -1 its choice"
    )
    hf.add_argument("--hf-compile-level", type=int, default=0, help="torch.compile level of its steps (0-3)")
    add_engine_args(p)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    # transformers advises at import that PyTorch is absent; jaxserve never needs it.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = make_parser().parse_args(argv)
    multi_gpu_environment(args.tensor_parallel_size, os.environ)  # NCCL_NVLS_ENABLE=0 at tp > 1
    if args.backend == "jaxserve":
        results = run_jaxserve(args)
    else:
        if args.model is None:
            from jaxserve.default_model import default_model_folder

            args.model = str(default_model_folder())
        results = run_transformers(args)
    for r in results:
        n, elapsed = r["num_prompts"], r["elapsed"]
        output_tokens = r.get("output_tokens", n * r["output_len"])
        prompt_tokens = r.get("prompt_tokens", n * r["input_len"])
        total = prompt_tokens + output_tokens
        r.update(
            elapsed_time=elapsed,
            num_requests=n,
            total_num_tokens=total,
            requests_per_second=n / elapsed,
            tokens_per_second=total / elapsed,
        )
        if len(results) > 1:
            print(f"{r.get('workload', '')}:")
        print(
            f"Throughput: {n / elapsed:.2f} requests/s, {total / elapsed:.2f} total tokens/s, "
            f"{output_tokens / elapsed:.2f} output tokens/s"
        )
        print(f"Total num prompt tokens:  {prompt_tokens}")
        print(f"Total num output tokens:  {output_tokens}")
    if args.output_json:
        keys = ("elapsed_time", "num_requests", "total_num_tokens", "requests_per_second", "tokens_per_second")
        record = dict(results[0] if len(results) == 1 else {}, **{k: results[-1][k] for k in keys})
        args_record = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        record.update(args=args_record, results=results, date=str(date.today()), host=platform.node())
        Path(args.output_json).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
