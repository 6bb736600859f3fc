"""Evaluation and prediction with a trained head: the code behind training's validation, ``c2f eval``
and ``c2f predict`` (the same metrics everywhere, from ``c2f.app.metrics``)."""
from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn

from .. import model_file
from ..errors import ConfigError, NonFiniteError
from . import metrics
from .data import FeatureCache, attribute_targets, make_loader, read_manifest, split_rows
from .data.images import EVAL_CROP, CenterView, ImageSource
from .devices import autocast, resolve_amp, resolve_device

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train", "all")


def is_fused(model: nn.Module) -> bool:
    """Fused c2f modules take the cache's fp16 features as they are; plain modules want their own dtype."""
    from ..nn import C2FHead
    return isinstance(model, C2FHead)


def model_input(x: torch.Tensor, model: nn.Module, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``: in the cache dtype for a fused head (no fp32 copy), else in the parameters' dtype."""
    x = x.to(device, non_blocking=True)
    if not is_fused(model):
        x = x.to(next(model.parameters()).dtype)
    return x


def model_stats(batch: dict, model: nn.Module, device: torch.device, use: bool = True):
    """The batch's cached token statistics ``(x_mean, x_var)`` on ``device`` for a fused head (the cache's, checked
    against its shards: ``c2f.app.data.stats``), or None: statistics off, absent (an older cache: ``c2f
    cache-stats``), or a plain module, which computes its own."""
    if not use or "x_mean" not in batch or not is_fused(model):
        return None
    return batch["x_mean"].to(device, non_blocking=True), batch["x_var"].to(device, non_blocking=True)


@torch.inference_mode()
def collect(model: nn.Module, loader, device: torch.device, amp: str = "off", keep_attention: int = 0,
            cached_stats: bool = True) -> dict:
    """Runs ``model`` (unmixed) over ``loader``; numpy arrays ``logits [n, classes]``, ``attr_pred [n, A]``,
    ``labels [n]``, ``targets [n, A]``, ``rows [n]`` and ``attn`` (the first ``keep_attention`` maps, or None)."""
    was_training = model.training
    model.eval()
    out = {k: [] for k in ("logits", "attr_pred", "labels", "targets", "rows", "attn")}
    kept = 0
    for batch in loader:
        x = model_input(batch["x"], model, device)
        with autocast(device, amp):
            res = model(x, x_stats=model_stats(batch, model, device, cached_stats))
        out["logits"].append(res.logits.float().cpu().numpy())
        out["attr_pred"].append(res.attr_pred.float().cpu().numpy())
        out["labels"].append(batch["labels"].numpy())
        out["targets"].append(batch["attr_target"].numpy())
        out["rows"].append(batch["index"].numpy())
        if kept < keep_attention:
            out["attn"].append(res.attn[:keep_attention - kept].float().cpu().numpy())
            kept += len(out["attn"][-1])
    model.train(was_training)
    return concat([out])


def concat(parts: list) -> dict:
    """Outputs of several ``collect`` calls (e.g. one per process) joined row-wise."""
    joined = {}
    for key in ("logits", "attr_pred", "labels", "targets", "rows", "attn"):
        arrays = [a for p in parts for a in (p[key] if isinstance(p[key], list) else [p[key]]) if a is not None]
        joined[key] = np.concatenate(arrays) if arrays else None
    if joined["labels"] is None:
        joined.update(labels=np.empty(0, np.int64), rows=np.empty(0, np.int64))
    return joined


# --------------------------------------------------------------------------------- non-finite rows

# Each collected output, its name in messages, and the metrics it feeds.
FEEDS = (("logits", "logits", "ce, top1, top5, mean_class_acc"),
         ("attr_pred", "attribute predictions", "reg, attr_acc, attr_map"),
         ("targets", "attribute targets", "reg, attr_acc, attr_map"))
FINITE_METRICS = ("ce", "reg", "top1", "top5", "mean_class_acc", "attr_acc")   # attr_map is NaN by definition
LISTED = 10   # rows named in a message; the rest are counted


def _listed(rows: np.ndarray) -> str:
    more = f" and {len(rows) - LISTED} more" if len(rows) > LISTED else ""
    return f"{rows[:LISTED].tolist()}{more}"


def drop_nonfinite(outputs: dict, split: str, skip: bool, row_name: str = "cache rows") -> tuple:
    """``(outputs, dropped)``: ``outputs`` without the rows whose logits, attribute predictions or targets are
    not finite, and how many those were. Without ``skip`` such rows raise ``NonFiniteError`` naming the split,
    the rows and the metrics they would make non-finite."""
    n = len(outputs["rows"])
    found, bad = [], np.zeros(n, dtype=bool)
    for key, what, feeds in FEEDS:
        if n and outputs.get(key) is not None:
            rows_bad = ~np.isfinite(outputs[key].reshape(n, -1)).all(1)
            if rows_bad.any():
                found.append(f"{what} at {row_name} {_listed(outputs['rows'][rows_bad])} (its {feeds} would be "
                             "non-finite)")
                bad |= rows_bad
    if not bad.any():
        return outputs, 0
    if not skip:
        raise NonFiniteError(f"non-finite values on the {split} split: {'; '.join(found)}; {int(bad.sum())} of {n} "
                             "rows. Check those rows, or pass --skip-nonfinite to leave such rows out (counted as "
                             "nonfinite_rows)")
    log.warning("%s split: left out %d of %d rows with non-finite outputs (%s %s)", split, int(bad.sum()), n,
                row_name, _listed(outputs["rows"][bad]))
    keep = ~bad
    kept = {k: (v[keep] if v is not None and k != "attn" and len(v) == n else v) for k, v in outputs.items()}
    if outputs.get("attn") is not None:
        kept["attn"] = outputs["attn"][keep[:len(outputs["attn"])]]
    return kept, int(bad.sum())


def split_metrics(outputs: dict, split: str, num_classes: int, attr_loss: str, skip: bool = False) -> tuple:
    """``(metrics, outputs)`` of one split, rows with non-finite outputs refused or left out (``skip``, counted
    as ``nonfinite_rows``); a metric that is still not finite raises ``NonFiniteError`` naming it."""
    outputs, dropped = drop_nonfinite(outputs, split, skip)
    m = metrics.summarize(outputs, num_classes, attr_loss)
    bad = [f"{k} {m[k]}" for k in FINITE_METRICS if k in m and not np.isfinite(m[k])]
    if bad:
        raise NonFiniteError(f"the {split} split's {', '.join(bad)} although every row's outputs are finite (they "
                             "overflow the metric's precision); the model has diverged")
    if dropped:
        m["nonfinite_rows"] = dropped
    return m, outputs


# ------------------------------------------------------------------------------ eval / predict

def resolve_checkpoint(source: str) -> str:
    """``source`` itself if a file, else ``source/best.pt`` (a run directory)."""
    if os.path.isdir(source):
        path = os.path.join(source, "best.pt")
        if not os.path.isfile(path):
            raise model_file.CheckpointError(f"{source} has no best.pt (no finished epoch yet?)")
        return path
    if not os.path.isfile(source):
        raise model_file.CheckpointError(f"{source}: no such run directory or checkpoint file")
    return source


def open_model(source: str, device: torch.device) -> tuple:
    """``(model, checkpoint dict)`` from a run directory or a model file (``c2f.model_file.load_model``)."""
    path = resolve_checkpoint(source)
    model = model_file.load_model(path, map_location=device)
    model.eval()
    return model, model_file.read_model_file(path)


def _check_fits(model: nn.Module, cache: FeatureCache) -> None:
    args = model_file.model_args(model)
    c = cache.feature_shape[0]
    for name, have, want in (("channels", c, args["dim"]),
                             ("attributes", len(cache.attribute_names), args["num_parts"]),
                             ("classes", len(cache.class_names), args["num_classes"])):
        if have != want:
            raise ConfigError("features", f"{cache.directory} has {have} {name}; the model was trained with {want}")


def split_of(cache: FeatureCache, split: str, val_fraction: float, seed: int) -> np.ndarray:
    """Cache rows of ``split``: the cache's test split, the run's validation or training rows, or all."""
    if split not in SPLITS:
        raise ConfigError("split", f"must be one of {', '.join(SPLITS)}; got {split!r}")
    if split == "all":
        return np.arange(len(cache))
    train, val, test = split_rows(cache.labels, cache.is_train, val_fraction, seed)
    return dict(train=train, val=val, test=test)[split]


def evaluate_on_cache(source: str, features: str | None = None, split: str = "test", batch_size: int = 64,
                      device: str | None = None, amp: str = "off", num_workers: int = 0,
                      keep_attention: int = 0, verify: str = "size", skip_nonfinite: bool = False) -> tuple:
    """``(metrics, outputs, cache, ckpt)`` of a checkpoint on one split of a feature cache.

    ``features`` defaults to the cache the run trained on (a run trained from images: its images through its
    backbone, in evaluation views; ``cache`` is then an ``ImageSource``); val/train rows and the attribute targets
    follow the run's saved settings (seed, val_fraction, attr_target, attr_loss). Rows with non-finite
    outputs raise ``NonFiniteError``, or are left out and counted with ``skip_nonfinite``.
    """
    if batch_size <= 0:
        raise ConfigError("batch_size", f"must be > 0, got {batch_size}")
    if num_workers < 0:
        raise ConfigError("num_workers", f"must be >= 0, got {num_workers}")
    dev = resolve_device(device)
    amp = resolve_amp(amp, dev)
    model, ckpt = open_model(source, dev)
    cfg = ckpt.get("config") or {}
    features = features or cfg.get("features")
    if not features and not cfg.get("cub"):
        raise ConfigError("features", "the checkpoint does not name its feature cache; pass --features")
    if features:
        cache = FeatureCache(features, verify=verify)
    else:   # a run trained from images: its images, through its backbone, in evaluation views
        cache = ImageSource(cfg["cub"], cfg["backbone"], cfg.get("weights"), cfg.get("image_size", 448), dev,
                            amp if dev.type == "cuda" else "off")
    _check_fits(model, cache)
    rows = split_of(cache, split, cfg.get("val_fraction", 0.1), cfg.get("seed", 0))
    targets = attribute_targets(cfg.get("attr_target", "binary"), cache.attributes, cache.certainty,
                                cache.labels, cache.class_attributes)
    if features:
        loader = make_loader(cache, rows, targets, batch_size, shuffle=False, num_workers=num_workers)
    else:
        loader = cache.loader(rows, targets, batch_size, shuffle=False, augment=None,
                              eval_crop=cfg.get("eval_crop", EVAL_CROP), num_workers=num_workers)
    outputs = collect(model, loader, dev, amp, keep_attention)
    m, outputs = split_metrics(outputs, split, len(cache.class_names), cfg.get("attr_loss", "mse"), skip_nonfinite)
    return m, outputs, cache, ckpt


def prediction_rows(outputs: dict, class_names: list, attribute_names: list, attr_loss: str = "mse",
                    top_k: int = 5, names: list | None = None, labels: np.ndarray | None = None) -> list:
    """One dict per sample: the top-k classes with probabilities and the attributes predicted present."""
    logits = outputs["logits"].astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    scores = outputs["attr_pred"]
    scores = 1 / (1 + np.exp(-scores)) if attr_loss == "bce" else scores
    rows = []
    for i in range(len(logits)):
        r = dict(sample=names[i] if names is not None else int(outputs["rows"][i]))
        if labels is not None:
            r.update(label=int(labels[i]), label_name=class_names[int(labels[i])])
        best = order[i]
        r.update(pred=int(best[0]), pred_name=class_names[best[0]], prob=float(probs[i, best[0]]),
                 top_k=" ".join(str(int(k)) for k in best),
                 top_k_probs=" ".join(f"{probs[i, k]:.4f}" for k in best),
                 attributes=";".join(attribute_names[a] for a in np.flatnonzero(scores[i] > 0.5)))
        rows.append(r)
    return rows


@torch.inference_mode()
def predict_images(source: str, images: list, backbone: str | None = None, weights: str | None = None,
                   image_size: int | None = None, device: str | None = None, amp: str = "off",
                   batch_size: int = 16, skip_nonfinite: bool = False) -> tuple:
    """``(outputs, ckpt)`` for image files, through the extract backbone into the head.

    ``backbone``, ``weights`` and ``image_size`` default to those recorded in the manifest of the cache
    the run trained on, or those it recorded if it trained from images; features are rounded to that cache's
    dtype, as training saw them (an image run's images get its evaluation centre crop). ``rows`` index
    ``images``; images with non-finite outputs raise ``NonFiniteError`` (or are left out: ``skip_nonfinite``).
    """
    from .data.backbones import ImageFolderDataset, open_backbone
    from .data.extract import check_images
    dev = resolve_device(device)
    amp = resolve_amp(amp, dev)
    model, ckpt = open_model(source, dev)
    made, cfg = {}, ckpt.get("config") or {}
    features = cfg.get("features")
    if features and os.path.isfile(os.path.join(features, "manifest.json")):
        made = read_manifest(features)
    recorded = cfg if cfg.get("cub") else made.get("config", {})   # trained from images: the run's backbone
    backbone = backbone or recorded.get("backbone")
    if not backbone:
        raise ConfigError("backbone", "the checkpoint's feature cache names no backbone; pass --backbone")
    image_size = image_size or recorded.get("image_size") or 448
    if image_size <= 0:
        raise ConfigError("image_size", f"must be > 0, got {image_size}")
    check_images([os.path.abspath(p) for p in images], os.getcwd(), progress=False)
    net = open_backbone(backbone, weights if weights is not None else recorded.get("weights"), image_size)
    for key in ("backbone_sha256", "weights_sha256"):
        if recorded.get(key) and net.identity.get(key) and recorded[key] != net.identity[key]:
            log.warning("the %s file differs from the one the training cache was extracted with (%s)",
                        key.split("_")[0], key)
    net.module.to(dev)
    # As training saw them: a cache's plain resize and dtype, or an image run's centre views in the backbone's dtype.
    view = CenterView(net.image_size, cfg.get("eval_crop", EVAL_CROP)) if cfg.get("cub") else None
    dataset = ImageFolderDataset(images, net.image_size, transform=net.transform, view=view)
    dtype = None if cfg.get("cub") else getattr(torch, made.get("dtype", "float16"))
    parts = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([dataset[i] for i in range(start, min(start + batch_size, len(images)))]).to(dev)
        with autocast(dev, amp):
            x = net.module(batch)
            x = x if dtype is None else x.to(dtype)
        with autocast(dev, amp):
            res = model(model_input(x, model, dev))
        parts.append(dict(logits=res.logits.float().cpu().numpy(), attr_pred=res.attr_pred.float().cpu().numpy(),
                          labels=None, targets=None, rows=np.arange(start, start + len(batch)), attn=None))
    outputs = dict(concat(parts), rows=np.arange(len(images)))
    outputs, _ = drop_nonfinite(outputs, "--images", skip_nonfinite, row_name="images")
    return outputs, ckpt
