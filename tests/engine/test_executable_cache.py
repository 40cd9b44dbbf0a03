"""The executable cache's key and its failure paths (its use by the engine is tested with the
mock engine; XLA's own serialization is exercised on the GPU by scripts/bench_startup.py)."""

from __future__ import annotations

import jax

from jaxserve.engine import executable_cache
from jaxserve.engine.executable_cache import ExecutableCache, environment_key


def test_the_key_follows_compiler_settings_and_shapes_but_not_memory_sizing(monkeypatch):
    base = environment_key("shapes A")
    assert environment_key("shapes A") == base
    assert environment_key("shapes B") != base
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    assert environment_key("shapes A") == base
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=")
    assert environment_key("shapes A") != base


def test_an_unserializable_program_is_not_saved_and_a_damaged_file_is_not_loaded(tmp_path, monkeypatch):
    cache = ExecutableCache(tmp_path, jax.devices()[:1], "k")

    def refuse(compiled):
        raise RuntimeError("not serializable on this backend")

    monkeypatch.setattr(executable_cache.serialize_executable, "serialize", refuse)
    cache.save("step", object())
    assert cache.load("step") is None and not list(tmp_path.rglob("*.bin"))
    cache.folder.mkdir(parents=True)
    (cache.folder / "step.bin").write_bytes(b"not a pickle")
    assert cache.load("step") is None
