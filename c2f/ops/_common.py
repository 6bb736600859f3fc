"""Helpers shared by the custom-op registrations."""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor


def implementation(op: str, backend: str) -> ModuleType:
    """The module implementing ``op``'s contract (``op``: "part_attention", "part_mixup" or "c2f_head"):
    ``c2f.kernels.<op>``, the Triton launchers, for ``backend == "triton"``, else ``c2f.torch_ops.<op>``.

    Imported on first use only, so triton stays optional: ``import c2f`` never imports a kernels module.
    """
    package = "..kernels" if backend == "triton" else "..torch_ops"
    return importlib.import_module(f"{package}.{op}", __package__)


def no_autocast(t: Tensor):
    """The implementations run the precision the op was given (``dot_precision``): autocast, still on
    inside a custom op, must not recast their ops again."""
    if t.device.type in ("cpu", "cuda"):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    """Custom ops return tensors only: an absent gradient travels as an empty tensor."""
    return like.new_empty(0) if t is None else t


def chain_rule_error(what: str) -> Callable:
    """The autograd formula of a backward op that has no second derivative: raises a clear error."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"c2f's fused {what} is once differentiable: its backward has no gradient of its own, so a "
            "second derivative (create_graph=True, e.g. a gradient penalty) cannot pass through it. "
            "Use the c2f.reference module for double backward.")
    return backward
