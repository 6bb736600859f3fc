"""c2f: fused part attention and part-wise mixup for coarse-to-fine fine-grained recognition.

The library: ``c2f.nn`` (modules), ``c2f.functional`` (functional ops), ``c2f.reference`` (the plain
PyTorch reference), ``c2f.losses`` and ``c2f.model_file`` load on first use; ``c2f.validation(True)``
turns the value checks of pairings and masks on (``c2f._validate``). The training application (data,
trainer, evaluation, runs, CLI) is ``c2f.app``; ``docs/design.md`` maps the folders.

Modules moved in 0.2 keep their old names for one release (``c2f.data`` is ``c2f.app.data``,
``c2f.train`` is ``c2f.app``, ...): importing one warns with a ``DeprecationWarning`` naming the new one.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

from ._validate import validation

__version__ = "0.2.0"
__all__ = ["nn", "functional", "reference", "losses", "model_file", "app", "validation", "__version__"]
_SUBMODULES = {"nn", "functional", "reference", "losses", "model_file", "app"}

# Old module -> new module (0.1 -> 0.2). Submodules follow their package (c2f.data.cache -> c2f.app.data.cache).
MOVED = {
    "c2f.attention": "c2f.part_attention", "c2f.mixup": "c2f.part_mixup", "c2f.head": "c2f.c2f_head",
    "c2f.ops.attention": "c2f.ops.part_attention", "c2f.ops.mixup": "c2f.ops.part_mixup",
    "c2f.ops.head": "c2f.ops.c2f_head", "c2f.checkpoint": "c2f.model_file", "c2f.train": "c2f.app",
    **{f"c2f.{m}": f"c2f.app.{m}" for m in ("cli", "data", "config", "devices", "distributed", "epoch", "evaluate",
                                            "log", "metrics", "plots", "runs", "sources", "trainer")},
}


def moved_to(name: str):
    """The new name of a module moved in 0.2 (``c2f.data.cache`` -> ``c2f.app.data.cache``), else None."""
    for old in sorted(MOVED, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return MOVED[old] + name[len(old):]
    return None


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a moved module under its old name: a thin module that forwards every attribute to the new one."""

    def find_spec(self, fullname, path=None, target=None):
        if moved_to(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        new = moved_to(module.__name__)
        warnings.warn(f"{module.__name__} is now {new}; the old name goes in the next release",
                      DeprecationWarning, stacklevel=2)
        target = importlib.import_module(new)
        module.__getattr__ = lambda attr: getattr(target, attr)
        module.__path__ = []   # a package, so its old submodule names import through this finder too
        module.__all__ = getattr(target, "__all__", [n for n in vars(target) if not n.startswith("_")])


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if moved_to(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'c2f' has no attribute {name!r}")
