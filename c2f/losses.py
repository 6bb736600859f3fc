"""Losses of the C2F head: attribute regression and soft-target cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_float, describe, values_checked

ROUNDING = 1e-5   # how far mixed targets may stray outside [0, 1] by float rounding


def _probabilities(t: torch.Tensor) -> bool:
    return bool(((t >= -ROUNDING) & (t <= 1 + ROUNDING)).all())


def attribute_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                   kind: str = "mse") -> torch.Tensor:
    """Attribute regression loss, a scalar: the weighted mean over entries of ``[B, P]``.

    ``kind`` is "mse" or "bce" (binary cross-entropy with logits). ``weight [B, P]`` (e.g. CUB
    certainty mapped to a confidence; 0 masks an entry out, as for "not visible") weights each entry;
    the mean is over the total weight, so masked entries do not dilute the loss.
    """
    check_float("pred", pred)
    check_float("target", target)
    if pred.shape != target.shape or pred.numel() == 0:
        raise ValueError(f"pred and target must have one non-empty shape, got pred {describe(pred)}, target "
                         f"{describe(target)}")
    if kind not in ("mse", "bce"):
        raise ValueError(f"kind must be 'mse' or 'bce', got {kind!r}")
    if kind == "bce" and values_checked(target) and not _probabilities(target):
        raise ValueError(f"target must lie in [0, 1] for kind='bce', got values in [{target.min().item():g}, "
                         f"{target.max().item():g}]")
    pred, target = pred.float(), target.float()
    if kind == "mse":
        per_entry = (pred - target).square()
    else:
        per_entry = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    if weight is None:
        return per_entry.mean()
    check_float("weight", weight)
    if weight.shape != pred.shape:
        raise ValueError(f"weight must match pred {tuple(pred.shape)}, got {describe(weight)}")
    if values_checked(weight) and not bool((weight >= 0).all()):
        raise ValueError(f"weight must be >= 0 (0 masks an entry out), got a minimum of {weight.min().item():g}")
    weight = weight.float()
    return (per_entry * weight).sum() / weight.sum().clamp_min(1e-12)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft (probability) targets, averaged over all leading dims, in fp32.

    ``F.cross_entropy`` with probability targets on ``[..., num_classes]`` flattened to 2-D (the
    ``[K, B, classes]`` logits of K mixed views included).
    """
    check_float("logits", logits)
    check_float("targets", targets)
    if logits.dim() < 1 or logits.shape[-1] < 1 or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must have one shape [..., num_classes >= 1], got {describe(logits)} "
                         f"and {describe(targets)}")
    if values_checked(targets) and not _probabilities(targets):
        raise ValueError(f"targets must be probabilities in [0, 1], got values in [{targets.min().item():g}, "
                         f"{targets.max().item():g}]")
    classes = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, classes), targets.float().reshape(-1, classes))
