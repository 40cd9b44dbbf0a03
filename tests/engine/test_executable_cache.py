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


def test_only_the_most_recently_used_key_folders_are_kept(tmp_path):
    import os

    for i in range(ExecutableCache.KEEP + 3):
        stale = tmp_path / f"old{i:02d}"
        stale.mkdir()
        os.utime(stale, (1000 + i, 1000 + i))
    cache = ExecutableCache(tmp_path, jax.devices()[:1], "k")
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len(kept) == ExecutableCache.KEEP - 1 and kept[0] == "old04"  # the newest 15 of 19; its own comes when saved
    cache.folder.mkdir()
    ExecutableCache(tmp_path, jax.devices()[:1], "other")
    assert cache.folder.is_dir()  # the newest stays
