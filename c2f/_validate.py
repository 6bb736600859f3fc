"""Input checks shared by the reference and fused modules: errors name the argument and expectation."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {describe(t)}")


def check_same_device(**tensors: torch.Tensor) -> None:
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
