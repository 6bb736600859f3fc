"""Modules users build models from: the fused counterparts of ``c2f.reference``.

Each has the reference's constructor (plus ``backend`` and path options) and ``state_dict`` keys,
so checkpoints load either way.
"""
from .c2f_head import C2FHead
from .part_attention import PartAttention
from .part_mixup import MixupOutput, PartMixup
from .reference import C2FOutput, PartRegressor

__all__ = ["PartAttention", "C2FHead", "C2FOutput", "PartMixup", "MixupOutput", "PartRegressor"]
