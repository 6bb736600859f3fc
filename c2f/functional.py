"""Functional forms of the fused ops. ``backend``: "auto" (Triton on CUDA, torch ops on CPU),
"triton" (on CPU: the kernels under the Triton interpreter) or "torch"."""
from .attention import part_attention
from .mixup import part_mixup_, part_mixup_pool
from .reference import mix_attributes, mix_targets

__all__ = ["part_attention", "part_mixup_", "part_mixup_pool", "mix_targets", "mix_attributes"]
