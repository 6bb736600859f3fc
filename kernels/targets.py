"""The GPUs the kernels are planned for, with their per-block and per-SM limits.

Plans (``plans.py`` and each op's ``plans_<op>.py``) size tiles from a ``Target``: at run time the device's
own properties (read once per device, ``device_target``), offline (``inspect.py``) the table below.
Checked against:

- NVIDIA: CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" (shared memory
  per block is the opt-in maximum a launch is held to, 1 KiB below the per-SM figure: CUDA reserves
  1 KiB per block), and the architecture tuning guides (docs.nvidia.com/cuda/ampere-tuning-guide,
  ada-tuning-guide, hopper-tuning-guide, blackwell-tuning-guide): sm_80 163 / 164 KiB, 64 warps, 32
  blocks per SM; sm_86 99 / 100 KiB, 48 warps, 16 blocks; sm_89 99 / 100 KiB, 48 warps, 24 blocks;
  sm_90 and sm_100 227 / 228 KiB, 64 warps, 32 blocks; sm_120 99 / 100 KiB, 48 warps (an RTX 5090's
  own device query: 101376 B per block opt-in, 102400 B per SM, 1536 threads per SM; pytorch/pytorch
  issue 161376). 65536 32-bit registers per SM on all of them, at most 255 per thread.
- AMD: ROCm "AMD GPU specifications" (rocm.docs.amd.com/en/latest/reference/gpu-specs.html): LDS
  64 KiB per CU on gfx90a (MI210, MI250X) and gfx942 (MI300X, MI325X), 160 KiB on gfx950 (MI350X,
  MI355X); wavefronts of 64; a 512 KiB VGPR file per CU, i.e. 512 VGPRs (with the AGPRs) per lane on
  each of 4 SIMDs, up to 8 waves per SIMD. A workgroup may use the whole LDS of its CU.

The interpreter has no limits that matter: its own tiles are sized for Python overhead.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

KIB = 1024


@dataclass(frozen=True)
class Target:
    name: str                    # "sm_90", "gfx942", "interpreter"
    backend: str                 # "cuda", "hip" or "interpreter"
    arch: int | str | None  # 90, "gfx942"
    warp_size: int
    smem_per_block: int          # bytes a block (workgroup) may use: the opt-in maximum on NVIDIA
    smem_per_sm: int             # bytes per SM (CU)
    regs_per_sm: int             # 32-bit registers per SM; on AMD VGPRs per SIMD lane x SIMDs
    max_warps_per_sm: int        # resident warps (waves) per SM (CU)
    max_blocks_per_sm: int
    devices: str = ""

    def gpu_target(self):
        """The ``triton.backends.compiler.GPUTarget`` to compile for."""
        from triton.backends.compiler import GPUTarget
        return GPUTarget(self.backend, self.arch, self.warp_size)


def _sm(arch, smem_block_kib, smem_sm_kib, warps, blocks, devices):
    return Target(f"sm_{arch}", "cuda", arch, 32, smem_block_kib * KIB, smem_sm_kib * KIB, 65536, warps, blocks,
                  devices)


def _gfx(arch, lds_kib, devices):
    # 4 SIMDs x 8 waves per CU; 512 VGPRs (unified with AGPRs) per lane per SIMD.
    return Target(arch, "hip", arch, 64, lds_kib * KIB, lds_kib * KIB, 4 * 512, 32, 32, devices)


TARGETS: dict[str, Target] = {t.name: t for t in (
    _sm(80, 163, 164, 64, 32, "A100, A30"),
    _sm(86, 99, 100, 48, 16, "RTX 30xx, A6000, A40, A10"),
    _sm(89, 99, 100, 48, 24, "RTX 40xx, L4, L40S"),
    _sm(90, 227, 228, 64, 32, "H100, H200, GH200"),
    _sm(100, 227, 228, 64, 32, "B200, GB200"),
    _sm(120, 99, 100, 48, 32, "RTX 50xx, RTX PRO 6000 Blackwell"),
    _gfx("gfx90a", 64, "MI210, MI250X"),
    _gfx("gfx942", 64, "MI300X, MI300A, MI325X"),
    _gfx("gfx950", 160, "MI350X, MI355X"),
)}

INTERPRETER = Target("interpreter", "interpreter", None, 32, 1 << 30, 1 << 30, 1 << 30, 64, 32,
                     "CPU, TRITON_INTERPRET=1")


def parse(name: str) -> Target:
    """``"sm_90"``, ``"90"`` or ``"gfx942"`` -> its Target."""
    key = f"sm_{name}" if name.isdigit() else name
    if key not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[key]


@functools.cache
def device_target(index: int) -> Target:
    """The Target of CUDA (or ROCm) device ``index``, from its properties (``torch.cuda.get_device_properties``,
    read once per device): shared memory per block and per SM, registers, warp size. Limits missing
    from the properties come from the table entry of the same architecture (or the nearest family:
    sm_80 for an unknown NVIDIA part, gfx942 for an unknown AMD one); plans size tiles from the device's
    own limits, so a part not in the table gets tiles by the same rule."""
    props = torch.cuda.get_device_properties(index)
    if getattr(torch.version, "hip", None):
        arch = props.gcnArchName.split(":")[0]
        base = TARGETS.get(arch, TARGETS["gfx942"])
        name, backend = arch, "hip"
    else:
        arch = props.major * 10 + props.minor
        base = TARGETS.get(f"sm_{arch}") or TARGETS["sm_80"]
        name, backend = f"sm_{arch}", "cuda"
    smem_block = getattr(props, "shared_memory_per_block_optin", 0) or base.smem_per_block
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or base.smem_per_sm
    # On AMD the table counts VGPRs per lane x SIMDs (what occupancy needs), not the device's figure.
    regs = (getattr(props, "regs_per_multiprocessor", 0) if backend == "cuda" else 0) or base.regs_per_sm
    warp = getattr(props, "warp_size", 0) or base.warp_size
    return replace(base, name=name, backend=backend, arch=arch, warp_size=warp, smem_per_block=smem_block,
                   smem_per_sm=smem_sm, regs_per_sm=regs, devices=props.name)


def current(device: torch.device | None = None) -> Target:
    """The Target launches are planned for: the one set by ``launch.plan_for`` (offline inspection,
    tests), the interpreter, or the device's own."""
    from .launch import interpreting, planned_target
    planned = planned_target()
    if planned is not None:
        return planned
    if interpreting() or device is None or device.type != "cuda":
        return INTERPRETER
    return device_target(device.index if device.index is not None else torch.cuda.current_device())
