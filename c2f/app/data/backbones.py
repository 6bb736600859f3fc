"""Frozen backbones for ``c2f extract``: TorchScript files, ``package.module:factory``, torchvision
ResNets and timm models (local weights only; nothing is downloaded), with their preprocessing."""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from .cache import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(NamedTuple):
    module: nn.Module                 # images [B, 3, S, S] -> feature maps [B, C, H, W], eval mode, frozen
    transform: Callable | None     # PIL image -> [3, S, S] tensor; None: resize + ImageNet normalisation
    image_size: int                   # S, the side of the images the module is fed
    identity: dict                    # what identifies it: spec, file hashes, package version, preprocessing


def _load_state(path: str) -> dict:
    from ...model_file import safe_load
    state = safe_load(path)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class TimmFeatures(nn.Module):
    """A timm model's ``forward_features`` as a feature map: ViT tokens are laid back on their patch grid."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_features(x)
        if f.dim() == 3:                                     # [B, prefix + H*W, C] tokens
            f = f[:, getattr(self.model, "num_prefix_tokens", 0):]
            side = math.isqrt(f.shape[1])
            if side * side != f.shape[1]:
                raise ValueError(f"timm model returned {f.shape[1]} patch tokens, not a square grid")
            f = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)
        return f


def _timm(name: str, weights: str | None, image_size: int):
    try:
        import timm
        import timm.data
    except ImportError:
        raise ImportError(f"backbone 'timm:{name}' needs timm, which is not installed: pip install timm") from None
    model = timm.create_model(name, pretrained=False)
    if weights is not None:
        model.load_state_dict(_load_state(weights))
    data_cfg = timm.data.resolve_data_config({"input_size": (3, image_size, image_size)}, model=model)
    transform = timm.data.create_transform(**data_cfg, is_training=False)
    preprocessing = json.loads(json.dumps(dict(data_cfg, source="timm"), default=list))
    return TimmFeatures(model), transform, preprocessing, getattr(timm, "__version__", None)


def _torchvision(name: str, weights: str | None):
    try:
        import torchvision
    except ImportError:
        raise ImportError(f"backbone 'torchvision:{name}' needs torchvision, which is not installed; "
                          "pass a TorchScript file or package.module:factory instead") from None
    if not name.startswith("resnet") or not hasattr(torchvision.models, name):
        raise ValueError(f"backbone 'torchvision:{name}': expected a torchvision ResNet such as torchvision:resnet50")
    full = getattr(torchvision.models, name)(weights=None)
    if weights is not None:
        full.load_state_dict(_load_state(weights))
    return nn.Sequential(*list(full.children())[:-2]), torchvision.__version__   # drop avgpool and fc


def _factory_file(module_name: str) -> str | None:
    spec = importlib.util.find_spec(module_name)
    return spec.origin if spec is not None and spec.origin and os.path.isfile(spec.origin) else None


def open_backbone(spec: str, weights: str | None = None, image_size: int = 448) -> Backbone:
    """The frozen backbone ``spec`` names, with its preprocessing and what identifies it.

    ``spec``: a TorchScript file, ``package.module:factory`` (``factory()`` returns the module),
    ``torchvision:resnet50`` (any torchvision ResNet, cut before its pooling) or ``timm:<name>`` (the
    model's ``forward_features``, with timm's own eval preprocessing for it at ``image_size``).
    ``weights``: a local ``state_dict`` file, loaded with ``weights_only=True``. The identity records
    the sha256 of the TorchScript file, the factory's source file and the weights file, so a file
    replaced under the same name is told apart.
    """
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file {weights} not found")
    identity = dict(backbone=spec, weights=None if weights is None else os.path.abspath(weights))
    transform = None
    preprocessing = dict(resize=[image_size, image_size], interpolation="bilinear", scale=1 / 255,
                         mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), color="RGB")
    if os.path.isfile(spec):
        model = torch.jit.load(spec, map_location="cpu")
        identity["backbone_sha256"] = sha256_file(spec)
    elif spec.startswith("timm:"):
        model, transform, preprocessing, identity["package_version"] = _timm(spec[5:], weights, image_size)
        weights = None
    elif spec.startswith("torchvision:"):
        model, identity["package_version"] = _torchvision(spec.split(":", 1)[1], weights)
        weights = None
    elif ":" in spec:
        module_name, factory = spec.split(":", 1)
        model = getattr(importlib.import_module(module_name), factory)()
        if not isinstance(model, nn.Module):
            raise TypeError(f"backbone factory {spec!r} returned {type(model).__name__}, expected an nn.Module")
        source = _factory_file(module_name)
        identity["backbone_sha256"] = None if source is None else sha256_file(source)
    else:
        raise ValueError(f"backbone {spec!r} is neither a file, package.module:factory, torchvision:resnetNN "
                         "nor timm:<name>")
    if weights is not None:
        model.load_state_dict(_load_state(weights))
    if identity["weights"] is not None:
        identity["weights_sha256"] = sha256_file(identity["weights"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    identity["preprocessing"] = preprocessing
    size = int(preprocessing.get("input_size", [3, image_size, image_size])[-1])
    return Backbone(model, transform, size, identity)


def load_backbone(spec: str, weights: str | None = None) -> nn.Module:
    """The frozen module of ``open_backbone(spec, weights)``, mapping ``[B, 3, S, S]`` to ``[B, C, H, W]``."""
    return open_backbone(spec, weights).module


class ImageFolderDataset(torch.utils.data.Dataset):
    """Decodes images and returns ``[3, S, S]``: ``transform`` (a PIL image -> tensor callable) if given,
    else a bilinear resize to ``size`` x ``size`` and ImageNet normalisation. ``view`` (``(img, key) -> img``,
    e.g. an augmentation) is applied first, keyed by ``keys[i]``."""

    def __init__(self, paths, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, transform=None, view=None,
                 keys=None):
        self.paths, self.size, self.transform, self.view, self.keys = list(paths), size, transform, view, keys
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.load(i, self.view, None if self.keys is None else self.keys[i])

    def load(self, i: int, view=None, key=None) -> torch.Tensor:
        """Image ``i`` as ``[3, S, S]``, through ``view(img, key)`` first if given."""
        from ...extras import require
        Image = require("PIL.Image", "extract", "decoding images", "Pillow")
        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB")
            if view is not None:
                img = view(img, key)
            if self.transform is not None:
                return self.transform(img)
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
        return (torch.from_numpy(arr).permute(2, 0, 1) - self.mean) / self.std
