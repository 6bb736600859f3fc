"""PNG plots of a run: learning curves and attention maps on the feature grid (matplotlib, Agg).

matplotlib is optional (the ``plots`` extra); it is imported only when a plot is drawn.
"""
from __future__ import annotations

import numpy as np

from ..files import atomic_write


def _pyplot():
    from ..extras import require
    matplotlib = require("matplotlib", "plots", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))


def learning_curves(records: list, path: str) -> None:
    """Losses, accuracies and the attribute metric per epoch, from ``metrics.jsonl`` records."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    panels = (("regression loss", ("train_reg", "val_reg")), ("classification loss", ("train_ce", "val_ce")),
              ("accuracy (val)", ("val_top1", "val_top5", "val_mean_class_acc")),
              ("attributes (val)", ("val_attr_map", "val_attr_acc")))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            ys = [r.get(key) for r in records]
            if any(y is not None for y in ys):
                ax.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def pick_attributes(num_parts: int, count: int = 4) -> np.ndarray:
    return np.unique(np.linspace(0, num_parts - 1, count).round().astype(int))


def attention_maps(attn: np.ndarray, grid: tuple, attribute_names: list, labels, class_names: list,
                   path: str, attributes=None) -> None:
    """``attn [S, P, N]``: one row per sample, one column per attribute, maps on the ``grid`` (H, W).

    All maps share one colour scale (0 to the largest weight shown), with a colour bar beside them.
    """
    plt = _pyplot()
    attributes = pick_attributes(attn.shape[1]) if attributes is None else np.asarray(attributes)
    s, k = attn.shape[0], len(attributes)
    vmax = float(attn[:, attributes].max()) if attn.size else 1.0
    fig, axes = plt.subplots(s, k, figsize=(2.2 * k + 0.8, 2.2 * s), squeeze=False)
    image = None
    for i in range(s):
        for j, a in enumerate(attributes):
            ax = axes[i, j]
            image = ax.imshow(attn[i, a].reshape(grid), cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(attribute_names[a][:28], fontsize=7)
            if j == 0:
                ax.set_ylabel(class_names[int(labels[i])][:20], fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    _save(fig, path)
    plt.close(fig)
