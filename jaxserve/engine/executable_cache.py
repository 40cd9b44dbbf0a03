"""Compiled step programs kept on disk between start-ups, so that a warm start skips tracing and
lowering them (about 1.2 s per step shape for Llama-3.1-8B on an H200: most of a warm start).

    key = sha256(source of jaxserve, models, pallas_kernels, sharding; jax, jaxlib and flax
                 versions; devices and their runtime; XLA_* and JAX_* variables; what the caller
                 adds: model, cache and state shapes)
    folder/<key>/<program name>.bin  <-  pickled output of jax's serialize_executable

JAX's own persistent cache needs the lowered program to compute its key; this one does not, so
its key must change whenever the program could: hence the hash of the source. A program that
cannot be serialized (on the CPU, a sort's comparator) is compiled at every start-up. The files
are unpickled: the cache folder must be as trusted as the code (as JAX's cache folder is).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import flax
import jax
import jaxlib
from jax.experimental import serialize_executable


@functools.cache
def source_digest() -> bytes:
    """A digest of every Python file the compiled programs are traced from (read once a process)."""
    import jaxserve
    import models
    import pallas_kernels
    import sharding

    folders = [Path(m.__file__).parent for m in (jaxserve, models, pallas_kernels, sharding)]
    digest = hashlib.sha256()
    for path in sorted(p for folder in folders for p in folder.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.digest()


def environment_key(*parts) -> str:
    """sha256 of the source, the versions, the devices, XLA's and JAX's variables and `parts` (their repr)."""
    devices = [(d.platform, d.device_kind, d.id, d.client.platform_version) for d in jax.devices()]
    flags = sorted(
        (k, v)
        for k, v in os.environ.items()  # XLA's and JAX's settings, less memory sizing
        if k.startswith(("XLA_", "JAX_")) and not k.startswith("XLA_PYTHON_CLIENT_")
    )
    env = (jax.__version__, jaxlib.__version__, flax.__version__, devices, flags, parts)
    return hashlib.sha256(source_digest() + repr(env).encode()).hexdigest()


class ExecutableCache:
    KEEP = 16  # key folders kept: each code change or new shape makes another; the oldest go

    def __init__(self, folder: str | Path, devices, *parts):
        """devices: those the programs run on (loaded programs are placed on them). Opening
        the cache marks its folder as used and removes all but the KEEP most recently used."""
        self.devices = list(devices)
        self.folder = Path(folder) / environment_key([d.id for d in self.devices], *parts)[:32]
        if self.folder.is_dir():
            os.utime(self.folder)
        try:
            siblings = sorted(
                (p for p in self.folder.parent.iterdir() if p.is_dir() and p != self.folder),
                key=lambda p: p.stat().st_mtime,
                reverse=True,
            )
        except OSError:  # no cache folder yet
            return
        for old in siblings[self.KEEP - 1 :]:
            shutil.rmtree(old, ignore_errors=True)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.bin"

    def load(self, name: str):
        """The compiled program saved under `name`, or None (absent, or unreadable by this JAX)."""
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            return serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=self.devices)
        except Exception:  # a damaged or incompatible file: compile instead (and overwrite it)
            return None

    def save(self, name: str, compiled) -> None:
        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
        except Exception:  # not serializable on this backend
            return
        write_atomically(self._path(name), blob)


def write_atomically(path: Path, data: bytes) -> None:
    """Writes `path` whole or not at all (a concurrent reader never sees half of it); a cache
    that cannot be written (read-only folder, full disk) is only slower, so errors are dropped."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
