"""Disk-backed training data: batches read straight from the memory-mapped cache by worker processes."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .cache import FeatureCache


def drawn_views(cache: FeatureCache, seed: int, epoch: int) -> np.ndarray:
    """The view each cache row is read in at ``epoch`` of a run seeded ``seed``: ``[n]`` int64, uniform over the
    cache's views for images that have them, 0 otherwise. A function of (seed, epoch) only, so resumable."""
    views = np.random.default_rng([seed, epoch, 3]).integers(0, cache.views, size=len(cache))
    views[cache.view_position < 0] = 0
    return views


class CachedFeatures(torch.utils.data.Dataset):
    """Indexed by a *batch* of row indices: returns one batch, read with one sorted pass per shard. Indexed by
    ``(epoch, rows)`` (a training plan's items), each row is read in the view drawn for it that epoch.

    Items: ``x`` ``[b, C, H, W]`` (the cache dtype), ``labels`` ``[b]`` int64, ``attr_target`` ``[b, A]``
    float32, ``index`` ``[b]`` int64 (cache rows), and, where the cache holds statistics (``cache.has_stats``)
    and ``stats`` is on, the LayerNorm statistics of ``x``'s tokens (``c2f.app.data.stats``):

    - ``x_mean`` ``[b, H * W]`` float32: the mean over the C channels of each token of ``x``;
    - ``x_var`` ``[b, H * W]`` float32: their biased variance (divided by C); the op's ``rstd`` is
      ``rstd_from_var(x_var, eps)`` = ``rsqrt(x_var + eps)`` in fp32.

    Both contiguous, row ``i`` the statistics of ``x[i]`` (same rows, same views), token ``h * W + w`` (the last
    axis of ``x.flatten(2)``); computed in float64 from the features as stored, so they describe ``x`` as the
    batch holds it, or converted exactly (fp16 to fp32), not rounded to another dtype. Absent keys mean no
    statistics: the consumer computes them.
    """

    def __init__(self, cache: FeatureCache, targets: np.ndarray, seed: int = 0, stats: bool = True):
        if targets.shape[0] != len(cache):
            raise ValueError(f"targets must have one row per cached image ({len(cache)}), got {targets.shape}")
        self.cache, self.targets, self.seed = cache, np.asarray(targets, dtype=np.float32), seed
        self.stats = stats and cache.has_stats
        self._drawn = (None, None)   # (epoch, views): drawn once per epoch in each worker

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, item) -> dict:
        epoch, rows = item if isinstance(item, tuple) else (None, item)
        rows = np.asarray(rows, dtype=np.int64)
        views = None
        if epoch is not None:
            if self._drawn[0] != epoch:
                self._drawn = (epoch, drawn_views(self.cache, self.seed, epoch))
            views = self._drawn[1][rows]
        item = dict(x=torch.from_numpy(self.cache.read(rows, views)),
                    labels=torch.from_numpy(self.cache.labels[rows]),
                    attr_target=torch.from_numpy(self.targets[rows]),
                    index=torch.from_numpy(rows))
        if self.stats:
            mean, var = self.cache.read_stats(rows, views)
            item.update(x_mean=torch.from_numpy(mean), x_var=torch.from_numpy(var))
        return item


class BatchPlan(torch.utils.data.Sampler):
    """Batches of cache rows for one process of ``world``.

    Training (``shuffle``): each epoch a permutation seeded by ``(seed, epoch)`` is cut into global
    batches of ``batch_size``; process ``rank`` takes its contiguous slice of ``batch_size // world``, so
    N processes see exactly the batches one process would. Evaluation: rows ``rank::world`` in order.
    ``with_epoch``: each item is ``(epoch, rows)``, for datasets that draw per epoch (augmented views).
    """

    def __init__(self, rows: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0,
                 rank: int = 0, world: int = 1, drop_last: bool = False, with_epoch: bool = False):
        if batch_size <= 0 or (shuffle and batch_size % world):
            raise ValueError(f"batch_size must be a positive multiple of the world size {world}, got {batch_size}")
        self.rows, self.batch_size, self.shuffle = np.asarray(rows, dtype=np.int64), batch_size, shuffle
        self.seed, self.rank, self.world, self.drop_last = seed, rank, world, drop_last
        self.with_epoch = with_epoch   # yield (epoch, rows): per-epoch draws keyed in the worker, resumable
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self):
        if not self.shuffle:
            mine = self.rows[self.rank::self.world]
            return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        order = self.rows[np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))]
        full = len(order) // self.batch_size
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(full)]
        tail = order[full * self.batch_size:]
        if not self.drop_last and len(tail) >= self.world:
            batches.append(tail[:len(tail) // self.world * self.world])
        return [b[self.rank * (len(b) // self.world):(self.rank + 1) * (len(b) // self.world)] for b in batches]

    def __iter__(self):
        if self.with_epoch:
            return iter([(self.epoch, b.tolist()) for b in self._batches()])
        return iter([b.tolist() for b in self._batches()])

    def __len__(self) -> int:
        return len(self._batches())


def make_loader(cache: FeatureCache, rows: Sequence[int], targets: np.ndarray, batch_size: int,
                shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1, drop_last: bool = False,
                num_workers: int = 2, pin_memory: bool = False, prefetch: int = 4,
                stats: bool = True) -> torch.utils.data.DataLoader:
    """A DataLoader over ``rows`` of the cache; call ``loader.batch_sampler``'s ``set_epoch`` via ``loader.sampler``.
    Shuffled (training) over a cache with views, each row is read in its view drawn for the epoch. Batches are
    ``CachedFeatures``' items: with ``stats`` (and a cache that has them) they carry ``x_mean`` and ``x_var``."""
    plan = BatchPlan(rows, batch_size, shuffle, seed, rank, world, drop_last, with_epoch=shuffle and cache.views > 1)
    extra = dict(persistent_workers=True, prefetch_factor=prefetch) if num_workers > 0 else {}
    return torch.utils.data.DataLoader(CachedFeatures(cache, targets, seed, stats), sampler=plan, batch_size=None,
                                       num_workers=num_workers, pin_memory=pin_memory, **extra)


def split_rows(labels: np.ndarray, is_train: np.ndarray, val_fraction: float, seed: int):
    """``(train, val, test)`` row indices: val is carved per class from train, test is the cache's test split."""
    rng = np.random.default_rng([seed, 1])
    train, val = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for k in np.unique(labels[is_train]):
        rows = np.flatnonzero(is_train & (labels == k))
        rows = rows[rng.permutation(len(rows))]
        n_val = int(round(val_fraction * len(rows)))
        if val_fraction > 0 and len(rows) >= 2:
            n_val = max(n_val, 1)
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return (np.sort(np.concatenate(train)), np.sort(np.concatenate(val)), np.flatnonzero(~is_train))
