"""Functional forms of the fused ops. ``backend``: "auto" (Triton on CUDA, torch ops on CPU),
"triton" (on CPU: the kernels under the Triton interpreter) or "torch"."""
from .part_attention import part_attention
from .part_mixup import mix_attributes, mix_targets, part_mixup_, part_mixup_pool

__all__ = ["part_attention", "part_mixup_", "part_mixup_pool", "mix_targets", "mix_attributes"]
