"""c2f: fused part attention and part-wise mixup for coarse-to-fine fine-grained recognition.

``c2f.nn`` (modules), ``c2f.functional`` (functional ops), ``c2f.reference`` (the plain PyTorch
reference), ``c2f.data`` and ``c2f.losses`` load on first use; ``c2f.validation(True)`` turns the
value checks of pairings and masks on (``c2f._validate``).
"""
from __future__ import annotations

import importlib

from ._validate import validation

__version__ = "0.1.0"
__all__ = ["nn", "functional", "reference", "data", "losses", "validation", "__version__"]
_SUBMODULES = {"nn", "functional", "reference", "data", "losses"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'c2f' has no attribute {name!r}")
