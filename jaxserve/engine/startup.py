"""Building an engine: model, memory probe, KV plan, runner, warm-up, scheduler.

    EngineConfig -> model and tokenizer (folder, attention implementation, weights)
        -> bucket plan (every step shape) -> step workspace (measured once per model, plan and
           code version; then read from the cache folder) -> KV pages (memory_plan.py)
        -> ModelRunner -> warm-up: every shape compiled (or loaded from the executable cache)
           and run once -> Scheduler over the same pages -> the start-up heap frozen for the
           garbage collector (gc_settings.py)

Logged as it goes: the plan, the workspace, the KV cache, the warm-up's phases.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from jaxserve.config import EngineConfig
from jaxserve.default_model import DEFAULT_MODEL_NAME, default_cache_dir, is_gguf, resolve_model
from jaxserve.engine import compile_counter, gc_settings
from jaxserve.engine.attention_choice import DeviceInfo, choose_attention_impl
from jaxserve.engine.buckets import BucketPlan
from jaxserve.engine.executable_cache import ExecutableCache
from jaxserve.engine.memory_plan import plan_kv_cache, step_workspace
from jaxserve.engine.runner import MAX_EOS_IDS, ModelRunner
from jaxserve.scheduler import KVPageManager, Scheduler, SchedulerConfig
from jaxserve.tokenizer import load_tokenizer
from models.loading import load_model, resolve_config, resolve_dtype
from sharding import make_mesh


@dataclasses.dataclass(frozen=True)
class EngineParts:
    tokenizer: object | None
    model_config: object
    plan: BucketPlan
    max_model_len: int
    eos_token_ids: frozenset[int]
    runner: ModelRunner
    scheduler: Scheduler
    compilations_after_warmup: int


def build_engine(
    config: EngineConfig, *, model=None, tokenizer=None, processors=(), progress: bool = True, log: Callable = print
) -> EngineParts:
    gc_settings.thaw()
    t0 = time.perf_counter()
    model, tokenizer = build_model_and_tokenizer(config, model, tokenizer, progress=progress, log=log)
    log(f"model and tokenizer ready in {time.perf_counter() - t0:.1f} s")
    plan = BucketPlan.make(
        config.max_num_batched_tokens,
        config.max_num_seqs,
        config.min_token_bucket,
        config.row_bucket_growth,
        config.token_bucket_growth,
    )
    log(plan.describe())
    eos = set(model.config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    eos_token_ids = frozenset(sorted(eos)[:MAX_EOS_IDS])
    processors = list(processors)

    def make_runner(num_pages: int, max_model_len: int) -> ModelRunner:
        return ModelRunner(
            model,
            num_pages=num_pages,
            page_size=config.page_size,
            max_model_len=max_model_len,
            plan=plan,
            max_num_seqs=config.max_num_seqs,
            processors=processors,
            eos_token_ids=eos_token_ids,
            kv_cache_dtype=config.kv_dtype_name,
            estimate_kv_scales=config.calculate_kv_scales,
        )

    workspace, t0 = 0, time.perf_counter()
    if config.num_kv_pages is None and "bytes_limit" in (jax.local_devices()[0].memory_stats() or {}):

        def measure() -> int:
            probe = make_runner(4, config.page_size)
            return probe.step_workspace_bytes() + probe.state_bytes()

        workspace = step_workspace(config, model, plan.shapes, [n for n, _ in processors], measure)
        log(f"step workspace {workspace / 2**30:.2f} GiB ({time.perf_counter() - t0:.1f} s)")
    max_model_len, num_pages = plan_kv_cache(config, model, workspace_bytes=workspace, log=log)
    if jax.process_count() > 1:  # several processes: one KV plan for all (their schedulers must agree)
        max_model_len, num_pages = agreed_kv_plan(max_model_len, num_pages, log)
    runner = make_runner(num_pages, max_model_len)
    use_cache = config.executable_cache if config.executable_cache is not None else jax.default_backend() == "gpu"
    cache = None
    # Not with logits processors (their code is not part of the key), and not yet on a mesh
    # (reloading onto several devices is untested).
    if use_cache and not processors and runner.mesh is None:
        cache = ExecutableCache(
            Path(config.cache_dir or default_cache_dir()) / "executables",
            runner.devices,
            *runner.executable_cache_key(),
        )
    log(
        f"warm-up: compiling {len(plan.shapes)} step shape{'s' * (len(plan.shapes) != 1)} (or loading them from the compilation "
        "cache), then running each once"
    )
    took = runner.warm_up(progress=progress, cache=cache)
    log(
        f"warm-up compiled {len(plan.shapes)} step shapes in {took.total:.1f} s ({took.cached_programs} "
        f"programs from the executable cache; lowering {took.lower:.1f} s, compiling or loading "
        f"{took.compile:.1f} s, first runs {took.run:.1f} s)"
    )
    scheduler = Scheduler(
        SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_model_len),
        KVPageManager(num_pages, config.page_size, enable_caching=config.enable_prefix_caching),
    )
    log(gc_settings.freeze_startup_heap())
    return EngineParts(
        tokenizer,
        model.config,
        plan,
        max_model_len,
        eos_token_ids,
        runner,
        scheduler,
        compile_counter.compilations(),
    )


def agreed_kv_plan(max_model_len: int, num_pages: int, log: Callable) -> tuple[int, int]:
    """The smallest plan of every process (each sized its cache from its own device's memory):
    a collective, called by every process at the same point of start-up."""
    from jax.experimental import multihost_utils

    plans = np.asarray(multihost_utils.process_allgather(np.array([max_model_len, num_pages], np.int32)))
    agreed = tuple(int(v) for v in plans.min(axis=0))
    if agreed != (max_model_len, num_pages):
        log(f"KV plan: {agreed[1]} pages, max_model_len {agreed[0]}: the smallest of the {len(plans)} processes'")
    return agreed


def enable_compilation_cache(cache_dir: str | Path | None) -> None:
    """JAX's persistent compilation cache, so that a second start-up skips XLA compilation."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir or default_cache_dir()) / "xla"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def build_mesh(config: EngineConfig) -> Mesh | None:
    """The tensor-parallel mesh over the first tensor_parallel_size devices (None: one device)."""
    return None if config.tensor_parallel_size == 1 else make_mesh(config.tensor_parallel_size)


def build_model_and_tokenizer(
    config: EngineConfig, model=None, tokenizer=None, *, progress: bool = True, log: Callable = print
):
    enable_compilation_cache(config.cache_dir)
    if model is None:
        if config.model is None or is_gguf(config.model):
            log(
                f"model: {config.model or DEFAULT_MODEL_NAME}, from a GGUF file (converted into the cache "
                "folder at its first use, then read from there)"
            )
        folder = resolve_model(config.model, config.cache_dir)
        cfg = resolve_config(folder)
        # Before any weights load: an explicit "pallas" that cannot run raises here.
        choice = choose_attention_impl(
            config.attention_impl,
            resolve_dtype(config.dtype, cfg),
            cfg.head_dim,
            config.page_size,
            DeviceInfo.of(),
            kv_dtype=config.kv_dtype_name,
        )
        log(choice.describe())
        model = load_model(
            folder,
            dtype=config.dtype,
            load_format=config.load_format,
            attention_impl=choice.impl,
            seed=config.seed,
            mesh=build_mesh(config),
            progress=progress,
        )
        if tokenizer is None:
            tok_folder = Path(config.tokenizer or folder)
            # A folder without tokenizer files (random-weight presets, bare checkpoints) serves
            # token ids only; one whose tokenizer files fail to load is an error.
            if config.tokenizer or any((tok_folder / f).is_file() for f in TOKENIZER_FILES):
                log(f"loading the tokenizer from {tok_folder}")
                tokenizer = load_tokenizer(tok_folder)
    return model, tokenizer
