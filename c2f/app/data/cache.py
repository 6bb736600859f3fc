"""On-disk feature cache: memory-mapped ``.npy`` shards plus a JSON manifest.

Layout of a cache directory::

    manifest.json            what made the cache, shapes, dtype, per-file sha256, completion state
    features-00000.npy ...   [count, C, H, W] shards (fp16 by default), read with np.load(mmap_mode="r")
    features-v1-00000.npy .. (version 2, ``views`` V > 1) view v = 1..V-1 of each training image, in row order
    stats-00000.npy ...      (version 3) each shard's per-token LayerNorm statistics (``c2f.app.data.stats``)
    labels.npy, is_train.npy, attributes.npy, certainty.npy, [class_attributes.npy]

Every file is written to a temporary name and moved into place with ``os.replace``, and the manifest is
rewritten after each shard, so a killed writer leaves a cache that resumes from its last whole shard.
Writers make version 3 caches: each shard's statistics are written with it. A cache made before (version 1
or 2) loads as it did, without statistics, and gains them with ``stats.add_stats`` (``c2f cache-stats DIR``),
or by rerunning the command that made it; reading a cache never writes to it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from .manifest import (  # noqa: F401 - the schema's names stay importable from c2f.app.data.cache
    CACHE_DTYPES,
    DTYPES,
    FORMAT,
    MANIFEST,
    MANIFEST_FIELDS,
    META_FILES,
    SHARD_FIELDS,
    STATS_VERSION,
    VERSION,
    VIEWS_VERSION,
    CacheError,
    add_stats_section,
    features_manifest,
    lock_cache,
    manifest_problems,
    read_manifest,
    save_npy_atomic,
    sha256_file,
    shard_groups,
    stats_groups,
    write_json_atomic,
)
from .stats import STATS_DTYPE, drop_bad_stats, fill_stats, stats_problems, stats_shape, write_stats

log = logging.getLogger(__name__)


def _differences(old: dict, new: dict, prefix: str = "") -> list:
    """``(key, old value, new value)`` of the keys of ``new`` that differ, nested dicts by dotted key."""
    out = []
    for k, v in new.items():
        o = old.get(k)
        if isinstance(v, dict) and isinstance(o, dict):
            out += _differences(o, v, f"{prefix}{k}.")
            out += [(f"{prefix}{k}.{j}", o[j], None) for j in o if j not in v]
        elif o != v:
            out.append((f"{prefix}{k}", o, v))
    return out


def identity(manifest: dict) -> str:
    """A hash of what a finished cache holds (its manifest: settings, shapes, per-file sha256), its statistics
    left out: a cache that gains them is the same cache to a run that trained on it before."""
    return hashlib.sha256(json.dumps(features_manifest(manifest), sort_keys=True).encode()).hexdigest()


class CacheWriter:
    """Creates a cache, or reopens a partial one made with the same ``config``, and fills it shard by shard.

    ``config`` (backbone, image size, preprocessing, split, source list, ...) identifies what the cache
    holds: reopening with a different one raises ``CacheError`` instead of mixing two caches. Hold
    ``lock_cache(directory)`` while writing, so that no other process writes the same cache.
    ``meta`` holds the per-image arrays (``labels`` [n], ``is_train`` [n], ``attributes`` [n, A],
    ``certainty`` [n, A], optionally ``class_attributes`` [K, A]). Each shard's statistics are written with it
    (a version 3 manifest); a reopened cache made before them is brought to version 3, and ``fill_stats``
    computes the statistics of the shards it already holds.
    """

    def __init__(self, directory: str, config: dict, feature_shape: Sequence[int], meta: dict,
                 attribute_names: Sequence[str], class_names: Sequence[str], dtype: str = "float16",
                 shard_size: int = 256, overwrite: bool = False, views: int = 1):
        if dtype not in DTYPES or dtype == "bfloat16":
            raise ValueError(f"dtype must be 'float16' or 'float32' (numpy has no bfloat16), got {dtype!r}")
        if shard_size <= 0 or views <= 0:
            raise ValueError(f"shard_size and views must be positive, got {shard_size}, {views}")
        missing = [k for k in ("labels", "is_train", "attributes", "certainty") if k not in meta]
        if missing:
            raise ValueError(f"meta lacks {missing}")
        self.directory = directory
        n = len(meta["labels"])
        self.num_images = n
        self.shard_size = shard_size
        self.dtype = np.dtype(dtype)
        self.feature_shape = tuple(int(s) for s in feature_shape)
        num_shards = (n + shard_size - 1) // shard_size
        # Extra views are of the training images only; view 0 is every image's deterministic one.
        self.view_rows = np.flatnonzero(np.asarray(meta["is_train"], dtype=bool)) if views > 1 else None
        # What must match for a partial cache to be resumed.
        identity = dict(config=config, num_images=n, feature_shape=list(self.feature_shape),
                        dtype=dtype, shard_size=shard_size, **(dict(views=views) if views > 1 else {}))
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, MANIFEST)
        if os.path.exists(path) and not overwrite:
            old = read_manifest(directory)
            diffs = _differences(old, identity)
            if diffs:
                details = "; ".join(f"{k}: cache has {a!r}, asked for {b!r}" for k, a, b in diffs)
                raise CacheError(f"{directory} holds a different cache ({details}). "
                                 "Use another directory or pass overwrite=True (--overwrite).")
            self.manifest = add_stats_section(old)
            self._verify_done_shards()
        else:
            self.manifest = dict(format=FORMAT, version=STATS_VERSION, complete=False,
                                 **identity, attribute_names=list(attribute_names), class_names=list(class_names),
                                 meta={}, shards=[None] * num_shards)
            if views > 1:
                per_view = -(-len(self.view_rows) // shard_size)
                self.manifest.update(view_images=len(self.view_rows),
                                     view_shards=[[None] * per_view for _ in range(views - 1)])
            add_stats_section(self.manifest)
            for name in META_FILES:
                if meta.get(name) is not None:
                    self.manifest["meta"][name] = save_npy_atomic(os.path.join(directory, f"{name}.npy"),
                                                                  np.ascontiguousarray(meta[name]))
            self._save()

    def _verify_done_shards(self) -> None:
        """Drops shards whose file is missing or fails its checksum, so they are written again, and statistics
        that cannot stand for their shard, so they are computed again."""
        for group in shard_groups(self.manifest):
            for i, entry in enumerate(group):
                if entry is None:
                    continue
                path = os.path.join(self.directory, entry["file"])
                if not os.path.isfile(path) or sha256_file(path) != entry["sha256"]:
                    group[i] = None
        drop_bad_stats(self.directory, self.manifest)
        self.manifest["complete"] = self._all_done()

    def _all_done(self) -> bool:
        return all(s is not None for group in shard_groups(self.manifest) for s in group)

    def _save(self) -> None:
        write_json_atomic(os.path.join(self.directory, MANIFEST), self.manifest)

    def shard_range(self, i: int, view: int = 0) -> range:
        """Positions of shard ``i`` of ``view``: cache rows for view 0, indices into ``view_rows`` otherwise."""
        start = i * self.shard_size
        return range(start, min(start + self.shard_size, self.num_images if view == 0 else len(self.view_rows)))

    def shard_rows(self, i: int, view: int = 0) -> np.ndarray:
        """The cache rows whose ``view`` shard ``i`` holds."""
        positions = np.arange(self.shard_range(i, view).start, self.shard_range(i, view).stop)
        return positions if view == 0 else self.view_rows[positions]

    def missing_shards(self, view: int = 0) -> list:
        return [i for i, s in enumerate(shard_groups(self.manifest)[view]) if s is None]

    def write_shard(self, i: int, features: np.ndarray, view: int = 0) -> None:
        """Writes shard ``i`` of ``view`` (``[len(shard_range(i, view)), C, H, W]``) and its statistics (of the
        values as stored, in the cache dtype) atomically and records both in the manifest."""
        rows = self.shard_range(i, view)
        expected = (len(rows), *self.feature_shape)
        if tuple(features.shape) != expected:
            raise ValueError(f"shard {i} must have shape {expected}, got {tuple(features.shape)}")
        name = f"features-{i:05d}.npy" if view == 0 else f"features-v{view}-{i:05d}.npy"
        stored = np.ascontiguousarray(features, dtype=self.dtype)
        entry = dict(file=name, start=rows.start, count=len(rows),
                     sha256=save_npy_atomic(os.path.join(self.directory, name), stored))
        shard_groups(self.manifest)[view][i] = entry
        stats_groups(self.manifest)[view][i] = write_stats(self.directory, entry, stored)
        self.manifest["complete"] = self._all_done()
        self._save()

    def fill_stats(self, progress: bool = True) -> int:
        """Computes the statistics of the written shards that have none (a cache begun before version 3);
        returns how many."""
        return fill_stats(self.directory, self.manifest, self._save, progress)

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])


class FeatureCache:
    """Read side of a finished cache: labels and attributes in RAM, features memory-mapped per shard.

    ``verify``: "full" checks every file's sha256 (reads the whole cache once), "size" checks shapes and
    dtypes from the ``.npy`` headers only. Either way an incomplete or mismatched cache raises ``CacheError``.

    ``has_stats``: the cache holds per-token statistics (``c2f.app.data.stats``) for every shard of every view,
    each file matching its sha256 (checked in both modes) and recorded as computed from the shard's sha256 in
    the manifest; ``read_stats`` reads them. Statistics that fail any of this are not used at all (one warning
    line says why), and the cache loads without them (the ops compute their own).
    """

    def __init__(self, directory: str, verify: str = "full", preload: bool = False):
        if verify not in ("full", "size"):
            raise ValueError(f"verify must be 'full' or 'size', got {verify!r}")
        self.directory = directory
        m = self.manifest = read_manifest(directory)
        groups = shard_groups(m)
        if not m.get("complete") or any(s is None for group in groups for s in group):
            done = sum(s is not None for group in groups for s in group)
            raise CacheError(f"{directory} is incomplete ({done} of {sum(map(len, groups))} shards): "
                             "rerun the same `c2f extract` command to finish it")
        self.num_images = int(m["num_images"])
        self.feature_shape = tuple(m["feature_shape"])
        self.dtype = np.dtype(m["dtype"])
        self.attribute_names, self.class_names = m["attribute_names"], m["class_names"]
        for name, digest in m["meta"].items():
            self._check_file(f"{name}.npy", digest, verify)
        meta = {name: np.load(os.path.join(directory, f"{name}.npy")) for name in m["meta"]}
        self.labels = meta["labels"].astype(np.int64)
        self.is_train = meta["is_train"].astype(bool)
        self.attributes = meta["attributes"].astype(np.float32)
        self.certainty = meta["certainty"].astype(np.int64)
        self.class_attributes = meta.get("class_attributes")
        self.image_ids = meta.get("image_ids")
        n, a = self.num_images, len(self.attribute_names)
        for name, arr, shape in (("labels", self.labels, (n,)), ("is_train", self.is_train, (n,)),
                                 ("attributes", self.attributes, (n, a)), ("certainty", self.certainty, (n, a))):
            if arr.shape != shape:
                raise CacheError(f"{directory}/{name}.npy has shape {arr.shape}, manifest says {shape}")
        bad = np.flatnonzero((self.labels < 0) | (self.labels >= len(self.class_names)))
        if bad.size:
            raise CacheError(f"{directory}/labels.npy: row {bad[0]} has class {self.labels[bad[0]]} but the cache "
                             f"names {len(self.class_names)} classes (0..{len(self.class_names) - 1}); "
                             f"{bad.size} row(s) out of range")
        self.identity = identity(m)
        self.views = int(m.get("views", 1))
        # Row r's extra views sit at position view_position[r] of each extra view's shards (-1: none, a test image).
        self.view_position = np.full(n, -1, dtype=np.int64)
        if self.views > 1:
            train = np.flatnonzero(self.is_train)
            if len(train) != m["view_images"]:
                raise CacheError(f"{directory}: {len(train)} training images, manifest says view_images "
                                 f"{m['view_images']}")
            self.view_position[train] = np.arange(len(train))
        # Start rows of each view's shards; ``starts`` is view 0's (cache rows).
        self.view_starts = [self._check_group(group, n if v == 0 else m["view_images"], verify)
                            for v, group in enumerate(groups)]
        self.starts = self.view_starts[0]
        self.has_stats = self._check_stats()
        self._maps = self._stats_maps = None
        if preload:
            self._maps = [[np.load(os.path.join(directory, s["file"])) for s in group] for group in groups]
            if self.has_stats:
                self._stats_maps = [[np.load(os.path.join(directory, s["file"])) for s in group]
                                    for group in stats_groups(m)]

    def _check_stats(self) -> bool:
        """Whether every shard's statistics can stand for it; logs one line saying why not where they cannot."""
        m, fix = self.manifest, f"`c2f cache-stats {self.directory}` writes them"
        if m["version"] != STATS_VERSION:   # debug: an older cache loads as it did, its log included
            log.debug("%s has no LayerNorm statistics (a version %s cache): the ops compute them; %s",
                      self.directory, m["version"], fix)
            return False
        problems = stats_problems(self.directory, m)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            log.warning("%s: LayerNorm statistics not used: %s%s; the ops compute them; %s",
                        self.directory, problems[0], more, fix)
        return not problems

    def _check_group(self, shards: list, rows: int, verify: str) -> np.ndarray:
        """The start row of each shard of one view, after checking that they tile ``rows`` rows."""
        expected = 0
        for s in shards:
            if s["start"] != expected:
                raise CacheError(f"{self.directory}/{s['file']} starts at row {s['start']}, expected {expected}")
            expected += s["count"]
            self._check_file(s["file"], s["sha256"], verify, (s["count"], *self.feature_shape))
        if expected != rows:
            raise CacheError(f"{self.directory}: shards hold {expected} rows, manifest says {rows} images")
        return np.array([s["start"] for s in shards], dtype=np.int64)

    def _check_file(self, name: str, digest: str, verify: str, shape=None) -> None:
        path = os.path.join(self.directory, name)
        if not os.path.isfile(path):
            raise CacheError(f"{path} is missing: the cache is corrupted")
        if verify == "full" and sha256_file(path) != digest:
            raise CacheError(f"{path} fails its sha256 checksum: the cache is corrupted; delete it and "
                             "rebuild, or rerun `c2f extract` with the same arguments to rewrite bad shards")
        if shape is not None:
            try:
                arr = np.load(path, mmap_mode="r")
            except ValueError as e:
                raise CacheError(f"{path} is not a readable .npy file ({e}): the cache is corrupted") from None
            if arr.shape != shape or arr.dtype != self.dtype:
                raise CacheError(f"{path} holds {arr.shape} {arr.dtype}, manifest says {shape} {self.dtype}")

    def __len__(self) -> int:
        return self.num_images

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_maps", "_stats_maps"):
            if state[key] is not None and isinstance(state[key][0][0], np.memmap):
                state[key] = None   # reopened lazily in each worker process
        return state

    def _open(self, groups: list) -> list:
        return [[np.load(os.path.join(self.directory, s["file"]), mmap_mode="r") for s in group] for group in groups]

    def _shards(self) -> list:
        if self._maps is None:
            self._maps = self._open(shard_groups(self.manifest))
        return self._maps

    def _stats(self) -> list:
        if self._stats_maps is None:
            self._stats_maps = self._open(stats_groups(self.manifest))
        return self._stats_maps

    def _by_view(self, idx: np.ndarray, views):
        """``(view, where, positions)`` for each view among the rows ``idx``: ``where`` indexes ``idx``,
        ``positions`` the view's shard rows (cache rows for view 0), after checking the rows and views."""
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_images):
            raise IndexError(f"indices must lie in [0, {self.num_images}), got min {idx.min()}, max {idx.max()}")
        views = np.zeros(len(idx), np.int64) if views is None else np.asarray(views, dtype=np.int64)
        if views.size and (views.min() < 0 or views.max() >= self.views
                           or (self.view_position[idx[views > 0]] < 0).any()):
            raise IndexError(f"views must lie in [0, {self.views}) and be 0 for images without extra views")
        for v in np.unique(views):
            where = np.flatnonzero(views == v)
            yield int(v), where, idx[where] if v == 0 else self.view_position[idx[where]]

    def read(self, indices: Sequence[int] | None, views: Sequence[int] | None = None) -> np.ndarray:
        """Features of ``indices`` in the order given: ``[len(indices), C, H, W]`` in the cache dtype; ``views``
        (one per index, default all 0) picks each row's view (only training images have views above 0)."""
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(idx), *self.feature_shape), dtype=self.dtype)
        for v, where, positions in self._by_view(idx, views):
            _gather(self.view_starts[v], self._shards()[v], positions, out, where)
        return out

    def read_stats(self, indices: Sequence[int], views: Sequence[int] | None = None):
        """The statistics of the features ``read(indices, views)`` returns, in the same row order: ``(mean,
        var)``, each ``[len(indices), H * W]`` float32 and contiguous (two halves of one ``[2, b, H * W]``
        array), token ``h * W + w``; None when the cache has no usable statistics (``has_stats``)."""
        if not self.has_stats:
            return None
        idx = np.asarray(indices, dtype=np.int64)
        out = np.empty(stats_shape(len(idx), self.feature_shape), dtype=STATS_DTYPE)
        for v, where, positions in self._by_view(idx, views):
            for k in range(2):
                _gather(self.view_starts[v], [s[k] for s in self._stats()[v]], positions, out[k], where)
        return out[0], out[1]


def _gather(starts: np.ndarray, shards: list, positions: np.ndarray, out: np.ndarray, where: np.ndarray) -> None:
    """``out[where] = `` the rows at ``positions`` of ``shards`` (shard s holds rows ``starts[s]`` on), read in
    ascending order per shard."""
    shard_of = np.searchsorted(starts, positions, side="right") - 1
    for s in np.unique(shard_of):
        mine = np.flatnonzero(shard_of == s)
        local = positions[mine] - starts[s]
        order = np.argsort(local, kind="stable")   # ascending reads are sequential on disk
        out[where[mine[order]]] = shards[s][local[order]]
