"""Modules users build models from. (Placeholder aliases to the reference until the fused modules land.)"""
from .reference import C2FHead, PartAttention  # noqa: F401
