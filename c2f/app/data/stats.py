"""Per-token LayerNorm statistics of cached features, computed once when the features are written.

The attention and head ops normalise each token of ``x [b, C, H, W]`` over its C channels. Frozen features
never change, so a cache (manifest version 3) stores each token's statistics beside each feature shard:

    stats-00000.npy ...      [2, count, H * W] float32: [0] the mean, [1] the biased variance (divided by C)
    stats-v1-00000.npy ...   the same for view v's shard (caches with views)

Token ``n`` is ``h * W + w`` (the last axis of ``x.flatten(2)``); row ``r`` of a shard is the shard's row ``r``.
The manifest's ``stats`` section lists, per feature shard, the statistics file, its sha256 and the sha256 of
the feature shard it was computed from; statistics whose file fails its hash, or whose feature hash is not
the shard's, are not used (``FeatureCache.has_stats``), and the consumer computes them itself.

Why the variance and not rstd: rstd = 1 / sqrt(var + eps) depends on the LayerNorm's ``eps``, a setting of
the model, not of the features; one cache serves heads of any eps. The consumer forms ``rstd_from_var(var,
eps)`` in fp32, the same ``add eps, rsqrt`` in the same dtype the ops run, so no second copy keyed by eps and
no recomputation on a mismatch is needed. Both are computed in float64 from the values as stored (after the
cache's fp16 rounding, exactly what the op reads) and rounded once to float32: each stored number is the
exact statistic to half an fp32 ulp (6e-8 relative), closer than the ops' own fp32 reductions get.
"""
from __future__ import annotations

import numpy as np
import torch

STATS_DTYPE = np.float32
# float64 temporaries of one chunk of samples: [s, C, H * W] doubles, 64 MiB is 20 samples at 2048 x 14 x 14.
STATS_CHUNK_MIB = 64


def stats_file(shard_file: str) -> str:
    """The statistics file of a feature shard: ``features-00003.npy`` -> ``stats-00003.npy``."""
    return "stats-" + shard_file.removeprefix("features-")


def stats_shape(count: int, feature_shape) -> tuple:
    """``(2, count, H * W)``: the shape of the statistics of ``count`` rows of ``[C, H, W]`` features."""
    return (2, count, int(np.prod(feature_shape[1:])))


def token_stats(features: np.ndarray) -> np.ndarray:
    """``[2, b, H * W]`` float32: the mean and biased variance over C of each token of ``features [b, C, H, W]``
    (any float dtype; a memory map is read once), computed in float64 by two passes (mean, then the centred
    sum of squares) in chunks of samples, then rounded to float32."""
    b, c = features.shape[:2]
    flat = features.reshape(b, c, -1)
    out = np.empty((2, b, flat.shape[2]), dtype=STATS_DTYPE)
    step = max(1, int(STATS_CHUNK_MIB * 2 ** 20) // max(flat[0].size * 8, 1))
    for s in range(0, b, step):
        x = flat[s:s + step].astype(np.float64)
        mean = x.mean(1)
        x -= mean[:, None]
        np.square(x, out=x)
        out[0, s:s + step] = mean
        out[1, s:s + step] = x.mean(1)
    return out


def rstd_from_var(var: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(var + eps)`` in fp32, as the ops form rstd from their own variance: the consumer's rstd."""
    return torch.rsqrt(var.float() + eps)
