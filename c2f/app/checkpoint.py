"""Run state in ``last.pt`` beside the model: the global RNG states, stored so a resumed run draws the same numbers.

The file format (``atomic_save``, ``safe_load``, checksums) is the library's, in ``c2f.model_file``.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Global RNG states as tensors and plain containers (so ``last.pt`` loads with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return dict(torch=torch.get_rng_state(),
                numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), cached_gaussian=float(cached)),
                python=dict(version=version, internal=list(internal), gauss_next=gauss_next),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state: dict) -> None:
    """Restores ``rng_state()``'s states (or the tuples that earlier c2f versions stored)."""
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)
    if isinstance(p, dict):
        p = (p["version"], tuple(p["internal"]), p["gauss_next"])
    random.setstate(p)
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
