"""Training the C2F head on a feature cache: stages, mixup, metrics, checkpoints, resume, DDP.

``train(TrainConfig(...))`` runs one stage and returns the held-out test metrics of the best epoch.
Run directory: ``config.json``, ``metrics.jsonl`` (one line per epoch), ``last.pt`` and ``best.pt``
(written atomically), ``final.json`` and PNG plots.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import losses, reference
from .data import CacheError, FeatureCache, attribute_targets, make_loader, synthesize

STAGES = ("attention", "fine", "joint")
HEADS = ("fused", "reference")
DEMO_CACHE = os.path.join(".cache", "c2f-demo")
# The demo: CUB's feature and attribute shapes, few classes and images so it trains in minutes on 2 cores.
DEMO_SYNTH = dict(num_classes=50, images_per_class=32, test_fraction=0.25, seed=0, shard_size=128)


@dataclass
class TrainConfig:
    features: Optional[str] = None        # cache directory; None: the demo cache (synthesized if absent)
    run_dir: Optional[str] = None         # None: runs/<stage>-<time>
    stage: str = "joint"
    head: str = "fused"                   # "fused" (c2f.nn) or "reference" (c2f.reference)
    init: Optional[str] = None            # checkpoint whose model weights start this run (stage chaining)
    freeze_attention: bool = False        # fine stage: train the classifier only
    epochs: int = 3                       # the demo's; CUB wants tens
    batch_size: int = 16                  # global: split over DDP processes
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.01
    attr_target: str = "binary"           # binary | calibrated | class
    attr_loss: str = "mse"                # mse | bce
    attr_weight: float = 5.0              # weight of the regression loss in the joint stage
    num_heads: int = 1
    mixup_alpha: float = 1.0
    mixup_mode: str = "binary"
    mixup_views: int = 1
    mixup_pairing: str = "flip"
    label_smoothing: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    num_workers: int = 2
    preload: bool = False
    verify: str = "full"
    device: Optional[str] = None
    stop_after: Optional[int] = None      # end this invocation after that many epochs (resumable)
    progress: bool = True
    plots: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name, value, allowed in (("stage", self.stage, STAGES), ("head", self.head, HEADS),
                                     ("attr_loss", self.attr_loss, ("mse", "bce"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError(f"epochs and batch_size must be positive, got {self.epochs}, {self.batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


# ------------------------------------------------------------------------------------------- helpers

class Dist:
    """Process-group facts; a single process when not launched by torchrun."""

    def __init__(self, device: Optional[str]):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        self.device = torch.device(f"cuda:{local}" if cuda and device in (None, "cuda") else (device or "cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list) -> list:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def split_rows(labels: np.ndarray, is_train: np.ndarray, val_fraction: float, seed: int):
    """``(train, val, test)`` row indices: val is carved per class from train, test is the cache's test split."""
    rng = np.random.default_rng([seed, 1])
    train, val = [], []
    for k in np.unique(labels[is_train]):
        rows = np.flatnonzero(is_train & (labels == k))
        rows = rows[rng.permutation(len(rows))]
        n_val = int(round(val_fraction * len(rows)))
        if val_fraction > 0 and len(rows) >= 2:
            n_val = max(n_val, 1)
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return (np.sort(np.concatenate(train)), np.sort(np.concatenate(val)), np.flatnonzero(~is_train))


