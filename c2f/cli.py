"""The ``c2f`` command: ``train``, ``extract``, ``synth`` and ``info``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional

from .data.cub import TARGET_KINDS


def _train_parser(sub) -> None:
    from .train import HEADS, STAGES, TrainConfig
    d = TrainConfig()
    p = sub.add_parser("train", help="train the C2F head on a feature cache (no arguments: the demo)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--features", help="feature cache directory; default: synthesize and use the demo cache")
    p.add_argument("--run-dir", help="run directory; default runs/<stage>-<time>")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    p.add_argument("--stage", choices=STAGES, default=d.stage)
    p.add_argument("--head", choices=HEADS, default=d.head)
    p.add_argument("--init", help="start from the model weights of this checkpoint (e.g. a previous stage's best.pt)")
    p.add_argument("--freeze-attention", action="store_true", help="fine stage: train the classifier only")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split over processes")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--attr-target", choices=TARGET_KINDS, default=d.attr_target)
    p.add_argument("--attr-loss", choices=("mse", "bce"), default=d.attr_loss)
    p.add_argument("--attr-weight", type=float, default=d.attr_weight)
    p.add_argument("--num-heads", type=int, default=d.num_heads)
    p.add_argument("--mixup-alpha", type=float, default=d.mixup_alpha)
    p.add_argument("--mixup-mode", choices=("binary", "blend", "part"), default=d.mixup_mode)
    p.add_argument("--mixup-views", type=int, default=d.mixup_views)
    p.add_argument("--mixup-pairing", choices=("flip", "random"), default=d.mixup_pairing)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--preload", action="store_true", help="load the whole cache into RAM instead of memory-mapping")
    p.add_argument("--verify", choices=("full", "size"), default=d.verify, help="cache check: checksums or sizes")
    p.add_argument("--device")
    p.add_argument("--stop-after", type=int, help="stop after this many epochs (continue later with --resume)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")


def _run_train(args) -> int:
    from .train import TrainConfig, load_run_config, train
    if args.resume:
        if not args.run_dir:
            raise SystemExit("--resume needs --run-dir")
        cfg = load_run_config(args.run_dir)
        cfg.stop_after, cfg.progress = args.stop_after, not args.no_progress
        result = train(cfg, resume=True)
    else:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: v for k, v in vars(args).items() if k in names}
        values.update(progress=not args.no_progress, plots=not args.no_plots)
        result = train(TrainConfig(**values))
    return 0 if result is not None else 1


def _extract_parser(sub) -> None:
    p = sub.add_parser("extract", help="cache a frozen backbone's features of CUB images",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("cub", help="the CUB_200_2011 directory (holding images.txt)")
    p.add_argument("out", help="cache directory")
    p.add_argument("--backbone", required=True,
                   help="TorchScript file, package.module:factory, or torchvision:resnet50 (needs torchvision)")
    p.add_argument("--weights", help="local state_dict file for the backbone (never downloaded)")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--split", choices=("all", "train", "test"), default="all")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made with other settings")


def _synth_parser(sub) -> None:
    p = sub.add_parser("synth", help="write a synthetic feature cache (learnable classes, attributes, parts)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="cache directory")
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--images-per-class", type=int, default=60)
    p.add_argument("--attributes", type=int, default=312)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--grid", type=int, default=14)
    p.add_argument("--locations", type=int, default=15, help="spatial parts the attributes sit on")
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--noise", type=float, default=1.0)
    p.add_argument("--classes-per-genus", type=int, default=4, help="classes sharing one attribute profile")
    p.add_argument("--class-flip", type=float, default=0.1, help="fraction of attributes where siblings differ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--overwrite", action="store_true")


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="c2f", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _extract_parser(sub)
    _synth_parser(sub)
    info = sub.add_parser("info", help="print a feature cache's manifest summary")
    info.add_argument("cache")
    args = parser.parse_args(argv)
    if args.command == "train":
        return _run_train(args)
    if args.command == "extract":
        from .data import extract
        extract(args.cub, args.out, args.backbone, image_size=args.image_size, split=args.split,
                batch_size=args.batch_size, dtype=args.dtype, shard_size=args.shard_size,
                num_workers=args.num_workers, device=args.device, weights=args.weights, overwrite=args.overwrite)
        return 0
    if args.command == "synth":
        from .data import synthesize
        synthesize(args.out, num_classes=args.classes, images_per_class=args.images_per_class,
                   num_attributes=args.attributes, dim=args.dim, grid=args.grid, num_locations=args.locations,
                   test_fraction=args.test_fraction, noise=args.noise, seed=args.seed,
                   classes_per_genus=args.classes_per_genus, class_flip=args.class_flip, dtype=args.dtype,
                   shard_size=args.shard_size, overwrite=args.overwrite)
        return 0
    if args.command == "info":
        from .data import read_manifest
        m = read_manifest(args.cache)
        summary = {k: m[k] for k in ("config", "num_images", "feature_shape", "dtype", "shard_size", "complete")}
        summary["shards_done"] = sum(s is not None for s in m["shards"])
        json.dump(summary, sys.stdout, indent=1)
        print()
        return 0
    return 2
