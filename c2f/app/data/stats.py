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

Below the computation: writing and checking a cache's statistics files, shared by the writer
(``CacheWriter``), the reader (``FeatureCache``) and ``add_stats`` (``c2f cache-stats DIR``).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .manifest import (
    MANIFEST,
    STATS_VERSION,
    CacheError,
    add_stats_section,
    lock_cache,
    read_manifest,
    save_npy_atomic,
    sha256_file,
    shard_groups,
    stats_groups,
    write_json_atomic,
)

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


# ------------------------------------------------------------------------ statistics files of a cache

def write_stats(directory: str, shard: dict, stored: np.ndarray) -> dict:
    """Writes the statistics of one feature shard (its manifest entry ``shard`` and its values as stored,
    ``[count, C, H, W]``) atomically and returns their manifest entry."""
    name = stats_file(shard["file"])
    digest = save_npy_atomic(os.path.join(directory, name), token_stats(stored))
    return dict(file=name, start=shard["start"], count=shard["count"], sha256=digest,
                features_sha256=shard["sha256"])


def stats_problem(directory: str, shard: dict, entry: dict | None, feature_shape) -> str | None:
    """Why the statistics ``entry`` cannot stand for the feature ``shard`` (None: they can). Always checks
    their file's sha256 (it is 0.2% of the shard's bytes), never the shard's own."""
    if entry is None:
        return f"{stats_file(shard['file'])} is not written"
    path = os.path.join(directory, entry["file"])
    if entry["features_sha256"] != shard["sha256"] or (entry["start"], entry["count"]) != (shard["start"],
                                                                                          shard["count"]):
        return f"{path} was computed from other features than {shard['file']} holds (their sha256 differs)"
    if not os.path.isfile(path):
        return f"{path} is missing"
    if sha256_file(path) != entry["sha256"]:
        return f"{path} fails its sha256 checksum"
    try:
        arr = np.load(path, mmap_mode="r")
    except ValueError as e:
        return f"{path} is not a readable .npy file ({e})"
    expected = stats_shape(shard["count"], feature_shape)
    if arr.shape != expected or arr.dtype != STATS_DTYPE:
        return f"{path} holds {arr.shape} {arr.dtype}, expected {expected} {np.dtype(STATS_DTYPE)}"
    return None


def stats_problems(directory: str, manifest: dict) -> list:
    """``stats_problem`` of every shard of a version 3 ``manifest`` that has one: empty when all can be used."""
    return [p for shards, stats in zip(shard_groups(manifest), stats_groups(manifest), strict=True)
            for shard, entry in zip(shards, stats, strict=True)
            if (p := stats_problem(directory, shard, entry, manifest["feature_shape"]))]


def drop_bad_stats(directory: str, manifest: dict) -> int:
    """Sets to null the statistics entries of a version 3 ``manifest`` that cannot stand for their shard (the
    shard not written, or ``stats_problem``); returns how many recorded entries were dropped."""
    dropped = 0
    for shards, stats in zip(shard_groups(manifest), stats_groups(manifest), strict=True):
        for i, (shard, entry) in enumerate(zip(shards, stats, strict=True)):
            if entry is not None and (shard is None or stats_problem(directory, shard, entry,
                                                                     manifest["feature_shape"])):
                stats[i] = None
                dropped += 1
    return dropped


def fill_stats(directory: str, manifest: dict, save: Callable, progress: bool = True) -> int:
    """Computes the statistics of every written shard of a version 3 ``manifest`` that has none, each from the
    shard's file once its sha256 is checked, calling ``save()`` after each; returns how many were written."""
    todo = [(v, i) for v, (shards, stats) in enumerate(zip(shard_groups(manifest), stats_groups(manifest),
                                                           strict=True))
            for i, (shard, entry) in enumerate(zip(shards, stats, strict=True)) if shard is not None and entry is None]
    bar = tqdm(total=sum(shard_groups(manifest)[v][i]["count"] for v, i in todo), unit="img", desc="statistics",
               disable=not progress or not todo)
    for v, i in todo:
        shard = shard_groups(manifest)[v][i]
        path = os.path.join(directory, shard["file"])
        if not os.path.isfile(path) or sha256_file(path) != shard["sha256"]:
            raise CacheError(f"{path} is missing or fails its sha256 checksum: the cache is corrupted; rerun the "
                             "command that made it to rewrite bad shards")
        stats_groups(manifest)[v][i] = write_stats(directory, shard, np.load(path, mmap_mode="r"))
        save()
        bar.update(shard["count"])
    bar.close()
    return len(todo)


def add_stats(directory: str, progress: bool = True) -> dict:
    """Gives a finished cache its statistics (``c2f cache-stats DIR``), under the cache's lock: a version 1 or 2
    cache is brought to version 3, statistics that cannot stand for their shard are dropped, and every shard
    without statistics gets them (its file's sha256 checked first), the manifest rewritten atomically after
    each; a killed run resumes where it stopped. The result is then checked as a reader checks it
    (``FeatureCache.has_stats``). Returns ``written`` and ``dropped`` (shard counts), ``stats_bytes`` and
    ``feature_bytes``."""
    read_manifest(directory)   # a directory that is not a cache is refused before its lock is made there
    with lock_cache(directory):
        m = read_manifest(directory)
        groups = shard_groups(m)
        if not m["complete"] or any(s is None for group in groups for s in group):
            raise CacheError(f"{directory} is incomplete: finish it with the command that made it, which writes "
                             "the statistics too")
        old = m["version"] != STATS_VERSION
        dropped = drop_bad_stats(directory, add_stats_section(m))
        path = os.path.join(directory, MANIFEST)
        if old or dropped:
            write_json_atomic(path, m)
        written = fill_stats(directory, m, lambda: write_json_atomic(path, m), progress)
    m = read_manifest(directory)
    problems = stats_problems(directory, m)
    if problems:
        raise CacheError(f"{directory}: the statistics just written do not check out: {problems[0]}")
    return dict(written=written, dropped=dropped, stats_bytes=_bytes(directory, stats_groups(m)),
                feature_bytes=_bytes(directory, shard_groups(m)))


def _bytes(directory: str, groups: list) -> int:
    return sum(os.path.getsize(os.path.join(directory, s["file"])) for group in groups for s in group)
