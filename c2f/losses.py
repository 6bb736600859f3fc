"""Losses of the C2F head: attribute regression and soft-target cross-entropy."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._validate import describe


def attribute_loss(pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                   kind: str = "mse") -> torch.Tensor:
    """Attribute regression loss, a scalar: the weighted mean over entries of ``[B, P]``.

    ``kind`` is "mse" or "bce" (binary cross-entropy with logits). ``weight [B, P]`` (e.g. CUB
    certainty mapped to a confidence; 0 masks an entry out, as for "not visible") weights each entry;
    the mean is over the total weight, so masked entries do not dilute the loss.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape, got pred {describe(pred)}, target {describe(target)}")
    pred, target = pred.float(), target.float()
    if kind == "mse":
        per_entry = (pred - target).square()
    elif kind == "bce":
        per_entry = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    else:
        raise ValueError(f"kind must be 'mse' or 'bce', got {kind!r}")
    if weight is None:
        return per_entry.mean()
    if weight.shape != pred.shape:
        raise ValueError(f"weight must match pred {tuple(pred.shape)}, got {describe(weight)}")
    weight = weight.float()
    return (per_entry * weight).sum() / weight.sum().clamp_min(1e-12)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft (probability) targets, averaged over all leading dims, in fp32.

    ``F.cross_entropy`` with probability targets on ``[..., num_classes]`` flattened to 2-D (the
    ``[K, B, classes]`` logits of K mixed views included).
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits and targets must have one shape, got {describe(logits)} and {describe(targets)}")
    classes = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, classes), targets.float().reshape(-1, classes))
