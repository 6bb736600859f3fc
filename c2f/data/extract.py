"""``c2f extract``: run a frozen backbone over CUB's images once and cache the feature maps."""
from __future__ import annotations

import hashlib
import importlib
import os
import time
from typing import Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .cache import CacheWriter
from .cub import CUBRecord, read_cub

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("all", "train", "test")


def load_backbone(spec: str, weights: Optional[str] = None) -> nn.Module:
    """A frozen feature extractor from ``spec``, mapping images ``[B, 3, S, S]`` to ``[B, C, H, W]``.

    ``spec`` is a TorchScript file, ``package.module:factory`` (``factory()`` returns the module), or
    ``torchvision:resnet50`` (any torchvision ResNet, cut before its pooling; needs torchvision).
    ``weights`` is a local ``state_dict`` file: nothing is ever downloaded.
    """
    if os.path.isfile(spec):
        model = torch.jit.load(spec, map_location="cpu")
    elif spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        try:
            import torchvision
        except ImportError:
            raise ImportError(f"backbone {spec!r} needs torchvision, which is not installed; "
                              "pass a TorchScript file or package.module:factory instead") from None
        if not name.startswith("resnet") or not hasattr(torchvision.models, name):
            raise ValueError(f"backbone {spec!r}: expected a torchvision ResNet such as torchvision:resnet50")
        full = getattr(torchvision.models, name)(weights=None)
        if weights is not None:
            full.load_state_dict(torch.load(weights, map_location="cpu"))
            weights = None
        model = nn.Sequential(*list(full.children())[:-2])   # drop avgpool and fc: keep the 14x14 map
    elif ":" in spec:
        module_name, factory = spec.split(":", 1)
        model = getattr(importlib.import_module(module_name), factory)()
        if not isinstance(model, nn.Module):
            raise TypeError(f"backbone factory {spec!r} returned {type(model).__name__}, expected an nn.Module")
    else:
        raise ValueError(f"backbone {spec!r} is neither a file, package.module:factory nor torchvision:resnetNN")
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu"))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class ImageFolderDataset(torch.utils.data.Dataset):
    """Decodes, resizes (bilinear, to ``size`` x ``size``) and normalizes images; returns ``[3, S, S]``."""

    def __init__(self, paths, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.paths, self.size = list(paths), size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            from PIL import Image
        except ImportError:
            raise ImportError("decoding images needs Pillow: pip install pillow") from None
        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
        return (torch.from_numpy(arr).permute(2, 0, 1) - self.mean) / self.std


def _fingerprint(paths, root: str) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.relpath(p, root).encode() + b"\n")
    return h.hexdigest()


def extract(cub: Union[str, CUBRecord], directory: str, backbone: str, image_size: int = 448,
            split: str = "all", batch_size: int = 32, dtype: str = "float16", shard_size: int = 256,
            num_workers: int = 2, device: Optional[str] = None, weights: Optional[str] = None,
            overwrite: bool = False, progress: bool = True) -> str:
    """Writes the backbone's features of ``split``'s images to the cache ``directory`` and returns it.

    Eval mode, inference mode, batched; bf16 autocast on CUDA. Rerunning the same command after an
    interruption continues from the last whole shard; a different command on the same directory is refused.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    record = read_cub(cub) if isinstance(cub, str) else cub
    rows = np.arange(len(record))
    if split != "all":
        rows = rows[record.is_train == (split == "train")]
    paths = [record.image_paths[i] for i in rows]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_backbone(backbone, weights).to(device)
    preprocessing = dict(resize=[image_size, image_size], interpolation="bilinear", scale=1 / 255,
                         mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), color="RGB")
    config = dict(source="extract", backbone=backbone,
                  weights=None if weights is None else os.path.abspath(weights),
                  image_size=image_size, preprocessing=preprocessing, split=split,
                  images=_fingerprint(paths, record.root))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        probe = model(torch.zeros(1, 3, image_size, image_size, device=device))
    if probe.dim() != 4:
        raise ValueError(f"backbone {backbone!r} returned shape {tuple(probe.shape)} for a "
                         f"[1, 3, {image_size}, {image_size}] image; expected a feature map [1, C, H, W]")
    meta = dict(labels=record.labels[rows], is_train=record.is_train[rows],
                attributes=record.attributes[rows].astype(np.uint8),
                certainty=record.certainty[rows].astype(np.uint8),
                class_attributes=record.class_attributes, image_ids=record.image_ids[rows])
    writer = CacheWriter(directory, config, tuple(probe.shape[1:]), meta, record.attribute_names,
                         record.class_names, dtype=dtype, shard_size=shard_size, overwrite=overwrite)
    todo = writer.missing_shards()
    dataset = ImageFolderDataset(paths, image_size)
    bar = tqdm(total=sum(len(writer.shard_range(i)) for i in todo), unit="img", desc="extract",
               disable=not progress or not todo)
    start = time.perf_counter()
    for i in todo:
        shard_rows = list(writer.shard_range(i))
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, shard_rows), batch_size=batch_size,
                                             num_workers=num_workers, pin_memory=device.type == "cuda")
        out = []
        for images in loader:
            with torch.inference_mode(), autocast:
                feats = model(images.to(device, non_blocking=True))
            out.append(feats.float().cpu().numpy())
            bar.update(len(images))
        writer.write_shard(i, np.concatenate(out))
    bar.close()
    if todo and progress:
        done = sum(len(writer.shard_range(i)) for i in todo)
        print(f"extract: {done} images in {time.perf_counter() - start:.1f} s -> {directory}")
    return directory
