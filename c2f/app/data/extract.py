"""``c2f extract``: run a frozen backbone over CUB's images once and cache the feature maps.

Everything is checked before anything is written: the arguments, every listed image (exists, is not
empty, has an image header Pillow reads) and the backbone (loads, maps an image to a feature map).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ...errors import ConfigError
from ...extras import require
from ..devices import autocast, resolve_amp, resolve_device
from .backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, ImageFolderDataset, load_backbone, open_backbone
from .cache import CACHE_DTYPES, CacheWriter, lock_cache
from .cub import CUBRecord, read_cub
from .images import CROP_RATIO, CROP_SCALE, HFLIP, Augment, AugmentedView

__all__ = ["extract", "check_images", "load_backbone", "open_backbone", "Backbone", "ImageFolderDataset",
           "ImageCheckError", "IMAGENET_MEAN", "IMAGENET_STD", "SPLITS"]

log = logging.getLogger(__name__)

SPLITS = ("all", "train", "test")
LISTED = 10   # problem images named in the error; the rest are counted


class ImageCheckError(ValueError):
    """Images listed in ``images.txt`` that are missing, empty or not decodable (all of them are counted)."""


def check_images(paths, root: str, progress: bool = True) -> None:
    """Checks that every image exists, is not empty and has a header Pillow identifies (no full decode).

    Raises ``ImageCheckError`` naming the first few problems and counting all of them.
    """
    Image = require("PIL.Image", "extract", "decoding images", "Pillow")
    problems = []
    for path in tqdm(paths, desc="check images", unit="img", leave=False, disable=not progress):
        try:
            size = os.path.getsize(path)
        except OSError:
            problems.append((path, "missing"))
            continue
        if size == 0:
            problems.append((path, "empty"))
            continue
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 - the header is parsed on open; the pixels are not decoded
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for a bad file
            problems.append((path, f"not a readable image: {type(e).__name__}"))
    if problems:
        listed = "; ".join(f"{os.path.relpath(p, root)} ({why})" for p, why in problems[:LISTED])
        more = f"; and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
        raise ImageCheckError(f"{len(problems)} of {len(paths)} images listed in {os.path.join(root, 'images.txt')} "
                              f"cannot be used: {listed}{more}")


def _fingerprint(paths, root: str) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.relpath(p, root).encode() + b"\n")
    return h.hexdigest()


def _check_args(image_size, split, batch_size, dtype, shard_size, num_workers) -> None:
    for name, value, minimum in (("image_size", image_size, 1), ("batch_size", batch_size, 1),
                                 ("shard_size", shard_size, 1), ("num_workers", num_workers, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")
    if split not in SPLITS:
        raise ConfigError("split", f"must be one of {', '.join(SPLITS)}; got {split!r}")
    if dtype not in CACHE_DTYPES:
        raise ConfigError("dtype", f"must be float16 or float32; got {dtype!r}")


def _check_views(views, seed) -> None:
    for name, value, minimum in (("views", views, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(name, f"must be an integer >= {minimum}, got {value!r}")


def _view_dataset(paths: list, net: Backbone, rows: np.ndarray, view: int, augment: Augment, seed: int):
    """The images of cache ``rows`` in ``view``: 0 the deterministic resize, others augmented, keyed
    ``[seed, row, view, 1]`` (a stream of its own, apart from training's ``[seed, epoch, row]``)."""
    if view == 0:
        return ImageFolderDataset([paths[r] for r in rows], net.image_size, transform=net.transform)
    return ImageFolderDataset([paths[r] for r in rows], net.image_size, transform=net.transform,
                              view=AugmentedView(augment), keys=[[seed, int(r), view, 1] for r in rows])


def _probe(backbone: Backbone, spec: str, device: torch.device, amp: str) -> tuple:
    s = backbone.image_size
    with torch.inference_mode(), autocast(device, amp):
        probe = backbone.module(torch.zeros(1, 3, s, s, device=device))
    if probe.dim() != 4:
        raise ValueError(f"backbone {spec!r} returned shape {tuple(probe.shape)} for a [1, 3, {s}, {s}] image; "
                         "expected a feature map [1, C, H, W]")
    return tuple(probe.shape[1:])


def extract(cub: str | CUBRecord, directory: str, backbone: str, image_size: int = 448,
            split: str = "all", batch_size: int = 32, dtype: str = "float16", shard_size: int = 256,
            num_workers: int = 2, device: str | None = None, weights: str | None = None,
            overwrite: bool = False, progress: bool = True, amp: str = "auto", views: int = 1, seed: int = 0,
            crop_scale: float = CROP_SCALE, hflip: float = HFLIP) -> str:
    """Writes the backbone's features of ``split``'s images to the cache ``directory`` and returns it.

    Eval mode, inference mode, batched; ``amp`` "auto" runs bf16 autocast on CUDA only (recorded in
    the manifest with the backbone's file hashes). Rerunning the same command after an interruption
    continues from the last whole shard; a different command, or a backbone or weights file replaced
    under the same name, is refused. ``views`` > 1 also stores ``views - 1`` augmented views of each training
    image (``crop_scale``, ``hflip``, keyed by ``seed``); training draws one per epoch. Each shard's per-token
    LayerNorm statistics are written with it (``c2f.app.data.stats``), of the values as stored in ``dtype``.
    """
    _check_args(image_size, split, batch_size, dtype, shard_size, num_workers)
    _check_views(views, seed)
    augment = Augment(image_size, crop_scale, hflip)
    augment.check()
    dev = resolve_device(device)
    if amp == "auto":   # features of a frozen backbone: bf16 on CUDA, fp32 elsewhere (recorded in the manifest)
        amp = "bf16" if dev.type == "cuda" else "off"
    resolve_amp(amp, dev)
    record = read_cub(cub) if isinstance(cub, str) else cub
    rows = np.arange(len(record))
    if split != "all":
        rows = rows[record.is_train == (split == "train")]
    paths = [record.image_paths[i] for i in rows]
    check_images(paths, record.root, progress)
    net = open_backbone(backbone, weights, image_size)
    net.module.to(dev)
    feature_shape = _probe(net, backbone, dev, amp)
    config = dict(source="extract", **net.identity, image_size=image_size, amp=amp, split=split,
                  images=_fingerprint(paths, record.root))
    if views > 1:   # recorded only with views, so that a cache made before views existed still resumes
        config.update(views=views, augment=dict(seed=seed, crop_scale=crop_scale, hflip=hflip,
                                                crop_ratio=list(CROP_RATIO)))
    meta = dict(labels=record.labels[rows], is_train=record.is_train[rows],
                attributes=record.attributes[rows].astype(np.uint8),
                certainty=record.certainty[rows].astype(np.uint8),
                class_attributes=record.class_attributes, image_ids=record.image_ids[rows])
    with lock_cache(directory):
        writer = CacheWriter(directory, config, feature_shape, meta, record.attribute_names,
                             record.class_names, dtype=dtype, shard_size=shard_size, overwrite=overwrite, views=views)
        todo = [(v, i) for v in range(views) for i in writer.missing_shards(v)]
        bar = tqdm(total=sum(len(writer.shard_range(i, v)) for v, i in todo), unit="img", desc="extract",
                   disable=not progress or not todo)
        start = time.perf_counter()
        for v, i in todo:
            dataset = _view_dataset(paths, net, writer.shard_rows(i, v), v, augment, seed)
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                                 pin_memory=dev.type == "cuda")
            out = []
            for images in loader:
                with torch.inference_mode(), autocast(dev, amp):
                    feats = net.module(images.to(dev, non_blocking=True))
                out.append(feats.float().cpu().numpy())
                bar.update(len(images))
            writer.write_shard(i, np.concatenate(out), v)
        bar.close()
        writer.fill_stats(progress)   # the shards of a cache begun before statistics existed
    if todo:
        done = sum(len(writer.shard_range(i, v)) for v, i in todo)
        log.info("extract: %d images in %.1f s -> %s", done, time.perf_counter() - start, directory)
    return directory
