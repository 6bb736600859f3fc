"""The device and the mixed-precision mode a run uses, checked against this machine."""
from __future__ import annotations

import torch

from ..errors import ConfigError

AMP_MODES = ("auto", "bf16", "fp16", "off")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | None, name: str = "device") -> torch.device:
    """The device ``spec`` names (default: CUDA where available), checked to exist on this machine."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(name, f"expected cpu, cuda or cuda:N, got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(name, f"{spec!r} asked for, but CUDA is not available on this machine "
                                    f"(torch {torch.__version__}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(name, f"{spec!r} asked for, but this machine has "
                                    f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(name, f"expected cpu, cuda or cuda:N, got {spec!r}")
    return device


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True where the CPU has native bf16 dot products (AVX512-BF16 or AMX-BF16)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_amp(amp: str, device: torch.device) -> str:
    """"bf16", "fp16" or "off" for ``amp``; "auto" is bf16 where the device runs it fast, else off."""
    if amp not in AMP_MODES:
        raise ConfigError("amp", f"must be one of {', '.join(AMP_MODES)}; got {amp!r}")
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "off"
    return "bf16" if cpu_has_fast_bf16() else "off"


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for a resolved ``amp`` ("off": a disabled context)."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(amp, torch.bfloat16), enabled=amp in AMP_DTYPES)
