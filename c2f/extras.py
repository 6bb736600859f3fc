"""Optional dependencies, imported when first needed, with an error naming the extra that installs them."""
from __future__ import annotations

import importlib
from types import ModuleType

DIST_NAME = "c2f-fgvc"   # the distribution on the package index; the import name is c2f


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra adds it."""


def install_hint(extra: str) -> str:
    return f"pip install '{DIST_NAME}[{extra}]'"


def require(module: str, extra: str, purpose: str, package: str | None = None) -> ModuleType:
    """Imports ``module`` or raises ``MissingExtra`` naming ``purpose``, the package and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{purpose} needs {package or module.split('.')[0]}, which is not installed: "
                           f"{install_hint(extra)}") from None


def available(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
