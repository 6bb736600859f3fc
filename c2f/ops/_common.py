"""Helpers shared by the custom-op registrations."""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor


def empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
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
