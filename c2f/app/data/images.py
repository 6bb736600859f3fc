"""Training straight from images: seeded augmentation views, and a feature source that decodes images in
DataLoader workers and runs the frozen backbone on each batch, yielding the cache loader's batches.

Every random draw is keyed: a training view of cache row ``r`` at epoch ``e`` of a run seeded ``s`` is
``np.random.default_rng([s, e, r])``'s, so a resumed run sees the augmentations an unbroken one would,
whatever the worker count or the number of processes. The crop follows torchvision's
``RandomResizedCrop.get_params`` (ten tries at a scale and log-uniform aspect ratio, then the whole image
clamped to the ratio range); tests check that both draw the same distribution where torchvision is installed.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import ConfigError
from ...extras import require
from ..devices import autocast
from .loader import BatchPlan

CROP_SCALE = 0.25          # smallest crop area: fine-grained recipes keep more of the bird than ImageNet's 0.08
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect ratio range
HFLIP = 0.5
EVAL_CROP = 0.875          # evaluation: resize the short side to size / 0.875, then centre-crop size
CROP_TRIES = 10            # as torchvision


@dataclass(frozen=True)
class Augment:
    """A random resized crop (area fraction in ``[crop_scale, 1]``, ratio in ``CROP_RATIO``), then a horizontal
    flip with probability ``hflip``; the result is ``size`` x ``size``."""
    size: int
    crop_scale: float = CROP_SCALE
    hflip: float = HFLIP

    def check(self) -> None:
        if not 0.0 < self.crop_scale <= 1.0:
            raise ConfigError("crop_scale", f"must be in (0, 1], got {self.crop_scale!r}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError("hflip", f"must be in [0, 1], got {self.hflip!r}")


def crop_box(width: int, height: int, scale: tuple, ratio: tuple, rng: np.random.Generator) -> tuple:
    """``(left, top, w, h)`` of a random resized crop of a ``width`` x ``height`` image (torchvision's rule)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _resized_crop(img, box: tuple, size: int):
    """The ``box = (left, top, w, h)`` of a PIL image resized (bilinear, antialiased) to ``size`` x ``size``."""
    Image = require("PIL.Image", "extract", "decoding images", "Pillow")
    left, top, w, h = box
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))


class AugmentedView:
    """``(img, key) -> img``: the ``Augment`` drawn from ``np.random.default_rng(key)``."""

    def __init__(self, aug: Augment):
        self.aug = aug

    def __call__(self, img, key):
        Image = require("PIL.Image", "extract", "decoding images", "Pillow")
        rng = np.random.default_rng(key)
        box = crop_box(img.width, img.height, (self.aug.crop_scale, 1.0), CROP_RATIO, rng)
        img = _resized_crop(img, box, self.aug.size)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < self.aug.hflip else img


class CenterView:
    """``(img, key) -> img``: the short side resized to ``size / crop``, then the centre ``size`` x ``size``."""

    def __init__(self, size: int, crop: float = EVAL_CROP):
        if not 0.0 < crop <= 1.0:
            raise ConfigError("eval_crop", f"must be in (0, 1], got {crop!r}")
        self.size, self.crop = size, crop

    def __call__(self, img, key=None):
        side = min(img.width, img.height) * self.crop      # the centre square that becomes size x size
        left, top = (img.width - side) / 2, (img.height - side) / 2
        Image = require("PIL.Image", "extract", "decoding images", "Pillow")
        return img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + side, top + side))


class ImageRows(torch.utils.data.Dataset):
    """Indexed like ``CachedFeatures``: by a batch of rows, or by ``(epoch, rows)`` from a training plan.

    Returns ``x`` ``[b, 3, S, S]`` float32 (decoded here, in the worker), ``labels`` ``[b]``, ``attr_target``
    ``[b, A]``, ``index`` ``[b]`` (rows). With an epoch the view is ``train_view`` keyed ``[seed, epoch, row]``,
    without it ``eval_view``.
    """

    def __init__(self, images, labels: np.ndarray, targets: np.ndarray, train_view, eval_view, seed: int):
        self.images, self.labels, self.targets = images, labels, np.asarray(targets, dtype=np.float32)
        self.train_view, self.eval_view, self.seed = train_view, eval_view, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item) -> dict:
        epoch, rows = item if isinstance(item, tuple) else (None, item)
        rows = np.asarray(rows, dtype=np.int64)
        if epoch is None:
            x = [self.images.load(int(r), self.eval_view) for r in rows]
        else:
            x = [self.images.load(int(r), self.train_view, [self.seed, epoch, int(r)]) for r in rows]
        return dict(x=torch.stack(x), labels=torch.from_numpy(self.labels[rows]),
                    attr_target=torch.from_numpy(self.targets[rows]), index=torch.from_numpy(rows))