def cosine_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def average_precision(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """AP per column of ``scores [n, A]`` against boolean ``positives``; NaN where a column has one class only."""
    order = np.argsort(-scores, axis=0, kind="stable")
    pos = np.take_along_axis(positives, order, 0).astype(np.float64)
    hits = np.cumsum(pos, 0)
    precision = hits / np.arange(1, len(scores) + 1)[:, None]
    n_pos = pos.sum(0)
    ap = (precision * pos).sum(0) / np.maximum(n_pos, 1)
    ap[(n_pos == 0) | (n_pos == len(scores))] = np.nan
    return ap


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    ranked = np.argsort(-logits, axis=1)
    top1 = ranked[:, 0] == labels
    top5 = (ranked[:, :min(5, num_classes)] == labels[:, None]).any(1)
    per_class = [top1[labels == k].mean() for k in np.unique(labels)]
    shifted = logits - logits.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return dict(ce=float(-logp[np.arange(len(labels)), labels].mean()), top1=float(top1.mean()),
                top5=float(top5.mean()), mean_class_acc=float(np.mean(per_class)))


# ----------------------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        cfg.validate()
        self.cfg = cfg
        self.dist = Dist(cfg.device)
        self.device = self.dist.device
        self.cuda = self.device.type == "cuda"
        features = cfg.features
        if features is None:
            features = DEMO_CACHE
            if self.dist.main:
                print(f"demo: synthetic cache at {features} ({DEMO_SYNTH['num_classes']} classes, "
                      "2048 x 14 x 14 features, 312 attributes; made if absent, finished if partial)")
                try:
                    synthesize(features, progress=cfg.progress, **DEMO_SYNTH)
                except CacheError:   # made by another version of the demo: replace it
                    synthesize(features, progress=cfg.progress, overwrite=True, **DEMO_SYNTH)
            self.dist.barrier()
        self.cache = FeatureCache(features, verify=cfg.verify, preload=cfg.preload)
        c, h, w = self.cache.feature_shape
        self.grid = (h, w)
        self.num_parts = len(self.cache.attribute_names)
        self.num_classes = len(self.cache.class_names)
        self.targets = attribute_targets(cfg.attr_target, self.cache.attributes, self.cache.certainty,
                                         self.cache.labels, self.cache.class_attributes)
        self.train_rows, self.val_rows, self.test_rows = split_rows(
            self.cache.labels, self.cache.is_train, cfg.val_fraction, cfg.seed)
        if len(self.train_rows) < cfg.batch_size:
            raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(self.train_rows)} training images")
        loader_args = dict(rank=self.dist.rank, world=self.dist.world, num_workers=cfg.num_workers,
                           pin_memory=self.cuda)
        self.train_loader = make_loader(self.cache, self.train_rows, self.targets, cfg.batch_size, shuffle=True,
                                        seed=cfg.seed, drop_last=True, **loader_args)
        self.eval_loaders = {name: make_loader(self.cache, rows, self.targets, cfg.batch_size, shuffle=False,
                                               **{**loader_args, "num_workers": min(cfg.num_workers, 1)})
                             for name, rows in (("val", self.val_rows), ("test", self.test_rows)) if len(rows)}

        torch.manual_seed(cfg.seed)
        head_cls = reference.C2FHead
        if cfg.head == "fused":
            from . import nn as c2f_nn
            head_cls = c2f_nn.C2FHead
        self.head = head_cls(dim=c, num_parts=self.num_parts, num_classes=self.num_classes,
                             num_heads=cfg.num_heads).to(self.device)
        if cfg.init:
            state = torch.load(cfg.init, map_location="cpu", weights_only=False)
            self.head.load_state_dict(state["model"])
        self._set_trainable()
        self.model = self.head
        if self.dist.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.head, device_ids=[self.device.index] if self.cuda else None)
        from .mixup import PartMixup
        self.mixup = PartMixup(cfg.mixup_alpha, cfg.mixup_mode, cfg.mixup_views, cfg.mixup_pairing,
                               self.num_classes, cfg.label_smoothing)
        params = [p for p in self.head.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_lambda(cfg.epochs * steps, max(1, int(cfg.warmup_epochs * steps)), cfg.min_lr_ratio))
        self.epoch, self.best, self.best_epoch = 0, None, None

        run_dir = cfg.run_dir or os.path.join("runs", f"{cfg.stage}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.run_dir = run_dir
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if resume:
            self._load(os.path.join(run_dir, "last.pt"))
        elif self.dist.main:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(dict(dataclasses.asdict(cfg), features=features, seed=cfg.seed), f, indent=1)
            open(self.metrics_path, "w").close()

    def _set_trainable(self) -> None:
        stage, h = self.cfg.stage, self.head
        train = dict(attention=stage != "fine" or not self.cfg.freeze_attention,
                     regressor=stage != "fine", classifier=stage != "attention")
        for name, flag in train.items():
            for p in getattr(h, name).parameters():
                p.requires_grad_(flag)

    # ------------------------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> dict:
        return dict(model=self.head.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), epoch=self.epoch, best=self.best,
                    best_epoch=self.best_epoch, rng=rng_state(), config=dataclasses.asdict(self.cfg))

    def _load(self, path: str) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"cannot resume: {path} not found")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.head.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best, self.best_epoch = state["epoch"], state["best"], state["best_epoch"]
        set_rng_state(state["rng"])
        if self.dist.main:
            print(f"resuming {self.run_dir} after epoch {self.epoch} of {self.cfg.epochs}", flush=True)
            # Drop lines of epochs logged after the checkpoint was taken.
            with open(self.metrics_path) as f:
                lines = [ln for ln in f if ln.strip() and json.loads(ln)["epoch"] <= self.epoch]
            with open(self.metrics_path, "w") as f:
                f.writelines(lines)

    # ------------------------------------------------------------------------------------- steps
    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def _inputs(self, batch: dict):
        x = batch["x"].to(self.device, non_blocking=True)
        x = x.to(torch.bfloat16 if self.cuda else torch.float32)
        labels = batch["labels"].to(self.device, non_blocking=True)
        return x, labels, batch["attr_target"].to(self.device, non_blocking=True)

    def _loss(self, x, labels, attr_target, generator):
        cfg = self.cfg
        reg = ce = None
        if cfg.stage == "attention":
            out = self.model(x)
        else:
            perm, mask = self.mixup.sample(x.shape[0], self.num_parts, self.device, generator)
            out = self.model(x, perm, mask)
            targets = reference.mix_targets(labels, perm, mask, self.num_classes, smoothing=cfg.label_smoothing)
            ce = losses.soft_cross_entropy(out.logits, targets)
        if cfg.stage != "fine":
            reg = losses.attribute_loss(out.attr_pred, attr_target, kind=cfg.attr_loss)
        if reg is None:
            return ce, reg, ce
        if ce is None:
            return reg, reg, ce
        return cfg.attr_weight * reg + ce, reg, ce

    def train_epoch(self) -> dict:
        self.model.train()
        self.train_loader.sampler.set_epoch(self.epoch)
        generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + self.epoch * 1_009 + self.dist.rank)
        sums = dict(reg=0.0, ce=0.0, steps=0.0, wait=0.0, compute=0.0)
        bar = tqdm(total=len(self.train_loader), desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                   unit="step", leave=False, disable=not (self.cfg.progress and self.dist.main))
        it = iter(self.train_loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            x, labels, attr_target = self._inputs(batch)
            t1 = time.perf_counter()
            with self._autocast():
                loss, reg, ce = self._loss(x, labels, attr_target, generator)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            sums["reg"] += reg.item() if reg is not None else 0.0
            sums["ce"] += ce.item() if ce is not None else 0.0
            if self.cuda:
                torch.cuda.synchronize(self.device)
            t2 = time.perf_counter()
            sums["steps"] += 1
            sums["wait"] += t1 - t0
            sums["compute"] += t2 - t1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        keys = list(sums)
        totals = dict(zip(keys, self.dist.sum([sums[k] for k in keys])))
        steps = max(totals["steps"], 1)
        w = self.dist.world
        return dict(train_reg=totals["reg"] / steps if self.cfg.stage != "fine" else None,
                    train_ce=totals["ce"] / steps if self.cfg.stage != "attention" else None,
                    data_wait_s=totals["wait"] / w, compute_s=totals["compute"] / w,
                    wait_frac=totals["wait"] / max(totals["wait"] + totals["compute"], 1e-12),
                    lr=self.scheduler.get_last_lr()[0])

    @torch.inference_mode()
    def evaluate(self, split: str, keep_attention: int = 0) -> dict:
        """Metrics on ``split`` ("val" or "test") over all processes; ``keep_attention`` samples' maps kept."""
        self.head.eval()
        logits, preds, labels, targets, rows, attn = [], [], [], [], [], []
        for batch in self.eval_loaders[split]:
            x, y, t = self._inputs(batch)
            with self._autocast():
                out = self.head(x)
            logits.append(out.logits.float().cpu().numpy())
            preds.append(out.attr_pred.float().cpu().numpy())
            labels.append(y.cpu().numpy())
            targets.append(t.cpu().numpy())
            rows.append(batch["index"].numpy())
            if sum(len(a) for a in attn) < keep_attention:
                attn.append(out.attn.float().cpu().numpy())
        local = [np.concatenate(v) if v else None for v in (logits, preds, labels, targets, rows)]
        parts = self.dist.gather(local)
        logits, preds, labels, targets, rows = (np.concatenate([p[i] for p in parts if p[i] is not None])
                                                for i in range(5))
        m = classification_metrics(logits, labels, self.num_classes)
        reg = losses.attribute_loss(torch.from_numpy(preds), torch.from_numpy(targets), kind=self.cfg.attr_loss)
        scores = 1 / (1 + np.exp(-preds)) if self.cfg.attr_loss == "bce" else preds
        positives = targets > 0.5
        m.update(reg=float(reg), attr_acc=float(((scores > 0.5) == positives).mean()),
                 attr_map=float(np.nanmean(average_precision(scores, positives))), n=int(len(labels)))
        if keep_attention:
            m["_attention"] = np.concatenate(attn)[:keep_attention] if attn else None
            m["_rows"] = rows[:keep_attention]
        return m

    # ----------------------------------------------------------------------------------- the loop
    def _score(self, val: dict) -> tuple:
        """Higher is better; ties on top-1 go to the lower validation cross-entropy."""
        return (-val["reg"],) if self.cfg.stage == "attention" else (val["top1"], -val["ce"])

    def fit(self) -> dict:
        cfg, main = self.cfg, self.dist.main
        ran = 0
        while self.epoch < cfg.epochs:
            if cfg.stop_after is not None and ran >= cfg.stop_after:
                return {}
            start = time.perf_counter()
            train = self.train_epoch()
            self.epoch += 1
            ran += 1
            val = self.evaluate("val") if "val" in self.eval_loaders else None
            record = dict(epoch=self.epoch, **train, epoch_s=time.perf_counter() - start)
            if val is not None:
                record.update({f"val_{k}": v for k, v in val.items()})
            improved = val is None or self.best is None or self._score(val) > tuple(self.best)
            if improved:
                self.best, self.best_epoch = (self._score(val) if val else None), self.epoch
            if main:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                atomic_save(self._checkpoint(), os.path.join(self.run_dir, "last.pt"))
                if improved:
                    atomic_save(dict(model=self.head.state_dict(), epoch=self.epoch, metrics=val),
                                os.path.join(self.run_dir, "best.pt"))
                print(format_epoch(record, cfg.epochs), flush=True)
            self.dist.barrier()
        return self.finish()

    def finish(self) -> dict:
        self.dist.barrier()   # best.pt is written by process 0; torchrun's processes share one file system
        best = torch.load(os.path.join(self.run_dir, "best.pt"), map_location="cpu", weights_only=False)
        self.head.load_state_dict(best["model"])
        test = self.evaluate("test") if "test" in self.eval_loaders else {}
        val = self.evaluate("val", keep_attention=4) if "val" in self.eval_loaders else {}
        result = dict(best_epoch=self.best_epoch, test=test, num_classes=self.num_classes,
                      chance=1.0 / self.num_classes, run_dir=self.run_dir)
        if self.dist.main:
            with open(os.path.join(self.run_dir, "final.json"), "w") as f:
                json.dump(result, f, indent=1)
            if self.cfg.plots:
                from . import plots
                with open(self.metrics_path) as f:
                    records = [json.loads(ln) for ln in f if ln.strip()]
                plots.learning_curves(records, os.path.join(self.run_dir, "curves.png"))
                if val.get("_attention") is not None:
                    plots.attention_maps(val["_attention"], self.grid, self.cache.attribute_names,
                                         self.cache.labels[val["_rows"]], self.cache.class_names,
                                         os.path.join(self.run_dir, "attention.png"))
            print(format_final(result), flush=True)
        return result

    def close(self) -> None:
        self.dist.close()


def format_epoch(r: dict, epochs: int) -> str:
    def f(key, fmt):
        v = r.get(key)
        return "-" if v is None else format(v, fmt)
    return (f"epoch {r['epoch']}/{epochs} | train reg {f('train_reg', '.4f')} ce {f('train_ce', '.4f')} | "
            f"val reg {f('val_reg', '.4f')} ce {f('val_ce', '.4f')} top1 {f('val_top1', '.1%')} "
            f"top5 {f('val_top5', '.1%')} mean-class {f('val_mean_class_acc', '.1%')} "
            f"attr-acc {f('val_attr_acc', '.1%')} attr-mAP {f('val_attr_map', '.3f')} | "
            f"data wait {r['data_wait_s']:.2f}s compute {r['compute_s']:.1f}s ({r['wait_frac']:.1%} waiting)")


def format_final(result: dict) -> str:
    t = result["test"]
    if not t:
        return f"done: no test split; run directory {result['run_dir']}"
    return (f"\n== held-out test split, best epoch {result['best_epoch']} ({t['n']} images, "
            f"{result['num_classes']} classes, chance {result['chance']:.1%}) ==\n"
            f"   top-1 {t['top1']:.1%}   top-5 {t['top5']:.1%}   mean per-class {t['mean_class_acc']:.1%}   "
            f"attr-acc {t['attr_acc']:.1%}   attr-mAP {t['attr_map']:.3f}   reg {t['reg']:.4f}\n"
            f"   run directory: {result['run_dir']}")


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Runs ``cfg`` (or resumes ``cfg.run_dir``) and returns the final metrics (empty if stopped early)."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def load_run_config(run_dir: str) -> TrainConfig:
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in names})
