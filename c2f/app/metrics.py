"""Metrics of the C2F head, shared by training, ``c2f eval`` and ``c2f predict``, and their formatting."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import torch

from .. import losses
from ..files import atomic_write_text

# The metrics of one split, in the order they are printed and written.
METRIC_KEYS = ("n", "top1", "top5", "mean_class_acc", "ce", "reg", "attr_acc", "attr_map")


def average_precision(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """AP per column of ``scores [n, A]`` against boolean ``positives [n, A]``, ``[A]`` float64.

    The step-wise area under the precision-recall curve, with one point per distinct score (tied scores
    enter together), as scikit-learn's ``average_precision_score``: ``sum_k (R_k - R_{k-1}) P_k``. So the
    result does not depend on the order of the rows. NaN where a column holds one class only.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    order = np.argsort(-scores, axis=0, kind="stable")
    ranked = np.take_along_axis(scores, order, 0)
    pos = np.take_along_axis(np.asarray(positives, dtype=bool), order, 0).astype(np.float64)
    hits = np.cumsum(pos, 0)
    # Each row takes the precision at the last row of its run of tied scores (the threshold's point).
    last_of_run = np.ones_like(ranked, dtype=bool)
    last_of_run[:-1] = ranked[1:] != ranked[:-1]
    ends = np.where(last_of_run, np.arange(n)[:, None], n)
    ends = np.minimum.accumulate(ends[::-1], axis=0)[::-1]
    precision = np.take_along_axis(hits, ends, 0) / (ends + 1)
    n_pos = pos.sum(0)
    ap = (precision * pos).sum(0) / np.maximum(n_pos, 1)
    ap[(n_pos == 0) | (n_pos == n)] = np.nan
    return ap


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """``ce``, ``top1``, ``top5`` and ``mean_class_acc`` of ``logits [n, classes]`` against ``labels [n]``."""
    logits = np.asarray(logits, dtype=np.float64)
    ranked = np.argsort(-logits, axis=1, kind="stable")
    top1 = ranked[:, 0] == labels
    top5 = (ranked[:, :min(5, num_classes)] == labels[:, None]).any(1)
    per_class = [top1[labels == k].mean() for k in np.unique(labels)]
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return dict(ce=float(-logp[np.arange(len(labels)), labels].mean()), top1=float(top1.mean()),
                top5=float(top5.mean()), mean_class_acc=float(np.mean(per_class)))


def attribute_metrics(preds: np.ndarray, targets: np.ndarray, attr_loss: str) -> dict:
    """``reg`` (the training loss), ``attr_acc`` and ``attr_map`` (mean AP over attributes) of ``[n, A]``."""
    reg = losses.attribute_loss(torch.from_numpy(np.asarray(preds, np.float32)),
                                torch.from_numpy(np.asarray(targets, np.float32)), kind=attr_loss)
    scores = 1 / (1 + np.exp(-preds)) if attr_loss == "bce" else preds
    positives = targets > 0.5
    ap = average_precision(scores, positives)
    return dict(reg=float(reg), attr_acc=float(((scores > 0.5) == positives).mean()),
                attr_map=float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"))


def summarize(outputs: dict, num_classes: int, attr_loss: str) -> dict:
    """The metrics of one split from collected ``outputs`` (``logits``, ``attr_pred``, ``labels``, ``targets``)."""
    m = dict(n=int(len(outputs["labels"])))
    if m["n"] == 0:
        return m
    m.update(classification_metrics(outputs["logits"], outputs["labels"], num_classes))
    m.update(attribute_metrics(outputs["attr_pred"], outputs["targets"], attr_loss))
    return m


# ------------------------------------------------------------------------------------ formatting

def _f(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def format_epoch(r: dict, epochs: int) -> str:
    skipped = f" | skipped {r['skipped_batches']} non-finite batches" if r.get("skipped_batches") else ""
    if r.get("val_nonfinite_rows"):
        skipped += f" | left out {r['val_nonfinite_rows']} non-finite val rows"
    return (f"epoch {r['epoch']}/{epochs} | train reg {_f(r.get('train_reg'), '.4f')} ce "
            f"{_f(r.get('train_ce'), '.4f')} | val reg {_f(r.get('val_reg'), '.4f')} ce {_f(r.get('val_ce'), '.4f')} "
            f"top1 {_f(r.get('val_top1'), '.1%')} top5 {_f(r.get('val_top5'), '.1%')} mean-class "
            f"{_f(r.get('val_mean_class_acc'), '.1%')} attr-acc {_f(r.get('val_attr_acc'), '.1%')} attr-mAP "
            f"{_f(r.get('val_attr_map'), '.3f')} | data wait {r['data_wait_s']:.2f}s compute "
            f"{r['compute_s']:.1f}s ({r['wait_frac']:.1%} waiting){skipped}")


def format_metrics(m: dict) -> str:
    """One line: accuracy and attribute metrics of one split."""
    left_out = f"; {m['nonfinite_rows']} non-finite rows left out" if m.get("nonfinite_rows") else ""
    if not m.get("n"):
        return f"no images{left_out}"
    return (f"top-1 {m['top1']:.1%}   top-5 {m['top5']:.1%}   mean per-class {m['mean_class_acc']:.1%}   "
            f"attr-acc {m['attr_acc']:.1%}   attr-mAP {_f(m['attr_map'], '.3f')}   ce {m['ce']:.4f}   "
            f"reg {m['reg']:.4f}   ({m['n']} images{left_out})")


def format_final(result: dict) -> str:
    t = result.get("test")
    if not t:
        return f"done: no test split; run directory {result['run_dir']}"
    return (f"== held-out test split, best epoch {result['best_epoch']} ({t['n']} images, "
            f"{result['num_classes']} classes, chance {result['chance']:.1%}) ==\n"
            f"   {format_metrics(t)}\n   run directory: {result['run_dir']}")


def format_table(rows: list, columns: list) -> str:
    """A plain text table of ``rows`` (dicts) under ``columns`` (``(key, title, format)``)."""
    cells = [[title for _, title, _ in columns]]
    cells += [[_f(r.get(key), fmt) if fmt else str(r.get(key, "-")) for key, _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


# ----------------------------------------------------------------------------------- writing

def csv_text(records: list, columns: list | None = None) -> str:
    """CSV of ``records`` (dicts) with a header; columns in first-seen order unless given; missing: empty."""
    if columns is None:
        columns = []
        for r in records:
            columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return buf.getvalue()


def write_records(path: str, records, columns: list | None = None) -> None:
    """Writes ``records`` (a dict or a list of dicts) as JSON, or as CSV when ``path`` ends in ``.csv``."""
    if path.endswith(".csv"):
        atomic_write_text(path, csv_text(records if isinstance(records, list) else [records], columns))
    else:
        atomic_write_text(path, json.dumps(records, indent=1) + "\n")