class BackboneFeatures:
    """A loader of ``ImageRows`` batches whose ``x`` is replaced by the frozen backbone's features
    ``[b, C, H, W]``: inference mode, channels_last, autocast ``amp``. ``backbone_s`` sums the seconds spent
    in the backbone (on CUDA: until its output is needed), so an epoch can tell decoding from the backbone."""

    def __init__(self, loader, module: torch.nn.Module, device: torch.device, amp: str):
        self.loader, self.module, self.device, self.amp = loader, module, device, amp
        self.sampler = loader.sampler
        self.backbone_s = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            start = time.perf_counter()
            images = batch["x"].to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast(self.device, self.amp):
                features = self.module(images)
            # An inference tensor cannot be saved for the head's backward: a plain copy (outside the mode) can.
            batch["x"] = features.clone().contiguous()
            self.backbone_s += time.perf_counter() - start
            yield batch


class ImageSource:
    """CUB images through a frozen backbone, with a ``FeatureCache``'s label side (``labels``, ``is_train``,
    ``attributes``, ``certainty``, ``class_attributes``, names, ``feature_shape``, ``identity``), so the
    trainer and ``c2f eval`` use either; ``loader`` builds the feature batches."""

    def __init__(self, cub: str, backbone: str, weights: str | None, image_size: int, device: torch.device,
                 amp: str, progress: bool = False):
        from .backbones import ImageFolderDataset, open_backbone
        from .cub import read_cub
        from .extract import _fingerprint, _probe, check_images
        try:
            record = read_cub(cub)
        except FileNotFoundError as e:
            raise ConfigError("cub", str(e)) from None
        try:
            net = open_backbone(backbone, weights, image_size)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            raise ConfigError("backbone", str(e)) from None
        check_images(record.image_paths, record.root, progress)
        self.module = net.module.to(device).to(memory_format=torch.channels_last)
        self.device, self.amp = device, amp
        self.feature_shape = _probe(net, backbone, device, amp)
        self.directory, self.image_size = record.root, net.image_size
        self.images = ImageFolderDataset(record.image_paths, net.image_size, transform=net.transform)
        for name in ("labels", "is_train", "certainty", "class_attributes", "attribute_names", "class_names",
                     "image_ids"):
            setattr(self, name, getattr(record, name))
        self.attributes = record.attributes.astype(np.float32)
        self.backbone_identity = {k: v for k, v in net.identity.items() if k not in ("backbone", "weights")}
        made = dict(source="images", **self.backbone_identity, image_size=net.image_size,
                    images=_fingerprint(record.image_paths, record.root))
        self.identity = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()
        self.has_stats = False   # features computed at each step: no LayerNorm statistics stored (FeatureCache's)

    def __len__(self) -> int:
        return len(self.labels)

    def loader(self, rows: Sequence[int], targets: np.ndarray, batch_size: int, shuffle: bool,
               augment: Augment | None, eval_crop: float, seed: int = 0, rank: int = 0, world: int = 1,
               drop_last: bool = False, num_workers: int = 2, pin_memory: bool = False) -> BackboneFeatures:
        """Feature batches of ``rows``: augmented (``augment``) when shuffled for training, else centre views."""
        plan = BatchPlan(rows, batch_size, shuffle, seed, rank, world, drop_last, with_epoch=augment is not None)
        dataset = ImageRows(self.images, self.labels, targets, None if augment is None else AugmentedView(augment),
                            CenterView(self.image_size, eval_crop), seed)
        extra = dict(persistent_workers=True, prefetch_factor=2) if num_workers > 0 else {}
        loader = torch.utils.data.DataLoader(dataset, sampler=plan, batch_size=None, num_workers=num_workers,
                                             pin_memory=pin_memory, **extra)
        return BackboneFeatures(loader, self.module, self.device, self.amp)
