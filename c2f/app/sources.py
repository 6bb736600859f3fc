"""The trainer's data: a feature cache (the demo's, synthesized if absent) or CUB images through a frozen
backbone, and their loaders. Both give the same batches (``x``, ``labels``, ``attr_target``, ``index``)
and the same label side, so the rest of ``Trainer`` does not tell them apart."""
from __future__ import annotations

import logging
import os

from ..errors import ConfigError
from .data import CacheError, FeatureCache, make_loader, synthesize
from .data.images import Augment, ImageSource

log = logging.getLogger("c2f.app.trainer")

DEMO_CACHE = os.path.join(".cache", "c2f-demo")
# The demo: CUB's feature and attribute shapes, few classes and images so it trains in minutes on 2 cores.
DEMO_SYNTH = dict(num_classes=50, images_per_class=32, test_fraction=0.25, seed=0, shard_size=128)


class DataSources:
    """For ``Trainer`` (which sets ``cfg``, ``dist``, ``device``, ``amp``, ``resuming``, ``targets`` and
    ``images``): opening the source and building its loaders."""

    def _loader(self, rows, train: bool):
        """Training batches (shuffled, seeded by epoch; a view drawn per image) or evaluation batches, of
        cache features or of images through the backbone: the same batch structure either way."""
        cfg = self.cfg
        common = dict(rank=self.dist.rank, world=self.dist.world, pin_memory=self.device.type == "cuda",
                      shuffle=train, seed=cfg.seed, drop_last=train,
                      num_workers=cfg.num_workers if train else min(cfg.num_workers, 1))
        if self.images is None:
            return make_loader(self.cache, rows, self.targets, cfg.batch_size, **common)
        augment = Augment(self.images.image_size, cfg.crop_scale, cfg.hflip) if train else None
        return self.images.loader(rows, self.targets, cfg.batch_size, augment=augment, eval_crop=cfg.eval_crop,
                                  **common)

    def _open_cache(self) -> FeatureCache:
        cfg = self.cfg
        features = cfg.features
        if features is None:
            features = DEMO_CACHE
            if self.dist.main:
                log.info("demo: synthetic cache at %s (%d classes, 2048 x 14 x 14 features, 312 attributes; "
                         "made if absent, finished if partial)", features, DEMO_SYNTH["num_classes"])
                try:
                    synthesize(features, progress=cfg.progress, **DEMO_SYNTH)
                except CacheError:   # made by another version of the demo: replace it
                    synthesize(features, progress=cfg.progress, overwrite=True, **DEMO_SYNTH)
            self.dist.barrier()
        self.features = os.path.abspath(features)
        if not os.path.isdir(self.features):
            moved = " (if the cache moved, pass its new place with --features)" if self.resuming else ""
            raise ConfigError("features", f"{self.features} is not a directory{moved}")
        return FeatureCache(self.features, verify=cfg.verify, preload=cfg.preload)

    def _open_images(self) -> ImageSource:
        """The images of ``cfg.cub`` through the frozen backbone (autocast on CUDA; fp32 on CPU, as extract)."""
        cfg = self.cfg
        self.features = None
        amp = self.amp if self.device.type == "cuda" else "off"
        Augment(cfg.image_size, cfg.crop_scale, cfg.hflip).check()
        return ImageSource(cfg.cub, cfg.backbone, cfg.weights, cfg.image_size, self.device, amp,
                           progress=cfg.progress and self.dist.main)

    def _paths(self) -> dict:
        """The data's paths, absolute, as recorded in config.json and best.pt (eval and predict find them)."""
        if self.images is None:
            return dict(features=self.features)
        cfg = self.cfg
        return dict(features=None, cub=self.images.directory,
                    backbone=os.path.abspath(cfg.backbone) if os.path.isfile(cfg.backbone) else cfg.backbone,
                    weights=None if cfg.weights is None else os.path.abspath(cfg.weights))

