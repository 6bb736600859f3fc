"""The three ways to feed the head, measured on this machine: a feature cache, an augmented cache
(``extract --views``) and training from images (``train --cub``).

Builds a CUB-format tree of JPEGs at CUB's typical size (500 x 375) and a small TorchScript backbone, then
times extraction (images/s) and two training epochs of each way (images/s of the second, warm epoch, split
into decode/data wait, backbone and head). Prints a Markdown table with the machine it ran on.

    python -m bench.pipeline [--classes 12] [--per-class 10] [--image-size 112] [--workers 1] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

from c2f.app import TrainConfig, train
from c2f.app.data import extract, read_cub
from c2f.app.data.backbones import ImageFolderDataset
from c2f.app.data.images import Augment, AugmentedView

from .machine import describe

ATTRIBUTES = 312
WIDTH, HEIGHT = 500, 375   # CUB's images are about this size
BATCH = 16


class SmallBackbone(nn.Module):
    """[B, 3, S, S] -> [B, 512, S/16, S/16]: three strided convolutions (about 0.1 GFLOP at S = 112)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 64, 4, stride=4), nn.ReLU(), nn.Conv2d(64, 256, 2, stride=2), nn.ReLU(),
                                 nn.Conv2d(256, 512, 2, stride=2), nn.ReLU())

    def forward(self, x):
        return self.net(x)


def write_tree(root: str, classes: int, per_class: int) -> None:
    """A CUB-format tree: smooth JPEGs with noise (they decode like photographs), half of each class for training."""
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    lines = dict(images=[], labels=[], split=[], attrs=[])
    for i in range(classes * per_class):
        k = i % classes
        rel = f"{k + 1:03d}.C{k}/img_{i}.jpg"
        os.makedirs(os.path.join(root, "images", os.path.dirname(rel)), exist_ok=True)
        base = np.stack([np.sin(xx / (20 + 3 * c + k) + i) * np.cos(yy / (30 + c)) for c in range(3)], -1)
        pixels = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "images", rel), quality=90)
        lines["images"].append(f"{i + 1} {rel}")
        lines["labels"].append(f"{i + 1} {k + 1}")
        lines["split"].append(f"{i + 1} {int(i // classes % 2 == 0)}")
        lines["attrs"] += [f"{i + 1} {a + 1} {int(rng.random() < 0.3)} 3" for a in range(ATTRIBUTES)]
    for name, key in (("images.txt", "images"), ("image_class_labels.txt", "labels"),
                      ("train_test_split.txt", "split"), ("image_attribute_labels.txt", "attrs")):
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(lines[key]) + "\n")
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("".join(f"{k + 1} {k + 1:03d}.C{k}\n" for k in range(classes)))
    with open(os.path.join(root, "attributes.txt"), "w") as f:
        f.write("".join(f"{a + 1} has_part{a % 15}::v{a}\n" for a in range(ATTRIBUTES)))


def decode_rate(cub: str, size: int, n: int = 48) -> tuple:
    """Images/s of decoding alone (deterministic resize) and of decoding with the training augmentation."""
    paths = read_cub(cub).image_paths[:n]
    plain = ImageFolderDataset(paths, size)
    aug = ImageFolderDataset(paths, size, view=AugmentedView(Augment(size)), keys=[[0, i] for i in range(n)])
    rates = []
    for dataset in (plain, aug):
        start = time.perf_counter()
        for i in range(n):
            dataset[i]
        rates.append(n / (time.perf_counter() - start))
    return tuple(rates)


def timed_extract(cub: str, out: str, backbone: str, size: int, views: int, workers: int) -> float:
    """Images/s of ``c2f extract`` (views stored per second: every image once, training images ``views`` times)."""
    start = time.perf_counter()
    extract(cub, out, backbone, image_size=size, num_workers=workers, progress=False, views=views, batch_size=32)
    rec = read_cub(cub)
    stored = len(rec.image_ids) + (views - 1) * int(rec.is_train.sum())
    return stored / (time.perf_counter() - start)


def timed_train(run_dir: str, workers: int, **source) -> dict:
    """The second epoch of a 2-epoch run: training images/s and seconds in data wait, backbone and head."""
    cfg = TrainConfig(run_dir=run_dir, epochs=2, batch_size=BATCH, num_workers=workers, progress=False, plots=False,
                      val_fraction=0.0, amp="off", **source)
    train(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    args = p.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="c2f-pipeline-")
    cub, backbone = os.path.join(root, "cub"), os.path.join(root, "backbone.pt")
    write_tree(cub, args.classes, args.per_class)
    torch.manual_seed(0)
    torch.jit.script(SmallBackbone().eval()).save(backbone)
    size, w = args.image_size, args.workers
    train_images = int(read_cub(cub).is_train.sum()) // BATCH * BATCH   # an epoch's images (whole batches)
    plain_rate, aug_rate = decode_rate(cub, size)
    rows = []
    for way, views in (("cache", 1), ("augmented cache (--views 4)", 4)):
        cache = os.path.join(root, f"cache-{views}")
        rate = timed_extract(cub, cache, backbone, size, views, w)
        rows.append((way, rate, timed_train(os.path.join(root, f"run-{views}"), w, features=cache)))
    rows.append(("from images (--cub)", None, timed_train(os.path.join(root, "run-images"), w, cub=cub,
                                                           backbone=backbone, image_size=size)))
    print(f"machine: {describe(torch.device('cpu'))['label']}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {w} loader worker(s)")
    print(f"{len(read_cub(cub).image_ids)} JPEGs of {WIDTH}x{HEIGHT}, {train_images} trained on per epoch; backbone "
          f"{size}x{size} -> 512x{size // 16}x{size // 16}; head 312 parts; batch 16; fp32")
    print(f"decode alone (one process): {plain_rate:.0f} img/s resize, {aug_rate:.0f} img/s random resized crop "
          "+ flip\n")
    print("| way | extract img/s | train img/s | epoch s | data wait s | backbone s | head s |")
    print("|---|---|---|---|---|---|---|")
    for way, rate, r in rows:
        print(f"| {way} | {'-' if rate is None else f'{rate:.0f}'} | {train_images / r['epoch_s']:.0f} | "
              f"{r['epoch_s']:.2f} | {r['data_wait_s']:.2f} | {r.get('backbone_s', 0.0):.2f} | {r['compute_s']:.2f} |")


if __name__ == "__main__":
    main()
