"""The result cache of ``python -m c2f.kernels.inspect``: one small JSON file per compile.

Keyed on Triton's own cache key (``triton.runtime.cache.get_cache_key``: Triton's build, the kernel's source
and the sources of the functions it calls, the argument specialisation, constexprs, options, target and
the environment variables that change code generation) and a digest of c2f's own code that reads the
figures, so an entry is reused only for the compile it came from. (Environment variables that change code
generation without Triton counting them as such escape the key, as they escape Triton's own cache.) Only
what the compile produced is kept (registers, spills, shared memory, matrix instructions, compile time);
occupancy and the verdict are recomputed from the target table on every run.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["CACHE_ENV", "COMPILED_FIELDS", "cache_dir", "compile_key", "cache_read", "cache_write"]

CACHE_ENV = "C2F_INSPECT_CACHE"
_CACHE_FORMAT = 1
# What a compile produced, and the type each figure has as cache_write writes it.
_FIELD_TYPES = dict(regs=int, spill_stores=int, spill_loads=int, stack_bytes=int, sgpr_spills=(int, type(None)),
                    smem_bytes=int, tensor_cores=str, compile_s=(int, float))
COMPILED_FIELDS = tuple(_FIELD_TYPES)


def cache_dir() -> Path | None:
    """Where compile results are kept, or None when ``$C2F_INSPECT_CACHE`` is ``off``."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() in ("off", "0", "none"):
        return None
    if value:
        return Path(value)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "c2f" / "inspect"


def compile_key(src, options: dict, target, derivation: str = "") -> str:
    """Triton's own cache key for this compile (what ``triton.compile`` would look up), with ``derivation``
    (a digest of the code that turns a compile into figures: a change there must not serve old figures),
    hashed."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler import make_backend
    from triton.runtime.cache import get_cache_key

    backend = make_backend(target.gpu_target())
    parsed = backend.parse_options(dict(options, **src.parse_options()))
    key = get_cache_key(src, backend, parsed, get_cache_invalidating_env_vars())
    return hashlib.sha256(f"c2f-inspect-{_CACHE_FORMAT}-{derivation}-{key}".encode()).hexdigest()


def cache_read(key: str) -> dict | None:
    """The entry stored under ``key``, or None (no cache, no entry, or an unreadable one)."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        with open(folder / f"{key}.json") as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or not all(k in entry and isinstance(entry[k], t) for k, t in _FIELD_TYPES.items()):
        return None   # not what cache_write writes: compile again
    return entry


def cache_write(key: str, entry: dict) -> None:
    """Atomic (``c2f.files.atomic_write``): a killed run leaves no half-written entry."""
    from c2f.files import atomic_write_text
    folder = cache_dir()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(str(folder / f"{key}.json"), json.dumps(entry))
    except OSError:   # a read-only or full disk costs the cache, not the check
        pass
