"""Input checks shared by every module and function: one set of rules and words for each argument.

Shape, dtype and device checks always run (they read metadata only). Value checks (perm is a
permutation or an involution, mask within [0, 1]) read tensor values: on a GPU that is a host
synchronisation, so they run only when validation is on: ``c2f.validation(True)`` (a context
manager or a plain call), ``C2F_VALIDATE=1`` in the environment (the tests set it), or, by default,
for CPU tensors in eager mode, where reading a value costs no synchronisation. Never inside a
``torch.compile`` region. ``PartMixup.sample`` makes valid pairings and masks by construction.
"""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_validation: bool | None = None


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


class validation:
    """Turns value checks on (True), off (False) or back to the default (None).

    ``c2f.validation(True)`` alone sets it for the process; ``with c2f.validation(False): ...`` sets it
    for a block and restores the previous setting after.
    """

    def __init__(self, enabled: bool | None):
        global _validation
        self._previous, _validation = _validation, enabled

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        global _validation
        _validation = self._previous


def values_checked(*tensors: torch.Tensor) -> bool:
    """Whether value checks run for these tensors now (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    if _validation is not None:
        return _validation
    env = os.environ.get("C2F_VALIDATE")
    if env is not None:
        return env not in ("0", "", "false", "False")
    return all(t.device.type == "cpu" for t in tensors)


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {describe(t)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise RuntimeError(f"all inputs must be on one device, got {listed}")


def feature_map_as_channels(x: torch.Tensor, dim: int, name: str = "x") -> torch.Tensor:
    """Views a feature map ``[B, C, H, W]`` or tokens ``[B, N, C]`` as ``[B, C, N]`` without copying."""
    check_float(name, x)
    if x.dim() == 4:
        b, c, h, w = x.shape
        if c != dim:
            raise ValueError(f"{name} has {c} channels, expected dim={dim}: {describe(x)} "
                             "(feature maps are [B, C, H, W])")
        xc = x.flatten(2)
    elif x.dim() == 3:
        b, n, c = x.shape
        if c != dim:
            raise ValueError(f"{name} has {c} channels, expected dim={dim}: {describe(x)} "
                             "(tokens are [B, N, C])")
        xc = x.transpose(1, 2)
    else:
        raise ValueError(f"{name} must be a feature map [B, C, H, W] or tokens [B, N, C], got {describe(x)}")
    if xc.shape[2] == 0:
        raise ValueError(f"{name} has no tokens (N = 0): {describe(x)}")
    return xc


def token_stats_args(x_stats, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The ``x_mean, x_var`` arguments of an op from ``x_stats``: ``(x_mean, x_var)``, each ``[B, N]`` float32
    (or float64 with a float64 x) on x's device, given for ``x [B, C, N]``, or None. ``(None, None)`` without
    them, and when x requires grad: statistics cached with frozen features do not describe features that
    train, so the op computes its own (checked all the same)."""
    if x_stats is None:
        return None, None
    if not isinstance(x_stats, (tuple, list)) or len(x_stats) != 2:
        raise TypeError(f"x_stats must be a pair (x_mean, x_var) or None, got {type(x_stats).__name__}")
    b, _, n = x.shape
    dtypes = (torch.float32, torch.float64) if x.dtype == torch.float64 else (torch.float32,)
    for name, t in zip(("x_mean", "x_var"), x_stats, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"x_stats' {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (b, n) or t.dtype not in dtypes or t.device != x.device:
            raise ValueError(f"x_stats' {name} must be a [B, N] = [{b}, {n}] {'/'.join(map(str, dtypes))} tensor on "
                             f"{x.device} (one value per token of x), got {describe(t)}")
        if t.requires_grad:
            raise ValueError(f"x_stats' {name} requires grad, but the statistics given with x get no gradient: "
                             f"pass {name}.detach()")
    return (None, None) if x.requires_grad else tuple(x_stats)


HEAD_REDUCES = ("mean", "max")   # c2f._math.HEAD_REDUCES: how the heads' maps become one


def check_head_reduce(head_reduce: str) -> None:
    if head_reduce not in HEAD_REDUCES:
        raise ValueError(f"head_reduce must be one of {HEAD_REDUCES}, got {head_reduce!r}")


def check_perm(perm: torch.Tensor, b: int, involution: bool) -> None:
    """``perm [B]`` int64: a permutation of range(B), an involution (perm[perm] == arange) if asked."""
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or tuple(perm.shape) != (b,):
        got = describe(perm) if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"perm must be an int64 tensor of shape ({b},), got {got}")
    if b == 0 or not values_checked(perm):
        return
    if int(perm.min()) < 0 or int(perm.max()) >= b:
        raise ValueError(f"perm must hold sample indices in [0, {b}), got values in "
                         f"[{int(perm.min())}, {int(perm.max())}]")
    if not bool((torch.bincount(perm, minlength=b) == 1).all()):
        raise ValueError(f"perm must be a permutation of range({b}) (every sample exactly once)")
    if involution and not torch.equal(perm[perm], torch.arange(b, device=perm.device)):
        raise ValueError("perm must be an involution (perm[perm] == arange(B)) to mix in place: each pair is "
                         "mixed by one program; use part_mixup_pool or the reference part_mixup for other "
                         "permutations")


def check_mask(mask: torch.Tensor, b: int, p: int, views: bool) -> torch.Tensor:
    """``mask [B, P]`` (or ``[K, B, P]`` when ``views``), float or bool, values in [0, 1], no gradient.

    Returns it as fp32 with unit stride along parts (no copy when it already is).
    """
    what = f"[K, B={b}, P={p}] or [B={b}, P={p}]" if views else f"[B={b}, P={p}]"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if not (mask.dtype.is_floating_point or mask.dtype == torch.bool):
        raise TypeError(f"mask must be a float or bool tensor, got {describe(mask)}")
    if tuple(mask.shape[-2:]) != (b, p) or mask.dim() not in ((2, 3) if views else (2,)):
        hint = "; use part_mixup_pool for K views" if not views and mask.dim() == 3 else ""
        raise ValueError(f"mask must be {what}, got {describe(mask)}{hint}")
    if mask.requires_grad:
        raise ValueError("mask requires grad, but part-wise mixup gives no gradient to the mask (masks are "
                         "sampled): pass mask.detach()")
    mask = mask.float()
    if mask.numel() and values_checked(mask) and not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError(f"mask values must lie in [0, 1], got min {mask.min().item():g}, "
                         f"max {mask.max().item():g} (NaN counts as outside)")
    return mask if mask.stride(-1) == 1 else mask.contiguous()


def check_pairing(perm: torch.Tensor | None, mask: torch.Tensor | None, b: int, p: int, *,
                  involution: bool = False, views: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks ``perm`` and ``mask`` together (one rule set for every module and function) and returns
    them with the mask as fp32 ``[K, B, P]`` or ``[B, P]`` as given."""
    if mask is None or perm is None:
        missing, given = ("mask", "perm") if mask is None else ("perm", "mask")
        raise ValueError(f"{missing} is required when {given} is given (part-wise mixup needs both)")
    mask = check_mask(mask, b, p, views)
    check_perm(perm, b, involution)
    check_same_device(perm=perm, mask=mask)
    return perm, mask
